// A bfloat16 linear layer on AVX512-BF16 (vdpbf16ps) for CPUs without AMX (AMD Zen 4/5, Xeons
// whose hypervisor hides the tiles), over the weight layout the engine already keeps for bfloat16
// projections: amx_linear_pack's column strips ([ceil(N/16)][K/32][16][32]), whose every 64-byte
// row is one K pair for 16 output columns, i.e. exactly one vdpbf16ps B operand; the input's pair
// (x[k], x[k+1]) is broadcast as one 32-bit value. One copy of the weight, shared with amx_linear.
//
// Blocking: rows in blocks of up to kBlockRows, strips in groups of strips_for(rows, ...), one
// float32 accumulator register per (row, strip) across all of K (K stays whole: a block's input
// rows, <= 8 x 3 KB at the default model's widest K, stay in L1 across a chunk of strips). At few
// rows that streams each thread's share of the weight once (up to kStreamingRows without software
// prefetch: strips_for's comment); at many rows a chunk of strips (kChunkBytes) stays in L2 while every
// row block passes over it; from kStreamingRows + 1 rows each strip's next lines are prefetched
// into L1 (kPrefetchPairs).
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
// A call of at most kStreamingRows rows streams the weight once, and few products per weight line
// leave the loop bound by the read: there the strips are read without software prefetch, 8 at once
// at 1-2 rows (more streams in flight for the hardware prefetcher). EPYC Zen 4 (2 vCPUs, no AMX),
// microbenchmark of this loop (one thread, median of 7-11 interleaved rounds, load 2.7-4):
// - from memory (256 MiB of strips), as a fraction of a float32 sum's rate in the same round, 4
//   strips with the prefetch below -> this shape: K 576 (3072 x 576) 1 row 0.75 -> 1.01, 2 rows
//   0.82 -> 1.01, 4 rows 0.73 -> 0.79, 6 rows 0.73 -> 0.74; K 1536 (576 x 1536) 1 row 0.80 -> 0.93,
//   2 rows 0.91 -> 1.03, 4 rows 0.84 -> 0.97, 6 rows 0.83 -> 0.96; 8 rows about even (vdpbf16ps,
//   ~1 a cycle, bounds the loop there);
// - from L3 (8 MiB of strips, read once before each timed pass: the pool's read-ahead leaves a
//   decode step's weights partly in cache): 1-2 rows 64-74 -> 77-88 GB/s (4 strips without
//   prefetch: 88-94, but 0.84-0.90 of the sum from memory); 4-8 rows even (57, 38, 29 GB/s).
// One strip at a time (one sequential stream, 2-4 accumulators over interleaved pairs) read 0.84-1.07
// of the sum at K 576 but 0.5-0.7 at K 1536. In the engine (profile_step.py --ab-streaming, the
// batch-1 bfloat16 decode step on 2 threads, this loop vs the prefetching one alternating in one
// process): step median of passes 1.07-1.30x faster (four runs, load 3-4). From 7 rows the loop
// keeps the prefetch (8 rows, bench_quant_matmul.py: 0.92-1.04x without it).
constexpr int kStreamingRows = 6;
// Whether calls of up to kStreamingRows rows take the streaming loop: the CPU's rule
// (cpu_features::few_rows_stream_weights: AMD's, not Intel's) unless set_bf16_linear_streaming forced one.
cpu_features::StreamingChoice streaming_choice;
// Strips per register block: as many as keep rows x strips + strips + 1 within 32 registers (at 1-2
// rows while streaming, 8).
constexpr int strips_for(int rows, bool streaming) { return streaming && rows <= 2 ? 8 : rows <= 6 ? 4 : 3; }
// Past kStreamingRows rows each strip's weight line this many pairs (64-byte lines) ahead is prefetched
// into L1 (at a strip's end: the next strip's first lines, or past the weight: a prefetch never
// faults). One thread, the default model's projections, A/B in one process (thread time, min of 8
// passes, a Xeon without AMX): 0.75-0.85x the time without at 1 row (~10.5 -> ~12.5 GB/s),
// 0.68-0.85x at 8-16 rows, 0.85-0.95x at 64 (the strips come from L2 there); 16 or 32 lines ahead
// measured about as 24. (On Zen 4 the streaming calls are faster without it: above.)
constexpr int64_t kPrefetchPairs = 24;
// Weight bytes per chunk of strips that all row blocks pass over while it stays in L2.
constexpr int64_t kChunkBytes = 512 << 10;
// At most one row block with a weight under this: the calling thread alone (amx_linear's rule).
constexpr int64_t kSerialLinearBytes = 256 << 10;

bool bf16_linear_supported() { return cpu_features::avx512_bf16(); }

// y[r][16 n + j] = bf16(sum_k a[r][k] w[16 n + j][k] + bias) for r < R, strips n < NS of b (each
// `strip` elements apart, K / 2 pairs long), j < 16 while 16 n + j < columns.
template <int R, int NS, bool Prefetch>
BF16_LINEAR_TARGET void block(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t strip, int64_t pairs,
                              const c10::BFloat16* bias, c10::BFloat16* y, int64_t ldy, int64_t columns) {
  __m512 acc[R][NS];
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < NS; ++n) acc[r][n] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh w[NS];
    if (Prefetch)
      for (int n = 0; n < NS; ++n)
        _mm_prefetch(reinterpret_cast<const char*>(b + n * strip + (p + kPrefetchPairs) * 2 * kColumns), _MM_HINT_T0);
    for (int n = 0; n < NS; ++n) w[n] = (__m512bh)_mm512_loadu_si512(b + n * strip + p * 2 * kColumns);
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * lda + 2 * p, sizeof(pair));
      const __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
      for (int n = 0; n < NS; ++n) acc[r][n] = _mm512_dpbf16_ps(acc[r][n], x, w[n]);
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
      const __m512 v = _mm512_add_ps(acc[r][n], add);
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

// block<R, NS> on the first `count` (1..NS) strips of b: the last group of a thread's strips.
template <int R, int NS, bool Prefetch>
BF16_LINEAR_TARGET void first_strips(int64_t count, const uint16_t* a, int64_t lda, const uint16_t* b, int64_t strip,
                                     int64_t pairs, const c10::BFloat16* bias, c10::BFloat16* y, int64_t ldy,
                                     int64_t columns) {
  if constexpr (NS > 1)
    if (count < NS) return first_strips<R, NS - 1, Prefetch>(count, a, lda, b, strip, pairs, bias, y, ldy, columns);
  block<R, NS, Prefetch>(a, lda, b, strip, pairs, bias, y, ldy, columns);
}

// Rows [r0, r0 + R) against strips [t0, t1), strips_for(R, Streaming) at a time (the last group
// fewer); Streaming: a call of at most kStreamingRows rows (no software prefetch).
template <int R, bool Streaming>
BF16_LINEAR_TARGET void row_block(const Problem& p, int64_t r0, int64_t t0, int64_t t1) {
  constexpr int NS = strips_for(R, Streaming);
  const int64_t strip = p.steps * kStepElems, pairs = p.steps * kK / 2;
  const uint16_t* a = p.a + r0 * p.lda;
  for (int64_t t = t0; t < t1; t += NS) {
    const uint16_t* b = p.w + t * strip;
    const c10::BFloat16* bias = p.bias ? p.bias + t * kColumns : nullptr;
    c10::BFloat16* y = p.y + r0 * p.n_total + t * kColumns;
    const int64_t columns = p.n_total - t * kColumns;
    first_strips<R, NS, !Streaming>(std::min<int64_t>(NS, t1 - t), a, p.lda, b, strip, pairs, bias, y, p.n_total, columns);
  }
}

template <bool Streaming>
BF16_LINEAR_TARGET void rows_against_strips(const Problem& p, int64_t r0, int64_t rows, int64_t t0, int64_t t1) {
  switch (rows) {
    case 1: row_block<1, Streaming>(p, r0, t0, t1); break;
    case 2: row_block<2, Streaming>(p, r0, t0, t1); break;
    case 3: row_block<3, Streaming>(p, r0, t0, t1); break;
    case 4: row_block<4, Streaming>(p, r0, t0, t1); break;
    case 5: row_block<5, Streaming>(p, r0, t0, t1); break;
    case 6: row_block<6, Streaming>(p, r0, t0, t1); break;
    case 7: row_block<7, Streaming>(p, r0, t0, t1); break;
    default: row_block<8, Streaming>(p, r0, t0, t1); break;
  }
}

// One thread's strips [t0, t1): up to kStreamingRows rows in one pass over them; more, chunks of them
// that stay in L2, every row block over each chunk.
BF16_LINEAR_TARGET void run_strips(const Problem& p, int64_t t0, int64_t t1) {
  const int64_t strip_bytes = p.steps * kStepElems * 2;
  const int64_t chunk = std::max<int64_t>(4, kChunkBytes / strip_bytes);
  if (p.rows <= kStreamingRows && streaming_choice.streaming())
    return rows_against_strips<true>(p, 0, p.rows, t0, t1);  // one pass: no chunks
  for (int64_t c0 = t0; c0 < t1; c0 += chunk) {
    const int64_t c1 = std::min(t1, c0 + chunk);
    for (int64_t r0 = 0; r0 < p.rows; r0 += kBlockRows)
      rows_against_strips<false>(p, r0, std::min<int64_t>(kBlockRows, p.rows - r0), c0, c1);
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
  // Benchmarks and tests: whether calls of up to kStreamingRows rows take their streaming loop or
  // the prefetching loop of more rows (profile_step.py --ab-streaming times one against the other);
  // None: the CPU's rule (cpu_features::few_rows_stream_weights).
  m.def("set_bf16_linear_streaming(bool? on) -> ()", [](std::optional<bool> on) { streaming_choice.force(on); });
}
