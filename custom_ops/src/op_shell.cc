// ONNX Runtime op shells for com.onnxfgq::MatMulBlockQuant (CPU always, CUDA when built with it),
// input validation, and the exported RegisterCustomOps entry point.
//
// The classic CustomOpBase API is used (not the Lite API) because input 3 (zero_points) may be
// uint8 or A's float type. A and Y are typed per kernel (one kernel per float type and
// provider); B, scales, zero_points and bias are declared untyped and checked here. ONNX Runtime
// merges the kernels into one schema and infers Y's type from the kernel matching A.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "block_quant.h"

namespace onnxfgq {
namespace {

constexpr const char* kDomain = "com.onnxfgq";
constexpr const char* kOpName = "MatMulBlockQuant";
constexpr const char* kInputNames[] = {"A", "B", "scales", "zero_points", "bias"};

const char* TypeName(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "double";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    default: return "another type";
  }
}

std::string ShapeText(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << '[';
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << ']';
  return os.str();
}

// Error carrying an ORT error code; turned into an OrtStatus at the API boundary.
struct OpError {
  OrtErrorCode code;
  std::string message;
};

[[noreturn]] void Fail(const std::string& what, OrtErrorCode code = ORT_INVALID_ARGUMENT) {
  throw OpError{code, std::string(kDomain) + "::" + kOpName + ": " + what};
}

struct Attributes {
  int64_t k = 0, n = 0, bits = 0, block_size = 0;
  int64_t groups() const { return (k + block_size - 1) / block_size; }
  int64_t row_bytes() const { return (k * bits + 7) / 8; }
};

Attributes ReadAttributes(const OrtKernelInfo* info) {
  Ort::ConstKernelInfo ki(info);
  Attributes a;
  auto get = [&](const char* name) -> int64_t {
    try {
      return ki.GetAttribute<int64_t>(name);
    } catch (const Ort::Exception&) {
      Fail(std::string("required int attribute '") + name + "' is missing");
    }
  };
  a.k = get("K");
  a.n = get("N");
  a.bits = get("bits");
  a.block_size = get("block_size");
  if (a.k < 1) Fail("attribute K must be >= 1, got " + std::to_string(a.k));
  if (a.n < 1) Fail("attribute N must be >= 1, got " + std::to_string(a.n));
  if (a.bits < 2 || a.bits > 8) Fail("attribute bits must be in 2..8, got " + std::to_string(a.bits));
  if (a.block_size < 1) Fail("attribute block_size must be >= 1, got " + std::to_string(a.block_size));
  return a;
}

struct Operand {
  const void* data = nullptr;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
  bool present = false;
};

Operand Fetch(const Ort::KernelContext& ctx, size_t index) {
  Operand op;
  if (index >= ctx.GetInputCount()) return op;
  Ort::ConstValue v = ctx.GetInput(index);
  if (v == nullptr) return op;
  auto info = v.GetTensorTypeAndShapeInfo();
  op.type = info.GetElementType();
  op.shape = info.GetShape();
  op.data = v.GetTensorRawData();
  op.present = true;
  return op;
}

void ExpectType(const Operand& op, size_t index, ONNXTensorElementDataType expected) {
  if (op.type != expected)
    Fail(std::string("input '") + kInputNames[index] + "' (index " + std::to_string(index) + ") must be " +
         TypeName(expected) + ", got " + TypeName(op.type));
}

void ExpectShape(const Operand& op, size_t index, const std::vector<int64_t>& expected, const char* formula) {
  if (op.shape != expected)
    Fail(std::string("input '") + kInputNames[index] + "' (index " + std::to_string(index) + ") must have shape " +
         formula + " = " + ShapeText(expected) + ", got " + ShapeText(op.shape));
}

struct Validated {
  Operand a, b, scales, zp, bias;
  ZeroPointKind zp_kind = ZeroPointKind::kNone;
  int64_t m = 0;
  std::vector<int64_t> y_shape;
};

Validated Validate(const Ort::KernelContext& ctx, const Attributes& at, ONNXTensorElementDataType t) {
  Validated v;
  v.a = Fetch(ctx, 0);
  v.b = Fetch(ctx, 1);
  v.scales = Fetch(ctx, 2);
  v.zp = Fetch(ctx, 3);
  v.bias = Fetch(ctx, 4);
  if (!v.a.present || !v.b.present || !v.scales.present) Fail("inputs A, B and scales are required");
  ExpectType(v.a, 0, t);
  if (v.a.shape.empty() || v.a.shape.back() != at.k)
    Fail("input 'A' (index 0) must have shape [..., K] with K = " + std::to_string(at.k) + ", got " +
         ShapeText(v.a.shape));
  ExpectType(v.b, 1, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
  ExpectShape(v.b, 1, {at.n, at.row_bytes()}, "[N, ceil(K*bits/8)]");
  ExpectType(v.scales, 2, t);
  ExpectShape(v.scales, 2, {at.n, at.groups()}, "[N, ceil(K/block_size)]");
  if (v.zp.present) {
    if (v.zp.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) {
      v.zp_kind = ZeroPointKind::kUint8;
    } else if (v.zp.type == t) {
      v.zp_kind = t == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ? ZeroPointKind::kFloat : ZeroPointKind::kHalf;
    } else {
      Fail(std::string("input 'zero_points' (index 3) must be uint8 or ") + TypeName(t) + " (A's type), got " +
           TypeName(v.zp.type));
    }
    ExpectShape(v.zp, 3, {at.n, at.groups()}, "[N, ceil(K/block_size)]");
  }
  if (v.bias.present) {
    ExpectType(v.bias, 4, t);
    ExpectShape(v.bias, 4, {at.n}, "[N]");
  }
  v.m = 1;
  for (size_t i = 0; i + 1 < v.a.shape.size(); ++i) v.m *= v.a.shape[i];
  v.y_shape = v.a.shape;
  v.y_shape.back() = at.n;
  return v;
}

OrtStatusPtr ToStatus(const OpError& e) { return Ort::GetApi().CreateStatus(e.code, e.message.c_str()); }

template <typename Body>
OrtStatusPtr Guard(Body&& body) {
  try {
    body();
    return nullptr;
  } catch (const OpError& e) {
    return ToStatus(e);
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
  }
}

void OrtParallelFor(void* pool, void (*fn)(void*, size_t), size_t total, void* data) {
  static_cast<const Ort::KernelContext*>(pool)->ParallelFor(fn, total, 0, data);
}

struct Kernel {
  Attributes attrs;
  ONNXTensorElementDataType type;
  bool cuda;

  OrtStatusPtr ComputeV2(OrtKernelContext* raw) {
    return Guard([&] {
      Ort::KernelContext ctx(raw);
      const Validated v = Validate(ctx, attrs, type);
      Ort::UnownedValue out = ctx.GetOutput(0, v.y_shape);
      void* y = out.GetTensorMutableRawData();
      if (cuda) {
        ComputeCuda(ctx, v, y);
      } else {
        ComputeCpu(ctx, v, y);
      }
    });
  }

  void ComputeCpu(const Ort::KernelContext& ctx, const Validated& v, void* y_out) const {
    const bool half = type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    const int64_t count_a = v.m * attrs.k;
    const int64_t count_y = v.m * attrs.n;
    std::vector<float> a_wide, y_wide;
    const float* a = static_cast<const float*>(v.a.data);
    float* y = static_cast<float*>(y_out);
    if (half) {
      a_wide.resize(static_cast<size_t>(count_a));
      const uint16_t* src = static_cast<const uint16_t*>(v.a.data);
      for (int64_t i = 0; i < count_a; ++i) a_wide[i] = HalfToFloat(src[i]);
      a = a_wide.data();
      y_wide.resize(static_cast<size_t>(count_y));
      y = y_wide.data();
    }
    CpuProblem p;
    p.a = a;
    p.b = static_cast<const uint8_t*>(v.b.data);
    p.scales = v.scales.data;
    p.scales_half = half;
    p.zero_points = v.zp.data;
    p.zp_kind = v.zp_kind;
    p.y = y;
    p.m = v.m;
    p.k = attrs.k;
    p.n = attrs.n;
    p.bits = static_cast<int>(attrs.bits);
    p.block_size = attrs.block_size;
    p.groups = attrs.groups();
    p.row_bytes = attrs.row_bytes();
    CpuMatMulBlockQuant(p, &OrtParallelFor, const_cast<Ort::KernelContext*>(&ctx));
    if (v.bias.present) {
      std::vector<float> bias(static_cast<size_t>(attrs.n));
      for (int64_t n = 0; n < attrs.n; ++n)
        bias[n] = half ? HalfToFloat(static_cast<const uint16_t*>(v.bias.data)[n])
                       : static_cast<const float*>(v.bias.data)[n];
      for (int64_t m = 0; m < v.m; ++m)
        for (int64_t n = 0; n < attrs.n; ++n) y[m * attrs.n + n] += bias[n];
    }
    if (half) {
      uint16_t* dst = static_cast<uint16_t*>(y_out);
      for (int64_t i = 0; i < count_y; ++i) dst[i] = FloatToHalf(y[i]);
    }
  }

  void ComputeCuda(const Ort::KernelContext& ctx, const Validated& v, void* y) const {
#ifdef ONNXFGQ_WITH_CUDA
    const int status = onnxfgq_cuda_matmul_block_quant(
        v.a.data, static_cast<const uint8_t*>(v.b.data), v.scales.data, v.zp.data, static_cast<int>(v.zp_kind),
        v.bias.present ? v.bias.data : nullptr, y, v.m, attrs.k, attrs.n, static_cast<int>(attrs.bits),
        attrs.block_size, static_cast<int>(type), ctx.GetGPUComputeStream());
    if (status != 0) Fail("CUDA kernel launch failed with error " + std::to_string(status), ORT_EP_FAIL);
#else
    (void)ctx, (void)v, (void)y;
    Fail("this build of the library has no CUDA kernels", ORT_NOT_IMPLEMENTED);
#endif
  }
};

template <ONNXTensorElementDataType T, bool kCuda>
struct MatMulBlockQuantOp : Ort::CustomOpBase<MatMulBlockQuantOp<T, kCuda>, Kernel, /*WithStatus=*/true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return Guard([&] {
      auto k = std::make_unique<Kernel>();
      k->attrs = ReadAttributes(info);
      k->type = T;
      k->cuda = kCuda;
      *kernel = k.release();
    });
  }
  const char* GetName() const { return kOpName; }
  const char* GetExecutionProviderType() const { return kCuda ? "CUDAExecutionProvider" : nullptr; }
  size_t GetInputTypeCount() const { return 5; }
  // Only A is typed: it selects the kernel (and so Y's type). The other inputs are declared
  // untyped so that a wrong dtype reaches Validate, which names the input, instead of failing
  // in ONNX Runtime's kernel matching with a generic message.
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 0 ? T : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i >= 3 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return T; }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t) const { return INPUT_OUTPUT_REQUIRED; }
};

struct Registry {
  MatMulBlockQuantOp<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, false> cpu_f32;
  MatMulBlockQuantOp<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, false> cpu_f16;
#ifdef ONNXFGQ_WITH_CUDA
  MatMulBlockQuantOp<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, true> cuda_f32;
  MatMulBlockQuantOp<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, true> cuda_f16;
#endif
  Ort::CustomOpDomain domain{kDomain};

  Registry() {
    domain.Add(&cpu_f32);
    domain.Add(&cpu_f16);
#ifdef ONNXFGQ_WITH_CUDA
    domain.Add(&cuda_f32);
    domain.Add(&cuda_f16);
#endif
  }
};

}  // namespace
}  // namespace onnxfgq

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // Every runtime still serves version 1 of the API, which is enough to report the problem.
    const OrtApi* v1 = api_base->GetApi(1);
    std::string msg = std::string("libonnxfgq_ops needs an onnxruntime with C API version >= ") +
                      std::to_string(ORT_API_VERSION) + ", this one is " + api_base->GetVersionString();
    return v1 != nullptr ? v1->CreateStatus(ORT_FAIL, msg.c_str()) : nullptr;
  }
  Ort::InitApi(api);
  // Kernels keep pointers to the op objects for as long as sessions live: never destroyed.
  static onnxfgq::Registry* registry = nullptr;
  static std::mutex mutex;
  try {
    std::lock_guard<std::mutex> lock(mutex);
    if (registry == nullptr) registry = new onnxfgq::Registry();
    Ort::UnownedSessionOptions(options).Add(registry->domain);
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}
