// CUDA kernels for qcompile's custom ops (kernels.h). Launchers take ONNX Runtime's compute
// stream, allocate nothing and never synchronise, so they run inside ORT's CUDA graphs.
//
// Int4MatMul
//   M <= 16: GEMV — one warp per output column, up to 4 rows per warp in registers, the packed
//            column read once per row group (coalesced bytes), dequantized in registers.
//   M  > 16: tiled tensor-core GEMM (WMMA fp16 16x16x16, fp32 accumulation; sm_80/sm_90):
//            64x64 output tiles, 4 warps; each K step stages A (as fp16) and the dequantized
//            W tile (s * (u - z), fp16) in shared memory.
// MixedInt8MatMul: one block per (row, 128 columns): the row's absmax over non-outlier channels
//   (outliers found by binary search in the sorted index), X^q of the row in shared memory,
//   int8 dot products with __dp4a (K % 4 == 0) or bytes, the fp16 outlier columns added in
//   the epilogue. (A tiled int8 tensor-core path for large M is future work.)
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>

#include "kernels.h"

namespace qcompile {
namespace {

__device__ __forceinline__ float load_f(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load_f(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ void store_f(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store_f(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
__device__ __forceinline__ __half load_h(const float* p, int64_t i) { return __float2half_rn(p[i]); }
__device__ __forceinline__ __half load_h(const __half* p, int64_t i) { return p[i]; }

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// --- Int4MatMul: GEMV -----------------------------------------------------------------------

constexpr int GEMV_ROWS = 4;
constexpr int GEMV_WARPS = 4;

template <typename T>
__global__ void int4_gemv(const T* __restrict__ a, const uint8_t* __restrict__ b,
                          const __half* __restrict__ scales, const __half* __restrict__ zeros,
                          T* __restrict__ y, int M, int K, int N, int g) {
  const int n = blockIdx.x * GEMV_WARPS + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int m0 = blockIdx.y * GEMV_ROWS;
  if (n >= N) return;
  const int blocks = (K + g - 1) / g, half_g = g / 2;
  const uint8_t* col = b + (int64_t)n * blocks * half_g;
  float acc[GEMV_ROWS] = {0.f, 0.f, 0.f, 0.f};
  for (int j = 0; j < blocks; ++j) {
    const float s = __half2float(scales[(int64_t)n * blocks + j]);
    const float z = __half2float(zeros[(int64_t)n * blocks + j]);
    const int k0 = j * g;
    for (int p = lane; p < half_g; p += 32) {
      const uint8_t byte = col[(int64_t)j * half_g + p];
      const int k = k0 + 2 * p;
      const float w0 = s * ((float)(byte & 0xf) - z), w1 = s * ((float)(byte >> 4) - z);
#pragma unroll
      for (int r = 0; r < GEMV_ROWS; ++r) {
        if (m0 + r < M) {
          const int64_t row = (int64_t)(m0 + r) * K;
          if (k < K) acc[r] += load_f(a, row + k) * w0;
          if (k + 1 < K) acc[r] += load_f(a, row + k + 1) * w1;
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < GEMV_ROWS; ++r) {
    const float v = warp_sum(acc[r]);
    if (lane == 0 && m0 + r < M) store_f(y, (int64_t)(m0 + r) * N + n, v);
  }
}

// --- Int4MatMul: tiled tensor cores ---------------------------------------------------------

constexpr int TM = 64, TN = 64, TK = 32, PAD = 8;

template <typename T>
__global__ void __launch_bounds__(128) int4_gemm_wmma(
    const T* __restrict__ a, const uint8_t* __restrict__ b, const __half* __restrict__ scales,
    const __half* __restrict__ zeros, T* __restrict__ y, int M, int K, int N, int g) {
  using namespace nvcuda;
  __shared__ __half As[TM][TK + PAD];
  __shared__ __half Bs[TK][TN + PAD];
  __shared__ float Cs[TM][TN + 4];
  const int m0 = blockIdx.y * TM, n0 = blockIdx.x * TN;
  const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;  // 2 x 2 warps, 32 x 32 each
  const int blocks = (K + g - 1) / g, half_g = g / 2;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  for (int k0 = 0; k0 < K; k0 += TK) {
    for (int idx = threadIdx.x; idx < TM * TK; idx += blockDim.x) {
      const int i = idx / TK, kk = idx % TK, m = m0 + i, k = k0 + kk;
      As[i][kk] = (m < M && k < K) ? load_h(a, (int64_t)m * K + k) : __float2half(0.0f);
    }
    for (int idx = threadIdx.x; idx < TN * TK; idx += blockDim.x) {
      const int nn = idx / TK, kk = idx % TK, n = n0 + nn, k = k0 + kk;
      float w = 0.0f;
      if (n < N && k < K) {
        const int j = k / g, r = k - j * g;
        const uint8_t byte = b[((int64_t)n * blocks + j) * half_g + r / 2];
        const float u = (float)((r & 1) ? (byte >> 4) : (byte & 0xf));
        w = __half2float(scales[(int64_t)n * blocks + j]) * (u - __half2float(zeros[(int64_t)n * blocks + j]));
      }
      Bs[kk][nn] = __float2half_rn(w);
    }
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < TK; ks += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &As[wm * 32 + i * 16][ks], TK + PAD);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &Bs[ks][wn * 32 + j * 16], TN + PAD);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&Cs[wm * 32 + i * 16][wn * 32 + j * 16], acc[i][j], TN + 4, wmma::mem_row_major);
  __syncthreads();
  for (int idx = threadIdx.x; idx < TM * TN; idx += blockDim.x) {
    const int i = idx / TN, jn = idx % TN, m = m0 + i, n = n0 + jn;
    if (m < M && n < N) store_f(y, (int64_t)m * N + n, Cs[i][jn]);
  }
}

// --- MixedInt8MatMul ------------------------------------------------------------------------

constexpr int MIXED_THREADS = 256, MIXED_COLUMNS = 128;

__device__ __forceinline__ bool is_outlier(const int64_t* index, int count, int k) {
  int lo = 0, hi = count;  // the index is sorted ascending (the emitter sorts it)
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (index[mid] < k) lo = mid + 1; else hi = mid;
  }
  return lo < count && index[lo] == k;
}

template <typename T>
__global__ void mixed_int8_row(const T* __restrict__ x, const int8_t* __restrict__ wq,
                               const float* __restrict__ w_scale, const int64_t* __restrict__ index,
                               const __half* __restrict__ w_outlier, T* __restrict__ y,
                               int K, int N, int outliers) {
  extern __shared__ int8_t xq[];  // K bytes (rounded up to 4)
  __shared__ float partial[MIXED_THREADS / 32];
  __shared__ float row_scale;
  const int m = blockIdx.y, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const T* row = x + (int64_t)m * K;
  float amax = 0.0f;
  for (int k = threadIdx.x; k < K; k += blockDim.x)
    if (!is_outlier(index, outliers, k)) amax = fmaxf(amax, fabsf(load_f(row, k)));
  for (int offset = 16; offset > 0; offset >>= 1) amax = fmaxf(amax, __shfl_down_sync(0xffffffffu, amax, offset));
  if (lane == 0) partial[warp] = amax;
  __syncthreads();
  if (threadIdx.x == 0) {
    float v = 0.0f;
    for (int w = 0; w < MIXED_THREADS / 32; ++w) v = fmaxf(v, partial[w]);
    row_scale = fmaxf(v, 1e-8f) / 127.0f;
  }
  __syncthreads();
  const float s = row_scale;
  const int padded = (K + 3) & ~3;
  for (int k = threadIdx.x; k < padded; k += blockDim.x) {
    float q = 0.0f;
    if (k < K && !is_outlier(index, outliers, k)) q = fminf(127.0f, fmaxf(-127.0f, rintf(load_f(row, k) / s)));
    xq[k] = (int8_t)q;
  }
  __syncthreads();
  const int n_end = min(N, (int)(blockIdx.x + 1) * MIXED_COLUMNS);
  for (int n = blockIdx.x * MIXED_COLUMNS + warp; n < n_end; n += MIXED_THREADS / 32) {
    const int8_t* w = wq + (int64_t)n * K;
    int acc = 0;
    if ((K & 3) == 0) {
      const int* w4 = reinterpret_cast<const int*>(w);
      const int* x4 = reinterpret_cast<const int*>(xq);
      for (int p = lane; p < K / 4; p += 32) acc = __dp4a(x4[p], w4[p], acc);
    } else {
      for (int k = lane; k < K; k += 32) acc += (int)xq[k] * (int)w[k];
    }
    for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, offset);
    float extra = 0.0f;
    for (int i = lane; i < outliers; i += 32)
      extra += load_f(row, index[i]) * __half2float(w_outlier[(int64_t)i * N + n]);
    extra = warp_sum(extra);
    if (lane == 0) store_f(y, (int64_t)m * N + n, (float)acc * s * w_scale[n] + extra);
  }
}

template <typename T>
int launch_int4(const Int4Args& p, const void* a, void* y, cudaStream_t stream) {
  const T* at = static_cast<const T*>(a);
  T* yt = static_cast<T*>(y);
  const __half* s = reinterpret_cast<const __half*>(p.scales);
  const __half* z = reinterpret_cast<const __half*>(p.zeros);
  if (p.M <= 16) {
    dim3 grid((unsigned)((p.N + GEMV_WARPS - 1) / GEMV_WARPS), (unsigned)((p.M + GEMV_ROWS - 1) / GEMV_ROWS));
    int4_gemv<T><<<grid, GEMV_WARPS * 32, 0, stream>>>(at, p.b, s, z, yt, (int)p.M, (int)p.K, (int)p.N, (int)p.group);
  } else {
    dim3 grid((unsigned)((p.N + TN - 1) / TN), (unsigned)((p.M + TM - 1) / TM));
    int4_gemm_wmma<T><<<grid, 128, 0, stream>>>(at, p.b, s, z, yt, (int)p.M, (int)p.K, (int)p.N, (int)p.group);
  }
  return (int)cudaGetLastError();
}

template <typename T>
int launch_mixed(const MixedInt8Args& p, const void* x, void* y, cudaStream_t stream) {
  dim3 grid((unsigned)((p.N + MIXED_COLUMNS - 1) / MIXED_COLUMNS), (unsigned)p.M);
  const size_t shared = (size_t)((p.K + 3) & ~3);
  if (shared > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(mixed_int8_row<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shared);
    if (e != cudaSuccess) return (int)e;
  }
  mixed_int8_row<T><<<grid, MIXED_THREADS, shared, stream>>>(
      static_cast<const T*>(x), p.wq, p.w_scale, p.outlier_index, reinterpret_cast<const __half*>(p.w_outlier),
      static_cast<T*>(y), (int)p.K, (int)p.N, (int)p.outliers);
  return (int)cudaGetLastError();
}

}  // namespace

int int4_matmul_cuda(const Int4Args& args, const void* a, void* y, bool half_io, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return half_io ? launch_int4<__half>(args, a, y, s) : launch_int4<float>(args, a, y, s);
}

int mixed_int8_matmul_cuda(const MixedInt8Args& args, const void* x, void* y, bool half_io, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return half_io ? launch_mixed<__half>(args, x, y, s) : launch_mixed<float>(args, x, y, s);
}

}  // namespace qcompile
