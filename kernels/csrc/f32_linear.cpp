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
// them [ceil(N/16)][K/group][2][16] float32, or float16 where all are exactly float16 as a GGUF's
// Q4_0/Q4_1 are: each group's scale and offset = zero - 8 scale, the same products). The
// weight code * scale + offset is factored: per group, part = sum of x[k] * code over its k (the
// code as read: one vpermps makes a nibble a float), then acc += part * scale + xsum * offset, with
// xsum the group's sum of x (group_sums, once per call). A product costs one FMA on the code, the
// scale and offset two FMAs a group: a fourth of the bytes of float32 read at few rows, and ~4
// vector ops per pair of k and strip at one row where dequantizing each weight first took ~7 (the
// default model's offline decode against dequantizing first, one process, rounds alternating, a
// 2-vCPU Ice Lake: 1.19x tok/s at 1 sequence, 1.09x at 16, 1.00x at 64; bench/RESULTS.md,
// 2026-12-04). Up to kInt4DirectRows rows the nibbles are
// decoded per row block in registers (Int4Strips); more, each thread converts a chunk of strips
// once per call into float codes in L2 for blocks of 8 rows x 3 strips (Int4ConvertedStrips). Both
// make an output by the same operations in the same order: a row's output does not depend on its
// batch. Why: CPUs without AVX512-BF16 (Skylake-SP to Ice Lake) run a float32 model, and
// PyTorch's int4 op on float32 rows is a scalar loop (35-60x slower).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <optional>
#include <type_traits>

#include "cpu_features.h"
#include "int4_groups.h"
#include "strips_loops.h"

namespace {

using int4_groups::kColumns;  // output columns of a strip (one zmm of float32)
using int4_groups::load_scales;

#define F32_LINEAR_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
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

// Every (row, strip) sum of a block set to 0.
template <int R, int NS>
F32_LINEAR_TARGET inline void zero_sums(__m512 (&sums)[R][NS]) {
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < NS; ++n) sums[r][n] = _mm512_setzero_ps();
}

// One k of a float32 strips block: line k of NS strips (strip floats apart from b) times each of R
// rows' a[r][k], added to sums[r][n]; Prefetch: those strips' lines kPrefetchLines ahead.
template <int R, int NS, bool Prefetch>
F32_LINEAR_TARGET inline void strips_k(__m512 (&sums)[R][NS], const float* a, int64_t lda, const float* b, int64_t strip, int64_t k) {
  __m512 w[NS];
  if (Prefetch)
    for (int n = 0; n < NS; ++n)
      _mm_prefetch(reinterpret_cast<const char*>(b + n * strip + (k + kPrefetchLines) * kColumns), _MM_HINT_T0);
  for (int n = 0; n < NS; ++n) w[n] = _mm512_loadu_ps(b + n * strip + k * kColumns);
  for (int r = 0; r < R; ++r) {
    const __m512 x = _mm512_set1_ps(a[r * lda + k]);
    for (int n = 0; n < NS; ++n) sums[r][n] = _mm512_fmadd_ps(x, w[n], sums[r][n]);
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
    zero_sums(acc);
    for (int64_t k = 0; k < p.k; ++k) strips_k<R, NS, Prefetch>(acc, a, p.lda, b, strip, k);
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
// Groups ahead whose scale and offset lines Int4Strips prefetches (beside its codes' lines): their
// own stream per strip, read once a group, which the hardware prefetcher left to miss. The default
// model's 30 layers of int4 projections at 1 row: 0.93x the time without (median of 30 in-process
// A/B rounds, this 2-vCPU Ice Lake).
constexpr int64_t kScaleGroupsAhead = 4;

template <class Scale>
struct Int4Problem {
  const float* a;
  int64_t lda, rows;
  const uint8_t* codes;  // [strips][k / 2][16]
  const Scale* scales;   // [strips][k / group][2][16]: float, or float16's bits (uint16_t)
  int64_t k, group, n_total;
  float* y;
  const float* group_sums;             // [rows][k / group]: group_sums of a
  const float* float_codes = nullptr;  // a chunk of strips' codes as floats from first_strip on (Int4ConvertedStrips)
  int64_t first_strip = 0;
};

// sums[r][g] = the sum of a[r] over group g's inputs, 16 at a time then across the lanes: one
// fixed order per row, whatever the row count.
F32_LINEAR_TARGET void group_sums(const float* a, int64_t lda, int64_t rows, int64_t k, int64_t group, float* sums) {
  const int64_t groups = k / group;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const float* x = a + r * lda + g * group;
      __m512 s = _mm512_setzero_ps();
      for (int64_t i = 0; i < group; i += kColumns) {
        const int64_t count = std::min<int64_t>(kColumns, group - i);
        s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << count) - 1), x + i));
      }
      sums[r * groups + g] = _mm512_reduce_add_ps(s);
    }
}

// The codes 0..15 as floats in lanes 0..15: vpermps reads only the low 4 bits of each index, so one
// permute turns every lane's low nibble into its code as a float (no mask, no int-to-float convert).
F32_LINEAR_TARGET inline __m512 int4_code_values() {
  return _mm512_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f, 8.f, 9.f, 10.f, 11.f, 12.f, 13.f, 14.f, 15.f);
}

// Pair q (k = 2q, 2q + 1) of the 16 columns at `pair_codes` as two vectors of floats.
F32_LINEAR_TARGET inline void int4_pair_codes(const uint8_t* pair_codes, __m512 values, __m512& c0, __m512& c1) {
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pair_codes)));
  c0 = _mm512_permutexvar_ps(bytes, values);
  c1 = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), values);
}

// acc = part * scale + group_sum * offset + acc for rows [0, R) x strips [0, NS) at group g of
// strip t's scales: a group's end in both int4 blocks.
template <int R, int NS, class Scale>
F32_LINEAR_TARGET inline void int4_group_end(__m512 (&acc)[R][NS], const __m512 (&part)[R][NS], const Scale* sz, int64_t groups,
                                             int64_t g, const float* sums) {
  for (int n = 0; n < NS; ++n) {
    const __m512 scale = load_scales(sz + (n * groups + g) * 2 * kColumns);
    const __m512 offset = load_scales(sz + (n * groups + g) * 2 * kColumns + kColumns);
    for (int r = 0; r < R; ++r) {
      acc[r][n] = _mm512_fmadd_ps(part[r][n], scale, acc[r][n]);
      acc[r][n] = _mm512_fmadd_ps(_mm512_set1_ps(sums[r * groups + g]), offset, acc[r][n]);
    }
  }
}

// Both int4 blocks below make each output by the same operations in the same order (k ascending
// within a group, int4_group_end at each group's end, groups ascending).

// Int4Strips (up to kInt4DirectRows rows): rows [r0, r0 + R) x strips [t, t + NS), codes decoded
// in registers a pair at a time.
template <class Scale>
struct Int4Strips {
  using Problem = Int4Problem<Scale>;
  // rows x strips partial sums and as many accumulators + the pair's codes within 32 registers.
  static constexpr int strips_for(int rows, bool) {
    return rows <= 1 ? 8 : rows <= 2 ? 6 : rows <= 3 ? 4 : rows <= 4 ? 3 : rows <= 7 ? 2 : 1;
  }
  static int64_t strip_bytes(const Problem& p) { return p.k * kColumns / 2 + p.k / p.group * 2 * kColumns * sizeof(Scale); }

  template <int R, int NS, bool Prefetch>
  F32_LINEAR_TARGET static void block(const Problem& p, int64_t r0, int64_t t) {
    const int64_t pairs = p.k / 2, groups = p.k / p.group, half = p.group / 2;
    const float* a = p.a + r0 * p.lda;
    const uint8_t* c = p.codes + t * pairs * kColumns;
    const __m512 values = int4_code_values();
    __m512 acc[R][NS];
    zero_sums(acc);
    for (int64_t g = 0; g < groups; ++g) {
      __m512 part[R][NS];
      zero_sums(part);
      if (Prefetch)
        for (int n = 0; n < NS; ++n) {
          const Scale* ahead = p.scales + ((t + n) * groups + g + kScaleGroupsAhead) * 2 * kColumns;
          _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(ahead + kColumns), _MM_HINT_T0);
        }
      for (int64_t q = g * half; q < (g + 1) * half; ++q) {
        if (Prefetch && q % 4 == 0)  // a 64-byte line holds 4 pairs
          for (int n = 0; n < NS; ++n)
            _mm_prefetch(reinterpret_cast<const char*>(c + (n * pairs + q + 4 * kPrefetchLines) * kColumns), _MM_HINT_T0);
        for (int n = 0; n < NS; ++n) {
          __m512 c0, c1;
          int4_pair_codes(c + (n * pairs + q) * kColumns, values, c0, c1);
          for (int r = 0; r < R; ++r) {
            part[r][n] = _mm512_fmadd_ps(_mm512_set1_ps(a[r * p.lda + 2 * q]), c0, part[r][n]);
            part[r][n] = _mm512_fmadd_ps(_mm512_set1_ps(a[r * p.lda + 2 * q + 1]), c1, part[r][n]);
          }
        }
      }
      int4_group_end<R, NS>(acc, part, p.scales + t * groups * 2 * kColumns, groups, g, p.group_sums + r0 * groups);
    }
    store_strips<R, NS>(acc, p.y + r0 * p.n_total, p.n_total, t, nullptr);
  }
};

// Int4ConvertedStrips (more rows): the same on a chunk's codes converted to floats (int4_to_float),
// k at a time as F32Strips; the registers hold the partial sums of 8 rows x 3 strips, the
// accumulators spill to L1 (touched once a group).
template <class Scale>
struct Int4ConvertedStrips {
  using Problem = Int4Problem<Scale>;
  static constexpr int strips_for(int rows, bool streaming) { return F32Strips::strips_for(rows, streaming); }
  static int64_t strip_bytes(const Problem& p) { return p.k * kColumns * 4; }

  template <int R, int NS, bool Prefetch>
  F32_LINEAR_TARGET static void block(const Problem& p, int64_t r0, int64_t t) {
    const int64_t strip = p.k * kColumns, groups = p.k / p.group;
    const float* a = p.a + r0 * p.lda;
    const float* b = p.float_codes + (t - p.first_strip) * strip;
    __m512 acc[R][NS];
    zero_sums(acc);
    for (int64_t g = 0; g < groups; ++g) {
      __m512 part[R][NS];
      zero_sums(part);
      for (int64_t k = g * p.group; k < (g + 1) * p.group; ++k) strips_k<R, NS, Prefetch>(part, a, p.lda, b, strip, k);
      int4_group_end<R, NS>(acc, part, p.scales + t * groups * 2 * kColumns, groups, g, p.group_sums + r0 * groups);
    }
    store_strips<R, NS>(acc, p.y + r0 * p.n_total, p.n_total, t, nullptr);
  }
};

// The codes of int4 strips [t0, t1) as floats in f32_linear's strip layout, into `out`.
template <class Scale>
F32_LINEAR_TARGET void int4_to_float(const Int4Problem<Scale>& p, int64_t t0, int64_t t1, float* out) {
  const int64_t pairs = p.k / 2;
  const __m512 values = int4_code_values();
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t q = 0; q < pairs; ++q) {
      __m512 c0, c1;
      int4_pair_codes(p.codes + (t * pairs + q) * kColumns, values, c0, c1);
      _mm512_storeu_ps(out + ((t - t0) * p.k + 2 * q) * kColumns, c0);
      _mm512_storeu_ps(out + ((t - t0) * p.k + 2 * q + 1) * kColumns, c1);
    }
}

template <class Scale>
Int4Problem<Scale> chunk_problem(const Int4Problem<Scale>& p, const float* chunk, int64_t first_strip) {
  Int4Problem<Scale> f = p;
  f.float_codes = chunk;
  f.first_strip = first_strip;
  return f;
}

struct FreeFloats {
  void operator()(float* p) const { std::free(p); }
};

// One thread's strips [t0, t1) at more than kInt4DirectRows rows: chunks of strips converted to
// float32 (to_float: a chunk of f32_linear's kChunkBytes, in L2), every row block of ChunkKernel
// (its problem: chunk_problem) over each.
template <class Problem, void (*to_float)(const Problem&, int64_t, int64_t, float*), class ChunkKernel>
void converted_chunks(const Problem& p, int64_t t0, int64_t t1) {
  const int64_t strip_floats = p.k * kColumns;
  const int64_t chunk = std::max<int64_t>(4, strips_loops::kChunkBytes / (strip_floats * 4));
  std::unique_ptr<float, FreeFloats> buffer(
      static_cast<float*>(std::aligned_alloc(64, ((std::min(chunk, t1 - t0) * strip_floats * 4 + 63) / 64) * 64)));
  for (int64_t c0 = t0; c0 < t1; c0 += chunk) {
    const int64_t c1 = std::min(t1, c0 + chunk);
    to_float(p, c0, c1, buffer.get());
    const typename ChunkKernel::Problem f = chunk_problem(p, buffer.get(), c0);
    for (int64_t r0 = 0; r0 < p.rows; r0 += strips_loops::kBlockRows)
      strips_loops::rows_against_strips<ChunkKernel, false>(f, r0, std::min<int64_t>(strips_loops::kBlockRows, p.rows - r0), c0, c1);
  }
}

// A call on quantized strips: in registers up to kInt4DirectRows rows (Kernel), else each thread's
// strips converted chunk by chunk (to_float) for ChunkKernel's blocks.
template <class Kernel, void (*to_float)(const typename Kernel::Problem&, int64_t, int64_t, float*), class ChunkKernel>
void run_quantized(const typename Kernel::Problem& p, int64_t tiles, const at::Tensor& codes) {
  if (p.rows <= kInt4DirectRows) {
    strips_loops::run<Kernel>(p, tiles, codes.data_ptr(), codes.numel(), streaming_choice.streaming());
  } else {
    kernel_pool::parallel_for(0, tiles, 1,
                              [&](int64_t t0, int64_t t1) { converted_chunks<typename Kernel::Problem, to_float, ChunkKernel>(p, t0, t1); },
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
  const bool half_scales = scales.scalar_type() == at::kHalf;
  TORCH_CHECK(scales.dim() == 4 && (half_scales || scales.scalar_type() == at::kFloat) && scales.is_contiguous() && scales.size(0) == tiles &&
                  scales.size(1) > 0 && k_total % scales.size(1) == 0 && (k_total / scales.size(1)) % 2 == 0 &&
                  scales.size(2) == 2 && scales.size(3) == kColumns,
              "scales: [ceil(N/16), K/group, 2, 16] float32 or float16 (an even group dividing K)");
  TORCH_CHECK(n_total > (tiles - 1) * kColumns && n_total <= tiles * kColumns, "out_features ", n_total,
              " does not match the strips");
  at::Tensor out = at::empty({rows, n_total}, x.options());
  if (rows == 0) return out;
  const int64_t group = k_total / scales.size(1);
  at::Tensor sums = at::empty({rows, scales.size(1)}, x.options());
  group_sums(x.data_ptr<float>(), x.stride(0), rows, k_total, group, sums.data_ptr<float>());
  const auto run = [&](const auto* scale_data) {
    using Scale = std::remove_cv_t<std::remove_pointer_t<decltype(scale_data)>>;
    const Int4Problem<Scale> p{x.data_ptr<float>(), x.stride(0), rows, codes.data_ptr<uint8_t>(), scale_data, k_total,
                               group, n_total, out.data_ptr<float>(), sums.data_ptr<float>()};
    run_quantized<Int4Strips<Scale>, int4_to_float<Scale>, Int4ConvertedStrips<Scale>>(p, tiles, codes);
  };
  int4_groups::with_scales(scales.data_ptr(), half_scales, run);
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
    zero_sums(acc);
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

F32Strips::Problem chunk_problem(const Int8Problem& p, const float* chunk, int64_t first_strip) {
  return {p.a, p.lda, p.rows, chunk, p.k, p.n_total, nullptr, p.y, first_strip};
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
  run_quantized<Int8Strips, int8_to_float, F32Strips>(p, tiles, codes);
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
