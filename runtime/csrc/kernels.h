// qcompile custom-op kernels: plain C++ / CUDA entry points, no ONNX Runtime headers here
// (nvcc 13 cannot compile onnxruntime_lite_custom_op.h; the ORT glue lives in ops.cc).
//
// Int4MatMul       Y[m, n] = sum_k A[m, k] * W[k, n],   W[k, n] = s[n, j] * (u[k, n] - z[n, j]),
//                  j = k / g; u: 4-bit codes packed [N, ceil(K/g), g/2] (even k in the low nibble),
//                  s, z: fp16 [N, ceil(K/g)].
// MixedInt8MatMul  LLM.int8(): with O the outlier input channels and X' = X with O zeroed,
//                  s_x[m] = max(max_k |X'[m, k]|, 1e-8) / 127, X^q = round_half_even(X' / s_x),
//                  Y[m, n] = s_x[m] * s_w[n] * sum_k X^q[m, k] Wq[n, k] + sum_i X[m, O_i] Wo[i, n],
//                  Wq: int8 [N, K] (rows of O zero), s_w: float [N], Wo: fp16 [|O|, N].
#pragma once
#include <cstddef>
#include <cstdint>

namespace qcompile {

// Runs fn(data, i) for i in [0, total), possibly in parallel (ONNX Runtime's thread pool).
using ParallelFor = void (*)(void* runner, void (*fn)(void*, size_t), size_t total, void* data);

float half_to_float(uint16_t h);
uint16_t float_to_half(float f);

struct Int4Args {
  int64_t M, K, N, group;
  const uint8_t* b;         // [N, blocks, group/2]
  const uint16_t* scales;   // fp16 [N, blocks]
  const uint16_t* zeros;    // fp16 [N, blocks]
};

// a: [M, K] float, y: [M, N] float.
void int4_matmul_cpu(const Int4Args& args, const float* a, float* y, ParallelFor parallel, void* runner);

struct MixedInt8Args {
  int64_t M, K, N, outliers;
  const int8_t* wq;          // [N, K]
  const float* w_scale;      // [N]
  const int64_t* outlier_index;  // [outliers]
  const uint16_t* w_outlier;     // fp16 [outliers, N]
};

void mixed_int8_matmul_cpu(const MixedInt8Args& args, const float* x, float* y, ParallelFor parallel, void* runner);

#ifdef QCOMPILE_WITH_CUDA
// CUDA launchers (kernels.cu): everything runs on `stream`, no allocation, no synchronisation
// (capturable in ONNX Runtime's CUDA graphs). Activations fp32 or fp16 (`half_io`).
// Returns 0 or a cudaError_t.
int int4_matmul_cuda(const Int4Args& args, const void* a, void* y, bool half_io, void* stream);
// outlier_index: device int64 [outliers].
int mixed_int8_matmul_cuda(const MixedInt8Args& args, const void* x, void* y, bool half_io, void* stream);
#endif

}  // namespace qcompile
