// ONNX Runtime CUDA custom-op library for the `keepbits` domain (CUDAExecutionProvider):
// the ops of cpu/keepbits_ort.cc on ORT's compute stream, kernels in nice_kernels.cu.
// Register it instead of the CPU library in sessions that use the CUDA execution provider.
#include <cuda_runtime.h>

#include "../ort_common.h"
#include "nice_kernels.cuh"

namespace {

using namespace keepbits_ort;
namespace kc = keepbits::cuda;

kc::Gate ToGate(const GateAttrs& a) { return kc::Gate{a.beta, a.gamma, a.zeta}; }

OrtStatus* CudaStatus(const OrtApi* api, cudaError_t err, const char* what) {
  if (err == cudaSuccess) return nullptr;
  return api->CreateStatus(ORT_RUNTIME_EXCEPTION, (std::string(what) + ": " + cudaGetErrorString(err)).c_str());
}

OrtStatus* Stream(const OrtApi* api, OrtKernelContext* ctx, cudaStream_t* stream) {
  void* raw = nullptr;
  KB_TRY(api->KernelContext_GetGPUComputeStream(ctx, &raw));
  *stream = static_cast<cudaStream_t>(raw);
  return nullptr;
}

struct Cuda {
  static constexpr const char* kProvider = "CUDAExecutionProvider";

  static OrtStatus* HardConcrete(const Kernel& k, OrtKernelContext* ctx) {
    Tensor la;
    KB_TRY(ReadInput(k.api, ctx, 0, &la));
    float* mask = nullptr;
    KB_TRY(MakeOutput(k.api, ctx, 0, la.shape, &mask));
    cudaStream_t stream;
    KB_TRY(Stream(k.api, ctx, &stream));
    return CudaStatus(k.api, kc::hard_concrete(la.data, mask, Numel(la.shape), ToGate(k.gate), stream), "HardConcreteMask");
  }

  static OrtStatus* Compose(const Kernel& k, OrtKernelContext* ctx) {
    const bool fused = k.kind == Kind::kMaskCompose;
    const char* op = fused ? "MaskCompose" : "MixedResCompose";
    Tensor x, m;
    KB_TRY(ReadComposeInputs(k, ctx, &x, &m));
    const kc::Shape shape{x.shape[0], x.shape[1], x.shape[2], x.shape[3], k.block_size};
    float* mask = nullptr;
    float* mixed = nullptr;
    if (fused) KB_TRY(MakeOutput(k.api, ctx, 0, m.shape, &mask));
    KB_TRY(MakeOutput(k.api, ctx, fused ? 1 : 0, x.shape, &mixed));
    cudaStream_t stream;
    KB_TRY(Stream(k.api, ctx, &stream));
    void* workspace = nullptr;
    const size_t bytes = kc::compose_workspace_bytes(shape);
    if (bytes) KB_TRY(CudaStatus(k.api, cudaMallocAsync(&workspace, bytes, stream), op));
    const cudaError_t err = fused ? kc::mask_compose(m.data, x.data, mask, mixed, shape, ToGate(k.gate), workspace, stream)
                                  : kc::mixed_res(x.data, m.data, mixed, shape, workspace, stream);
    if (workspace) cudaFreeAsync(workspace, stream);
    return CudaStatus(k.api, err, op);
  }
};

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  return RegisterDomain<Cuda>(options, api_base);
}
