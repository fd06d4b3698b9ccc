// Codec helpers of keepbits.codec, exported with C linkage and called through ctypes (the
// ONNX Runtime kernels of this library are registered separately, see keepbits_ort.cc).
//
// keepbits_block_means: the rounded b×b block means x_b of a uint8 image (NICE Eq. 12's
// background), edge blocks averaging the pixels they hold, exactly as keepbits.core.block_means
// followed by numpy's rint (integer sums, ties to even).
//
// keepbits_png_paeth: PNG filter type 4 (Paeth) of n scanlines. For every byte x with left
// neighbour a (channels bytes back), upper b and upper-left c (0 outside the image), the
// predictor is whichever of a, b, c is nearest to p = a + b − c, ties to a then b, and the
// output is x − predictor modulo 256. |p − a| = |b − c|, |p − b| = |a − c| and
// |p − c| = |a + b − 2c|, so no intermediate leaves 16-bit range and the loop vectorises.
//
// keepbits_kept_blocks / keepbits_mosaic: the blocks payload's foreground, as the numpy path of
// keepbits.codec.payload (_kept_blocks, _mosaic) computes it: which th×tw tiles (th = min(b, h),
// tw = min(b, w)) hold a kept pixel, and those tiles of x̃ (x where kept, the block's mean
// elsewhere, pixels beyond the frame included) laid out row-major, `cols` tiles per mosaic row.
//
// keepbits_blocks_scanlines: the pixel work of a lossless blocks payload in one call, so that a
// Python caller holds the interpreter lock only around it (several stream workers encode in
// parallel): block means, kept tiles, the mosaic in ⌈√k⌉ columns, and the Paeth scanlines of
// the mosaic and (optionally) of the means grid, as the calls above compute them one by one.
#include <cmath>
#include <cstddef>
#include <cstring>
#include <cstdint>
#include <vector>

namespace {

inline uint8_t PaethByte(int x, int a, int b, int c) {
  int da = b - c, db = a - c, dc = a + b - 2 * c;
  da = da < 0 ? -da : da;
  db = db < 0 ? -db : db;
  dc = dc < 0 ? -dc : dc;
  int predictor = (da <= db && da <= dc) ? a : (db <= dc ? b : c);
  return static_cast<uint8_t>(x - predictor);
}

}  // namespace

extern "C" {

// image: h × w × channels bytes, contiguous; out: ⌈h/b⌉ × ⌈w/b⌉ × channels bytes. Per block row,
// column sums over its rows (a loop over contiguous bytes that vectorises), then per block the
// sum of its columns, divided in float64 and rounded half to even (as numpy's rint of the
// float64 mean; exact: below 2^40 pixels per block a quotient that is not a tie lies further from
// one than float64's error, and a tie is exact). Returns 0, or -1 on bad sizes.
__attribute__((visibility("default"))) int keepbits_block_means(const uint8_t* image, int64_t h, int64_t w, int64_t channels,
                                                                 int64_t b, uint8_t* out) {
  if (h < 1 || w < 1 || channels < 1 || b < 1 || (b > h ? h : b) > (int64_t{1} << 24)) return -1;  // 32-bit column sums
  const int64_t row = w * channels, bw = (w + b - 1) / b;
  if ((b > w ? w : b) * (b > h ? h : b) >= (int64_t{1} << 40)) return -1;
  std::vector<uint32_t> columns(static_cast<size_t>(row));
  uint32_t* col = columns.data();
  for (int64_t top = 0; top < h; top += b) {
    const int64_t rows = h - top < b ? h - top : b;
    const uint8_t* src = image + top * row;
    for (int64_t i = 0; i < row; ++i) col[i] = src[i];
    for (int64_t y = 1; y < rows; ++y) {
      const uint8_t* r = src + y * row;
      for (int64_t i = 0; i < row; ++i) col[i] += r[i];
    }
    uint8_t* dst = out + (top / b) * bw * channels;
    for (int64_t bx = 0; bx < bw; ++bx) {
      const int64_t x0 = bx * b, cols = w - x0 < b ? w - x0 : b;
      const double count = static_cast<double>(rows * cols);
      for (int64_t ch = 0; ch < channels; ++ch) {
        uint64_t sum = 0;
        for (int64_t x = x0; x < x0 + cols; ++x) sum += col[x * channels + ch];
        dst[bx * channels + ch] = static_cast<uint8_t>(std::nearbyint(static_cast<double>(sum) / count));
      }
    }
  }
  return 0;
}

// rows: n rows of row_bytes bytes, contiguous; above: the row before rows[0], or null for the
// first row of the image; out: n × (1 + row_bytes) bytes, each row its filter-type byte (4)
// and the filtered bytes. Returns 0, or -1 on bad sizes.
__attribute__((visibility("default"))) int keepbits_png_paeth(const uint8_t* rows, const uint8_t* above, int64_t n,
                                                               int64_t row_bytes, int64_t channels, uint8_t* out) {
  if (n < 0 || row_bytes < 0 || channels < 1 || (row_bytes > 0 && row_bytes < channels)) return -1;
  for (int64_t y = 0; y < n; ++y) {
    const uint8_t* x = rows + y * row_bytes;
    const uint8_t* up = y ? x - row_bytes : above;
    uint8_t* o = out + y * (row_bytes + 1);
    *o++ = 4;
    if (up == nullptr) {  // first image row: b = c = 0, so the predictor is a
      for (int64_t i = 0; i < channels && i < row_bytes; ++i) o[i] = x[i];
      for (int64_t i = channels; i < row_bytes; ++i) o[i] = static_cast<uint8_t>(x[i] - x[i - channels]);
      continue;
    }
    for (int64_t i = 0; i < channels && i < row_bytes; ++i) o[i] = static_cast<uint8_t>(x[i] - up[i]);  // a = c = 0
    for (int64_t i = channels; i < row_bytes; ++i) o[i] = PaethByte(x[i], x[i - channels], up[i], up[i - channels]);
  }
  return 0;
}

// keep: h × w bytes (0 or 1); kept: ⌈h/b⌉ × ⌈w/b⌉ flags written. Per tile row, the OR of its
// rows (a vectorising loop), then per tile the OR of its columns. Returns the number of kept
// tiles, or -1 on bad sizes.
__attribute__((visibility("default"))) int keepbits_kept_blocks(const uint8_t* keep, int64_t h, int64_t w, int64_t b,
                                                                 uint8_t* kept) {
  if (h < 1 || w < 1 || b < 1) return -1;
  const int64_t th = b < h ? b : h, tw = b < w ? b : w, bh = (h + th - 1) / th, bw = (w + tw - 1) / tw;
  if (bh * bw > (int64_t{1} << 30)) return -1;
  std::vector<uint8_t> band(static_cast<size_t>(w));
  uint8_t* any = band.data();
  int count = 0;
  for (int64_t i = 0; i < bh; ++i) {
    const int64_t top = i * th, rows = h - top < th ? h - top : th;
    const uint8_t* src = keep + top * w;
    for (int64_t x = 0; x < w; ++x) any[x] = src[x];
    for (int64_t y = 1; y < rows; ++y) {
      const uint8_t* r = src + y * w;
      for (int64_t x = 0; x < w; ++x) any[x] |= r[x];
    }
    for (int64_t j = 0; j < bw; ++j) {
      const int64_t x0 = j * tw, x1 = x0 + tw < w ? x0 + tw : w;
      uint8_t flag = 0;
      for (int64_t x = x0; x < x1; ++x) flag |= any[x];
      kept[i * bw + j] = flag != 0;
      count += flag != 0;
    }
  }
  return count;
}

// image: h × w × channels; keep: h × w (0/1); grid: ⌈h/th⌉ × ⌈w/tw⌉ × channels block means;
// kept: the flags of keepbits_kept_blocks; out: (rows · th) × (cols · tw) × channels, zeroed by
// the caller, rows = ⌈k / cols⌉. Returns 0, or -1 on bad sizes.
__attribute__((visibility("default"))) int keepbits_mosaic(const uint8_t* image, const uint8_t* keep, const uint8_t* grid,
                                                            const uint8_t* kept, int64_t h, int64_t w, int64_t channels,
                                                            int64_t th, int64_t tw, int64_t cols, uint8_t* out) {
  if (h < 1 || w < 1 || channels < 1 || th < 1 || th > h || tw < 1 || tw > w || cols < 1) return -1;
  const int64_t bh = (h + th - 1) / th, bw = (w + tw - 1) / tw;
  const int64_t out_row = cols * tw * channels;
  int64_t t = 0;
  for (int64_t i = 0; i < bh; ++i) {
    for (int64_t j = 0; j < bw; ++j) {
      if (!kept[i * bw + j]) continue;
      const uint8_t* mean = grid + (i * bw + j) * channels;
      uint8_t* tile = out + (t / cols) * th * out_row + (t % cols) * tw * channels;
      const int64_t x0 = j * tw;
      const bool whole_row = x0 + tw <= w;  // the tile's columns all lie inside the frame
      for (int64_t yy = 0; yy < th; ++yy) {
        const int64_t y = i * th + yy;
        uint8_t* dst = tile + yy * out_row;
        if (y < h && whole_row) {  // the row's pixels, then the means where the mask drops one
          std::memcpy(dst, image + (y * w + x0) * channels, static_cast<size_t>(tw * channels));
          const uint8_t* k = keep + y * w + x0;
          for (int64_t xx = 0; xx < tw; ++xx)
            if (!k[xx]) std::memcpy(dst + xx * channels, mean, static_cast<size_t>(channels));
          continue;
        }
        for (int64_t xx = 0; xx < tw; ++xx) {
          const int64_t x = x0 + xx;
          const bool inside = y < h && x < w;
          const uint8_t* src = inside && keep[y * w + x] ? image + (y * w + x) * channels : mean;
          for (int64_t ch = 0; ch < channels; ++ch) dst[xx * channels + ch] = src[ch];
        }
      }
      ++t;
    }
  }
  return 0;
}

// grid: ⌈h/b⌉ × ⌈w/b⌉ × channels; kept: the tile flags; background_lines: Paeth scanlines of the
// grid (bh × (1 + bw · channels)) or null; foreground_lines: Paeth scanlines of the mosaic, at
// most foreground_capacity bytes; mosaic_size: its height and width in pixels (0 × 0 when no tile
// is kept). Returns k, the number of kept tiles; -1 on bad sizes, -2 when the capacity is short.
__attribute__((visibility("default"))) int keepbits_blocks_scanlines(const uint8_t* image, const uint8_t* keep, int64_t h,
                                                                      int64_t w, int64_t channels, int64_t b, uint8_t* grid,
                                                                      uint8_t* kept, uint8_t* background_lines,
                                                                      uint8_t* foreground_lines, int64_t foreground_capacity,
                                                                      int64_t* mosaic_size) {
  mosaic_size[0] = mosaic_size[1] = 0;
  if (keepbits_block_means(image, h, w, channels, b, grid) != 0) return -1;
  const int k = keepbits_kept_blocks(keep, h, w, b, kept);
  if (k < 0) return -1;
  const int64_t th = b < h ? b : h, tw = b < w ? b : w, bh = (h + th - 1) / th, bw = (w + tw - 1) / tw;
  if (background_lines != nullptr && keepbits_png_paeth(grid, nullptr, bh, bw * channels, channels, background_lines) != 0)
    return -1;
  if (k == 0) return 0;
  int64_t cols = 1;
  while (cols * cols < k) ++cols;  // ⌈√k⌉
  const int64_t rows = (k + cols - 1) / cols, mh = rows * th, mw = cols * tw;
  if (mh * (1 + mw * channels) > foreground_capacity) return -2;
  std::vector<uint8_t> mosaic(static_cast<size_t>(mh * mw * channels), 0);
  if (keepbits_mosaic(image, keep, grid, kept, h, w, channels, th, tw, cols, mosaic.data()) != 0) return -1;
  if (keepbits_png_paeth(mosaic.data(), nullptr, mh, mw * channels, channels, foreground_lines) != 0) return -1;
  mosaic_size[0] = mh;
  mosaic_size[1] = mw;
  return k;
}

}  // extern "C"
