// ONNX Runtime glue shared by the CPU (cpu/keepbits_ort.cc) and CUDA (cuda/keepbits_ort_cuda.cc)
// custom-op libraries of the `keepbits` domain: attribute reading (names and defaults of the
// ONNX function bodies in keepbits/export/ops.py), tensor access, shape checks, the
// OrtCustomOp tables and domain registration. Plain C API: ONNX Runtime hands its API table
// to RegisterCustomOps, so the libraries do not link against libonnxruntime.
#pragma once

#include <onnxruntime_c_api.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#ifndef KEEPBITS_ORT_API_VERSION
#define KEEPBITS_ORT_API_VERSION 21
#endif
static_assert(KEEPBITS_ORT_API_VERSION <= ORT_API_VERSION, "headers older than the requested ORT API version");

namespace keepbits_ort {

// Hard-concrete attributes as the nodes carry them (defaults: those of the function bodies).
struct GateAttrs {
  float beta = 2.0f / 3.0f;
  float gamma = -0.1f;
  float zeta = 1.1f;
};

enum class Kind { kHardConcrete, kMixedRes, kMaskCompose };

struct Kernel {
  const OrtApi* api;
  Kind kind;
  GateAttrs gate;
  int64_t block_size = 1;
};

// Wrap an OrtStatus-returning call: return the status to ORT on failure.
#define KB_TRY(expr)                      \
  do {                                    \
    OrtStatus* status_ = (expr);          \
    if (status_ != nullptr) return status_; \
  } while (0)

inline OrtStatus* Fail(const OrtApi* api, const std::string& message) {
  return api->CreateStatus(ORT_INVALID_ARGUMENT, message.c_str());
}

// Optional float attribute: the node's value, or `fallback` when the node does not carry it.
inline float FloatAttr(const OrtApi* api, const OrtKernelInfo* info, const char* name, float fallback) {
  float value = fallback;
  if (OrtStatus* st = api->KernelInfoGetAttribute_float(info, name, &value)) {
    api->ReleaseStatus(st);
    return fallback;
  }
  return value;
}

inline int64_t IntAttr(const OrtApi* api, const OrtKernelInfo* info, const char* name, int64_t fallback) {
  int64_t value = fallback;
  if (OrtStatus* st = api->KernelInfoGetAttribute_int64(info, name, &value)) {
    api->ReleaseStatus(st);
    return fallback;
  }
  return value;
}

struct Tensor {
  const OrtValue* value = nullptr;
  std::vector<int64_t> shape;
  float* data = nullptr;
};

inline OrtStatus* ReadInput(const OrtApi* api, OrtKernelContext* ctx, size_t index, Tensor* t) {
  KB_TRY(api->KernelContext_GetInput(ctx, index, &t->value));
  OrtTensorTypeAndShapeInfo* info = nullptr;
  KB_TRY(api->GetTensorTypeAndShape(t->value, &info));
  size_t rank = 0;
  OrtStatus* st = api->GetDimensionsCount(info, &rank);
  if (st == nullptr) {
    t->shape.resize(rank);
    st = api->GetDimensions(info, t->shape.data(), rank);
  }
  api->ReleaseTensorTypeAndShapeInfo(info);
  if (st != nullptr) return st;
  void* data = nullptr;
  KB_TRY(api->GetTensorMutableData(const_cast<OrtValue*>(t->value), &data));
  t->data = static_cast<float*>(data);
  return nullptr;
}

inline OrtStatus* MakeOutput(const OrtApi* api, OrtKernelContext* ctx, size_t index, const std::vector<int64_t>& shape, float** data) {
  OrtValue* out = nullptr;
  KB_TRY(api->KernelContext_GetOutput(ctx, index, shape.data(), shape.size(), &out));
  void* raw = nullptr;
  KB_TRY(api->GetTensorMutableData(out, &raw));
  *data = static_cast<float*>(raw);
  return nullptr;
}

inline std::string ShapeText(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? "," : "") + std::to_string(shape[i]);
  return text + "]";
}

inline int64_t Numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// A mask / log α tensor must be N×1×H×W matching x (N×C×H×W).
inline OrtStatus* CheckMaskShape(const OrtApi* api, const char* op, const char* what, const std::vector<int64_t>& m, const std::vector<int64_t>& x) {
  if (x.size() != 4) return Fail(api, std::string(op) + ": x must be N×C×H×W, got " + ShapeText(x));
  if (m.size() != 4 || m[0] != x[0] || m[1] != 1 || m[2] != x[2] || m[3] != x[3])
    return Fail(api, std::string(op) + ": " + what + " must be N×1×H×W = [" + std::to_string(x[0]) + ",1," +
                         std::to_string(x[2]) + "," + std::to_string(x[3]) + "], got " + ShapeText(m));
  return nullptr;
}

// The inputs of a compose node, shape-checked: MixedResCompose takes (x, mask), the fused
// MaskCompose (log_alpha, x). Shared by the CPU and CUDA kernels.
inline OrtStatus* ReadComposeInputs(const Kernel& k, OrtKernelContext* ctx, Tensor* x, Tensor* m) {
  const bool fused = k.kind == Kind::kMaskCompose;
  KB_TRY(ReadInput(k.api, ctx, fused ? 1 : 0, x));
  KB_TRY(ReadInput(k.api, ctx, fused ? 0 : 1, m));
  return CheckMaskShape(k.api, fused ? "MaskCompose" : "MixedResCompose", fused ? "log_alpha" : "mask", m->shape, x->shape);
}

// One OrtCustomOp per keepbits op; `Backend` supplies kProvider (the execution provider name)
// and the compute functions HardConcrete(kernel, ctx) and Compose(kernel, ctx).
template <class Backend>
struct KeepbitsOp : OrtCustomOp {
  Kind kind;
  const char* name;
  size_t inputs;
  size_t outputs;

  KeepbitsOp(Kind k, const char* op_name, size_t n_in, size_t n_out) : OrtCustomOp{}, kind(k), name(op_name), inputs(n_in), outputs(n_out) {
    version = KEEPBITS_ORT_API_VERSION;
    GetName = [](const OrtCustomOp* self) { return static_cast<const KeepbitsOp*>(self)->name; };
    GetExecutionProviderType = [](const OrtCustomOp*) -> const char* { return Backend::kProvider; };
    GetInputType = [](const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; };
    GetInputTypeCount = [](const OrtCustomOp* self) { return static_cast<const KeepbitsOp*>(self)->inputs; };
    GetOutputType = [](const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; };
    GetOutputTypeCount = [](const OrtCustomOp* self) { return static_cast<const KeepbitsOp*>(self)->outputs; };
    GetInputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
    GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
    GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
    GetStartVersion = [](const OrtCustomOp*) { return 1; };
    GetEndVersion = [](const OrtCustomOp*) { return 1; };
    KernelDestroy = [](void* kernel) { delete static_cast<Kernel*>(kernel); };
    CreateKernelV2 = [](const OrtCustomOp* self, const OrtApi* api, const OrtKernelInfo* info, void** out) -> OrtStatus* {
      const auto* op = static_cast<const KeepbitsOp*>(self);
      auto* k = new Kernel{api, op->kind, GateAttrs{}, 1};
      k->gate.beta = FloatAttr(api, info, "beta", k->gate.beta);
      k->gate.gamma = FloatAttr(api, info, "gamma", k->gate.gamma);
      k->gate.zeta = FloatAttr(api, info, "zeta", k->gate.zeta);
      k->block_size = IntAttr(api, info, "block_size", 1);
      if (k->block_size < 1 || !(k->gate.beta > 0.0f)) {
        std::string msg = std::string(op->name) + ": needs block_size >= 1 and beta > 0, got block_size=" +
                          std::to_string(k->block_size) + " beta=" + std::to_string(k->gate.beta);
        delete k;
        return Fail(api, msg);
      }
      *out = k;
      return nullptr;
    };
    KernelComputeV2 = [](void* kernel, OrtKernelContext* ctx) -> OrtStatus* {
      const auto& k = *static_cast<const Kernel*>(kernel);
      return k.kind == Kind::kHardConcrete ? Backend::HardConcrete(k, ctx) : Backend::Compose(k, ctx);
    };
  }
};

// Register the three ops of `Backend` in a new `keepbits` domain on `options`. The ops and the
// domain must outlive every session that uses them: the ops are static, the domain is never released.
template <class Backend>
OrtStatus* RegisterDomain(OrtSessionOptions* options, const OrtApiBase* api_base) {
  static const KeepbitsOp<Backend> hard_concrete(Kind::kHardConcrete, "HardConcreteMask", 1, 1);
  static const KeepbitsOp<Backend> mixed_res(Kind::kMixedRes, "MixedResCompose", 2, 1);
  static const KeepbitsOp<Backend> mask_compose(Kind::kMaskCompose, "MaskCompose", 2, 2);
  const OrtApi* api = api_base->GetApi(KEEPBITS_ORT_API_VERSION);
  if (api == nullptr) {
    std::fprintf(stderr, "keepbits native: this ONNX Runtime (%s) lacks C API version %d\n", api_base->GetVersionString(),
                 KEEPBITS_ORT_API_VERSION);
    return nullptr;  // no status object can be made without an API table; the function bodies run instead
  }
  OrtCustomOpDomain* domain = nullptr;
  KB_TRY(api->CreateCustomOpDomain("keepbits", &domain));
  for (const KeepbitsOp<Backend>* op : {&hard_concrete, &mixed_res, &mask_compose})
    KB_TRY(api->CustomOpDomain_Add(domain, const_cast<KeepbitsOp<Backend>*>(op)));
  return api->AddCustomOpDomain(options, domain);
}

}  // namespace keepbits_ort
