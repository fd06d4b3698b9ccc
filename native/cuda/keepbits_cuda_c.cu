// Plain C entry points of nice_kernels.cu (libkeepbits_cuda_c.so), for callers without ONNX
// Runtime or TensorRT: Python through ctypes (bench/gpu_check.py runs them on torch CUDA
// tensors). Pointers are device pointers; `stream` is a cudaStream_t (0: the legacy default
// stream); every call returns its cudaError_t as an int (0 = success), which
// keepbits_cuda_error_string turns into text. Shapes are NCHW float32; the mask is N×1×H×W.
#include "nice_kernels.cuh"

#define KEEPBITS_C_API extern "C" __attribute__((visibility("default")))

namespace {

namespace kc = keepbits::cuda;

kc::Shape MakeShape(int64_t n, int64_t c, int64_t h, int64_t w, int64_t b) { return kc::Shape{n, c, h, w, b}; }

// The ONNX Runtime and TensorRT glue check shapes and block_size before calling the kernels; so does this one.
bool Valid(const kc::Shape& s) { return s.n >= 0 && s.c >= 0 && s.h >= 0 && s.w >= 0 && s.b >= 1; }

}  // namespace

// Bytes of device scratch that mixed_res / mask_compose need for this shape (0 when b == 1; -1: invalid shape).
KEEPBITS_C_API int64_t keepbits_cuda_workspace_bytes(int64_t n, int64_t c, int64_t h, int64_t w, int64_t b) {
  const kc::Shape s = MakeShape(n, c, h, w, b);
  return Valid(s) ? int64_t(kc::compose_workspace_bytes(s)) : -1;
}

// NICE Eq. 11 over `count` values.
KEEPBITS_C_API int keepbits_cuda_hard_concrete(const float* log_alpha, float* mask, int64_t count, float beta, float gamma,
                                               float zeta, void* stream) {
  if (count < 0) return int(cudaErrorInvalidValue);
  return int(kc::hard_concrete(log_alpha, mask, count, kc::Gate{beta, gamma, zeta}, static_cast<cudaStream_t>(stream)));
}

// NICE Eq. 12 with a given mask.
KEEPBITS_C_API int keepbits_cuda_mixed_res(const float* x, const float* mask, float* mixed, int64_t n, int64_t c, int64_t h,
                                           int64_t w, int64_t b, void* workspace, void* stream) {
  const kc::Shape s = MakeShape(n, c, h, w, b);
  if (!Valid(s)) return int(cudaErrorInvalidValue);
  return int(kc::mixed_res(x, mask, mixed, s, workspace, static_cast<cudaStream_t>(stream)));
}

// Fused Eqs. 11–12: ẑ from log α (written to `mask`) and x̃.
KEEPBITS_C_API int keepbits_cuda_mask_compose(const float* log_alpha, const float* x, float* mask, float* mixed, int64_t n,
                                              int64_t c, int64_t h, int64_t w, int64_t b, float beta, float gamma, float zeta,
                                              void* workspace, void* stream) {
  const kc::Shape s = MakeShape(n, c, h, w, b);
  if (!Valid(s)) return int(cudaErrorInvalidValue);
  return int(kc::mask_compose(log_alpha, x, mask, mixed, s, kc::Gate{beta, gamma, zeta}, workspace, static_cast<cudaStream_t>(stream)));
}

KEEPBITS_C_API const char* keepbits_cuda_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }
