// A float32 linear layer on AVX-512 FMAs (the exact mode's projections) over column strips of the
// weight ([ceil(N/16)][K][16] float32: f32_strips_pack in engine/layers/linear_kernels.py), whose
// every 64-byte line is one k for 16 output columns, i.e. exactly one FMA operand against the
// broadcast input x[k]: no horizontal sums, and at one row a strip is one sequential stream.
// bf16_linear.cpp's blocking on FMAs: rows in blocks of up to kBlockRows, strips in groups of
// strips_for(rows), one float32 accumulator register per (row, strip) across all of K. At few rows
// each thread streams its share of the weight once; at many rows a chunk of strips (kChunkBytes)
// stays in L2 while every row block passes over it, each strip's next lines prefetched into L1.
// Both threads split the strips (kernel_pool::parallel_for); a small weight at few rows runs on
// the calling thread. Bias is added in the store. Any K, any N (the last strip's padding columns
// are zeros, never stored), any rows. The sum over k runs in order, one FMA per product, the same
// for every row count: a row's output does not depend on the batch it came in.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "cpu_features.h"
#include "thread_pool.h"

namespace {

#define F32_LINEAR_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

constexpr int64_t kColumns = 16;  // output columns of a strip (one zmm of float32)
// Rows of one register block: 8 rows x 3 strips = 24 accumulators (+ 3 weight, 1 input register).
constexpr int kBlockRows = 8;
// Calls of up to this many rows stream each thread's strips once without software prefetch where
// the CPU's rule says so (cpu_features::few_rows_stream_weights, bf16_linear's kStreamingRows).
constexpr int kStreamingRows = 6;
cpu_features::StreamingChoice streaming_choice;
// Strips per register block: as many as keep rows x strips + strips + 1 within 32 registers.
constexpr int strips_for(int rows) { return rows <= 2 ? 8 : rows <= 6 ? 4 : 3; }
// Past the streaming rows each strip's line this many k ahead is prefetched into L1.
constexpr int64_t kPrefetchLines = 24;
// Weight bytes per chunk of strips that all row blocks pass over while it stays in L2.
constexpr int64_t kChunkBytes = 512 << 10;
// At most one row block with a weight under this: the calling thread alone.
constexpr int64_t kSerialLinearBytes = 256 << 10;

bool f32_linear_supported() { return cpu_features::avx512_bf16(); }

// y[r][16 n + j] = sum_k a[r][k] w[16 n + j][k] + bias for r < R, strips n < NS of b (each `strip`
// floats apart, k_total lines long), j < 16 while 16 n + j < columns.
template <int R, int NS, bool Prefetch>
F32_LINEAR_TARGET void block(const float* a, int64_t lda, const float* b, int64_t strip, int64_t k_total,
                             const float* bias, float* y, int64_t ldy, int64_t columns) {
  __m512 acc[R][NS];
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < NS; ++n) acc[r][n] = _mm512_setzero_ps();
  for (int64_t k = 0; k < k_total; ++k) {
    __m512 w[NS];
    if (Prefetch)
      for (int n = 0; n < NS; ++n)
        _mm_prefetch(reinterpret_cast<const char*>(b + n * strip + (k + kPrefetchLines) * kColumns), _MM_HINT_T0);
    for (int n = 0; n < NS; ++n) w[n] = _mm512_loadu_ps(b + n * strip + k * kColumns);
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(a[r * lda + k]);
      for (int n = 0; n < NS; ++n) acc[r][n] = _mm512_fmadd_ps(x, w[n], acc[r][n]);
    }
  }
  for (int n = 0; n < NS; ++n) {
    const int64_t count = std::min<int64_t>(kColumns, columns - n * kColumns);
    if (count <= 0) break;
    const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1);
    const __m512 add = bias ? _mm512_maskz_loadu_ps(mask, bias + n * kColumns) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + r * ldy + n * kColumns, mask, _mm512_add_ps(acc[r][n], add));
  }
}

struct Problem {
  const float* a;
  int64_t lda, rows;
  const float* w;
  int64_t k_total, n_total;
  const float* bias;
  float* y;
};

// block<R, NS> on the first `count` (1..NS) strips of b: the last group of a thread's strips.
template <int R, int NS, bool Prefetch>
F32_LINEAR_TARGET void first_strips(int64_t count, const float* a, int64_t lda, const float* b, int64_t strip,
                                    int64_t k_total, const float* bias, float* y, int64_t ldy, int64_t columns) {
  if constexpr (NS > 1)
    if (count < NS) return first_strips<R, NS - 1, Prefetch>(count, a, lda, b, strip, k_total, bias, y, ldy, columns);
  block<R, NS, Prefetch>(a, lda, b, strip, k_total, bias, y, ldy, columns);
}

// Rows [r0, r0 + R) against strips [t0, t1), strips_for(R) at a time (the last group fewer).
template <int R, bool Streaming>
F32_LINEAR_TARGET void row_block(const Problem& p, int64_t r0, int64_t t0, int64_t t1) {
  constexpr int NS = strips_for(R);
  const int64_t strip = p.k_total * kColumns;
  const float* a = p.a + r0 * p.lda;
  for (int64_t t = t0; t < t1; t += NS) {
    const float* bias = p.bias ? p.bias + t * kColumns : nullptr;
    float* y = p.y + r0 * p.n_total + t * kColumns;
    first_strips<R, NS, !Streaming>(std::min<int64_t>(NS, t1 - t), a, p.lda, p.w + t * strip, strip, p.k_total, bias, y,
                                    p.n_total, p.n_total - t * kColumns);
  }
}

template <bool Streaming>
F32_LINEAR_TARGET void rows_against_strips(const Problem& p, int64_t r0, int64_t rows, int64_t t0, int64_t t1) {
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

// One thread's strips [t0, t1): up to kStreamingRows rows in one pass over them; more, chunks of
// them that stay in L2, every row block over each chunk.
F32_LINEAR_TARGET void run_strips(const Problem& p, int64_t t0, int64_t t1) {
  const int64_t strip_bytes = p.k_total * kColumns * 4;
  const int64_t chunk = std::max<int64_t>(4, kChunkBytes / strip_bytes);
  if (p.rows <= kStreamingRows && streaming_choice.streaming()) return rows_against_strips<true>(p, 0, p.rows, t0, t1);
  for (int64_t c0 = t0; c0 < t1; c0 += chunk) {
    const int64_t c1 = std::min(t1, c0 + chunk);
    for (int64_t r0 = 0; r0 < p.rows; r0 += kBlockRows)
      rows_against_strips<false>(p, r0, std::min<int64_t>(kBlockRows, p.rows - r0), c0, c1);
  }
}

// x [M, K] float32 @ strips (f32_strips_pack of an [N, K] weight) + bias -> [M, N] float32.
at::Tensor f32_linear(const at::Tensor& x, const at::Tensor& strips, const std::optional<at::Tensor>& bias,
                      int64_t n_total) {
  TORCH_CHECK(f32_linear_supported(), "f32_linear needs a CPU with our AVX-512 kernels");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1, "x: a [rows, K] float32 matrix");
  TORCH_CHECK(strips.dim() == 3 && strips.scalar_type() == at::kFloat && strips.is_contiguous() &&
                  strips.size(2) == kColumns,
              "strips: f32_strips_pack's [ceil(N/16), K, 16] float32 layout");
  const int64_t rows = x.size(0), k_total = x.size(1), tiles = strips.size(0);
  TORCH_CHECK(strips.size(1) == k_total, "x has ", k_total, " columns, the weight ", strips.size(1));
  TORCH_CHECK(n_total > (tiles - 1) * kColumns && n_total <= tiles * kColumns, "out_features ", n_total,
              " does not match the strips");
  const float* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n_total,
                "bias: [out_features] float32");
    bias_ptr = bias->data_ptr<float>();
  }
  at::Tensor out = at::empty({rows, n_total}, x.options());
  if (rows == 0) return out;
  const Problem p{x.data_ptr<float>(), x.stride(0), rows, strips.data_ptr<float>(), k_total, n_total, bias_ptr,
                  out.data_ptr<float>()};
  const bool serial = rows <= kBlockRows && strips.numel() * 4 < kSerialLinearBytes;
  kernel_pool::parallel_for(0, tiles, serial ? tiles : 1, [&](int64_t t0, int64_t t1) { run_strips(p, t0, t1); },
                            {strips.data_ptr(), strips.numel() * 4});
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bento_llm, m) {
  m.def("f32_linear(Tensor x, Tensor strips, Tensor? bias, int out_features) -> Tensor", &f32_linear);
  // Benchmarks and tests: whether calls of up to kStreamingRows rows take the streaming loop (None:
  // the CPU's rule), as set_bf16_linear_streaming.
  m.def("set_f32_linear_streaming(bool? on) -> ()", [](std::optional<bool> on) { streaming_choice.force(on); });
}
