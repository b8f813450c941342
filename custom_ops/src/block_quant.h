// Shared declarations for the MatMulBlockQuant kernels. No ONNX Runtime or CUDA headers here:
// the CPU kernels, the CUDA kernels (nvcc) and the op shells (g++) all include this file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace onnxfgq {

enum class ZeroPointKind : int { kNone = 0, kUint8 = 1, kFloat = 2, kHalf = 3 };

// Y[m, n] = sum_k A[m, k] * (code[n, k] - zp[n, g]) * scale[n, g] + bias[n], g = k / block_size.
struct CpuProblem {
  const float* a = nullptr;     // [M, K], fp32 (fp16 inputs are widened by the op shell)
  const uint8_t* b = nullptr;   // [N, row_bytes] little-endian bit streams
  const void* scales = nullptr; // [N, G], fp32 or fp16 (scales_half)
  bool scales_half = false;
  const void* zero_points = nullptr;  // [N, G] as described by zp_kind, or null
  ZeroPointKind zp_kind = ZeroPointKind::kNone;
  float* y = nullptr;           // [M, N], fp32
  int64_t m = 0, k = 0, n = 0;
  int bits = 4;
  int64_t block_size = 32;
  int64_t groups = 0;           // ceil(K / block_size)
  int64_t row_bytes = 0;        // ceil(K * bits / 8)
};

// Runs fn(data, i) for i in [0, total), possibly in parallel.
using ParallelForFn = void (*)(void* pool, void (*fn)(void*, size_t), size_t total, void* data);

// Computes p.y (without bias). Picks the AVX2 variant when the CPU has it.
void CpuMatMulBlockQuant(const CpuProblem& p, ParallelForFn parallel_for, void* pool);

// Name of the CPU variant CpuMatMulBlockQuant uses on this machine ("avx2" or "scalar").
const char* CpuVariantName();

// ---- per-ISA column kernels (internal) ----
// Decode path: y[:, n0:n1] for all m, dequantising each column in registers.
// scratch must hold at least 3 * (K + 64) + 2 * G floats.
void ColumnsScalar(const CpuProblem& p, int64_t n0, int64_t n1, float* scratch);
void ColumnsAvx2(const CpuProblem& p, int64_t n0, int64_t n1, float* scratch);
// Prefill path: dequantise columns [n0, n1) into a float tile once, reuse it for all M rows.
// scratch must hold at least (n1 - n0) * K + 2 * G + 64 floats.
void TileScalar(const CpuProblem& p, int64_t n0, int64_t n1, float* scratch);
void TileAvx2(const CpuProblem& p, int64_t n0, int64_t n1, float* scratch);

// ---- helpers shared by the variants ----
inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal half -> normal float
    exp = 113;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t FloatToHalf(float f) {  // round to nearest even
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t abs = x & 0x7fffffffu;
  if (abs >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0));
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf
  if (abs < 0x38800000u) {  // subnormal or zero in half
    if (abs < 0x33000000u) return sign;
    const uint32_t e = abs >> 23;
    const uint32_t m = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;  // 14..24
    uint32_t h = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  uint32_t h = ((abs >> 13) - (112u << 10));
  const uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

// Scale and offset (-zero_point * scale) of every group of column n, as floats: w = code * s + o.
inline void ColumnParams(const CpuProblem& p, int64_t n, float* s, float* o) {
  const int64_t g_count = p.groups;
  const int64_t base = n * g_count;
  for (int64_t g = 0; g < g_count; ++g) {
    s[g] = p.scales_half ? HalfToFloat(static_cast<const uint16_t*>(p.scales)[base + g])
                         : static_cast<const float*>(p.scales)[base + g];
  }
  switch (p.zp_kind) {
    case ZeroPointKind::kNone: {
      const float zp = static_cast<float>(1 << (p.bits - 1));
      for (int64_t g = 0; g < g_count; ++g) o[g] = -zp * s[g];
      break;
    }
    case ZeroPointKind::kUint8: {
      const uint8_t* zp = static_cast<const uint8_t*>(p.zero_points) + base;
      for (int64_t g = 0; g < g_count; ++g) o[g] = -static_cast<float>(zp[g]) * s[g];
      break;
    }
    case ZeroPointKind::kFloat: {
      const float* zp = static_cast<const float*>(p.zero_points) + base;
      for (int64_t g = 0; g < g_count; ++g) o[g] = -zp[g] * s[g];
      break;
    }
    case ZeroPointKind::kHalf: {
      const uint16_t* zp = static_cast<const uint16_t*>(p.zero_points) + base;
      for (int64_t g = 0; g < g_count; ++g) o[g] = -HalfToFloat(zp[g]) * s[g];
      break;
    }
  }
}

// Reads 8 bytes starting at src, never touching memory at or past end (zero-filled instead).
inline uint64_t Load8Bytes(const uint8_t* src, const uint8_t* end) {
  uint64_t v = 0;
  if (src + 8 <= end) {
    std::memcpy(&v, src, 8);
  } else if (src < end) {
    std::memcpy(&v, src, static_cast<size_t>(end - src));
  }
  return v;  // little-endian hosts only (x86-64, aarch64)
}

}  // namespace onnxfgq

// ---- CUDA (implemented in cuda_kernels.cu, only when built with CUDA) ----
// Plain C ABI, raw device pointers. a_dtype/scale dtype: 1 = fp32, 10 = fp16 (ONNX enum values).
// zp_kind: ZeroPointKind values; zero-point dtype for float zero points equals a_dtype.
// Returns 0 on success, otherwise a cudaError_t value, or -1 for invalid arguments.
extern "C" int onnxfgq_cuda_matmul_block_quant(const void* a, const uint8_t* b, const void* scales,
                                               const void* zero_points, int zp_kind, const void* bias,
                                               void* y, int64_t m, int64_t k, int64_t n, int bits,
                                               int64_t block_size, int a_dtype, void* stream);
