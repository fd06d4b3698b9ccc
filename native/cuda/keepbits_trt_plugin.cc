// TensorRT 10 plugins (IPluginV3 + IPluginCreatorV3One) for the `keepbits` ops
// HardConcreteMask, MixedResCompose and MaskCompose (NICE Eqs. 11–12), kernels in
// nice_kernels.cu. TensorRT's ONNX parser maps a node without a built-in importer to the
// plugin named like its op type (version "1", namespace ""), passing the node attributes
// as plugin fields: beta, gamma, zeta (float) and block_size (int).
//
// STATUS: written against the TensorRT 10 headers' documented interface but never compiled
// or run here (no TensorRT headers and no GPU on the development machine); see native/README.md.
#include <NvInferRuntime.h>

#include <cstring>
#include <string>
#include <vector>

#include "nice_kernels.cuh"

using namespace nvinfer1;

namespace {

namespace kc = keepbits::cuda;

enum class Kind { kHardConcrete, kMixedRes, kMaskCompose };

char const* OpName(Kind kind) {
  switch (kind) {
    case Kind::kHardConcrete: return "HardConcreteMask";
    case Kind::kMixedRes: return "MixedResCompose";
    default: return "MaskCompose";
  }
}

constexpr char const* kVersion = "1";
constexpr char const* kNamespace = "";

struct Attrs {
  kc::Gate gate;
  int32_t block_size = 1;
};

// Read beta/gamma/zeta/block_size from the fields, accepting the widths the parser may use.
bool ReadFields(PluginFieldCollection const* fc, Attrs* attrs) {
  for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
    PluginField const& f = fc->fields[i];
    if (f.data == nullptr || f.length < 1) continue;
    auto as_float = [&f]() -> float {
      return f.type == PluginFieldType::kFLOAT64 ? float(*static_cast<double const*>(f.data)) : *static_cast<float const*>(f.data);
    };
    auto as_int = [&f]() -> int64_t {
      return f.type == PluginFieldType::kINT64 ? *static_cast<int64_t const*>(f.data) : *static_cast<int32_t const*>(f.data);
    };
    if (!std::strcmp(f.name, "beta")) attrs->gate.beta = as_float();
    else if (!std::strcmp(f.name, "gamma")) attrs->gate.gamma = as_float();
    else if (!std::strcmp(f.name, "zeta")) attrs->gate.zeta = as_float();
    else if (!std::strcmp(f.name, "block_size")) attrs->block_size = int32_t(as_int());
  }
  return attrs->block_size >= 1 && attrs->gate.beta > 0.0f;
}

kc::Shape ShapeOf(Dims const& x, int32_t b) { return kc::Shape{x.d[0], x.d[1], x.d[2], x.d[3], b}; }

class NicePlugin : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild, public IPluginV3OneRuntime {
 public:
  NicePlugin(Kind kind, Attrs attrs) : kind_(kind), attrs_(attrs) {}

  IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override {
    switch (type) {
      case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
      case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
      case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    }
    return nullptr;
  }
  IPluginV3* clone() noexcept override { return new NicePlugin(kind_, attrs_); }

  // core
  AsciiChar const* getPluginName() const noexcept override { return OpName(kind_); }
  AsciiChar const* getPluginVersion() const noexcept override { return kVersion; }
  AsciiChar const* getPluginNamespace() const noexcept override { return kNamespace; }

  // build
  int32_t getNbOutputs() const noexcept override { return kind_ == Kind::kMaskCompose ? 2 : 1; }
  int32_t configurePlugin(DynamicPluginTensorDesc const*, int32_t, DynamicPluginTensorDesc const*, int32_t) noexcept override { return 0; }
  bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t, int32_t) noexcept override {
    return inOut[pos].desc.type == DataType::kFLOAT && inOut[pos].desc.format == TensorFormat::kLINEAR;
  }
  int32_t getOutputDataTypes(DataType* types, int32_t nbOutputs, DataType const*, int32_t) const noexcept override {
    for (int32_t i = 0; i < nbOutputs; ++i) types[i] = DataType::kFLOAT;
    return 0;
  }
  int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* outputs,
                          int32_t nbOutputs, IExprBuilder&) noexcept override {
    if (nbOutputs != getNbOutputs() || nbInputs != (kind_ == Kind::kHardConcrete ? 1 : 2)) return -1;
    outputs[0] = inputs[0];  // mask like log α / x̃ like x (MixedResCompose's input 0 is x)
    if (kind_ == Kind::kMaskCompose) outputs[1] = inputs[1];
    return 0;
  }
  size_t getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t, DynamicPluginTensorDesc const*, int32_t) const noexcept override {
    if (kind_ == Kind::kHardConcrete) return 0;
    return kc::compose_workspace_bytes(ShapeOf(inputs[kind_ == Kind::kMixedRes ? 0 : 1].max, attrs_.block_size));
  }

  // runtime
  int32_t setTactic(int32_t) noexcept override { return 0; }
  int32_t onShapeChange(PluginTensorDesc const*, int32_t, PluginTensorDesc const*, int32_t) noexcept override { return 0; }
  int32_t enqueue(PluginTensorDesc const* in, PluginTensorDesc const*, void const* const* inputs, void* const* outputs,
                  void* workspace, cudaStream_t stream) noexcept override {
    cudaError_t err = cudaSuccess;
    if (kind_ == Kind::kHardConcrete) {
      int64_t count = 1;
      for (int32_t i = 0; i < in[0].dims.nbDims; ++i) count *= in[0].dims.d[i];
      err = kc::hard_concrete(static_cast<float const*>(inputs[0]), static_cast<float*>(outputs[0]), count, attrs_.gate, stream);
    } else if (kind_ == Kind::kMixedRes) {
      err = kc::mixed_res(static_cast<float const*>(inputs[0]), static_cast<float const*>(inputs[1]), static_cast<float*>(outputs[0]),
                          ShapeOf(in[0].dims, attrs_.block_size), workspace, stream);
    } else {
      err = kc::mask_compose(static_cast<float const*>(inputs[0]), static_cast<float const*>(inputs[1]), static_cast<float*>(outputs[0]),
                             static_cast<float*>(outputs[1]), ShapeOf(in[1].dims, attrs_.block_size), attrs_.gate, workspace, stream);
    }
    return err == cudaSuccess ? 0 : -1;
  }
  IPluginV3* attachToContext(IPluginResourceContext*) noexcept override { return clone(); }
  PluginFieldCollection const* getFieldsToSerialize() noexcept override {
    fields_.clear();
    fields_.emplace_back("beta", &attrs_.gate.beta, PluginFieldType::kFLOAT32, 1);
    fields_.emplace_back("gamma", &attrs_.gate.gamma, PluginFieldType::kFLOAT32, 1);
    fields_.emplace_back("zeta", &attrs_.gate.zeta, PluginFieldType::kFLOAT32, 1);
    fields_.emplace_back("block_size", &attrs_.block_size, PluginFieldType::kINT32, 1);
    collection_.nbFields = int32_t(fields_.size());
    collection_.fields = fields_.data();
    return &collection_;
  }

 private:
  Kind kind_;
  Attrs attrs_;
  std::vector<PluginField> fields_;
  PluginFieldCollection collection_{};
};

class NiceCreator : public IPluginCreatorV3One {
 public:
  explicit NiceCreator(Kind kind) : kind_(kind) {
    fields_.emplace_back("beta", nullptr, PluginFieldType::kFLOAT32, 1);
    fields_.emplace_back("gamma", nullptr, PluginFieldType::kFLOAT32, 1);
    fields_.emplace_back("zeta", nullptr, PluginFieldType::kFLOAT32, 1);
    fields_.emplace_back("block_size", nullptr, PluginFieldType::kINT32, 1);
    collection_.nbFields = int32_t(fields_.size());
    collection_.fields = fields_.data();
  }
  AsciiChar const* getPluginName() const noexcept override { return OpName(kind_); }
  AsciiChar const* getPluginVersion() const noexcept override { return kVersion; }
  AsciiChar const* getPluginNamespace() const noexcept override { return kNamespace; }
  PluginFieldCollection const* getFieldNames() noexcept override { return &collection_; }
  IPluginV3* createPlugin(AsciiChar const*, PluginFieldCollection const* fc, TensorRTPhase) noexcept override {
    Attrs attrs;
    if (!ReadFields(fc, &attrs)) return nullptr;  // block_size < 1 or beta <= 0
    return new NicePlugin(kind_, attrs);
  }

 private:
  Kind kind_;
  std::vector<PluginField> fields_;
  PluginFieldCollection collection_{};
};

}  // namespace

// Entry point of a TensorRT 10 plugin library (IPluginRegistry::loadLibrary / registry.load_library).
extern "C" __attribute__((visibility("default"))) IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  static NiceCreator hard_concrete(Kind::kHardConcrete), mixed_res(Kind::kMixedRes), mask_compose(Kind::kMaskCompose);
  static IPluginCreatorInterface* const creators[] = {&hard_concrete, &mixed_res, &mask_compose};
  nbCreators = 3;
  return creators;
}
