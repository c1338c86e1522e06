// A float32 linear layer on AVX-512 FMAs (the exact mode's projections) over column strips of the
// weight ([ceil(N/16)][K][16] float32: f32_strips_pack in engine/layers/linear_kernels.py), whose
// every 64-byte line is one k for 16 output columns, i.e. exactly one FMA operand against the
// broadcast input x[k]: no horizontal sums, and at one row a strip is one sequential stream.
// The loop nest is bf16_linear's (strips_loops.h); register blocks of up to 8 rows x 3 strips (8
// strips at 1-2 rows). Bias is added in the store. Any K, any N (the last strip's padding columns
// are zeros, never stored), any rows. The sum over k runs in order, one FMA per product, the same
// for every row count: a row's output does not depend on the batch it came in.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "cpu_features.h"
#include "strips_loops.h"

namespace {

#define F32_LINEAR_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

constexpr int64_t kColumns = 16;  // output columns of a strip (one zmm of float32)
// Whether calls of up to strips_loops::kStreamingRows rows stream: the CPU's rule unless
// set_f32_linear_streaming forced one (as bf16_linear's).
cpu_features::StreamingChoice streaming_choice;
// Past the streaming rows each strip's line this many k ahead is prefetched into L1.
constexpr int64_t kPrefetchLines = 24;

bool f32_linear_supported() { return cpu_features::avx512_core(); }

struct F32Strips {
  using Problem = strips_loops::Problem<float, float>;

  // As many strips as keep rows x strips + strips + 1 within 32 registers.
  static constexpr int strips_for(int rows, bool) { return rows <= 2 ? 8 : rows <= 6 ? 4 : 3; }
  static int64_t strip_bytes(const Problem& p) { return p.k * kColumns * 4; }

  // y[r][16 n + j] = sum_k a[r][k] w[16 n + j][k] + bias for rows [r0, r0 + R), strips [t, t + NS),
  // j < 16 while 16 n + j < N.
  template <int R, int NS, bool Prefetch>
  F32_LINEAR_TARGET static void block(const Problem& p, int64_t r0, int64_t t) {
    const int64_t strip = p.k * kColumns, columns = p.n_total - t * kColumns;
    const float* a = p.a + r0 * p.lda;
    const float* b = p.w + t * strip;
    __m512 acc[R][NS];
    for (int r = 0; r < R; ++r)
      for (int n = 0; n < NS; ++n) acc[r][n] = _mm512_setzero_ps();
    for (int64_t k = 0; k < p.k; ++k) {
      __m512 w[NS];
      if (Prefetch)
        for (int n = 0; n < NS; ++n)
          _mm_prefetch(reinterpret_cast<const char*>(b + n * strip + (k + kPrefetchLines) * kColumns), _MM_HINT_T0);
      for (int n = 0; n < NS; ++n) w[n] = _mm512_loadu_ps(b + n * strip + k * kColumns);
      for (int r = 0; r < R; ++r) {
        const __m512 x = _mm512_set1_ps(a[r * p.lda + k]);
        for (int n = 0; n < NS; ++n) acc[r][n] = _mm512_fmadd_ps(x, w[n], acc[r][n]);
      }
    }
    float* y = p.y + r0 * p.n_total + t * kColumns;
    for (int n = 0; n < NS; ++n) {
      const int64_t count = std::min<int64_t>(kColumns, columns - n * kColumns);
      if (count <= 0) break;
      const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1);
      const __m512 add = p.bias ? _mm512_maskz_loadu_ps(mask, p.bias + (t + n) * kColumns) : _mm512_setzero_ps();
      for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + r * p.n_total + n * kColumns, mask, _mm512_add_ps(acc[r][n], add));
    }
  }
};

// x [M, K] float32 @ strips (f32_strips_pack of an [N, K] weight) + bias -> [M, N] float32.
at::Tensor f32_linear(const at::Tensor& x, const at::Tensor& strips, const std::optional<at::Tensor>& bias,
                      int64_t n_total) {
  TORCH_CHECK(f32_linear_supported(), "f32_linear needs a CPU with AVX-512 (F, BW, VL, DQ)");
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
  const F32Strips::Problem p{x.data_ptr<float>(), x.stride(0), rows, strips.data_ptr<float>(), k_total, n_total, bias_ptr,
                             out.data_ptr<float>()};
  strips_loops::run<F32Strips>(p, tiles, strips.data_ptr(), strips.numel() * 4, streaming_choice.streaming());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bento_llm, m) {
  // Whether f32_linear runs here (AVX-512 F/BW/VL/DQ, with or without AVX512-BF16): the engine asks this once.
  m.def("f32_linear_supported() -> bool", &f32_linear_supported);
  m.def("f32_linear(Tensor x, Tensor strips, Tensor? bias, int out_features) -> Tensor", &f32_linear);
  // Benchmarks and tests: whether calls of up to strips_loops::kStreamingRows rows take the streaming loop (None:
  // the CPU's rule), as set_bf16_linear_streaming.
  m.def("set_f32_linear_streaming(bool? on) -> ()", [](std::optional<bool> on) { streaming_choice.force(on); });
}
