// A float32 linear layer on AVX-512 FMAs (the exact mode's projections) over column strips of the
// weight ([ceil(N/16)][K][16] float32: f32_strips_pack in engine/layers/linear_kernels.py), whose
// every 64-byte line is one k for 16 output columns, i.e. exactly one FMA operand against the
// broadcast input x[k]: no horizontal sums, and at one row a strip is one sequential stream.
// The loop nest is bf16_linear's (strips_loops.h); register blocks of up to 8 rows x 3 strips (8
// strips at 1-2 rows). Bias is added in the store. Any K, any N (the last strip's padding columns
// are zeros, never stored), any rows. The sum over k runs in order, one FMA per product, the same
// for every row count: a row's output does not depend on the batch it came in.
//
// int4_f32_linear: an int4 weight (group-wise affine, engine/layers/quant.py's convention) in a
// float32 model, on the same loop nest over int4 strips ([ceil(N/16)][K/2][16] bytes: byte j of
// pair p holds column j's code for k = 2p in its low nibble, k = 2p + 1 in its high one; beside
// them [ceil(N/16)][K/group][2][16] float32: each group's scale and zero - 8 scale). Each weight
// is made in registers as code * scale + (zero - 8 scale), one FMA (its dequantized value up to
// float32 rounding), then multiplied as f32_linear's: a fourth of its bytes read at few rows.
// From kInt4DirectRows + 1 rows, where the conversion per row block would cost more than the FMAs
// it feeds, each thread converts a chunk of strips once per call into float32 strips in L2 and
// runs f32_linear's blocks on them. Why: CPUs without AVX512-BF16 (Skylake-SP to Ice Lake) run a
// float32 model, and PyTorch's int4 op on float32 rows is a scalar loop (35-60x slower).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
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

// acc[r][n] (+ bias) into rows r of y (n_total floats apart) at strips [t, t + NS): the columns below n_total.
template <int R, int NS>
F32_LINEAR_TARGET inline void store_strips(const __m512 (&acc)[R][NS], float* y, int64_t n_total, int64_t t, const float* bias) {
  for (int n = 0; n < NS; ++n) {
    const int64_t count = std::min<int64_t>(kColumns, n_total - (t + n) * kColumns);
    if (count <= 0) break;
    const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1);
    const __m512 add = bias ? _mm512_maskz_loadu_ps(mask, bias + (t + n) * kColumns) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + r * n_total + (t + n) * kColumns, mask, _mm512_add_ps(acc[r][n], add));
  }
}

struct F32Strips {
  using Problem = strips_loops::Problem<float, float>;

  // As many strips as keep rows x strips + strips + 1 within 32 registers.
  static constexpr int strips_for(int rows, bool) { return rows <= 2 ? 8 : rows <= 6 ? 4 : 3; }
  static int64_t strip_bytes(const Problem& p) { return p.k * kColumns * 4; }

  // y[r][16 n + j] = sum_k a[r][k] w[16 n + j][k] + bias for rows [r0, r0 + R), strips [t, t + NS),
  // j < 16 while 16 n + j < N.
  template <int R, int NS, bool Prefetch>
  F32_LINEAR_TARGET static void block(const Problem& p, int64_t r0, int64_t t) {
    const int64_t strip = p.k * kColumns;
    const float* a = p.a + r0 * p.lda;
    const float* b = p.w + (t - p.first_strip) * strip;
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
    store_strips<R, NS>(acc, p.y + r0 * p.n_total, p.n_total, t, p.bias);
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

// Row counts up to which int4 (and int8) strips are converted in registers per row block
// (Int4Strips, Int8Strips); more convert each chunk once per call (converted_chunks).
constexpr int64_t kInt4DirectRows = 8;

struct Int4Problem {
  const float* a;
  int64_t lda, rows;
  const uint8_t* codes;  // [strips][k / 2][16]
  const float* scales;   // [strips][k / group][2][16]
  int64_t k, group, n_total;
  float* y;
};

// The 16 weights of strip column j at k = 2 pair and 2 pair + 1, as floats: code * scale + offset.
F32_LINEAR_TARGET inline void int4_pair(const uint8_t* pair_codes, __m512 scale, __m512 offset, __m512& w0, __m512& w1) {
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pair_codes)));
  w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15))), scale, offset);
  w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4)), scale, offset);
}

struct Int4Strips {
  using Problem = Int4Problem;

  // rows x strips accumulators + 2 x strips (scale, offset) + the pair's two weights within 32 registers.
  static constexpr int strips_for(int rows, bool) { return rows <= 1 ? 8 : rows <= 2 ? 6 : rows <= 4 ? 4 : rows <= 6 ? 3 : 2; }
  static int64_t strip_bytes(const Problem& p) { return p.k * kColumns / 2 + p.k / p.group * 2 * kColumns * 4; }

  // y[r][16 n + j] = sum_k a[r][k] (code * scale + offset) for rows [r0, r0 + R), strips [t, t + NS).
  template <int R, int NS, bool Prefetch>
  F32_LINEAR_TARGET static void block(const Problem& p, int64_t r0, int64_t t) {
    const int64_t pairs = p.k / 2, groups = p.k / p.group;
    const float* a = p.a + r0 * p.lda;
    const uint8_t* c = p.codes + t * pairs * kColumns;
    const float* sz = p.scales + t * groups * 2 * kColumns;
    __m512 acc[R][NS];
    for (int r = 0; r < R; ++r)
      for (int n = 0; n < NS; ++n) acc[r][n] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m512 scale[NS], offset[NS];
      for (int n = 0; n < NS; ++n) {
        scale[n] = _mm512_loadu_ps(sz + (n * groups + g) * 2 * kColumns);
        offset[n] = _mm512_loadu_ps(sz + (n * groups + g) * 2 * kColumns + kColumns);
      }
      for (int64_t q = g * p.group / 2; q < (g + 1) * p.group / 2; ++q) {
        if (Prefetch && q % 4 == 0)  // a 64-byte line holds 4 pairs
          for (int n = 0; n < NS; ++n)
            _mm_prefetch(reinterpret_cast<const char*>(c + (n * pairs + q + 4 * kPrefetchLines) * kColumns), _MM_HINT_T0);
        for (int n = 0; n < NS; ++n) {
          __m512 w0, w1;
          int4_pair(c + (n * pairs + q) * kColumns, scale[n], offset[n], w0, w1);
          for (int r = 0; r < R; ++r) {
            acc[r][n] = _mm512_fmadd_ps(_mm512_set1_ps(a[r * p.lda + 2 * q]), w0, acc[r][n]);
            acc[r][n] = _mm512_fmadd_ps(_mm512_set1_ps(a[r * p.lda + 2 * q + 1]), w1, acc[r][n]);
          }
        }
      }
    }
    store_strips<R, NS>(acc, p.y + r0 * p.n_total, p.n_total, t, nullptr);
  }
};

// Int4 strips [t0, t1) as float32 strips (f32_linear's layout) into `out`: the same values
// Int4Strips makes in registers.
F32_LINEAR_TARGET void int4_to_float(const Int4Problem& p, int64_t t0, int64_t t1, float* out) {
  const int64_t pairs = p.k / 2, groups = p.k / p.group;
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* c = p.codes + t * pairs * kColumns;
    const float* sz = p.scales + t * groups * 2 * kColumns;
    float* w = out + (t - t0) * p.k * kColumns;
    for (int64_t q = 0; q < pairs; ++q) {
      const int64_t g = 2 * q / p.group;
      __m512 w0, w1;
      int4_pair(c + q * kColumns, _mm512_loadu_ps(sz + g * 2 * kColumns), _mm512_loadu_ps(sz + g * 2 * kColumns + kColumns),
                w0, w1);
      _mm512_storeu_ps(w + 2 * q * kColumns, w0);
      _mm512_storeu_ps(w + (2 * q + 1) * kColumns, w1);
    }
  }
}

struct FreeFloats {
  void operator()(float* p) const { std::free(p); }
};

// One thread's strips [t0, t1) at more than kInt4DirectRows rows: chunks of strips converted to
// float32 (to_float: a chunk of f32_linear's kChunkBytes, in L2), every row block over each.
template <class Problem, void (*to_float)(const Problem&, int64_t, int64_t, float*)>
void converted_chunks(const Problem& p, int64_t t0, int64_t t1) {
  const int64_t strip_floats = p.k * kColumns;
  const int64_t chunk = std::max<int64_t>(4, strips_loops::kChunkBytes / (strip_floats * 4));
  std::unique_ptr<float, FreeFloats> buffer(
      static_cast<float*>(std::aligned_alloc(64, ((std::min(chunk, t1 - t0) * strip_floats * 4 + 63) / 64) * 64)));
  for (int64_t c0 = t0; c0 < t1; c0 += chunk) {
    const int64_t c1 = std::min(t1, c0 + chunk);
    to_float(p, c0, c1, buffer.get());
    const F32Strips::Problem f{p.a, p.lda, p.rows, buffer.get(), p.k, p.n_total, nullptr, p.y, c0};
    for (int64_t r0 = 0; r0 < p.rows; r0 += strips_loops::kBlockRows)
      strips_loops::rows_against_strips<F32Strips, false>(f, r0, std::min<int64_t>(strips_loops::kBlockRows, p.rows - r0), c0, c1);
  }
}

// A call on quantized strips: in registers up to kInt4DirectRows rows (Kernel), else each thread's
// strips converted chunk by chunk (to_float) for f32_linear's blocks.
template <class Kernel, void (*to_float)(const typename Kernel::Problem&, int64_t, int64_t, float*)>
void run_quantized(const typename Kernel::Problem& p, int64_t tiles, const at::Tensor& codes) {
  if (p.rows <= kInt4DirectRows) {
    strips_loops::run<Kernel>(p, tiles, codes.data_ptr(), codes.numel(), streaming_choice.streaming());
  } else {
    kernel_pool::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) { converted_chunks<typename Kernel::Problem, to_float>(p, t0, t1); },
                              {codes.data_ptr(), codes.numel()});
  }
}

// x [M, K] float32 @ an int4 weight in int4 strips (codes [ceil(N/16), K/2, 16] uint8, scales
// [ceil(N/16), K/group, 2, 16] float32: engine/layers/quant.py packs them) -> [M, N] float32.
at::Tensor int4_f32_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, int64_t n_total) {
  TORCH_CHECK(f32_linear_supported(), "int4_f32_linear needs a CPU with AVX-512 (F, BW, VL, DQ)");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1, "x: a [rows, K] float32 matrix");
  const int64_t rows = x.size(0), k_total = x.size(1), tiles = codes.size(0);
  TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.size(2) == kColumns &&
                  codes.size(1) * 2 == k_total,
              "codes: [ceil(N/16), K/2, 16] uint8 int4 strips for K = ", k_total);
  TORCH_CHECK(scales.dim() == 4 && scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.size(0) == tiles &&
                  scales.size(1) > 0 && k_total % scales.size(1) == 0 && (k_total / scales.size(1)) % 2 == 0 &&
                  scales.size(2) == 2 && scales.size(3) == kColumns,
              "scales: [ceil(N/16), K/group, 2, 16] float32 (an even group dividing K)");
  TORCH_CHECK(n_total > (tiles - 1) * kColumns && n_total <= tiles * kColumns, "out_features ", n_total,
              " does not match the strips");
  at::Tensor out = at::empty({rows, n_total}, x.options());
  if (rows == 0) return out;
  const Int4Problem p{x.data_ptr<float>(), x.stride(0), rows, codes.data_ptr<uint8_t>(), scales.data_ptr<float>(), k_total,
                      k_total / scales.size(1), n_total, out.data_ptr<float>()};
  run_quantized<Int4Strips, int4_to_float>(p, tiles, codes);
  return out;
}

// int8_f32_linear: int8 codes with one scale per output column (int8 weight-only, and the int8 LM
// head and tied table of a float32 model) in int8 strips ([ceil(N/16)][K][16] int8, f32_linear's
// order, a byte per weight), each weight made as code * scale (its dequantized value) in registers,
// then as int4_f32_linear: in registers up to kInt4DirectRows rows, converted per chunk beyond.
struct Int8Problem {
  const float* a;
  int64_t lda, rows;
  const int8_t* codes;  // [strips][k][16]
  const float* scales;  // [n_total]
  int64_t k, n_total;
  float* y;
};

// The scales of strip t's columns (0 past n_total: its padding columns' codes are 0 too).
F32_LINEAR_TARGET inline __m512 int8_strip_scales(const Int8Problem& p, int64_t t) {
  const int64_t count = std::clamp<int64_t>(p.n_total - t * kColumns, 0, kColumns);
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << count) - 1), p.scales + t * kColumns);
}

// Codes [16] at p as floats times scale.
F32_LINEAR_TARGET inline __m512 int8_weights(const int8_t* p, __m512 scale) {
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))), scale);
}

struct Int8Strips {
  using Problem = Int8Problem;

  static constexpr int strips_for(int rows, bool) { return rows <= 2 ? 8 : rows <= 6 ? 4 : 3; }
  static int64_t strip_bytes(const Problem& p) { return p.k * kColumns; }

  template <int R, int NS, bool Prefetch>
  F32_LINEAR_TARGET static void block(const Problem& p, int64_t r0, int64_t t) {
    const int64_t strip = p.k * kColumns;
    const float* a = p.a + r0 * p.lda;
    const int8_t* c = p.codes + t * strip;
    __m512 acc[R][NS], scale[NS];
    for (int n = 0; n < NS; ++n) scale[n] = int8_strip_scales(p, t + n);
    for (int r = 0; r < R; ++r)
      for (int n = 0; n < NS; ++n) acc[r][n] = _mm512_setzero_ps();
    for (int64_t k = 0; k < p.k; ++k) {
      if (Prefetch && k % 4 == 0)  // a 64-byte line holds 4 k
        for (int n = 0; n < NS; ++n)
          _mm_prefetch(reinterpret_cast<const char*>(c + n * strip + (k + 4 * kPrefetchLines) * kColumns), _MM_HINT_T0);
      for (int n = 0; n < NS; ++n) {
        const __m512 w = int8_weights(c + n * strip + k * kColumns, scale[n]);
        for (int r = 0; r < R; ++r) acc[r][n] = _mm512_fmadd_ps(_mm512_set1_ps(a[r * p.lda + k]), w, acc[r][n]);
      }
    }
    store_strips<R, NS>(acc, p.y + r0 * p.n_total, p.n_total, t, nullptr);
  }
};

F32_LINEAR_TARGET void int8_to_float(const Int8Problem& p, int64_t t0, int64_t t1, float* out) {
  for (int64_t t = t0; t < t1; ++t) {
    const __m512 scale = int8_strip_scales(p, t);
    const int8_t* c = p.codes + t * p.k * kColumns;
    float* w = out + (t - t0) * p.k * kColumns;
    for (int64_t k = 0; k < p.k; ++k) _mm512_storeu_ps(w + k * kColumns, int8_weights(c + k * kColumns, scale));
  }
}

// x [M, K] float32 @ int8 strips (codes [ceil(N/16), K, 16] int8, scales [N] float32) -> [M, N] float32.
at::Tensor int8_f32_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, int64_t n_total) {
  TORCH_CHECK(f32_linear_supported(), "int8_f32_linear needs a CPU with AVX-512 (F, BW, VL, DQ)");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1, "x: a [rows, K] float32 matrix");
  const int64_t rows = x.size(0), k_total = x.size(1), tiles = codes.size(0);
  TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == at::kChar && codes.is_contiguous() && codes.size(2) == kColumns &&
                  codes.size(1) == k_total,
              "codes: [ceil(N/16), K, 16] int8 strips for K = ", k_total);
  TORCH_CHECK(n_total > (tiles - 1) * kColumns && n_total <= tiles * kColumns, "out_features ", n_total,
              " does not match the strips");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == n_total,
              "scales: [out_features] float32");
  at::Tensor out = at::empty({rows, n_total}, x.options());
  if (rows == 0) return out;
  const Int8Problem p{x.data_ptr<float>(), x.stride(0), rows, codes.data_ptr<int8_t>(), scales.data_ptr<float>(), k_total,
                      n_total, out.data_ptr<float>()};
  run_quantized<Int8Strips, int8_to_float>(p, tiles, codes);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bento_llm, m) {
  // Whether f32_linear runs here (AVX-512 F/BW/VL/DQ, with or without AVX512-BF16): the engine asks this once.
  m.def("f32_linear_supported() -> bool", &f32_linear_supported);
  m.def("f32_linear(Tensor x, Tensor strips, Tensor? bias, int out_features) -> Tensor", &f32_linear);
  m.def("int4_f32_linear(Tensor x, Tensor codes, Tensor scales, int out_features) -> Tensor", &int4_f32_linear);
  m.def("int8_f32_linear(Tensor x, Tensor codes, Tensor scales, int out_features) -> Tensor", &int8_f32_linear);
  // Benchmarks and tests: whether calls of up to strips_loops::kStreamingRows rows take the streaming loop (None:
  // the CPU's rule), as set_bf16_linear_streaming.
  m.def("set_f32_linear_streaming(bool? on) -> ()", [](std::optional<bool> on) { streaming_choice.force(on); });
}
