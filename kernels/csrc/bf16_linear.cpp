// A bfloat16 linear layer on AVX512-BF16 (vdpbf16ps) for CPUs without AMX (AMD Zen 4/5, Xeons
// whose hypervisor hides the tiles), over the weight layout the engine already keeps for bfloat16
// projections: amx_linear_pack's column strips ([ceil(N/16)][K/32][16][32]), whose every 64-byte
// row is one K pair for 16 output columns, i.e. exactly one vdpbf16ps B operand; the input's pair
// (x[k], x[k+1]) is broadcast as one 32-bit value. One copy of the weight, shared with amx_linear.
//
// Blocking: rows in blocks of up to kBlockRows, strips in groups of shape_for(rows).strips, one
// float32 accumulator register (up to 4 rows: 2 or 4, consecutive pairs round robin) per (row,
// strip) across all of K (K stays whole: a block's input rows, <= 8 x 3 KB at the default model's
// widest K, stay in L1 across a chunk of strips). At few rows that streams each thread's share of
// the weight once (up to 4 rows one strip after another, one sequential stream); at many rows a
// chunk of strips (kChunkBytes) stays in L2 while every row block passes over it. From 5 rows each
// strip's next lines are prefetched into L1 (kPrefetchPairs).
// Both threads split the strips (kernel_pool::parallel_for); a small weight at few rows runs on
// the calling thread. Bias and the rounding to bfloat16 are in the store. K a multiple of 32 (the
// packing's rule), any N (the last strip's padding columns are zeros, never stored), any rows.
// Functions with AVX-512 bodies carry their own target attribute, so the file builds on any
// x86-64; the op refuses to run unless the CPU has AVX512-BF16 (bf16_linear_supported).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>

#include "cpu_features.h"
#include "strips_call.h"
#include "thread_pool.h"

namespace {

#define BF16_LINEAR_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

using strips_call::kColumns;  // output columns of a strip
using strips_call::kK;        // K of one step of a strip (16 pairs, 1 KB)
constexpr int64_t kStepElems = kColumns * kK;

// Rows of one register block: 8 rows x 3 strips = 24 accumulators (+ 3 weight, 1 input register).
constexpr int kBlockRows = 8;
// How a block of `rows` rows reads the strips: how many at once, how many accumulators per (row,
// strip) (consecutive pairs go round them, so a register's chain of dependent vdpbf16ps is that
// many times shorter), and whether each strip's weight line kPrefetchPairs ahead is asked into L1.
// Up to 4 rows a thread streams one strip at a time, without software prefetch: its share of the
// weight is then one sequential stream, which the hardware prefetcher follows better than four
// streams 18 KB apart with a prefetch each (EPYC Zen 4, 2 vCPUs, /tmp/mb16 microbenchmark over
// 256 MiB of 3072 x 576 strips, one thread, median of 7 interleaved rounds against a float32 sum
// in the same round: 1 row 0.73-0.80 -> 0.93-1.07 of the sum, 2 rows 0.56 -> 0.90, 4 rows 0.59 ->
// 0.72-0.75; at 8 rows vdpbf16ps bounds the loop, ~0.5 of the sum with any shape). From 5 rows
// the strips are read 4 or 3 at once so a weight register meets more input rows.
struct Shape {
  int strips;        // strips read at once
  int interleave;    // accumulators per (row, strip), consecutive pairs round robin
  bool prefetch;     // each strip's line kPrefetchPairs ahead into L1
};
constexpr Shape shape_for(int rows) {
  if (rows == 1) return {1, 4, false};
  if (rows <= 4) return {1, 2, false};
  return {rows <= 6 ? 4 : 3, 1, true};
}
// Each strip's weight line this many pairs (64-byte lines) ahead is prefetched into L1 (at a
// strip's end: the next strip's first lines, or past the weight: a prefetch never faults). One
// thread, the default model's projections, A/B in one process (thread time, min of 8 passes):
// 0.75-0.85x the time without at 1 row (~10.5 -> ~12.5 GB/s), 0.68-0.85x at 8-16 rows, 0.85-0.95x at
// 64 (the strips come from L2 there); 16 or 32 lines ahead measured about as 24. (Measured with
// four strips at once, on a Xeon; on Zen 4 up to 4 rows one strip without it is faster: Shape.)
constexpr int64_t kPrefetchPairs = 24;
// Weight bytes per chunk of strips that all row blocks pass over while it stays in L2.
constexpr int64_t kChunkBytes = 512 << 10;
// At most one row block with a weight under this: the calling thread alone (amx_linear's rule).
constexpr int64_t kSerialLinearBytes = 256 << 10;

bool bf16_linear_supported() { return cpu_features::avx512_bf16(); }

// y[r][16 n + j] = bf16(sum_k a[r][k] w[16 n + j][k] + bias) for r < R, strips n < NS of b (each
// `strip` elements apart, K / 2 pairs long, a multiple of IL), j < 16 while 16 n + j < columns.
template <int R, int NS, int IL, bool Prefetch>
BF16_LINEAR_TARGET void block(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t strip, int64_t pairs,
                              const c10::BFloat16* bias, c10::BFloat16* y, int64_t ldy, int64_t columns) {
  __m512 acc[R][NS][IL];
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < NS; ++n)
      for (int i = 0; i < IL; ++i) acc[r][n][i] = _mm512_setzero_ps();
  for (int64_t p0 = 0; p0 < pairs; p0 += IL) {
    for (int i = 0; i < IL; ++i) {
      const int64_t p = p0 + i;
      __m512bh w[NS];
      if (Prefetch)
        for (int n = 0; n < NS; ++n)
          _mm_prefetch(reinterpret_cast<const char*>(b + n * strip + (p + kPrefetchPairs) * 2 * kColumns), _MM_HINT_T0);
      for (int n = 0; n < NS; ++n) w[n] = (__m512bh)_mm512_loadu_si512(b + n * strip + p * 2 * kColumns);
      for (int r = 0; r < R; ++r) {
        int32_t pair;
        std::memcpy(&pair, a + r * lda + 2 * p, sizeof(pair));
        const __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
        for (int n = 0; n < NS; ++n) acc[r][n][i] = _mm512_dpbf16_ps(acc[r][n][i], x, w[n]);
      }
    }
  }
  for (int n = 0; n < NS; ++n) {
    const int64_t count = std::min<int64_t>(kColumns, columns - n * kColumns);
    if (count <= 0) break;
    const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1);
    __m512 add = _mm512_setzero_ps();
    if (bias) {
      const __m256i raw = _mm256_maskz_loadu_epi16(mask, bias + n * kColumns);
      add = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    }
    for (int r = 0; r < R; ++r) {
      __m512 sum = acc[r][n][0];
      for (int i = 1; i < IL; ++i) sum = _mm512_add_ps(sum, acc[r][n][i]);
      const __m512 v = _mm512_add_ps(sum, add);
      _mm256_mask_storeu_epi16(y + r * ldy + n * kColumns, mask, (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

struct Problem {
  const uint16_t* a;
  int64_t lda, rows;
  const uint16_t* w;
  int64_t steps, n_total;
  const c10::BFloat16* bias;
  c10::BFloat16* y;
};

// Rows [r0, r0 + R) against strips [t0, t1), shape_for(R).strips at a time (the last group fewer).
template <int R>
BF16_LINEAR_TARGET void row_block(const Problem& p, int64_t r0, int64_t t0, int64_t t1) {
  constexpr Shape shape = shape_for(R);
  constexpr int NS = shape.strips, IL = shape.interleave;
  constexpr bool PF = shape.prefetch;
  const int64_t strip = p.steps * kStepElems, pairs = p.steps * kK / 2;
  const uint16_t* a = p.a + r0 * p.lda;
  for (int64_t t = t0; t < t1; t += NS) {
    const uint16_t* b = p.w + t * strip;
    const c10::BFloat16* bias = p.bias ? p.bias + t * kColumns : nullptr;
    c10::BFloat16* y = p.y + r0 * p.n_total + t * kColumns;
    const int64_t columns = p.n_total - t * kColumns;
    switch (std::min<int64_t>(NS, t1 - t)) {
      case 4: if constexpr (NS >= 4) block<R, 4, IL, PF>(a, p.lda, b, strip, pairs, bias, y, p.n_total, columns); break;
      case 3: if constexpr (NS >= 3) block<R, 3, IL, PF>(a, p.lda, b, strip, pairs, bias, y, p.n_total, columns); break;
      case 2: if constexpr (NS >= 2) block<R, 2, IL, PF>(a, p.lda, b, strip, pairs, bias, y, p.n_total, columns); break;
      default: block<R, 1, IL, PF>(a, p.lda, b, strip, pairs, bias, y, p.n_total, columns); break;
    }
  }
}

BF16_LINEAR_TARGET void rows_against_strips(const Problem& p, int64_t r0, int64_t rows, int64_t t0, int64_t t1) {
  switch (rows) {
    case 1: row_block<1>(p, r0, t0, t1); break;
    case 2: row_block<2>(p, r0, t0, t1); break;
    case 3: row_block<3>(p, r0, t0, t1); break;
    case 4: row_block<4>(p, r0, t0, t1); break;
    case 5: row_block<5>(p, r0, t0, t1); break;
    case 6: row_block<6>(p, r0, t0, t1); break;
    case 7: row_block<7>(p, r0, t0, t1); break;
    default: row_block<8>(p, r0, t0, t1); break;
  }
}

// One thread's strips [t0, t1): chunks of them that stay in L2, every row block over each chunk.
BF16_LINEAR_TARGET void run_strips(const Problem& p, int64_t t0, int64_t t1) {
  const int64_t strip_bytes = p.steps * kStepElems * 2;
  const int64_t chunk = std::max<int64_t>(4, kChunkBytes / strip_bytes);
  for (int64_t c0 = t0; c0 < t1; c0 += chunk) {
    const int64_t c1 = std::min(t1, c0 + chunk);
    for (int64_t r0 = 0; r0 < p.rows; r0 += kBlockRows)
      rows_against_strips(p, r0, std::min<int64_t>(kBlockRows, p.rows - r0), c0, c1);
  }
}

// x [M, K] bfloat16 @ packed weight (amx_linear_pack of an [N, K] weight) + bias -> [M, N] bfloat16.
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                       int64_t n_total) {
  TORCH_CHECK(bf16_linear_supported(), "bf16_linear needs a CPU with AVX512-BF16");
  auto call = strips_call::check(x, packed, bias, n_total);
  const int64_t rows = call.rows, steps = call.steps, tiles = call.tiles;
  const c10::BFloat16* bias_ptr = call.bias;
  at::Tensor out = call.out;
  if (rows == 0) return out;
  const Problem p{reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>()), x.stride(0), rows,
                  reinterpret_cast<const uint16_t*>(packed.data_ptr<c10::BFloat16>()), steps, n_total, bias_ptr,
                  out.data_ptr<c10::BFloat16>()};
  const bool serial = rows <= kBlockRows && packed.numel() * 2 < kSerialLinearBytes;
  kernel_pool::parallel_for(0, tiles, serial ? tiles : 1, [&](int64_t t0, int64_t t1) { run_strips(p, t0, t1); },
                            {packed.data_ptr(), packed.numel() * 2});
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bento_llm, m) {
  // Whether bf16_linear and bf16_mm_rows (gemv_ops.cpp) run here: the engine asks this once.
  m.def("avx512_bf16_kernels_supported() -> bool", &bf16_linear_supported);
  m.def("bf16_linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor", &bf16_linear);
}
