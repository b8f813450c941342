// AVX2 + FMA variant of the CPU kernels. This translation unit alone is compiled with
// -mavx2 -mfma; it only runs after cpu_kernel.cc checked the CPU at run time.
#include <immintrin.h>

#include <algorithm>

#include "block_quant.h"

namespace onnxfgq {
namespace {

inline float HorizontalSum(__m256 v) {
  const __m128 lo = _mm256_castps256_ps128(v);
  const __m128 hi = _mm256_extractf128_ps(v, 1);
  __m128 s = _mm_add_ps(lo, hi);
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256i TailMask(int64_t valid) {  // lanes [0, valid) set
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(valid)), lanes);
}

// Turns the `bits` bytes holding 8 consecutive codes (the first at a byte boundary) into
// 8 int32 lanes. Eight codes of b bits are exactly b bytes, and each code spans at most two
// bytes, so one byte shuffle + one variable shift + one mask decodes any width.
struct Decoder {
  int bits;
  __m256i shuffle;  // per 32-bit lane: the two bytes holding the code
  __m256i shift;    // per lane: bit offset of the code inside those two bytes
  __m256i mask;

  explicit Decoder(int b) : bits(b) {
    alignas(32) int8_t ctrl[32];
    alignas(32) int32_t sh[8];
    for (int i = 0; i < 8; ++i) {
      const int first_bit = i * b;
      const int byte = first_bit / 8;
      const int half = i / 4;  // lanes 4..7 live in the upper 128-bit half
      int8_t* c = ctrl + half * 16 + (i % 4) * 4;
      c[0] = static_cast<int8_t>(byte);
      c[1] = static_cast<int8_t>(byte + 1 < 8 ? byte + 1 : 0x80);
      c[2] = static_cast<int8_t>(0x80);
      c[3] = static_cast<int8_t>(0x80);
      sh[i] = first_bit % 8;
    }
    shuffle = _mm256_load_si256(reinterpret_cast<const __m256i*>(ctrl));
    shift = _mm256_load_si256(reinterpret_cast<const __m256i*>(sh));
    mask = _mm256_set1_epi32((1 << b) - 1);
  }

  // Generic: any width, from a 64-bit word that holds the chunk in its low bytes.
  inline __m256i FromWord(uint64_t word) const {
    const __m256i v = _mm256_set1_epi64x(static_cast<long long>(word));
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(v, shuffle), shift), mask);
  }

  // Full chunk of 8 codes whose `bits` bytes start at src (only the last chunk of a row may
  // need Safe, every earlier one has 8 readable bytes before row_end for the generic path).
  template <int BITS>
  inline __m256i Full(const uint8_t* src, const uint8_t* row_end) const {
    if constexpr (BITS == 4) {
      // Broadcast straight from memory (one load uop): a scalar load + GPR-to-vector move +
      // broadcast was the bottleneck of the decode loop.
      const __m256i v = _mm256_castps_si256(_mm256_broadcast_ss(reinterpret_cast<const float*>(src)));
      return _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
                              _mm256_set1_epi32(0xF));
    } else if constexpr (BITS == 2) {
      uint16_t word;
      std::memcpy(&word, src, 2);
      const __m256i v = _mm256_set1_epi32(word);
      return _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)),
                              _mm256_set1_epi32(0x3));
    } else if constexpr (BITS == 8) {
      return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)));
    } else {
      if (src + 8 <= row_end) {
        const __m256i v = _mm256_castpd_si256(_mm256_broadcast_sd(reinterpret_cast<const double*>(src)));
        return _mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(v, shuffle), shift), mask);
      }
      return FromWord(Load8Bytes(src, row_end));
    }
  }

  // Any chunk, including the last partial one (lanes past K hold padding zeros).
  inline __m256i Safe(const uint8_t* row, const uint8_t* row_end, int64_t k) const {
    return FromWord(Load8Bytes(row + (k / 8) * bits, row_end));
  }
};

// Decode path with block_size % 8 == 0: every 8-code chunk sits in one group, so codes are
// decoded in registers, turned into weights with one FMA and used for all MR rows of A.
// U independent accumulators per row hide the FMA latency when MR is small.
template <int BITS, int MR>
void ColumnFused(const CpuProblem& p, const Decoder& dec, int64_t n, const float* s, const float* o,
                 const float* a, float* y) {
  constexpr int U = MR >= 4 ? 1 : (MR >= 2 ? 2 : 4);
  const uint8_t* row = p.b + n * p.row_bytes;
  const uint8_t* row_end = row + p.row_bytes;
  const int64_t K = p.k;
  const int64_t k_full = K & ~int64_t{7};
  __m256 acc[MR][U];
  for (int r = 0; r < MR; ++r)
    for (int u = 0; u < U; ++u) acc[r][u] = _mm256_setzero_ps();
  // Groups are whole chunks (block_size % 8 == 0), so bytes of B and A are walked with running
  // pointers across groups: no index arithmetic in the hot loop.
  const int64_t step = BITS ? BITS : dec.bits;
  const int64_t chunks_per_group = p.block_size / 8;
  const int64_t full_chunks = k_full / 8;
  const uint8_t* src = row;
  const float* ak = a;
  int64_t chunk = 0;
  for (int64_t g = 0; g < p.groups; ++g) {
    const __m256 sv = _mm256_broadcast_ss(s + g);
    const __m256 ov = _mm256_broadcast_ss(o + g);
    const int64_t end = std::min(chunk + chunks_per_group, full_chunks);
    if (chunks_per_group == U && end - chunk == U) {  // e.g. block 32 at M=1: straight-line group
      for (int u = 0; u < U; ++u) {
        const __m256 w = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dec.Full<BITS>(src + u * step, row_end)), sv, ov);
        for (int r = 0; r < MR; ++r)
          acc[r][u] = _mm256_fmadd_ps(w, _mm256_loadu_ps(ak + r * K + 8 * u), acc[r][u]);
      }
      chunk += U, src += U * step, ak += 8 * U;
      continue;
    }
    for (; chunk + U <= end; chunk += U, src += U * step, ak += 8 * U) {
      for (int u = 0; u < U; ++u) {
        const __m256 w = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dec.Full<BITS>(src + u * step, row_end)), sv, ov);
        for (int r = 0; r < MR; ++r)
          acc[r][u] = _mm256_fmadd_ps(w, _mm256_loadu_ps(ak + r * K + 8 * u), acc[r][u]);
      }
    }
    for (; chunk < end; ++chunk, src += step, ak += 8) {
      const __m256 w = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dec.Full<BITS>(src, row_end)), sv, ov);
      for (int r = 0; r < MR; ++r) acc[r][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(ak + r * K), acc[r][0]);
    }
  }
  if (k_full < K) {  // last partial chunk of the row, in the last group
    const __m256 sv = _mm256_broadcast_ss(s + p.groups - 1);
    const __m256 ov = _mm256_broadcast_ss(o + p.groups - 1);
    const __m256 w = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dec.Safe(row, row_end, k_full)), sv, ov);
    const __m256i m = TailMask(K - k_full);
    for (int r = 0; r < MR; ++r)
      acc[r][0] = _mm256_fmadd_ps(w, _mm256_maskload_ps(a + r * K + k_full, m), acc[r][0]);
  }
  for (int r = 0; r < MR; ++r) {
    __m256 t = acc[r][0];
    for (int u = 1; u < U; ++u) t = _mm256_add_ps(t, acc[r][u]);
    y[r * p.n] = HorizontalSum(t);
  }
}

// ColumnParams with 8 groups per step for fp32 scales (fp16 inputs take the scalar helper).
void ColumnParamsAvx2(const CpuProblem& p, int64_t n, float* s, float* o) {
  if (p.scales_half || p.zp_kind == ZeroPointKind::kHalf) {
    ColumnParams(p, n, s, o);
    return;
  }
  const int64_t G = p.groups;
  const float* sc = static_cast<const float*>(p.scales) + n * G;
  const bool has_zp = p.zero_points != nullptr;
  const uint8_t* zp_u8 = has_zp ? static_cast<const uint8_t*>(p.zero_points) + n * G : nullptr;
  const float* zp_f = has_zp ? static_cast<const float*>(p.zero_points) + n * G : nullptr;
  const float default_zp = static_cast<float>(1 << (p.bits - 1));
  const __m256 zero = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= G; g += 8) {
    const __m256 sv = _mm256_loadu_ps(sc + g);
    __m256 zv;
    if (p.zp_kind == ZeroPointKind::kUint8) {
      zv = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zp_u8 + g))));
    } else if (p.zp_kind == ZeroPointKind::kFloat) {
      zv = _mm256_loadu_ps(zp_f + g);
    } else {
      zv = _mm256_set1_ps(default_zp);
    }
    _mm256_storeu_ps(s + g, sv);
    _mm256_storeu_ps(o + g, _mm256_fnmadd_ps(zv, sv, zero));
  }
  for (; g < G; ++g) {
    const float zp = p.zp_kind == ZeroPointKind::kUint8   ? static_cast<float>(zp_u8[g])
                     : p.zp_kind == ZeroPointKind::kFloat ? zp_f[g]
                                                          : default_zp;
    s[g] = sc[g];
    o[g] = -zp * sc[g];
  }
}

// Dequantised weights of column n into w[0, K) (any block size), zero-padded to a multiple of 8.
void DequantRow(const CpuProblem& p, const Decoder& dec, int64_t n, const float* s, const float* o,
                float* cbuf, float* w) {
  const uint8_t* row = p.b + n * p.row_bytes;
  const uint8_t* row_end = row + p.row_bytes;
  const int64_t K = p.k;
  for (int64_t k = 0; k < K; k += 8)
    _mm256_storeu_ps(cbuf + k, _mm256_cvtepi32_ps(dec.Safe(row, row_end, k)));
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t k0 = g * p.block_size;
    const int64_t k1 = std::min(K, k0 + p.block_size);
    const __m256 sv = _mm256_set1_ps(s[g]);
    const __m256 ov = _mm256_set1_ps(o[g]);
    int64_t k = k0;
    for (; k + 8 <= k1; k += 8) _mm256_storeu_ps(w + k, _mm256_fmadd_ps(_mm256_loadu_ps(cbuf + k), sv, ov));
    for (; k < k1; ++k) w[k] = cbuf[k] * s[g] + o[g];
  }
  for (int64_t k = K; k < ((K + 7) & ~int64_t{7}); ++k) w[k] = 0.0f;
}

template <int MR>
void DotRows(const float* a, int64_t K, const float* w, float* y, int64_t y_stride) {
  __m256 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 wv = _mm256_loadu_ps(w + k);
    for (int r = 0; r < MR; ++r) acc[r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(a + r * K + k), acc[r]);
  }
  if (k < K) {
    const __m256i m = TailMask(K - k);
    const __m256 wv = _mm256_loadu_ps(w + k);
    for (int r = 0; r < MR; ++r) acc[r] = _mm256_fmadd_ps(wv, _mm256_maskload_ps(a + r * K + k, m), acc[r]);
  }
  for (int r = 0; r < MR; ++r) y[r * y_stride] = HorizontalSum(acc[r]);
}

template <int BITS>
void ColumnsFusedRows(const CpuProblem& p, const Decoder& dec, int64_t n, const float* s, const float* o) {
  for (int64_t m0 = 0; m0 < p.m; m0 += 8) {
    const float* a = p.a + m0 * p.k;
    float* y = p.y + m0 * p.n + n;
    switch (std::min<int64_t>(8, p.m - m0)) {
      case 1: ColumnFused<BITS, 1>(p, dec, n, s, o, a, y); break;
      case 2: ColumnFused<BITS, 2>(p, dec, n, s, o, a, y); break;
      case 3: ColumnFused<BITS, 3>(p, dec, n, s, o, a, y); break;
      case 4: ColumnFused<BITS, 4>(p, dec, n, s, o, a, y); break;
      case 5: ColumnFused<BITS, 5>(p, dec, n, s, o, a, y); break;
      case 6: ColumnFused<BITS, 6>(p, dec, n, s, o, a, y); break;
      case 7: ColumnFused<BITS, 7>(p, dec, n, s, o, a, y); break;
      default: ColumnFused<BITS, 8>(p, dec, n, s, o, a, y); break;
    }
  }
}

// Prefill micro-kernel: R rows of A x 16 packed weight columns, outer-product form (broadcast
// one A value, FMA it into two 8-wide accumulators). packed is [K][16], k-major.
template <int R>
void Micro16(const float* a, int64_t K, const float* packed, int64_t k0, int64_t k1, bool first, float* y,
             int64_t y_stride, int64_t width) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const float* a0 = a;
  const float* a1 = a + (R > 1 ? K : 0);
  const float* a2 = a + (R > 2 ? 2 * K : 0);
  const float* a3 = a + (R > 3 ? 3 * K : 0);
  const float* a4 = a + (R > 4 ? 4 * K : 0);
  const float* a5 = a + (R > 5 ? 5 * K : 0);
  const float* bp = packed + k0 * 16;
  for (int64_t k = k0; k < k1; ++k, bp += 16) {
    const __m256 b0 = _mm256_load_ps(bp);
    const __m256 b1 = _mm256_load_ps(bp + 8);
    __m256 av = _mm256_broadcast_ss(a0 + k);
    c00 = _mm256_fmadd_ps(av, b0, c00);
    c01 = _mm256_fmadd_ps(av, b1, c01);
    if constexpr (R > 1) {
      av = _mm256_broadcast_ss(a1 + k);
      c10 = _mm256_fmadd_ps(av, b0, c10);
      c11 = _mm256_fmadd_ps(av, b1, c11);
    }
    if constexpr (R > 2) {
      av = _mm256_broadcast_ss(a2 + k);
      c20 = _mm256_fmadd_ps(av, b0, c20);
      c21 = _mm256_fmadd_ps(av, b1, c21);
    }
    if constexpr (R > 3) {
      av = _mm256_broadcast_ss(a3 + k);
      c30 = _mm256_fmadd_ps(av, b0, c30);
      c31 = _mm256_fmadd_ps(av, b1, c31);
    }
    if constexpr (R > 4) {
      av = _mm256_broadcast_ss(a4 + k);
      c40 = _mm256_fmadd_ps(av, b0, c40);
      c41 = _mm256_fmadd_ps(av, b1, c41);
    }
    if constexpr (R > 5) {
      av = _mm256_broadcast_ss(a5 + k);
      c50 = _mm256_fmadd_ps(av, b0, c50);
      c51 = _mm256_fmadd_ps(av, b1, c51);
    }
  }
  alignas(32) float out[6][16];
  _mm256_store_ps(out[0], c00), _mm256_store_ps(out[0] + 8, c01);
  _mm256_store_ps(out[1], c10), _mm256_store_ps(out[1] + 8, c11);
  _mm256_store_ps(out[2], c20), _mm256_store_ps(out[2] + 8, c21);
  _mm256_store_ps(out[3], c30), _mm256_store_ps(out[3] + 8, c31);
  _mm256_store_ps(out[4], c40), _mm256_store_ps(out[4] + 8, c41);
  _mm256_store_ps(out[5], c50), _mm256_store_ps(out[5] + 8, c51);
  for (int r = 0; r < R; ++r) {
    float* dst = y + r * y_stride;
    for (int64_t j = 0; j < width; ++j) dst[j] = first ? out[r][j] : dst[j] + out[r][j];
  }
}

}  // namespace

void ColumnsAvx2(const CpuProblem& p, int64_t n0, int64_t n1, float* scratch) {
  const Decoder dec(p.bits);
  float* s = scratch;
  float* o = s + p.groups;
  float* cbuf = o + p.groups;
  float* w = cbuf + p.k + 64;
  const bool fused = p.block_size % 8 == 0;
  for (int64_t n = n0; n < n1; ++n) {
    ColumnParamsAvx2(p, n, s, o);
    if (fused) {
      switch (p.bits) {
        case 2: ColumnsFusedRows<2>(p, dec, n, s, o); break;
        case 4: ColumnsFusedRows<4>(p, dec, n, s, o); break;
        case 8: ColumnsFusedRows<8>(p, dec, n, s, o); break;
        default: ColumnsFusedRows<0>(p, dec, n, s, o); break;
      }
      continue;
    }
    DequantRow(p, dec, n, s, o, cbuf, w);
    for (int64_t m0 = 0; m0 < p.m; m0 += 4) {
      const float* a = p.a + m0 * p.k;
      float* y = p.y + m0 * p.n + n;
      switch (std::min<int64_t>(4, p.m - m0)) {
        case 1: DotRows<1>(a, p.k, w, y, p.n); break;
        case 2: DotRows<2>(a, p.k, w, y, p.n); break;
        case 3: DotRows<3>(a, p.k, w, y, p.n); break;
        default: DotRows<4>(a, p.k, w, y, p.n); break;
      }
    }
  }
}

void TileAvx2(const CpuProblem& p, int64_t n0, int64_t n1, float* scratch) {
  const Decoder dec(p.bits);
  const int64_t K = p.k;
  float* s = scratch;
  float* o = s + p.groups;
  float* cbuf = o + p.groups;
  float* w = cbuf + K + 64;
  // 32-byte aligned [K][16] buffer for the packed weights of 16 columns.
  float* packed = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(w + K + 64) + 31) & ~uintptr_t{31});
  constexpr int64_t kRows = 6;    // 6 x 16 accumulators = 12 of the 16 ymm registers
  constexpr int64_t kBlock = 256; // 16 KiB of packed weights stay in L1 while A's rows stream
  for (int64_t t0 = n0; t0 < n1; t0 += 16) {
    const int64_t width = std::min<int64_t>(16, n1 - t0);
    for (int64_t j = 0; j < 16; ++j) {
      if (j < width) {
        ColumnParamsAvx2(p, t0 + j, s, o);
        DequantRow(p, dec, t0 + j, s, o, cbuf, w);
        for (int64_t k = 0; k < K; ++k) packed[k * 16 + j] = w[k];
      } else {
        for (int64_t k = 0; k < K; ++k) packed[k * 16 + j] = 0.0f;
      }
    }
    for (int64_t k0 = 0; k0 < K; k0 += kBlock) {
      const int64_t k1 = std::min(K, k0 + kBlock);
      const bool first = k0 == 0;
      for (int64_t m0 = 0; m0 < p.m; m0 += kRows) {
        const float* a = p.a + m0 * K;
        float* y = p.y + m0 * p.n + t0;
        switch (std::min(kRows, p.m - m0)) {
          case 1: Micro16<1>(a, K, packed, k0, k1, first, y, p.n, width); break;
          case 2: Micro16<2>(a, K, packed, k0, k1, first, y, p.n, width); break;
          case 3: Micro16<3>(a, K, packed, k0, k1, first, y, p.n, width); break;
          case 4: Micro16<4>(a, K, packed, k0, k1, first, y, p.n, width); break;
          case 5: Micro16<5>(a, K, packed, k0, k1, first, y, p.n, width); break;
          default: Micro16<6>(a, K, packed, k0, k1, first, y, p.n, width); break;
        }
      }
    }
  }
}

}  // namespace onnxfgq
