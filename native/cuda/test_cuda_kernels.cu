// GPU check of nice_kernels.cu against the CPU kernels (cpu/nice_kernels.h, themselves tested
// against keepbits.core): random log α and x, batch 1–8, odd sizes, b ∈ {1, 2, 8, size}, both
// the fused and the unfused path. Prints the worst errors and how many values differ from the
// CPU kernels' in any bit (b = 1 must give x̃ = x exactly, as the CPU kernels do); exit code 1
// above 1e-5 or when a b = 1 x̃ differs from x.
//   native/build/keepbits_cuda_test [seed]
#include <cmath>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <random>
#include <vector>

#include "../cpu/nice_kernels.h"
#include "nice_kernels.cuh"

#define CHECK(call)                                                                      \
  do {                                                                                   \
    cudaError_t e_ = (call);                                                             \
    if (e_ != cudaSuccess) {                                                             \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
      std::exit(2);                                                                      \
    }                                                                                    \
  } while (0)

static float* to_device(const std::vector<float>& v) {
  float* d = nullptr;
  CHECK(cudaMalloc(&d, v.size() * sizeof(float) + 1));
  CHECK(cudaMemcpy(d, v.data(), v.size() * sizeof(float), cudaMemcpyHostToDevice));
  return d;
}

static std::vector<float> to_host(const float* d, size_t n) {
  std::vector<float> v(n);
  CHECK(cudaMemcpy(v.data(), d, n * sizeof(float), cudaMemcpyDeviceToHost));
  return v;
}

static double max_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double worst = 0.0;
  for (size_t i = 0; i < a.size(); ++i) worst = std::fmax(worst, std::fabs(double(a[i]) - double(b[i])));
  return worst;
}

static int64_t bits_differ(const std::vector<float>& a, const std::vector<float>& b) {
  int64_t count = 0;
  for (size_t i = 0; i < a.size(); ++i) count += std::memcmp(&a[i], &b[i], sizeof(float)) != 0;
  return count;
}

int main(int argc, char** argv) {
  const unsigned seed = argc > 1 ? unsigned(std::strtoul(argv[1], nullptr, 10)) : std::random_device{}();
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  double worst_mask = 0.0, worst_mixed = 0.0;
  int64_t mask_values = 0, mixed_values = 0, mask_differ = 0, mixed_differ = 0, b1_not_x = 0;
  const int sizes[][2] = {{37, 51}, {1, 1}, {224, 224}, {int(rng() % 60) + 1, int(rng() % 60) + 1}};
  for (const auto& hw : sizes) {
    const int64_t h = hw[0], w = hw[1], n = int64_t(rng() % 8) + 1, c = 3;
    for (int64_t b : {int64_t(1), int64_t(2), int64_t(8), std::max(h, w)}) {
      std::vector<float> la(n * h * w), x(n * c * h * w);
      for (auto& v : la) v = normal(rng);
      for (auto& v : x) v = uniform(rng);
      std::vector<float> ref_mask(la.size()), ref_mixed(x.size());
      keepbits::Gate g;
      keepbits::ComposeShape s{n, c, h, w, b};
      std::vector<double> acc;
      std::vector<float> means;
      for (int64_t i = 0; i < n; ++i)
        for (int64_t r = 0; r < s.block_rows(); ++r)
          keepbits::compose_block_row(x.data(), la.data(), nullptr, ref_mask.data(), ref_mixed.data(), s, g, i, r, acc, means);
      const keepbits::cuda::Shape cs{n, c, h, w, b};
      float *d_la = to_device(la), *d_x = to_device(x), *d_mask = to_device(ref_mask), *d_mixed = to_device(ref_mixed);
      void* ws = nullptr;
      CHECK(cudaMalloc(&ws, keepbits::cuda::compose_workspace_bytes(cs) + 1));
      for (int fused = 0; fused < 2; ++fused) {
        CHECK(cudaMemset(d_mixed, 0, x.size() * sizeof(float)));
        if (fused) {
          CHECK(cudaMemset(d_mask, 0, la.size() * sizeof(float)));
          CHECK(keepbits::cuda::mask_compose(d_la, d_x, d_mask, d_mixed, cs, keepbits::cuda::Gate{}, ws, 0));
        } else {
          CHECK(keepbits::cuda::hard_concrete(d_la, d_mask, int64_t(la.size()), keepbits::cuda::Gate{}, 0));
          CHECK(keepbits::cuda::mixed_res(d_x, d_mask, d_mixed, cs, ws, 0));
        }
        CHECK(cudaDeviceSynchronize());
        const std::vector<float> mask = to_host(d_mask, la.size()), mixed = to_host(d_mixed, x.size());
        worst_mask = std::fmax(worst_mask, max_diff(mask, ref_mask));
        worst_mixed = std::fmax(worst_mixed, max_diff(mixed, ref_mixed));
        mask_values += int64_t(mask.size());
        mixed_values += int64_t(mixed.size());
        mask_differ += bits_differ(mask, ref_mask);
        mixed_differ += bits_differ(mixed, ref_mixed);
        if (b == 1) b1_not_x += bits_differ(mixed, x);
      }
      for (void* p : {static_cast<void*>(d_la), static_cast<void*>(d_x), static_cast<void*>(d_mask), static_cast<void*>(d_mixed), ws})
        CHECK(cudaFree(p));
    }
  }
  std::printf("{\"seed\": %u, \"mask_max_abs\": %.3g, \"mixed_max_abs\": %.3g, \"mask_values\": %lld, "
              "\"mask_bits_differ\": %lld, \"mixed_values\": %lld, \"mixed_bits_differ\": %lld, \"b1_mixed_not_x\": %lld}\n",
              seed, worst_mask, worst_mixed, (long long)mask_values, (long long)mask_differ, (long long)mixed_values,
              (long long)mixed_differ, (long long)b1_not_x);
  return worst_mask <= 1e-5 && worst_mixed <= 1e-5 && b1_not_x == 0 ? 0 : 1;
}
