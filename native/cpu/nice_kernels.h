// NICE kernels on the CPU: the hard-concrete test-time mask (NICE Eq. 11) and the
// mixed-resolution composition (Eq. 12), float32, NCHW. Plain loops written so that
// gcc/clang -O3 vectorise them; no ONNX Runtime types here (see keepbits_ort.cc).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
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
// 1.5·2^23 rounds x·log2(e) to the integer n and leaves n in the low mantissa bits, so no
// float-to-int conversion is needed; branch-free, so that the calling loops vectorise
// (with -fno-trapping-math -fno-signed-zeros, see CMakeLists.txt).
inline float fast_exp(float x) {
  const float round_magic = 12582912.0f;  // 1.5 · 2^23
  const int32_t magic_bits = 0x4B400000;  // bit pattern of round_magic
  x = clamp(x, -80.0f, 80.0f);
  const float t = x * 1.44269504089f + round_magic;
  const float n = t - round_magic;
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;  // ln2 split hi + lo
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t t_bits;
  std::memcpy(&t_bits, &t, sizeof t_bits);
  const int32_t scale_bits = (t_bits - magic_bits + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof scale);
  return p * scale;
}

#if defined(__AVX2__) && defined(__FMA__)
// fast_exp on 8 lanes: the same reduction and polynomial, with min/max clamps (the scalar
// ternaries compile to compare+blend chains) and the 2^n bits built with integer lanes.
inline __m256 fast_exp8(__m256 x) {
  const __m256 round_magic = _mm256_set1_ps(12582912.0f);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-80.0f)), _mm256_set1_ps(80.0f));
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504089f), round_magic);
  const __m256 n = _mm256_sub_ps(t, round_magic);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(0x4B400000)),
                                                          _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
#endif

// Eq. 11 over `count` contiguous values (8 lanes at a time with AVX2+FMA, scalar tail).
inline void hard_concrete(const float* __restrict log_alpha, float* __restrict mask, int64_t count, const Gate& g) {
  const float neg_inv_beta = -1.0f / g.beta;
  const float span = g.zeta - g.gamma;
  const float gamma = g.gamma;
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 v_scale = _mm256_set1_ps(neg_inv_beta), v_span = _mm256_set1_ps(span), v_gamma = _mm256_set1_ps(gamma);
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  for (; i + 8 <= count; i += 8) {
    const __m256 e = fast_exp8(_mm256_mul_ps(_mm256_loadu_ps(log_alpha + i), v_scale));
    const __m256 z = _mm256_fmadd_ps(_mm256_div_ps(one, _mm256_add_ps(one, e)), v_span, v_gamma);
    _mm256_storeu_ps(mask + i, _mm256_min_ps(_mm256_max_ps(z, zero), one));
  }
#endif
  for (; i < count; ++i) {
    const float s = 1.0f / (1.0f + fast_exp(log_alpha[i] * neg_inv_beta));
    mask[i] = clamp(s * span + gamma, 0.0f, 1.0f);
  }
}

// Shapes of one composition: x is N×C×H×W, the mask N×1×H×W, b the block size.
// Column sums of `rows` rows of width `w` (row stride w) into `a`: float within chunks of
// ≤ kChunkRows rows (≤ 7 roundings), the chunks added in double, so tall blocks lose no
// precision. AVX2: 8 columns per register, one pass over x; the scalar tail adds in the same order.
constexpr int64_t kChunkRows = 8;

inline void column_sums(const float* __restrict x, int64_t rows, int64_t w, double* __restrict a) {
  int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; j + 8 <= w; j += 8) {
    __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
    for (int64_t c0 = 0; c0 < rows; c0 += kChunkRows) {
      const int64_t c1 = std::min(c0 + kChunkRows, rows);
      __m256 part = _mm256_loadu_ps(x + c0 * w + j);
      for (int64_t r = c0 + 1; r < c1; ++r) part = _mm256_add_ps(part, _mm256_loadu_ps(x + r * w + j));
      lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(part)));
      hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(part, 1)));
    }
    _mm256_storeu_pd(a + j, lo);
    _mm256_storeu_pd(a + j + 4, hi);
  }
#endif
  for (; j < w; ++j) {
    double sum = 0.0;
    for (int64_t c0 = 0; c0 < rows; c0 += kChunkRows) {
      const int64_t c1 = std::min(c0 + kChunkRows, rows);
      float part = x[c0 * w + j];
      for (int64_t r = c0 + 1; r < c1; ++r) part += x[r * w + j];
      sum += part;
    }
    a[j] = sum;
  }
}

struct ComposeShape {
  int64_t n, c, h, w, b;
  bool stream = false;  // write x̃ with streaming (non-temporal) stores, for outputs larger than L2
  int64_t block_rows() const { return (h + b - 1) / b; }
};

// Eq. 12 for one image `n` and one block row `block_row` (rows [b·block_row, b·block_row + b) ∩ [0, H)),
// all channels. For each channel: sum the block's rows into `acc` (double, one pass over x),
// reduce `acc` per block column to the block means (edge blocks divide by the pixels they
// hold), then blend the same rows, still in cache: x̃ = x_b + ẑ (x − x_b).
// Fused MaskCompose: `log_alpha` given, the mask rows are computed first into `mask_out`;
// MixedResCompose: `log_alpha` null, the mask is read from `mask_in`.
inline void compose_block_row(const float* x, const float* log_alpha, const float* mask_in, float* mask_out, float* mixed,
                              const ComposeShape& s, const Gate& g, int64_t n, int64_t block_row,
                              std::vector<double>& acc, std::vector<float>& means) {
  const int64_t r0 = block_row * s.b;
  const int64_t r1 = std::min(r0 + s.b, s.h);
  const int64_t rows = r1 - r0;
  const int64_t plane = s.h * s.w;
  const int64_t offset = n * plane + r0 * s.w;
  const float* z = nullptr;
  if (log_alpha != nullptr) {
    hard_concrete(log_alpha + offset, mask_out + offset, rows * s.w, g);
    z = mask_out + offset;
  } else {
    z = mask_in + offset;
  }
  acc.resize(static_cast<size_t>(s.w));
  means.resize(static_cast<size_t>(s.w));
  for (int64_t c = 0; c < s.c; ++c) {
    const float* xc = x + (n * s.c + c) * plane + r0 * s.w;
    float* oc = mixed + (n * s.c + c) * plane + r0 * s.w;
    if (s.b == 1) {  // x_b = x, so x̃ = x
      std::memcpy(oc, xc, sizeof(float) * static_cast<size_t>(rows * s.w));
      continue;
    }
    double* a = acc.data();
    column_sums(xc, rows, s.w, a);
    float* m = means.data();
    for (int64_t j0 = 0; j0 < s.w; j0 += s.b) {
      const int64_t j1 = std::min(j0 + s.b, s.w);
      double sum = 0.0;
      for (int64_t j = j0; j < j1; ++j) sum += a[j];
      const float mean = static_cast<float>(sum / static_cast<double>(rows * (j1 - j0)));
      for (int64_t j = j0; j < j1; ++j) m[j] = mean;
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = xc + r * s.w;
      const float* zr = z + r * s.w;
      float* orow = oc + r * s.w;
      int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
      if (s.stream && reinterpret_cast<uintptr_t>(orow) % 32 == 0) {  // x̃ is write-only here: no read for ownership
        for (; j + 8 <= s.w; j += 8) {
          const __m256 mj = _mm256_loadu_ps(m + j);
          _mm256_stream_ps(orow + j, _mm256_fmadd_ps(_mm256_loadu_ps(zr + j), _mm256_sub_ps(_mm256_loadu_ps(xr + j), mj), mj));
        }
      }
#endif
      for (; j < s.w; ++j) orow[j] = m[j] + zr[j] * (xr[j] - m[j]);
    }
  }
#if defined(__AVX2__) && defined(__FMA__)
  if (s.stream) _mm_sfence();  // streaming stores visible before the task returns
#endif
}

}  // namespace keepbits
