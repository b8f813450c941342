// CUDA kernels for com.onnxfgq::MatMulBlockQuant, behind a plain C entry point
// (onnxfgq_cuda_matmul_block_quant) used by the op shell and by ctypes-based GPU tests.
//
//  * GEMV (M <= 8 rows per launch): one warp per output column, memory-bound. Fast path when
//    K % 32 == 0 and block_size % 32 == 0: each lane owns chunks of 32 codes (= `bits` 32-bit
//    words of B, fetched with 128/64/32-bit vector loads), decodes them in registers with
//    compile-time bit offsets, and FMAs against up to 8 rows of A. Otherwise a generic
//    per-code path handles any K and block size.
//  * GEMM (M > 8): 64x64 output tiles, the B tile is dequantised into shared memory once per
//    K step and reused by all 64 rows of A. fp16: tensor cores (WMMA 16x16x16, fp32
//    accumulation, weights rounded to fp16 in shared memory); fp32: SIMT FP32 FMAs, so fp32
//    keeps full precision.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "block_quant.h"

namespace onnxfgq {
namespace {

constexpr int kWarp = 32;

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }
template <typename T>
__device__ __forceinline__ T FromFloat(float v);
template <>
__device__ __forceinline__ float FromFloat<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half FromFloat<__half>(float v) { return __float2half_rn(v); }

struct Problem {
  const void* a;
  const uint8_t* b;
  const void* scales;
  const void* zp;
  int zp_kind;
  const void* bias;
  void* y;
  int64_t m, k, n, block_size, groups, row_bytes;
  int bits;
};

// Scale and offset (w = code * s + o) of group g of column n.
template <typename T>
__device__ __forceinline__ void GroupParams(const Problem& p, int64_t n, int64_t g, float& s, float& o) {
  const int64_t idx = n * p.groups + g;
  s = ToFloat(static_cast<const T*>(p.scales)[idx]);
  float zp;
  switch (p.zp_kind) {
    case static_cast<int>(ZeroPointKind::kUint8): zp = static_cast<float>(p.zp ? static_cast<const uint8_t*>(p.zp)[idx] : 0); break;
    case static_cast<int>(ZeroPointKind::kFloat):
    case static_cast<int>(ZeroPointKind::kHalf): zp = ToFloat(static_cast<const T*>(p.zp)[idx]); break;
    default: zp = static_cast<float>(1 << (p.bits - 1)); break;
  }
  o = -zp * s;
}

// Code k of a row, any width, byte reads only (never past the row's last byte).
__device__ __forceinline__ uint32_t CodeAt(const uint8_t* row, int64_t row_bytes, int64_t k, int bits) {
  const int64_t bit = k * bits;
  const int64_t byte = bit >> 3;
  uint32_t v = row[byte];
  if (byte + 1 < row_bytes) v |= static_cast<uint32_t>(row[byte + 1]) << 8;
  return (v >> (bit & 7)) & ((1u << bits) - 1u);
}

template <int BITS>
__device__ __forceinline__ void LoadChunk(const uint8_t* src, uint32_t (&w)[BITS + 1]) {
  if constexpr (BITS % 4 == 0) {
#pragma unroll
    for (int i = 0; i < BITS / 4; ++i) {
      const uint4 v = reinterpret_cast<const uint4*>(src)[i];
      w[4 * i] = v.x, w[4 * i + 1] = v.y, w[4 * i + 2] = v.z, w[4 * i + 3] = v.w;
    }
  } else if constexpr (BITS % 2 == 0) {
#pragma unroll
    for (int i = 0; i < BITS / 2; ++i) {
      const uint2 v = reinterpret_cast<const uint2*>(src)[i];
      w[2 * i] = v.x, w[2 * i + 1] = v.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < BITS; ++i) w[i] = reinterpret_cast<const uint32_t*>(src)[i];
  }
  w[BITS] = 0;
}

template <int BITS, int J>
__device__ __forceinline__ uint32_t ChunkCode(const uint32_t (&w)[BITS + 1]) {
  constexpr int kBit = J * BITS;
  constexpr int kWord = kBit / 32;
  constexpr int kShift = kBit % 32;
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  if constexpr (kShift + BITS <= 32) {
    return (w[kWord] >> kShift) & kMask;
  } else {
    return __funnelshift_r(w[kWord], w[kWord + 1], kShift) & kMask;
  }
}

template <typename T, int BITS, int MR, int J>
__device__ __forceinline__ void ChunkFma(const uint32_t (&w)[BITS + 1], float s, float o, const T* a, int64_t k,
                                         int64_t lda, int rows, float (&acc)[MR]) {
  if constexpr (J < 32) {
    const float wv = static_cast<float>(ChunkCode<BITS, J>(w)) * s + o;
#pragma unroll
    for (int r = 0; r < MR; ++r)
      if (r < rows) acc[r] = fmaf(wv, ToFloat(a[r * lda + k + J]), acc[r]);
    ChunkFma<T, BITS, MR, J + 1>(w, s, o, a, k, lda, rows, acc);
  }
}

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename T, int MR>
__device__ __forceinline__ void StoreRows(const Problem& p, int64_t m0, int rows, int64_t n, float (&acc)[MR]) {
  const float bias = p.bias ? ToFloat(static_cast<const T*>(p.bias)[n]) : 0.0f;
#pragma unroll
  for (int r = 0; r < MR; ++r) {
    const float v = WarpSum(acc[r]);
    if (threadIdx.x % kWarp == 0 && r < rows) static_cast<T*>(p.y)[(m0 + r) * p.n + n] = FromFloat<T>(v + bias);
  }
}

// Fast GEMV: K % 32 == 0, block_size % 32 == 0, 16-byte aligned B rows.
template <typename T, int BITS, int MR>
__global__ void GemvFast(Problem p, int64_t m0, int rows) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (n >= p.n) return;
  const int lane = threadIdx.x % kWarp;
  const uint8_t* row = p.b + n * p.row_bytes;
  const T* a = static_cast<const T*>(p.a) + m0 * p.k;
  const int64_t chunks = p.k / 32;
  const int64_t chunks_per_group = p.block_size / 32;
  float acc[MR];
#pragma unroll
  for (int r = 0; r < MR; ++r) acc[r] = 0.0f;
  for (int64_t c = lane; c < chunks; c += kWarp) {
    uint32_t w[BITS + 1];
    LoadChunk<BITS>(row + c * 4 * BITS, w);
    float s, o;
    GroupParams<T>(p, n, c / chunks_per_group, s, o);
    ChunkFma<T, BITS, MR, 0>(w, s, o, a, c * 32, p.k, rows, acc);
  }
  StoreRows<T, MR>(p, m0, rows, n, acc);
}

// Generic GEMV: any K, any block size.
template <typename T, int MR>
__global__ void GemvGeneric(Problem p, int64_t m0, int rows) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (n >= p.n) return;
  const int lane = threadIdx.x % kWarp;
  const uint8_t* row = p.b + n * p.row_bytes;
  const T* a = static_cast<const T*>(p.a) + m0 * p.k;
  float acc[MR];
#pragma unroll
  for (int r = 0; r < MR; ++r) acc[r] = 0.0f;
  for (int64_t k = lane; k < p.k; k += kWarp) {
    float s, o;
    GroupParams<T>(p, n, k / p.block_size, s, o);
    const float wv = static_cast<float>(CodeAt(row, p.row_bytes, k, p.bits)) * s + o;
#pragma unroll
    for (int r = 0; r < MR; ++r)
      if (r < rows) acc[r] = fmaf(wv, ToFloat(a[r * p.k + k]), acc[r]);
  }
  StoreRows<T, MR>(p, m0, rows, n, acc);
}

constexpr int kTileM = 64, kTileN = 64, kTileK = 32, kGemmThreads = 256;

// Tiled GEMM: each K step dequantises a 64-column x 32-code tile of B into shared memory once.
template <typename T>
__global__ void __launch_bounds__(kGemmThreads) GemmTiled(Problem p) {
  __shared__ float as[kTileK][kTileM + 1];
  __shared__ float bs[kTileK][kTileN + 1];
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const T* a = static_cast<const T*>(p.a);
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < p.k; k0 += kTileK) {
#pragma unroll
    for (int i = 0; i < (kTileM * kTileK) / kGemmThreads; ++i) {
      const int e = tid + i * kGemmThreads;
      const int r = e / kTileK, kk = e % kTileK;
      const int64_t m = m0 + r, k = k0 + kk;
      as[kk][r] = (m < p.m && k < p.k) ? ToFloat(a[m * p.k + k]) : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < (kTileN * kTileK) / kGemmThreads; ++i) {
      const int e = tid + i * kGemmThreads;
      const int c = e / kTileK, kk = e % kTileK;
      const int64_t n = n0 + c, k = k0 + kk;
      float w = 0.0f;
      if (n < p.n && k < p.k) {
        float s, o;
        GroupParams<T>(p, n, k / p.block_size, s, o);
        w = static_cast<float>(CodeAt(p.b + n * p.row_bytes, p.row_bytes, k, p.bits)) * s + o;
      }
      bs[kk][c] = w;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kTileK; ++kk) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = as[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = bs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t n = n0 + tx + 16 * j;
    if (n >= p.n) continue;
    const float bias = p.bias ? ToFloat(static_cast<const T*>(p.bias)[n]) : 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t m = m0 + ty + 16 * i;
      if (m < p.m) static_cast<T*>(p.y)[m * p.n + n] = FromFloat<T>(acc[i][j] + bias);
    }
  }
}

constexpr int kMmaThreads = 128;  // 4 warps, each a 32x32 quarter of the 64x64 tile
constexpr int kMmaLd = kTileK + 8;  // halves; multiple of 8 as WMMA requires, skews banks
constexpr int kMmaLdc = kTileN + 4;

// fp16 GEMM on tensor cores: Y = A @ W^T; W's tile is stored [n][k], i.e. W^T column-major.
__global__ void __launch_bounds__(kMmaThreads) GemmWmmaHalf(Problem p) {
  using namespace nvcuda;
  __shared__ __align__(32) __half as[kTileM * kMmaLd];
  __shared__ __align__(32) __half bs[kTileN * kMmaLd];
  __shared__ __align__(32) float cs[kTileM * kMmaLdc];
  const int tid = threadIdx.x;
  const int warp = tid / kWarp;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const __half* a = static_cast<const __half*>(p.a);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  for (int64_t k0 = 0; k0 < p.k; k0 += kTileK) {
#pragma unroll
    for (int i = 0; i < (kTileM * kTileK) / kMmaThreads; ++i) {
      const int e = tid + i * kMmaThreads;
      const int r = e / kTileK, kk = e % kTileK;
      const int64_t m = m0 + r, k = k0 + kk;
      as[r * kMmaLd + kk] = (m < p.m && k < p.k) ? a[m * p.k + k] : __float2half(0.0f);
    }
#pragma unroll
    for (int i = 0; i < (kTileN * kTileK) / kMmaThreads; ++i) {
      const int e = tid + i * kMmaThreads;
      const int c = e / kTileK, kk = e % kTileK;
      const int64_t n = n0 + c, k = k0 + kk;
      float w = 0.0f;
      if (n < p.n && k < p.k) {
        float s, o;
        GroupParams<__half>(p, n, k / p.block_size, s, o);
        w = static_cast<float>(CodeAt(p.b + n * p.row_bytes, p.row_bytes, k, p.bits)) * s + o;
      }
      bs[c * kMmaLd + kk] = __float2half_rn(w);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> af[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> bf[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(af[i], as + (wm + 16 * i) * kMmaLd + kk, kMmaLd);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(bf[j], bs + (wn + 16 * j) * kMmaLd + kk, kMmaLd);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], af[i], bf[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(cs + (wm + 16 * i) * kMmaLdc + wn + 16 * j, acc[i][j], kMmaLdc, wmma::mem_row_major);
  __syncthreads();
  for (int e = tid; e < kTileM * kTileN; e += kMmaThreads) {
    const int r = e / kTileN, c = e % kTileN;
    const int64_t m = m0 + r, n = n0 + c;
    if (m < p.m && n < p.n) {
      const float bias = p.bias ? __half2float(static_cast<const __half*>(p.bias)[n]) : 0.0f;
      static_cast<__half*>(p.y)[m * p.n + n] = __float2half_rn(cs[r * kMmaLdc + c] + bias);
    }
  }
}

constexpr int kGemvWarps = 8;  // columns per block
constexpr int64_t kGemvMaxRows = 8;

template <typename T, int MR>
void LaunchGemvRows(const Problem& p, bool fast, int64_t m0, int rows, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.n + kGemvWarps - 1) / kGemvWarps));
  const dim3 block(kGemvWarps * kWarp);
  if (!fast) {
    GemvGeneric<T, MR><<<grid, block, 0, stream>>>(p, m0, rows);
    return;
  }
  switch (p.bits) {
    case 2: GemvFast<T, 2, MR><<<grid, block, 0, stream>>>(p, m0, rows); break;
    case 3: GemvFast<T, 3, MR><<<grid, block, 0, stream>>>(p, m0, rows); break;
    case 4: GemvFast<T, 4, MR><<<grid, block, 0, stream>>>(p, m0, rows); break;
    case 5: GemvFast<T, 5, MR><<<grid, block, 0, stream>>>(p, m0, rows); break;
    case 6: GemvFast<T, 6, MR><<<grid, block, 0, stream>>>(p, m0, rows); break;
    case 7: GemvFast<T, 7, MR><<<grid, block, 0, stream>>>(p, m0, rows); break;
    default: GemvFast<T, 8, MR><<<grid, block, 0, stream>>>(p, m0, rows); break;
  }
}

template <typename T>
int Launch(const Problem& p, cudaStream_t stream) {
  if (p.m <= 0) return 0;
  if (p.m > kGemvMaxRows) {
    const dim3 grid(static_cast<unsigned>((p.n + kTileN - 1) / kTileN),
                    static_cast<unsigned>((p.m + kTileM - 1) / kTileM));
    if constexpr (std::is_same_v<T, __half>) {
      GemmWmmaHalf<<<grid, kMmaThreads, 0, stream>>>(p);
    } else {
      GemmTiled<T><<<grid, kGemmThreads, 0, stream>>>(p);
    }
    return static_cast<int>(cudaGetLastError());
  }
  const bool fast = p.k % 32 == 0 && p.block_size % 32 == 0 &&
                    reinterpret_cast<uintptr_t>(p.b) % 16 == 0;
  const int rows = static_cast<int>(p.m);
  if (rows == 1) {
    LaunchGemvRows<T, 1>(p, fast, 0, rows, stream);
  } else if (rows == 2) {
    LaunchGemvRows<T, 2>(p, fast, 0, rows, stream);
  } else if (rows <= 4) {
    LaunchGemvRows<T, 4>(p, fast, 0, rows, stream);
  } else {
    LaunchGemvRows<T, 8>(p, fast, 0, rows, stream);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace
}  // namespace onnxfgq

extern "C" __attribute__((visibility("default"))) int onnxfgq_cuda_matmul_block_quant(
    const void* a, const uint8_t* b, const void* scales, const void* zero_points, int zp_kind, const void* bias,
    void* y, int64_t m, int64_t k, int64_t n, int bits, int64_t block_size, int a_dtype, void* stream) {
  using onnxfgq::ZeroPointKind;
  if (a == nullptr || b == nullptr || scales == nullptr || y == nullptr || k < 1 || n < 1 || m < 0 || bits < 2 ||
      bits > 8 || block_size < 1 || zp_kind < 0 || zp_kind > 3 ||
      (zp_kind != static_cast<int>(ZeroPointKind::kNone) && zero_points == nullptr))
    return -1;
  onnxfgq::Problem p;
  p.a = a;
  p.b = b;
  p.scales = scales;
  p.zp = zero_points;
  p.zp_kind = zp_kind;
  p.bias = bias;
  p.y = y;
  p.m = m;
  p.k = k;
  p.n = n;
  p.bits = bits;
  p.block_size = block_size;
  p.groups = (k + block_size - 1) / block_size;
  p.row_bytes = (k * bits + 7) / 8;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (a_dtype == 1) return onnxfgq::Launch<float>(p, s);
  if (a_dtype == 10) return onnxfgq::Launch<__half>(p, s);
  return -1;
}
