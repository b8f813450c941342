// CPU driver (task split, run-time ISA dispatch) and the portable scalar variant.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "block_quant.h"

namespace onnxfgq {
namespace {

constexpr int64_t kPrefillMinRows = 16;  // from here on, dequantise a tile once and reuse it

bool HasAvx2() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

// Codes of a whole row as floats (cbuf, K rounded up to 8), then w = code * s[g] + o[g].
void DequantRowScalar(const CpuProblem& p, int64_t n, const float* s, const float* o, float* cbuf,
                      float* w) {
  const uint8_t* row = p.b + n * p.row_bytes;
  const uint8_t* row_end = row + p.row_bytes;
  const uint64_t mask = (uint64_t{1} << p.bits) - 1;
  for (int64_t k = 0; k < p.k; k += 8) {
    const uint64_t word = Load8Bytes(row + (k / 8) * p.bits, row_end);
    for (int i = 0; i < 8; ++i) cbuf[k + i] = static_cast<float>((word >> (i * p.bits)) & mask);
  }
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t k0 = g * p.block_size;
    const int64_t k1 = std::min(p.k, k0 + p.block_size);
    const float sg = s[g], og = o[g];
    for (int64_t k = k0; k < k1; ++k) w[k] = cbuf[k] * sg + og;
  }
}

float DotScalar(const float* a, const float* w, int64_t len) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= len; k += 8)
    for (int i = 0; i < 8; ++i) acc[i] += a[k + i] * w[k + i];
  for (; k < len; ++k) acc[k & 7] += a[k] * w[k];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

// ONNXFGQ_CPU_KERNEL=scalar forces the portable variant (tests, comparisons).
bool UseAvx2() {
  const char* forced = std::getenv("ONNXFGQ_CPU_KERNEL");
  if (forced != nullptr && std::strcmp(forced, "scalar") == 0) return false;
  return HasAvx2();
}

struct TaskSet {
  const CpuProblem* p;
  int64_t cols_per_task;
  bool prefill;
  bool avx2;
};

void RunTask(void* data, size_t index) {
  const TaskSet& t = *static_cast<const TaskSet*>(data);
  const CpuProblem& p = *t.p;
  const int64_t n0 = static_cast<int64_t>(index) * t.cols_per_task;
  const int64_t n1 = std::min(p.n, n0 + t.cols_per_task);
  if (n0 >= n1) return;
  thread_local std::vector<float> scratch;
  const size_t need = t.prefill
                          ? static_cast<size_t>(std::max<int64_t>(n1 - n0, 16) * (p.k + 8) + 2 * p.groups +
                                                3 * (p.k + 64))
                          : static_cast<size_t>(3 * (p.k + 64) + 2 * p.groups);
  if (scratch.size() < need) scratch.resize(need);
  if (t.prefill) {
    (t.avx2 ? TileAvx2 : TileScalar)(p, n0, n1, scratch.data());
  } else {
    (t.avx2 ? ColumnsAvx2 : ColumnsScalar)(p, n0, n1, scratch.data());
  }
}

}  // namespace

void ColumnsScalar(const CpuProblem& p, int64_t n0, int64_t n1, float* scratch) {
  float* s = scratch;
  float* o = s + p.groups;
  float* cbuf = o + p.groups;
  float* w = cbuf + p.k + 64;
  for (int64_t n = n0; n < n1; ++n) {
    ColumnParams(p, n, s, o);
    DequantRowScalar(p, n, s, o, cbuf, w);
    for (int64_t m = 0; m < p.m; ++m) p.y[m * p.n + n] = DotScalar(p.a + m * p.k, w, p.k);
  }
}

void TileScalar(const CpuProblem& p, int64_t n0, int64_t n1, float* scratch) {
  float* s = scratch;
  float* o = s + p.groups;
  float* cbuf = o + p.groups;
  float* tile = cbuf + p.k + 64;
  for (int64_t n = n0; n < n1; ++n) {
    ColumnParams(p, n, s, o);
    DequantRowScalar(p, n, s, o, cbuf, tile + (n - n0) * p.k);
  }
  for (int64_t m = 0; m < p.m; ++m)
    for (int64_t n = n0; n < n1; ++n)
      p.y[m * p.n + n] = DotScalar(p.a + m * p.k, tile + (n - n0) * p.k, p.k);
}

const char* CpuVariantName() { return UseAvx2() ? "avx2" : "scalar"; }

void CpuMatMulBlockQuant(const CpuProblem& p, ParallelForFn parallel_for, void* pool) {
  if (p.m == 0 || p.n == 0) return;
  TaskSet t;
  t.p = &p;
  t.prefill = p.m >= kPrefillMinRows;
  t.avx2 = UseAvx2();
  // Decode: small column ranges balance well and each column is one pass over its bytes.
  // Prefill: a 16-column tile is dequantised once and reused for all M rows.
  t.cols_per_task = 16;
  const size_t tasks = static_cast<size_t>((p.n + t.cols_per_task - 1) / t.cols_per_task);
  if (parallel_for != nullptr && tasks > 1) {
    parallel_for(pool, &RunTask, tasks, &t);
  } else {
    for (size_t i = 0; i < tasks; ++i) RunTask(&t, i);
  }
}

}  // namespace onnxfgq
