// ONNX Runtime custom-op library for the `keepbits` domain (CPU):
//   HardConcreteMask(log_alpha) -> mask                       attrs beta, gamma, zeta
//   MixedResCompose(x, mask) -> mixed                         attr  block_size
//   MaskCompose(log_alpha, x) -> mask, mixed                  attrs beta, gamma, zeta, block_size
// Attribute names and defaults are those of the ONNX function bodies in
// keepbits/export/ops.py. Written against the plain C API (no libonnxruntime link): the
// entry point RegisterCustomOps receives the API table from the loading runtime.
#include <onnxruntime_c_api.h>

#include <cstdio>
#include <string>
#include <vector>

#include "nice_kernels.h"

#ifndef KEEPBITS_ORT_API_VERSION
#define KEEPBITS_ORT_API_VERSION 21
#endif
#define KB_STR2(x) #x
#define KB_STR(x) KB_STR2(x)
static_assert(KEEPBITS_ORT_API_VERSION <= ORT_API_VERSION, "headers older than the requested ORT API version");

namespace {

using keepbits::ComposeShape;
using keepbits::Gate;

enum class Kind { kHardConcrete, kMixedRes, kMaskCompose };

struct Kernel {
  const OrtApi* api;
  Kind kind;
  Gate gate;
  int64_t block_size = 1;
};

// Wrap an OrtStatus-returning call: return the status to ORT on failure.
#define KB_TRY(expr)                      \
  do {                                    \
    OrtStatus* status_ = (expr);          \
    if (status_ != nullptr) return status_; \
  } while (0)

OrtStatus* Fail(const OrtApi* api, const std::string& message) {
  return api->CreateStatus(ORT_INVALID_ARGUMENT, message.c_str());
}

// Optional float attribute: the node's value, or `fallback` when the node does not carry it.
float FloatAttr(const OrtApi* api, const OrtKernelInfo* info, const char* name, float fallback) {
  float value = fallback;
  if (OrtStatus* st = api->KernelInfoGetAttribute_float(info, name, &value)) {
    api->ReleaseStatus(st);
    return fallback;
  }
  return value;
}

int64_t IntAttr(const OrtApi* api, const OrtKernelInfo* info, const char* name, int64_t fallback) {
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

OrtStatus* ReadInput(const OrtApi* api, OrtKernelContext* ctx, size_t index, Tensor* t) {
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

OrtStatus* MakeOutput(const OrtApi* api, OrtKernelContext* ctx, size_t index, const std::vector<int64_t>& shape, float** data) {
  OrtValue* out = nullptr;
  KB_TRY(api->KernelContext_GetOutput(ctx, index, shape.data(), shape.size(), &out));
  void* raw = nullptr;
  KB_TRY(api->GetTensorMutableData(out, &raw));
  *data = static_cast<float*>(raw);
  return nullptr;
}

std::string ShapeText(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? "," : "") + std::to_string(shape[i]);
  return text + "]";
}

int64_t Numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// A mask / log α tensor must be N×1×H×W matching x (N×C×H×W).
OrtStatus* CheckMaskShape(const OrtApi* api, const char* op, const char* what, const std::vector<int64_t>& m, const std::vector<int64_t>& x) {
  if (x.size() != 4) return Fail(api, std::string(op) + ": x must be N×C×H×W, got " + ShapeText(x));
  if (m.size() != 4 || m[0] != x[0] || m[1] != 1 || m[2] != x[2] || m[3] != x[3])
    return Fail(api, std::string(op) + ": " + what + " must be N×1×H×W = [" + std::to_string(x[0]) + ",1," +
                         std::to_string(x[2]) + "," + std::to_string(x[3]) + "], got " + ShapeText(m));
  return nullptr;
}

struct ComposeJob {
  const float* x;
  const float* log_alpha;
  const float* mask_in;
  float* mask_out;
  float* mixed;
  ComposeShape shape;
  Gate gate;
};

void ComposeTask(void* user, size_t task) {
  const auto* job = static_cast<const ComposeJob*>(user);
  thread_local std::vector<double> acc;
  thread_local std::vector<float> means;
  const int64_t rows = job->shape.block_rows();
  const int64_t n = static_cast<int64_t>(task) / rows;
  keepbits::compose_block_row(job->x, job->log_alpha, job->mask_in, job->mask_out, job->mixed, job->shape, job->gate, n,
                              static_cast<int64_t>(task) % rows, acc, means);
}

struct GateJob {
  const float* log_alpha;
  float* mask;
  int64_t count;
  Gate gate;
};

constexpr int64_t kGateChunk = 1 << 14;

void GateTask(void* user, size_t task) {
  const auto* job = static_cast<const GateJob*>(user);
  const int64_t begin = static_cast<int64_t>(task) * kGateChunk;
  const int64_t end = std::min(begin + kGateChunk, job->count);
  keepbits::hard_concrete(job->log_alpha + begin, job->mask + begin, end - begin, job->gate);
}

OrtStatus* ComputeHardConcrete(const Kernel& k, OrtKernelContext* ctx) {
  Tensor la;
  KB_TRY(ReadInput(k.api, ctx, 0, &la));
  float* mask = nullptr;
  KB_TRY(MakeOutput(k.api, ctx, 0, la.shape, &mask));
  GateJob job{la.data, mask, Numel(la.shape), k.gate};
  const size_t tasks = static_cast<size_t>((job.count + kGateChunk - 1) / kGateChunk);
  if (tasks == 0) return nullptr;
  return k.api->KernelContext_ParallelFor(ctx, GateTask, tasks, 0, &job);
}

OrtStatus* ComputeCompose(const Kernel& k, OrtKernelContext* ctx) {
  const bool fused = k.kind == Kind::kMaskCompose;
  const char* op = fused ? "MaskCompose" : "MixedResCompose";
  Tensor x, m;
  KB_TRY(ReadInput(k.api, ctx, fused ? 1 : 0, &x));
  KB_TRY(ReadInput(k.api, ctx, fused ? 0 : 1, &m));
  KB_TRY(CheckMaskShape(k.api, op, fused ? "log_alpha" : "mask", m.shape, x.shape));
  ComposeJob job{x.data, nullptr, nullptr, nullptr, nullptr, {x.shape[0], x.shape[1], x.shape[2], x.shape[3], k.block_size}, k.gate};
  if (fused) {
    job.log_alpha = m.data;
    KB_TRY(MakeOutput(k.api, ctx, 0, m.shape, &job.mask_out));
    KB_TRY(MakeOutput(k.api, ctx, 1, x.shape, &job.mixed));
  } else {
    job.mask_in = m.data;
    KB_TRY(MakeOutput(k.api, ctx, 0, x.shape, &job.mixed));
  }
  const size_t tasks = static_cast<size_t>(job.shape.n * job.shape.block_rows());
  if (tasks == 0 || job.shape.c == 0 || job.shape.w == 0) return nullptr;
  return k.api->KernelContext_ParallelFor(ctx, ComposeTask, tasks, 0, &job);
}

struct KeepbitsOp : OrtCustomOp {
  Kind kind;
  const char* name;
  size_t inputs;
  size_t outputs;

  KeepbitsOp(Kind k, const char* op_name, size_t n_in, size_t n_out) : OrtCustomOp{}, kind(k), name(op_name), inputs(n_in), outputs(n_out) {
    version = KEEPBITS_ORT_API_VERSION;
    GetName = [](const OrtCustomOp* self) { return static_cast<const KeepbitsOp*>(self)->name; };
    GetExecutionProviderType = [](const OrtCustomOp*) -> const char* { return "CPUExecutionProvider"; };
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
      auto* k = new Kernel{api, op->kind, Gate{}, 1};
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
      return k.kind == Kind::kHardConcrete ? ComputeHardConcrete(k, ctx) : ComputeCompose(k, ctx);
    };
  }
};

const KeepbitsOp kHardConcreteOp(Kind::kHardConcrete, "HardConcreteMask", 1, 1);
const KeepbitsOp kMixedResOp(Kind::kMixedRes, "MixedResCompose", 2, 1);
const KeepbitsOp kMaskComposeOp(Kind::kMaskCompose, "MaskCompose", 2, 2);

}  // namespace

extern "C" {

// Entry point called by OrtApi::RegisterCustomOpsLibrary / SessionOptions.register_custom_ops_library.
// The domain object must outlive every session that uses it, so it is intentionally never released.
__attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(KEEPBITS_ORT_API_VERSION);
  if (api == nullptr) {
    std::fprintf(stderr, "keepbits native: this ONNX Runtime (%s) lacks C API version %d\n", api_base->GetVersionString(),
                 KEEPBITS_ORT_API_VERSION);
    return nullptr;  // no status object can be made without an API table; the function bodies run instead
  }
  OrtCustomOpDomain* domain = nullptr;
  KB_TRY(api->CreateCustomOpDomain("keepbits", &domain));
  for (const KeepbitsOp* op : {&kHardConcreteOp, &kMixedResOp, &kMaskComposeOp})
    KB_TRY(api->CustomOpDomain_Add(domain, const_cast<KeepbitsOp*>(op)));
  return api->AddCustomOpDomain(options, domain);
}

// Lets tests and `keepbits.native` check that a file is this library, and which version.
__attribute__((visibility("default"))) const char* KeepbitsNativeVersion() { return "keepbits-native 1 (cpu, ort-api " KB_STR(KEEPBITS_ORT_API_VERSION) ")"; }

}  // extern "C"
