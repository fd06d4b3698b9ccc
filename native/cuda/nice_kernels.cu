// CUDA implementation of nice_kernels.cuh. Block means: one warp per (n, c, block) cell,
// lanes stride over the cell and reduce with shuffles; edge cells divide by the pixels
// they hold. Blend: one thread per output element, x̃ = x_b + ẑ (x − x_b); the fused
// kernel computes ẑ on the fly from log α (the channel-0 thread writes the mask).
#include "nice_kernels.cuh"

namespace keepbits {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float gate_value(float log_alpha, Gate g) {
  const float s = 1.0f / (1.0f + __expf(-log_alpha / g.beta));
  return fminf(1.0f, fmaxf(0.0f, s * (g.zeta - g.gamma) + g.gamma));
}

__global__ void hard_concrete_kernel(const float* __restrict__ la, float* __restrict__ mask, int64_t count, Gate g) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x)
    mask[i] = gate_value(la[i], g);
}

__global__ void block_means_kernel(const float* __restrict__ x, float* __restrict__ means, Shape s, int64_t hb, int64_t wb) {
  const int64_t warps_per_block = blockDim.x / 32;
  const int64_t cell = blockIdx.x * warps_per_block + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t cells = s.n * s.c * hb * wb;
  if (cell >= cells) return;
  const int64_t bj = cell % wb, bi = (cell / wb) % hb, plane = cell / (wb * hb);
  const int64_t r0 = bi * s.b, c0 = bj * s.b;
  const int64_t rows = min(s.b, s.h - r0), cols = min(s.b, s.w - c0);
  const float* base = x + plane * s.h * s.w + r0 * s.w + c0;
  double sum = 0.0;  // double: b×b cells up to the whole image stay exact to ~1e-7
  for (int64_t k = lane; k < rows * cols; k += 32) sum += base[(k / cols) * s.w + k % cols];
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
  if (lane == 0) means[cell] = float(sum / double(rows * cols));
}

template <bool kFused>
__global__ void blend_kernel(const float* __restrict__ x, const float* __restrict__ means, const float* __restrict__ mask_or_la,
                             float* __restrict__ mask_out, float* __restrict__ mixed, Shape s, int64_t hb, int64_t wb, Gate g) {
  const int64_t total = s.n * s.c * s.h * s.w;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t col = i % s.w, row = (i / s.w) % s.h, ch = (i / (s.w * s.h)) % s.c, img = i / (s.w * s.h * s.c);
    const int64_t pixel = (img * s.h + row) * s.w + col;
    float z;
    if (kFused) {
      z = gate_value(mask_or_la[pixel], g);
      if (ch == 0) mask_out[pixel] = z;
    } else {
      z = mask_or_la[pixel];
    }
    const float xv = x[i];
    const float m = s.b == 1 ? xv : means[((img * s.c + ch) * hb + row / s.b) * wb + col / s.b];
    mixed[i] = m + z * (xv - m);
  }
}

int grid_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return int(blocks < 65535 * 32 ? (blocks > 0 ? blocks : 1) : 65535 * 32);
}

cudaError_t compose(const float* x, const float* mask_or_la, float* mask_out, float* mixed, const Shape& s, Gate g,
                    void* workspace, cudaStream_t stream, bool fused) {
  const int64_t hb = (s.h + s.b - 1) / s.b, wb = (s.w + s.b - 1) / s.b;
  float* means = static_cast<float*>(workspace);
  if (s.b > 1) {
    const int64_t cells = s.n * s.c * hb * wb;
    const int warps = kThreads / 32;
    block_means_kernel<<<int((cells + warps - 1) / warps), kThreads, 0, stream>>>(x, means, s, hb, wb);
  }
  const int grid = grid_for(s.n * s.c * s.h * s.w);
  if (fused)
    blend_kernel<true><<<grid, kThreads, 0, stream>>>(x, means, mask_or_la, mask_out, mixed, s, hb, wb, g);
  else
    blend_kernel<false><<<grid, kThreads, 0, stream>>>(x, means, mask_or_la, nullptr, mixed, s, hb, wb, g);
  return cudaGetLastError();
}

}  // namespace

size_t compose_workspace_bytes(const Shape& s) {
  if (s.b <= 1) return 0;
  return size_t(s.n * s.c * ((s.h + s.b - 1) / s.b) * ((s.w + s.b - 1) / s.b)) * sizeof(float);
}

cudaError_t hard_concrete(const float* log_alpha, float* mask, int64_t count, Gate g, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  hard_concrete_kernel<<<grid_for(count), kThreads, 0, stream>>>(log_alpha, mask, count, g);
  return cudaGetLastError();
}

cudaError_t mixed_res(const float* x, const float* mask, float* mixed, const Shape& s, void* workspace, cudaStream_t stream) {
  if (s.n * s.c * s.h * s.w == 0) return cudaSuccess;
  return compose(x, mask, nullptr, mixed, s, Gate{}, workspace, stream, false);
}

cudaError_t mask_compose(const float* log_alpha, const float* x, float* mask, float* mixed, const Shape& s, Gate g,
                         void* workspace, cudaStream_t stream) {
  if (s.n * s.h * s.w == 0) return cudaSuccess;
  if (s.c == 0) return hard_concrete(log_alpha, mask, s.n * s.h * s.w, g, stream);
  return compose(x, log_alpha, mask, mixed, s, g, workspace, stream, true);
}

}  // namespace cuda
}  // namespace keepbits
