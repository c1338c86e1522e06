// A bfloat16 linear layer on AVX512-BF16 (vdpbf16ps) for CPUs without AMX (AMD Zen 4/5, Xeons
// whose hypervisor hides the tiles), over the weight layout the engine already keeps for bfloat16
// projections: amx_linear_pack's column strips ([ceil(N/16)][K/32][16][32]), whose every 64-byte
// row is one K pair for 16 output columns, i.e. exactly one vdpbf16ps B operand; the input's pair
// (x[k], x[k+1]) is broadcast as one 32-bit value. One copy of the weight, shared with amx_linear.
//
// Blocking: strips_loops.h's loop nest (shared with f32_linear.cpp): register blocks of up to 8
// rows x strips_for(rows, ...) strips over all of K (a block's input rows, <= 8 x 3 KB at the
// default model's widest K, stay in L1 across a chunk of strips); few rows stream each thread's
// share of the weight once (the streaming rule's measurements: below); many rows go over L2
// chunks of strips, each strip's next lines prefetched into L1 (kPrefetchPairs).
// Bias and the rounding to bfloat16 are in the store. K a multiple of 32 (the
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
#include "strips_loops.h"

namespace {

#define BF16_LINEAR_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

using strips_call::kColumns;  // output columns of a strip

// The streaming rule (strips_loops.h): a call of at most strips_loops::kStreamingRows (6) rows
// streams the weight once, and few products per weight line leave the loop bound by the read:
// there the strips are read without software prefetch, 8 at once at 1-2 rows (more streams in
// flight for the hardware prefetcher). EPYC Zen 4 (2 vCPUs, no AMX),
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
//
// Whether calls of up to strips_loops::kStreamingRows rows take the streaming loop: the CPU's rule
// (cpu_features::few_rows_stream_weights: AMD's, not Intel's) unless set_bf16_linear_streaming forced one.
cpu_features::StreamingChoice streaming_choice;
// Past the streaming rows each strip's weight line this many pairs (64-byte lines) ahead is prefetched
// into L1 (at a strip's end: the next strip's first lines, or past the weight: a prefetch never
// faults). One thread, the default model's projections, A/B in one process (thread time, min of 8
// passes, a Xeon without AMX): 0.75-0.85x the time without at 1 row (~10.5 -> ~12.5 GB/s),
// 0.68-0.85x at 8-16 rows, 0.85-0.95x at 64 (the strips come from L2 there); 16 or 32 lines ahead
// measured about as 24. (On Zen 4 the streaming calls are faster without it: above.)
constexpr int64_t kPrefetchPairs = 24;

bool bf16_linear_supported() { return cpu_features::avx512_bf16(); }

struct Bf16Strips {
  using Problem = strips_loops::Problem<uint16_t, c10::BFloat16>;

  // Strips per register block: as many as keep rows x strips + strips + 1 within 32 registers (at
  // 1-2 rows while streaming, 8).
  static constexpr int strips_for(int rows, bool streaming) { return streaming && rows <= 2 ? 8 : rows <= 6 ? 4 : 3; }
  static int64_t strip_bytes(const Problem& p) { return p.k * kColumns * 2; }

  // y[r][16 n + j] = bf16(sum_k a[r][k] w[16 n + j][k] + bias) for rows [r0, r0 + R), strips
  // [t, t + NS) (each K / 2 pairs long), j < 16 while 16 n + j < N.
  template <int R, int NS, bool Prefetch>
  BF16_LINEAR_TARGET static void block(const Problem& p, int64_t r0, int64_t t) {
    const int64_t strip = p.k * kColumns, pairs = p.k / 2, columns = p.n_total - t * kColumns;
    const uint16_t* a = p.a + r0 * p.lda;
    const uint16_t* b = p.w + (t - p.first_strip) * strip;
    __m512 acc[R][NS];
    for (int r = 0; r < R; ++r)
      for (int n = 0; n < NS; ++n) acc[r][n] = _mm512_setzero_ps();
    for (int64_t q = 0; q < pairs; ++q) {
      __m512bh w[NS];
      if (Prefetch)
        for (int n = 0; n < NS; ++n)
          _mm_prefetch(reinterpret_cast<const char*>(b + n * strip + (q + kPrefetchPairs) * 2 * kColumns), _MM_HINT_T0);
      for (int n = 0; n < NS; ++n) w[n] = (__m512bh)_mm512_loadu_si512(b + n * strip + q * 2 * kColumns);
      for (int r = 0; r < R; ++r) {
        int32_t pair;
        std::memcpy(&pair, a + r * p.lda + 2 * q, sizeof(pair));
        const __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
        for (int n = 0; n < NS; ++n) acc[r][n] = _mm512_dpbf16_ps(acc[r][n], x, w[n]);
      }
    }
    c10::BFloat16* y = p.y + r0 * p.n_total + t * kColumns;
    for (int n = 0; n < NS; ++n) {
      const int64_t count = std::min<int64_t>(kColumns, columns - n * kColumns);
      if (count <= 0) break;
      const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1);
      __m512 add = _mm512_setzero_ps();
      if (p.bias) {
        const __m256i raw = _mm256_maskz_loadu_epi16(mask, p.bias + (t + n) * kColumns);
        add = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
      }
      for (int r = 0; r < R; ++r) {
        const __m512 v = _mm512_add_ps(acc[r][n], add);
        _mm256_mask_storeu_epi16(y + r * p.n_total + n * kColumns, mask, (__m256i)_mm512_cvtneps_pbh(v));
      }
    }
  }
};

// x [M, K] bfloat16 @ packed weight (amx_linear_pack of an [N, K] weight) + bias -> [M, N] bfloat16.
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                       int64_t n_total) {
  TORCH_CHECK(bf16_linear_supported(), "bf16_linear needs a CPU with AVX512-BF16");
  auto call = strips_call::check(x, packed, bias, n_total);
  const int64_t rows = call.rows, tiles = call.tiles;
  const c10::BFloat16* bias_ptr = call.bias;
  at::Tensor out = call.out;
  if (rows == 0) return out;
  const Bf16Strips::Problem p{reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>()), x.stride(0), rows,
                              reinterpret_cast<const uint16_t*>(packed.data_ptr<c10::BFloat16>()), call.k, n_total,
                              bias_ptr, out.data_ptr<c10::BFloat16>()};
  strips_loops::run<Bf16Strips>(p, tiles, packed.data_ptr(), packed.numel() * 2, streaming_choice.streaming());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bento_llm, m) {
  // Whether bf16_linear and bf16_mm_rows (gemv_ops.cpp) run here: the engine asks this once.
  m.def("avx512_bf16_kernels_supported() -> bool", &bf16_linear_supported);
  m.def("bf16_linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor", &bf16_linear);
  // Benchmarks and tests: whether calls of up to strips_loops::kStreamingRows rows take their streaming loop or
  // the prefetching loop of more rows (profile_step.py --ab-streaming times one against the other);
  // None: the CPU's rule (cpu_features::few_rows_stream_weights).
  m.def("set_bf16_linear_streaming(bool? on) -> ()", [](std::optional<bool> on) { streaming_choice.force(on); });
}
