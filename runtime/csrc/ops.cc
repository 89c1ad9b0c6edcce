// ONNX Runtime glue for qcompile's custom ops (domain "qcompile"): Int4MatMul and MixedInt8MatMul,
// a CPU kernel for each (reference and fallback) and, built with QCOMPILE_WITH_CUDA, a CUDA one.
//
// The library does not link against libonnxruntime: the API comes from the OrtApiBase passed to
// RegisterCustomOps (SessionOptions.register_custom_ops_library). Headers: Debian's
// libonnxruntime-dev (ORT_API_VERSION 21), which any newer onnxruntime serves.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT
#include "onnxruntime_lite_custom_op.h"

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "kernels.h"

namespace {

using Ort::Custom::Tensor;
using half_t = Ort::Float16_t;

constexpr const char* DOMAIN_NAME = "qcompile";

void run_parallel(void* runner, void (*fn)(void*, size_t), size_t total, void* data) {
  if (total == 0) return;
  if (total == 1) { fn(data, 0); return; }
  static_cast<Ort::KernelContext*>(runner)->ParallelFor(fn, total, 0, data);
}

Ort::Status invalid(const std::string& message) {
  return Ort::Status(message.c_str(), ORT_INVALID_ARGUMENT);
}

template <typename T> constexpr bool is_half() { return std::is_same<T, half_t>::value; }

// Activations as float32 (fp16 is widened into `scratch`).
template <typename T>
const float* as_float(const T* data, size_t count, std::vector<float>& scratch) {
  if constexpr (is_half<T>()) {
    scratch.resize(count);
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(data);
    for (size_t i = 0; i < count; ++i) scratch[i] = qcompile::half_to_float(bits[i]);
    return scratch.data();
  } else {
    return data;
  }
}

template <typename T>
void store(const std::vector<float>& values, T* out) {
  if constexpr (is_half<T>()) {
    uint16_t* bits = reinterpret_cast<uint16_t*>(out);
    for (size_t i = 0; i < values.size(); ++i) bits[i] = qcompile::float_to_half(values[i]);
  }
}

std::vector<int64_t> output_shape(const std::vector<int64_t>& a, int64_t n) {
  std::vector<int64_t> shape(a.begin(), a.end() - 1);
  shape.push_back(n);
  return shape;
}

int64_t rows(const std::vector<int64_t>& shape) {
  int64_t m = 1;
  for (size_t i = 0; i + 1 < shape.size(); ++i) m *= shape[i];
  return m;
}

// --- Int4MatMul ------------------------------------------------------------------------------

struct Int4Shape {
  int64_t K, N, group;
  Int4Shape(const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    K = ki.GetAttribute<int64_t>("K");
    N = ki.GetAttribute<int64_t>("N");
    group = ki.GetAttribute<int64_t>("group_size");
  }
  // Checks the inputs, fills args (M and the weight pointers) and allocates the output.
  template <typename T>
  Ort::Status prepare(const Tensor<T>& a, const Tensor<uint8_t>& b, const Tensor<half_t>& scales,
                      const Tensor<half_t>& zeros, Tensor<T>& y, qcompile::Int4Args& args, T*& out) const {
    const int64_t blocks = (K + group - 1) / group;
    const auto& s = a.Shape();
    if (s.empty() || s.back() != K)
      return invalid("Int4MatMul: the last dimension of A must be K = " + std::to_string(K));
    if (b.Shape() != std::vector<int64_t>{N, blocks, group / 2})
      return invalid("Int4MatMul: B must be uint8 [N, ceil(K/group_size), group_size/2]");
    const std::vector<int64_t> param{N, blocks};
    if (scales.Shape() != param || zeros.Shape() != param)
      return invalid("Int4MatMul: scales and zero_points must be float16 [N, ceil(K/group_size)]");
    args = {rows(s), K, N, group, b.Data(), reinterpret_cast<const uint16_t*>(scales.Data()),
            reinterpret_cast<const uint16_t*>(zeros.Data())};
    out = y.Allocate(output_shape(s, N));
    return Ort::Status{nullptr};
  }
};

template <typename T>
struct Int4MatMulCpu : Int4Shape {
  Int4MatMulCpu(const OrtApi*, const OrtKernelInfo* info) : Int4Shape(info) {}
  Ort::Status Compute(OrtKernelContext* context, const Tensor<T>& a, const Tensor<uint8_t>& b,
                      const Tensor<half_t>& scales, const Tensor<half_t>& zeros, Tensor<T>& y) {
    try {
      qcompile::Int4Args args;
      T* out = nullptr;
      Ort::Status status = prepare(a, b, scales, zeros, y, args, out);
      if (!status.IsOK() || args.M == 0) return status;
      Ort::KernelContext ctx(context);
      std::vector<float> a32, y32;
      const float* x = as_float(a.Data(), (size_t)(args.M * K), a32);
      float* target = reinterpret_cast<float*>(out);
      if constexpr (is_half<T>()) { y32.resize((size_t)(args.M * N)); target = y32.data(); }
      qcompile::int4_matmul_cpu(args, x, target, run_parallel, &ctx);
      store(y32, out);
      return Ort::Status{nullptr};
    } catch (const std::exception& e) {
      return Ort::Status(e.what(), ORT_RUNTIME_EXCEPTION);
    }
  }
};

// --- MixedInt8MatMul -------------------------------------------------------------------------

// Checks the inputs, fills args and allocates the output.
template <typename T>
Ort::Status prepare_mixed(const Tensor<T>& x, const Tensor<int8_t>& wq, const Tensor<float>& w_scale,
                          const Tensor<int64_t>& index, const Tensor<half_t>& w_outlier, Tensor<T>& y,
                          qcompile::MixedInt8Args& args, T*& out) {
  const auto& s = x.Shape();
  const auto& ws = wq.Shape();
  if (ws.size() != 2) return invalid("MixedInt8MatMul: weight_q must be int8 [N, K]");
  const int64_t N = ws[0], K = ws[1];
  if (s.empty() || s.back() != K)
    return invalid("MixedInt8MatMul: the last dimension of X must be K = " + std::to_string(K));
  if (w_scale.Shape() != std::vector<int64_t>{N})
    return invalid("MixedInt8MatMul: weight_scale must be float [N]");
  if (index.Shape().size() != 1) return invalid("MixedInt8MatMul: outlier_index must be int64 [O]");
  const int64_t outliers = index.Shape()[0];
  if (w_outlier.Shape() != std::vector<int64_t>{outliers, N})
    return invalid("MixedInt8MatMul: weight_outlier must be float16 [O, N]");
  args = {rows(s), K, N, outliers, wq.Data(), w_scale.Data(), outliers ? index.Data() : nullptr,
          outliers ? reinterpret_cast<const uint16_t*>(w_outlier.Data()) : nullptr};
  out = y.Allocate(output_shape(s, N));
  return Ort::Status{nullptr};
}

template <typename T>
struct MixedInt8MatMulCpu {
  MixedInt8MatMulCpu(const OrtApi*, const OrtKernelInfo*) {}
  Ort::Status Compute(OrtKernelContext* context, const Tensor<T>& x, const Tensor<int8_t>& wq,
                      const Tensor<float>& w_scale, const Tensor<int64_t>& index,
                      const Tensor<half_t>& w_outlier, Tensor<T>& y) {
    try {
      qcompile::MixedInt8Args args;
      T* out = nullptr;
      Ort::Status status = prepare_mixed(x, wq, w_scale, index, w_outlier, y, args, out);
      if (!status.IsOK()) return status;
      for (int64_t i = 0; i < args.outliers; ++i)
        if (args.outlier_index[i] < 0 || args.outlier_index[i] >= args.K)
          return invalid("MixedInt8MatMul: outlier_index out of [0, K)");
      if (args.M == 0) return Ort::Status{nullptr};
      Ort::KernelContext ctx(context);
      std::vector<float> x32, y32;
      const float* xf = as_float(x.Data(), (size_t)(args.M * args.K), x32);
      float* target = reinterpret_cast<float*>(out);
      if constexpr (is_half<T>()) { y32.resize((size_t)(args.M * args.N)); target = y32.data(); }
      qcompile::mixed_int8_matmul_cpu(args, xf, target, run_parallel, &ctx);
      store(y32, out);
      return Ort::Status{nullptr};
    } catch (const std::exception& e) {
      return Ort::Status(e.what(), ORT_RUNTIME_EXCEPTION);
    }
  }
};

#ifdef QCOMPILE_WITH_CUDA
Ort::Status cuda_status(int code, const char* op) {
  if (code == 0) return Ort::Status{nullptr};
  return Ort::Status((std::string(op) + ": CUDA error " + std::to_string(code)).c_str(), ORT_RUNTIME_EXCEPTION);
}

template <typename T>
struct Int4MatMulCuda : Int4Shape {
  Int4MatMulCuda(const OrtApi*, const OrtKernelInfo* info) : Int4Shape(info) {}
  Ort::Status Compute(OrtKernelContext* context, const Tensor<T>& a, const Tensor<uint8_t>& b,
                      const Tensor<half_t>& scales, const Tensor<half_t>& zeros, Tensor<T>& y) {
    try {
      qcompile::Int4Args args;
      T* out = nullptr;
      Ort::Status status = prepare(a, b, scales, zeros, y, args, out);
      if (!status.IsOK() || args.M == 0) return status;
      void* stream = Ort::KernelContext(context).GetGPUComputeStream();  // ORT's stream
      return cuda_status(qcompile::int4_matmul_cuda(args, a.Data(), out, is_half<T>(), stream), "Int4MatMul");
    } catch (const std::exception& e) {
      return Ort::Status(e.what(), ORT_RUNTIME_EXCEPTION);
    }
  }
};

template <typename T>
struct MixedInt8MatMulCuda {
  MixedInt8MatMulCuda(const OrtApi*, const OrtKernelInfo*) {}
  Ort::Status Compute(OrtKernelContext* context, const Tensor<T>& x, const Tensor<int8_t>& wq,
                      const Tensor<float>& w_scale, const Tensor<int64_t>& index,
                      const Tensor<half_t>& w_outlier, Tensor<T>& y) {
    try {
      qcompile::MixedInt8Args args;
      T* out = nullptr;
      Ort::Status status = prepare_mixed(x, wq, w_scale, index, w_outlier, y, args, out);
      if (!status.IsOK() || args.M == 0) return status;
      void* stream = Ort::KernelContext(context).GetGPUComputeStream();
      return cuda_status(qcompile::mixed_int8_matmul_cuda(args, x.Data(), out, is_half<T>(), stream),
                         "MixedInt8MatMul");
    } catch (const std::exception& e) {
      return Ort::Status(e.what(), ORT_RUNTIME_EXCEPTION);
    }
  }
};
#endif

std::once_flag once;
Ort::CustomOpDomain* domain = nullptr;  // lives as long as the process (sessions refer to it)

void build_domain() {
  using Ort::Custom::CreateLiteCustomOp;
  static std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>> ops;
  const char* cpu = "CPUExecutionProvider";
  ops.emplace_back(CreateLiteCustomOp<Int4MatMulCpu<float>>("Int4MatMul", cpu));
  ops.emplace_back(CreateLiteCustomOp<Int4MatMulCpu<half_t>>("Int4MatMul", cpu));
  ops.emplace_back(CreateLiteCustomOp<MixedInt8MatMulCpu<float>>("MixedInt8MatMul", cpu));
  ops.emplace_back(CreateLiteCustomOp<MixedInt8MatMulCpu<half_t>>("MixedInt8MatMul", cpu));
#ifdef QCOMPILE_WITH_CUDA
  const char* cuda = "CUDAExecutionProvider";
  ops.emplace_back(CreateLiteCustomOp<Int4MatMulCuda<float>>("Int4MatMul", cuda));
  ops.emplace_back(CreateLiteCustomOp<Int4MatMulCuda<half_t>>("Int4MatMul", cuda));
  ops.emplace_back(CreateLiteCustomOp<MixedInt8MatMulCuda<float>>("MixedInt8MatMul", cuda));
  ops.emplace_back(CreateLiteCustomOp<MixedInt8MatMulCuda<half_t>>("MixedInt8MatMul", cuda));
#endif
  domain = new Ort::CustomOpDomain(DOMAIN_NAME);
  for (auto& op : ops) domain->Add(op.get());
}

}  // namespace

#define QCOMPILE_EXPORT __attribute__((visibility("default")))

extern "C" {

QCOMPILE_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return nullptr;  // cannot even report: ORT older than our headers
  Ort::InitApi(api);
  try {
    std::call_once(once, build_domain);
    Ort::UnownedSessionOptions(options).Add(*domain);
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_RUNTIME_EXCEPTION, e.what());
  }
  return nullptr;
}

// For tooling: whether this build carries the CUDA kernels.
QCOMPILE_EXPORT int QcompileHasCuda() {
#ifdef QCOMPILE_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}

}  // extern "C"
