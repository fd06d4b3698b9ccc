// NICE kernels on the CPU: the hard-concrete test-time mask (NICE Eq. 11) and the
// mixed-resolution composition (Eq. 12), float32, NCHW. Plain loops written so that
// gcc/clang -O3 vectorise them; no ONNX Runtime types here (see keepbits_ort.cc).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
// gcc 12's AVX-512 intrinsics start from a self-initialised "undefined" register, which
// -Wmaybe-uninitialized reports once inlined (fixed in gcc 13): silence that false positive.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#define KEEPBITS_LANES 1
#endif

namespace keepbits {

// ẑ = clamp(σ(log α / β)(ζ − γ) + γ, 0, 1)
struct Gate {
  float beta = 2.0f / 3.0f;
  float gamma = -0.1f;
  float zeta = 1.1f;
};

inline float clamp(float x, float lo, float hi) {
  x = x < lo ? lo : x;
  return x > hi ? hi : x;
}

// exp(x) for x in [-80, 80]: Cody–Waite reduction x = n ln2 + r, |r| ≤ ln2/2, degree-6
// polynomial for e^r (relative error < 2e-7), 2^n assembled in the exponent bits. Adding
// 1.5·2^23 + 127 rounds x·log2(e) to the integer n and leaves n + 127 (in [11, 243]) in the
// low mantissa bits; shifting the bits of t left by 23 drops the rest and leaves exactly the
// bits of 2^n, so no float-to-int conversion is needed.
// Branch-free, so that the calling loops vectorise (with -fno-trapping-math -fno-signed-zeros,
// see CMakeLists.txt).
constexpr float kRoundBias = 12583039.0f;  // 1.5 · 2^23 + 127

inline float fast_exp(float x) {
  x = clamp(x, -80.0f, 80.0f);
  const float t = x * 1.44269504089f + kRoundBias;
  const float n = t - kRoundBias;
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;  // ln2 split hi + lo
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  uint32_t bits;
  std::memcpy(&bits, &t, sizeof bits);
  bits <<= 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

#if defined(KEEPBITS_LANES)
// One register of float lanes and the few operations the kernels need, so that each kernel is
// written once. AVX-512: 16 lanes, which halve the instructions of the compute-bound gate and
// also speed up the column sums and the blend (measured on Zen 5); AVX2+FMA: 8 lanes.
#if defined(__AVX512F__)
struct Lanes {
  using F = __m512;
  using D = __m512d;  // half a register of lanes, in double
  static constexpr int64_t kWidth = 16;
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static void stream(float* p, F v) { _mm512_stream_ps(p, v); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }    // a·b + c
  static F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }  // c − a·b
  static F min(F a, F b) { return _mm512_min_ps(a, b); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F shift_bits_23(F v) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(v), 23)); }
  static D zero_d() { return _mm512_setzero_pd(); }
  static D add_low_half(D acc, F v) { return _mm512_add_pd(acc, _mm512_cvtps_pd(_mm512_castps512_ps256(v))); }
  static D add_high_half(D acc, F v) {
    return _mm512_add_pd(acc, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
  }
  static void store_d(double* p, D v) { _mm512_storeu_pd(p, v); }
  // Each group of 8 lanes (columns [0, 8) and [8, 16)) replaced by its sum: pairs, quads, octets.
  static F group8_sums(F v) {
    v = add(v, _mm512_permute_ps(v, _MM_SHUFFLE(2, 3, 0, 1)));
    v = add(v, _mm512_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2)));
    return add(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
  }
};
#else
struct Lanes {
  using F = __m256;
  using D = __m256d;
  static constexpr int64_t kWidth = 8;
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static void stream(float* p, F v) { _mm256_stream_ps(p, v); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static F min(F a, F b) { return _mm256_min_ps(a, b); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static F shift_bits_23(F v) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(v), 23)); }
  static D zero_d() { return _mm256_setzero_pd(); }
  static D add_low_half(D acc, F v) { return _mm256_add_pd(acc, _mm256_cvtps_pd(_mm256_castps256_ps128(v))); }
  static D add_high_half(D acc, F v) { return _mm256_add_pd(acc, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1))); }
  static void store_d(double* p, D v) { _mm256_storeu_pd(p, v); }
  // The register's 8 lanes (one group of 8 columns) replaced by their sum: pairs, quads, octet.
  static F group8_sums(F v) {
    v = add(v, _mm256_permute_ps(v, _MM_SHUFFLE(2, 3, 0, 1)));
    v = add(v, _mm256_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2)));
    return add(v, _mm256_permute2f128_ps(v, v, 1));
  }
};
#endif

// fast_exp on all lanes: the same reduction and polynomial, with min/max clamps (the scalar
// ternaries compile to compare+blend chains).
inline Lanes::F fast_exp_lanes(Lanes::F x) {
  using L = Lanes;
  const L::F bias = L::set1(kRoundBias);
  x = L::min(L::max(x, L::set1(-80.0f)), L::set1(80.0f));
  const L::F t = L::fmadd(x, L::set1(1.44269504089f), bias);
  const L::F n = L::sub(t, bias);
  L::F r = L::fnmadd(n, L::set1(0.693145751953125f), x);
  r = L::fnmadd(n, L::set1(1.428606765330187e-06f), r);
  L::F p = L::set1(1.0f / 720.0f);
  p = L::fmadd(p, r, L::set1(1.0f / 120.0f));
  p = L::fmadd(p, r, L::set1(1.0f / 24.0f));
  p = L::fmadd(p, r, L::set1(1.0f / 6.0f));
  p = L::fmadd(p, r, L::set1(0.5f));
  p = L::fmadd(p, r, L::set1(1.0f));
  p = L::fmadd(p, r, L::set1(1.0f));
  return L::mul(p, L::shift_bits_23(t));
}
#endif

// Eq. 11 over `count` contiguous values (a register of lanes at a time, scalar tail).
inline void hard_concrete(const float* __restrict log_alpha, float* __restrict mask, int64_t count, const Gate& g) {
  const float neg_inv_beta = -1.0f / g.beta;
  const float span = g.zeta - g.gamma;
  const float gamma = g.gamma;
  int64_t i = 0;
#if defined(KEEPBITS_LANES)
  using L = Lanes;
  const L::F v_scale = L::set1(neg_inv_beta), v_span = L::set1(span), v_gamma = L::set1(gamma);
  const L::F one = L::set1(1.0f), zero = L::set1(0.0f);
  for (; i + L::kWidth <= count; i += L::kWidth) {
    const L::F e = fast_exp_lanes(L::mul(L::load(log_alpha + i), v_scale));
    L::store(mask + i, L::min(L::max(L::add(L::div(v_span, L::add(one, e)), v_gamma), zero), one));
  }
#endif
  for (; i < count; ++i) mask[i] = clamp(span / (1.0f + fast_exp(log_alpha[i] * neg_inv_beta)) + gamma, 0.0f, 1.0f);
}

// Column sums of `rows` rows of `count` columns (row stride `stride`) into `a`: float within
// chunks of ≤ kChunkRows rows (≤ 7 roundings), the chunks added in double, so tall blocks lose
// no precision. A register of columns at a time, one pass over x; the scalar tail adds in the same order.
constexpr int64_t kChunkRows = 8;

inline void column_sums(const float* __restrict x, int64_t rows, int64_t count, int64_t stride, double* __restrict a) {
  int64_t j = 0;
#if defined(KEEPBITS_LANES)
  using L = Lanes;
  for (; j + L::kWidth <= count; j += L::kWidth) {
    L::D lo = L::zero_d(), hi = L::zero_d();
    for (int64_t c0 = 0; c0 < rows; c0 += kChunkRows) {
      const int64_t c1 = std::min(c0 + kChunkRows, rows);
      L::F part = L::load(x + c0 * stride + j);
      for (int64_t r = c0 + 1; r < c1; ++r) part = L::add(part, L::load(x + r * stride + j));
      lo = L::add_low_half(lo, part);
      hi = L::add_high_half(hi, part);
    }
    L::store_d(a + j, lo);
    L::store_d(a + j + L::kWidth / 2, hi);
  }
#endif
  for (; j < count; ++j) {
    double sum = 0.0;
    for (int64_t c0 = 0; c0 < rows; c0 += kChunkRows) {
      const int64_t c1 = std::min(c0 + kChunkRows, rows);
      float part = x[c0 * stride + j];
      for (int64_t r = c0 + 1; r < c1; ++r) part += x[r * stride + j];
      sum += part;
    }
    a[j] = sum;
  }
}

// Shapes of one composition: x is N×C×H×W, the mask N×1×H×W, b the block size.
struct ComposeShape {
  int64_t n, c, h, w, b;
  bool stream = false;  // write x̃ with streaming (non-temporal) stores; needs streamable_rows(x̃, w)
  int64_t block_rows() const { return (h + b - 1) / b; }
};

// Whether the blend's registers of x̃ (rows of width w from p) all start on aligned addresses
// with no scalar tail, as streaming stores need (a regular store into a line that is being
// streamed costs more than the stream saves).
inline bool streamable_rows(const float* p, int64_t w) {
#if defined(KEEPBITS_LANES)
  return reinterpret_cast<uintptr_t>(p) % sizeof(Lanes::F) == 0 && w % Lanes::kWidth == 0;
#else
  (void)p;
  (void)w;
  return false;
#endif
}

// One block row of one image: rows [r0, r0 + rows); x and x̃ at channel 0, ẑ (one channel).
struct BlockRow {
  const float* x;
  const float* z;
  float* mixed;
  int64_t rows;
};

#if defined(KEEPBITS_LANES)
// The paper's block size b = 8 on a full block row, per channel a register of columns
// (kWidth / 8 blocks) at a time: the 8 rows of x are loaded once, summed per column (float, 7
// roundings), reduced per group of 8 lanes to the block sums (3 more roundings) and blended with
// the rows of ẑ. The means need no row buffer and x is read once instead of twice. One channel
// at a time keeps 16 rows in flight (x and x̃; ẑ's 8 rows stay in L1): computing ẑ in the same
// tiles for all channels at once (48 rows in flight) measured 1.2× slower at 1×3×256×256 with
// 64-byte-aligned buffers and 1.6× with numpy's (16 bytes off).
// Returns the columns done (the registers that fit in w); the caller finishes the rest.
constexpr int64_t kTileBlock = 8;

inline int64_t compose_tiles8(const BlockRow& br, const ComposeShape& s) {
  using L = Lanes;
  const int64_t w = s.w, plane = s.h * s.w;
  const int64_t done = w - w % L::kWidth;
  const L::F inv_count = L::set1(1.0f / static_cast<float>(kTileBlock * kTileBlock));
  for (int64_t c = 0; c < s.c; ++c) {
    const float* xc = br.x + c * plane;
    float* oc = br.mixed + c * plane;
    for (int64_t j = 0; j < done; j += L::kWidth) {
      L::F xr[kTileBlock];
      L::F sum = xr[0] = L::load(xc + j);
      for (int64_t r = 1; r < kTileBlock; ++r) sum = L::add(sum, xr[r] = L::load(xc + r * w + j));
      const L::F mean = L::mul(L::group8_sums(sum), inv_count);
      for (int64_t r = 0; r < kTileBlock; ++r) {
        const L::F v = L::fmadd(L::load(br.z + r * w + j), L::sub(xr[r], mean), mean);
        if (s.stream) {  // x̃ is write-only here: no read for ownership
          L::stream(oc + r * w + j, v);
        } else {
          L::store(oc + r * w + j, v);
        }
      }
    }
  }
  return done;
}
#endif

// Eq. 12 for columns [j0, w) of a block row, any b: per channel, sum the rows into `acc`
// (double, one pass over x), reduce `acc` per block column to the block means (edge blocks
// divide by the pixels they hold), then blend the same rows, still in cache:
// x̃ = x_b + ẑ (x − x_b). j0 is a multiple of b.
inline void compose_columns(const BlockRow& br, const ComposeShape& s, int64_t j0, std::vector<double>& acc,
                            std::vector<float>& means) {
  const int64_t w = s.w, plane = s.h * s.w, count = w - j0;
  acc.resize(static_cast<size_t>(count));
  means.resize(static_cast<size_t>(count));
  for (int64_t c = 0; c < s.c; ++c) {
    const float* xc = br.x + c * plane + j0;
    float* oc = br.mixed + c * plane + j0;
    if (s.b == 1) {  // x_b = x, so x̃ = x
      for (int64_t r = 0; r < br.rows; ++r) std::memcpy(oc + r * w, xc + r * w, sizeof(float) * static_cast<size_t>(count));
      continue;
    }
    double* a = acc.data();
    column_sums(xc, br.rows, count, w, a);
    float* m = means.data();
    for (int64_t k0 = 0; k0 < count; k0 += s.b) {
      const int64_t k1 = std::min(k0 + s.b, count);
      double sum = 0.0;
      for (int64_t k = k0; k < k1; ++k) sum += a[k];
      const float mean = static_cast<float>(sum / static_cast<double>(br.rows * (k1 - k0)));
      for (int64_t k = k0; k < k1; ++k) m[k] = mean;
    }
    for (int64_t r = 0; r < br.rows; ++r) {
      const float* xr = xc + r * w;
      const float* zr = br.z + r * w + j0;
      float* orow = oc + r * w;
      int64_t k = 0;
#if defined(KEEPBITS_LANES)
      using L = Lanes;
      for (; k + L::kWidth <= count; k += L::kWidth) {
        const L::F mk = L::load(m + k);
        const L::F v = L::fmadd(L::load(zr + k), L::sub(L::load(xr + k), mk), mk);
        if (s.stream) {
          L::stream(orow + k, v);
        } else {
          L::store(orow + k, v);
        }
      }
#endif
      for (; k < count; ++k) orow[k] = m[k] + zr[k] * (xr[k] - m[k]);
    }
  }
}

// Eq. 12 for one image `n` and one block row `block_row` (rows [b·block_row, b·block_row + b) ∩ [0, H)),
// all channels. Fused MaskCompose (`log_alpha` given): ẑ for these rows is first computed into
// `mask_out` (one contiguous pass); MixedResCompose (`log_alpha` null) reads it from `mask_in`.
// b = 8 block rows go through compose_tiles8 where registers fit; the rest (other b, the last
// rows and columns) through compose_columns.
inline void compose_block_row(const float* x, const float* log_alpha, const float* mask_in, float* mask_out, float* mixed,
                              const ComposeShape& s, const Gate& g, int64_t n, int64_t block_row,
                              std::vector<double>& acc, std::vector<float>& means) {
  const int64_t r0 = block_row * s.b;
  const int64_t rows = std::min(r0 + s.b, s.h) - r0;
  const int64_t plane = s.h * s.w;
  const int64_t offset = n * plane + r0 * s.w;
  const int64_t x_offset = n * s.c * plane + r0 * s.w;
  const float* z = nullptr;
  if (log_alpha != nullptr) {
    hard_concrete(log_alpha + offset, mask_out + offset, rows * s.w, g);
    z = mask_out + offset;
  } else {
    z = mask_in + offset;
  }
  const BlockRow br{x + x_offset, z, mixed + x_offset, rows};
  int64_t j0 = 0;
#if defined(KEEPBITS_LANES)
  if (s.b == kTileBlock && rows == kTileBlock) j0 = compose_tiles8(br, s);
#endif
  if (j0 < s.w) compose_columns(br, s, j0, acc, means);
#if defined(KEEPBITS_LANES)
  if (s.stream) _mm_sfence();  // streaming stores visible before the task returns
#endif
}

}  // namespace keepbits
