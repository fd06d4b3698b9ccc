// NICE kernels on CUDA (float32, NCHW): the hard-concrete test-time mask (NICE Eq. 11) and
// the mixed-resolution composition (Eq. 12), shared by the ONNX Runtime CUDA custom ops
// (keepbits_ort_cuda.cc) and the TensorRT plugins (keepbits_trt_plugin.cc).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace keepbits {
namespace cuda {

// ẑ = clamp(σ(log α / β)(ζ − γ) + γ, 0, 1)
struct Gate {
  float beta = 2.0f / 3.0f;
  float gamma = -0.1f;
  float zeta = 1.1f;
};

struct Shape {
  int64_t n, c, h, w, b;
};

// Scratch bytes that mixed_res / mask_compose need (the block means), 0 when b == 1.
size_t compose_workspace_bytes(const Shape& s);

// Eq. 11 over `count` values.
cudaError_t hard_concrete(const float* log_alpha, float* mask, int64_t count, Gate g, cudaStream_t stream);

// Eq. 12 with a given mask (N×1×H×W). `workspace` holds compose_workspace_bytes(s).
cudaError_t mixed_res(const float* x, const float* mask, float* mixed, const Shape& s, void* workspace, cudaStream_t stream);

// Fused: ẑ from log α (written to `mask`) and x̃, two launches (block means, then gate + blend).
cudaError_t mask_compose(const float* log_alpha, const float* x, float* mask, float* mixed, const Shape& s, Gate g,
                         void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace keepbits
