// CPU reference and fallback kernels (kernels.h). Blocked so that a SmolLM2 evaluation runs in
// minutes: Int4MatMul dequantizes a tile of 16 output columns into a small float buffer (exact:
// s * (u - z) in float32, as the reference) and multiplies 4 rows at a time with 8-wide vectors;
// MixedInt8MatMul quantizes each row once and takes int8 dot products column by column. Work is
// split over ONNX Runtime's intra-op thread pool.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels.h"

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace qcompile {

float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while (!(mant & 0x400)) { mant <<= 1; --exp; }
      bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_half(float f) {  // round to nearest even
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000, e = (x >> 23) & 0xff, m = x & 0x7fffff;
  if (e == 0xff) return (uint16_t)(sign | 0x7c00 | (m ? 0x200 : 0));
  int exp = (int)e - 127 + 15;
  if (exp >= 0x1f) return (uint16_t)(sign | 0x7c00);
  if (exp <= 0) {
    if (exp < -10) return (uint16_t)sign;
    m |= 0x800000;
    int shift = 14 - exp;
    uint32_t half = m >> shift, rest = m & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rest > mid || (rest == mid && (half & 1))) ++half;
    return (uint16_t)(sign | half);
  }
  uint32_t half = ((uint32_t)exp << 10) | (m >> 13), rest = m & 0x1fff;
  if (rest > 0x1000 || (rest == 0x1000 && (half & 1))) ++half;
  return (uint16_t)(sign | half);
}

namespace {

typedef float v8f __attribute__((vector_size(32)));
constexpr int64_t NT = 16;  // output columns per tile (two 8-wide vectors)
constexpr int64_t MR = 4;   // rows per micro-kernel step

inline v8f load8(const float* p) { v8f v; std::memcpy(&v, p, sizeof v); return v; }
inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }

struct Int4Job {
  const Int4Args* args;
  const float* a;
  float* y;
};

// One tile of NT output columns: dequantize W[:, n0:n0+NT] into buf[K][NT], then every row.
void int4_tile(void* data, size_t tile) {
  const Int4Job& job = *static_cast<Int4Job*>(data);
  const Int4Args& p = *job.args;
  const int64_t K = p.K, N = p.N, g = p.group, blocks = (K + g - 1) / g, n0 = (int64_t)tile * NT;
  const int64_t nt = std::min(NT, N - n0);
  thread_local std::vector<float> storage;
  if (storage.size() < (size_t)(K * NT)) storage.resize((size_t)(K * NT));
  float* buf = storage.data();
  if (nt < NT) std::fill(storage.begin(), storage.begin() + K * NT, 0.0f);
  for (int64_t c = 0; c < nt; ++c) {
    const int64_t n = n0 + c;
    const uint8_t* col = p.b + n * blocks * (g / 2);
    for (int64_t j = 0; j < blocks; ++j) {
      const float s = half_to_float(p.scales[n * blocks + j]), z = half_to_float(p.zeros[n * blocks + j]);
      const int64_t k0 = j * g, k1 = std::min(K, k0 + g);
      const uint8_t* bytes = col + j * (g / 2);
      for (int64_t k = k0; k < k1; ++k) {
        const uint8_t byte = bytes[(k - k0) >> 1];
        const float u = (float)(((k - k0) & 1) ? (byte >> 4) : (byte & 0xf));
        buf[k * NT + c] = s * (u - z);
      }
    }
  }
  const float* a = job.a;
  float* y = job.y;
  int64_t m = 0;
  for (; m + MR <= p.M; m += MR) {
    v8f acc[MR][2] = {};
    const float* rows[MR];
    for (int r = 0; r < MR; ++r) rows[r] = a + (m + r) * K;
    for (int64_t k = 0; k < K; ++k) {
      const v8f w0 = load8(buf + k * NT), w1 = load8(buf + k * NT + 8);
      for (int r = 0; r < MR; ++r) {
        const float x = rows[r][k];
        acc[r][0] += x * w0;
        acc[r][1] += x * w1;
      }
    }
    for (int r = 0; r < MR; ++r) {
      float out[NT];
      store8(out, acc[r][0]);
      store8(out + 8, acc[r][1]);
      std::memcpy(y + (m + r) * N + n0, out, (size_t)nt * sizeof(float));
    }
  }
  for (; m < p.M; ++m) {
    v8f acc0 = {}, acc1 = {};
    const float* row = a + m * K;
    for (int64_t k = 0; k < K; ++k) {
      acc0 += row[k] * load8(buf + k * NT);
      acc1 += row[k] * load8(buf + k * NT + 8);
    }
    float out[NT];
    store8(out, acc0);
    store8(out + 8, acc1);
    std::memcpy(y + m * N + n0, out, (size_t)nt * sizeof(float));
  }
}

// 8 bytes -> 16 codes in k order (low nibble first) as two float vectors.
inline void unpack16(const uint8_t* bytes, v8f& u0, v8f& u1) {
#ifdef __AVX2__
  __m128i b;
  std::memcpy(&b, bytes, 8);
  b = _mm_unpacklo_epi64(b, b);
  const __m128i mask = _mm_set1_epi8(0x0f);
  const __m128i lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
  const __m128i codes = _mm_unpacklo_epi8(lo, hi);  // k order: lo0 hi0 lo1 hi1 ...
  const __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes));
  const __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(codes, 8)));
  std::memcpy(&u0, &f0, 32);
  std::memcpy(&u1, &f1, 32);
#else
  float u[16];
  for (int t = 0; t < 8; ++t) {
    u[2 * t] = (float)(bytes[t] & 0xf);
    u[2 * t + 1] = (float)(bytes[t] >> 4);
  }
  u0 = load8(u);
  u1 = load8(u + 8);
#endif
}

constexpr int64_t GEMV_ROWS = 4;  // at most this many rows: the GEMV path

struct GemvJob {
  const Int4Args* args;
  const float* a;
  float* y;
  const float* group_sums;  // [M, blocks]: sum of x over each group
};

// Decode: per column and group, y += s * (sum_k x_k u_k - z * sum_k x_k), the codes unpacked
// 16 at a time into two 8-wide vectors; no weight buffer.
void int4_gemv_tile(void* data, size_t tile) {
  const GemvJob& job = *static_cast<GemvJob*>(data);
  const Int4Args& p = *job.args;
  const int64_t K = p.K, N = p.N, g = p.group, blocks = (K + g - 1) / g, M = p.M;
  const int64_t n0 = (int64_t)tile * NT, n1 = std::min(N, n0 + NT);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* col = p.b + n * blocks * (g / 2);
    float out[GEMV_ROWS] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t j = 0; j < blocks; ++j) {
      const float s = half_to_float(p.scales[n * blocks + j]), z = half_to_float(p.zeros[n * blocks + j]);
      const int64_t k0 = j * g, len = std::min(K, k0 + g) - k0;
      const uint8_t* bytes = col + j * (g / 2);
      v8f acc[GEMV_ROWS][2] = {};
      int64_t i = 0;
      for (; i + 16 <= len; i += 16) {
        v8f u0, u1;
        unpack16(bytes + (i >> 1), u0, u1);
        for (int64_t r = 0; r < M; ++r) {
          const float* x = job.a + r * K + k0 + i;
          acc[r][0] += load8(x) * u0;
          acc[r][1] += load8(x + 8) * u1;
        }
      }
      for (int64_t r = 0; r < M; ++r) {
        float dot = 0.0f;
        for (int t = 0; t < 8; ++t) dot += acc[r][0][t] + acc[r][1][t];
        const float* x = job.a + r * K + k0;
        for (int64_t t = i; t < len; ++t) {
          const uint8_t byte = bytes[t >> 1];
          dot += x[t] * (float)((t & 1) ? (byte >> 4) : (byte & 0xf));
        }
        out[r] += s * (dot - z * job.group_sums[r * blocks + j]);
      }
    }
    for (int64_t r = 0; r < M; ++r) job.y[r * N + n] = out[r];
  }
}

struct MixedJob {
  const MixedInt8Args* args;
  const float* x;
  float* y;
  const int8_t* xq;       // [M, K]
  const float* x_scale;   // [M]
  int64_t rows_per_task;
};

constexpr int64_t MIXED_COLUMNS = 64;  // columns per task: a 64 x K int8 slab stays in L2

void mixed_task(void* data, size_t task) {
  const MixedJob& job = *static_cast<MixedJob*>(data);
  const MixedInt8Args& p = *job.args;
  const int64_t K = p.K, N = p.N, col_tiles = (N + MIXED_COLUMNS - 1) / MIXED_COLUMNS;
  const int64_t m0 = (int64_t)task / col_tiles * job.rows_per_task, n0 = (int64_t)task % col_tiles * MIXED_COLUMNS;
  const int64_t m1 = std::min(p.M, m0 + job.rows_per_task), n1 = std::min(N, n0 + MIXED_COLUMNS);
  for (int64_t m = m0; m < m1; ++m) {
    const int8_t* xq = job.xq + m * K;
    const float* x = job.x + m * K;
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* w = p.wq + n * K;
      int32_t acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += (int32_t)xq[k] * (int32_t)w[k];
      float out = (float)acc * job.x_scale[m] * p.w_scale[n];
      for (int64_t i = 0; i < p.outliers; ++i)
        out += x[p.outlier_index[i]] * half_to_float(p.w_outlier[i * N + n]);
      job.y[m * N + n] = out;
    }
  }
}

}  // namespace

void int4_matmul_cpu(const Int4Args& args, const float* a, float* y, ParallelFor parallel, void* runner) {
  const size_t tiles = (size_t)((args.N + NT - 1) / NT);
  if (args.M <= GEMV_ROWS) {
    const int64_t blocks = (args.K + args.group - 1) / args.group;
    std::vector<float> sums((size_t)(args.M * blocks), 0.0f);
    for (int64_t r = 0; r < args.M; ++r)
      for (int64_t k = 0; k < args.K; ++k) sums[(size_t)(r * blocks + k / args.group)] += a[r * args.K + k];
    GemvJob job{&args, a, y, sums.data()};
    parallel(runner, int4_gemv_tile, tiles, &job);
    return;
  }
  Int4Job job{&args, a, y};
  parallel(runner, int4_tile, tiles, &job);
}

void mixed_int8_matmul_cpu(const MixedInt8Args& args, const float* x, float* y, ParallelFor parallel, void* runner) {
  const int64_t M = args.M, K = args.K;
  std::vector<int8_t> xq((size_t)(M * K));
  std::vector<float> scale((size_t)M);
  std::vector<uint8_t> outlier((size_t)K, 0);
  for (int64_t i = 0; i < args.outliers; ++i) outlier[(size_t)args.outlier_index[i]] = 1;
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * K;
    float amax = 0.0f;
    for (int64_t k = 0; k < K; ++k) amax = outlier[k] ? amax : std::max(amax, std::fabs(row[k]));
    const float s = std::max(amax, 1e-8f) / 127.0f;
    scale[m] = s;
    for (int64_t k = 0; k < K; ++k) {
      const float q = outlier[k] ? 0.0f : std::nearbyint(row[k] / s);
      xq[m * K + k] = (int8_t)std::min(127.0f, std::max(-127.0f, q));
    }
  }
  const int64_t col_tiles = (args.N + MIXED_COLUMNS - 1) / MIXED_COLUMNS;
  const int64_t rows_per_task = std::max<int64_t>(1, std::min<int64_t>(M, 16));
  MixedJob job{&args, x, y, xq.data(), scale.data(), rows_per_task};
  const size_t tasks = (size_t)(((M + rows_per_task - 1) / rows_per_task) * col_tiles);
  parallel(runner, mixed_task, tasks, &job);
}

}  // namespace qcompile
