// w4a8_linear: an int4 weight (group-wise affine, engine/layers/quant.py's convention; a GGUF's
// Q4_0/Q4_1 codes as they are) times float32 rows rounded to int8 per row and weight group, on
// AVX512-VNNI byte products: llama.cpp's Q4 x Q8 scheme on CPUs without AMX (Cascade Lake, Ice
// Lake), where int4_f32_linear's float32 FMAs make a quarter of VNNI's products per instruction.
//
// Each row's group of g inputs is rounded to int8 with its own scale (max |x| / 127,
// round-to-nearest-even, quantize_groups): an outlier channel costs only its group's precision.
// Per group, the rounded input x' = q * x_scale times the weight code * scale + offset is
// scale * x_scale * sum(q * code) + offset * x_scale * sum(q), both integer sums exact (vpdpbusd:
// unsigned codes 0..15 times signed q, four products a lane), so the product is the dequantized
// weight's with x' up to float32 rounding, and its error is sum |w| * x_scale / 2 at most
// (tests/test_w4a8.py). The offset's term must take the rounded inputs' sum, not the exact one:
// a GGUF's offset is about -8 scale, so with the exact sum the error would be that of the codes'
// (code * scale = w - offset, biased) rather than the weight's, 2-3x larger on the default model.
//
// Codes: strips of 16 output columns, [ceil(N/16)][K/8][16][4] bytes: lane j of step s holds
// column j's codes for k = 8s + b in the low nibble of byte b and k = 8s + 4 + b in its high
// nibble, so one 64-byte load, a mask and a shift make two vpdpbusd operands against the row's
// inputs 8s..8s+3 and 8s+4..8s+7 as they lie in memory (one broadcast each). Scales and offsets
// as int4_f32_linear's ([strips][K/group][2][16], float32 or float16). The loop nest is
// strips_loops.h's; integer sums do not depend on their order and each output's group ends run in
// one fixed order, so a row's output is the same bits at any batch size and thread count.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>

#include "cpu_features.h"
#include "int4_groups.h"
#include "strips_loops.h"
#include "thread_pool.h"

namespace {

#define W4A8_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))

using int4_groups::kColumns;
using int4_groups::load_scales;

constexpr int64_t kStepK = 8;          // inputs per 64-byte line of a strip
constexpr int64_t kPrefetchLines = 16;  // past the streaming rows: each strip's line this many steps ahead
constexpr int64_t kScaleGroupsAhead = 4;
cpu_features::StreamingChoice streaming_choice;
constexpr int64_t kQuantizeGrainRows = 64;  // rows per part of the input's rounding

bool w4a8_supported() { return cpu_features::avx512_core() && __builtin_cpu_supports("avx512vnni"); }

template <class Scale>
struct W4A8Problem {
  const int8_t* q;          // [rows][k]: each row's inputs rounded per group
  const float* q_scales;    // [rows][groups]: each group's x_scale
  const float* q_sums;      // [rows][groups]: each group's x_scale * sum(q)
  int64_t rows;
  const uint8_t* codes;  // [strips][k / 8][16][4]
  const Scale* scales;   // [strips][groups][2][16]
  int64_t k, group, n_total;
  float* y;
};

// Rows [r0, r1): q[r][k] = x[r][k] / x_scale rounded to nearest even (x_scale = max |x| / 127 over
// k's group; 0 for a group of zeros; NaN for a group holding a NaN or an infinity, so that the
// outputs are NaN as the float product's would be), scales[r][g] = x_scale, sums[r][g] = x_scale *
// the group's sum of q.
W4A8_TARGET void quantize_groups(const float* a, int64_t lda, int64_t r0, int64_t r1, int64_t k, int64_t group, int8_t* q,
                                 float* scales, float* sums) {
  const int64_t groups = k / group;
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  const __m512i exponent = _mm512_set1_epi32(0x7f800000);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const float* x = a + r * lda + g * group;
      __m512 amax = _mm512_setzero_ps();
      __mmask16 non_finite = 0;  // lanes whose exponent bits are all ones: NaN or infinity (bits, not float
                                 // compares, which the fast-math flags may fold)
      for (int64_t i = 0; i < group; i += kColumns) {
        const __m512 v = _mm512_loadu_ps(x + i);
        amax = _mm512_max_ps(amax, _mm512_and_ps(v, sign));
        non_finite |= _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(v), exponent), exponent);
      }
      const float top = non_finite ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(amax);
      scales[r * groups + g] = top / 127.f;
      const __m512 inverse = _mm512_set1_ps(top > 0.f ? 127.f / top : 0.f);
      __m512i total = _mm512_setzero_si512();
      for (int64_t i = 0; i < group; i += kColumns) {
        const __m512i codes = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + i), inverse));
        total = _mm512_add_epi32(total, codes);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + r * k + g * group + i), _mm512_cvtsepi32_epi8(codes));
      }
      sums[r * groups + g] = scales[r * groups + g] * static_cast<float>(_mm512_reduce_add_epi32(total));
    }
}

// sum += the four byte products of each lane of codes (unsigned) and in (signed), in place: GCC
// kept copying the intrinsic's accumulators between registers and the stack in the unrolled block.
W4A8_TARGET inline void dot_bytes(__m512i& sum, __m512i codes, __m512i in) {
  asm("vpdpbusd %2, %1, %0" : "+v"(sum) : "v"(codes), "v"(in));
}

template <class Scale>
struct W4A8Strips {
  using Problem = W4A8Problem<Scale>;
  // rows x strips integer sums, the strips' two operands and a row's two broadcasts within 32 registers.
  static constexpr int strips_for(int rows, bool) { return rows <= 1 ? 8 : rows <= 2 ? 6 : rows <= 4 ? 4 : rows <= 6 ? 3 : 2; }
  static int64_t strip_bytes(const Problem& p) { return p.k * kColumns / 2 + p.k / p.group * 2 * kColumns * sizeof(Scale); }

  // Rows [r0, r0 + R) x strips [t, t + NS): per group the integer sums, then for each (row, strip)
  // acc += float(sum) * (scale * x_scale), acc += (x_scale * sum(q)) * offset. The float accumulators live in
  // L1 (touched once a group), so the integer sums and the lines' operands keep the registers.
  template <int R, int NS, bool Prefetch>
  W4A8_TARGET static void block(const Problem& p, int64_t r0, int64_t t) {
    const int64_t steps = p.k / kStepK, groups = p.k / p.group, per_group = p.group / kStepK;
    const int8_t* x = p.q + r0 * p.k;
    const uint8_t* c = p.codes + t * steps * 64;
    const Scale* sz = p.scales + t * groups * 2 * kColumns;
    const __m512i nibble = _mm512_set1_epi8(0x0f);
    alignas(64) float acc[R][NS][kColumns] = {};
    for (int64_t g = 0; g < groups; ++g) {
      __m512i part[R][NS];
      for (int r = 0; r < R; ++r)
        for (int n = 0; n < NS; ++n) part[r][n] = _mm512_setzero_si512();
      if (Prefetch)
        for (int n = 0; n < NS; ++n) {
          const Scale* ahead = sz + (n * groups + g + kScaleGroupsAhead) * 2 * kColumns;
          _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(ahead + kColumns), _MM_HINT_T0);
        }
      for (int64_t s = g * per_group; s < (g + 1) * per_group; ++s) {
        // The NS lines' operands, then row by row two broadcasts against them.
        __m512i low[NS], high[NS];
        for (int n = 0; n < NS; ++n) {
          const uint8_t* line = c + (n * steps + s) * 64;
          if (Prefetch) _mm_prefetch(reinterpret_cast<const char*>(line + kPrefetchLines * 64), _MM_HINT_T0);
          const __m512i v = _mm512_loadu_si512(line);
          low[n] = _mm512_and_si512(v, nibble);
          high[n] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
        }
        for (int r = 0; r < R; ++r) {
          int32_t quads[2];
          std::memcpy(quads, x + r * p.k + s * kStepK, sizeof(quads));
          const __m512i first = _mm512_set1_epi32(quads[0]);
          const __m512i second = _mm512_set1_epi32(quads[1]);
          for (int n = 0; n < NS; ++n) {
            dot_bytes(part[r][n], low[n], first);
            dot_bytes(part[r][n], high[n], second);
          }
        }
      }
      for (int n = 0; n < NS; ++n) {
        const __m512 scale = load_scales(sz + (n * groups + g) * 2 * kColumns);
        const __m512 offset = load_scales(sz + (n * groups + g) * 2 * kColumns + kColumns);
        for (int r = 0; r < R; ++r) {
          const int64_t rg = (r0 + r) * groups + g;
          const __m512 step = _mm512_mul_ps(scale, _mm512_set1_ps(p.q_scales[rg]));
          __m512 sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(part[r][n]), step, _mm512_load_ps(acc[r][n]));
          _mm512_store_ps(acc[r][n], _mm512_fmadd_ps(_mm512_set1_ps(p.q_sums[rg]), offset, sum));
        }
      }
    }
    for (int n = 0; n < NS; ++n) {
      const int64_t count = std::min<int64_t>(kColumns, p.n_total - (t + n) * kColumns);
      if (count <= 0) break;
      const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1);
      for (int r = 0; r < R; ++r)
        _mm512_mask_storeu_ps(p.y + (r0 + r) * p.n_total + (t + n) * kColumns, mask, _mm512_load_ps(acc[r][n]));
    }
  }
};

// x [M, K] float32 @ an int4 weight in w4a8 strips (codes [ceil(N/16), K/8, 16, 4] uint8, scales
// [ceil(N/16), K/group, 2, 16] float32 or float16: engine/layers/quant_kernels.py packs them) ->
// [M, N] float32.
at::Tensor w4a8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, int64_t n_total) {
  TORCH_CHECK(w4a8_supported(), "w4a8_linear needs a CPU with AVX-512 (F, BW, VL, DQ) and AVX512-VNNI");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1 && x.size(1) > 0,
              "x: a [rows, K] float32 matrix, K > 0");
  const int64_t rows = x.size(0), k_total = x.size(1), tiles = codes.size(0);
  TORCH_CHECK(codes.dim() == 4 && codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.size(2) == kColumns &&
                  codes.size(3) == 4 && codes.size(1) * kStepK == k_total,
              "codes: [ceil(N/16), K/8, 16, 4] uint8 w4a8 strips for K = ", k_total);
  const bool half_scales = scales.scalar_type() == at::kHalf;
  TORCH_CHECK(scales.dim() == 4 && (half_scales || scales.scalar_type() == at::kFloat) && scales.is_contiguous() &&
                  scales.size(0) == tiles && scales.size(1) > 0 && k_total % scales.size(1) == 0 &&
                  (k_total / scales.size(1)) % 16 == 0 && scales.size(2) == 2 && scales.size(3) == kColumns,
              "scales: [ceil(N/16), K/group, 2, 16] float32 or float16 (a group of a multiple of 16 dividing K)");
  TORCH_CHECK(n_total > (tiles - 1) * kColumns && n_total <= tiles * kColumns, "out_features ", n_total,
              " does not match the strips");
  at::Tensor out = at::empty({rows, n_total}, x.options());
  if (rows == 0) return out;
  const int64_t groups = scales.size(1), group = k_total / groups;
  // The rounded rows and their groups' x_scale and x_scale * sum(q), in one allocation with no
  // tensor views (a batch-1 step makes ~120 calls: each allocation or select was ~1 us of it).
  const int64_t row_group_floats = rows * groups;
  at::Tensor scratch = at::empty({2 * row_group_floats + (rows * k_total + 3) / 4}, x.options());
  float* const x_scales = scratch.data_ptr<float>();
  float* const q_sums = x_scales + row_group_floats;
  int8_t* const q = reinterpret_cast<int8_t*>(q_sums + row_group_floats);
  // Rows rounded on both threads where there are enough of them (a prefill chunk's: ~1 us a row).
  const float* const a = x.data_ptr<float>();
  const int64_t lda = x.stride(0);
  kernel_pool::parallel_for(0, rows, kQuantizeGrainRows, [&](int64_t r0, int64_t r1) {
    quantize_groups(a, lda, r0, r1, k_total, group, q, x_scales, q_sums);
  });
  const auto run = [&](const auto* scale_data) {
    using Scale = std::remove_cv_t<std::remove_pointer_t<decltype(scale_data)>>;
    const W4A8Problem<Scale> p{q, x_scales, q_sums, rows, codes.data_ptr<uint8_t>(), scale_data, k_total, group, n_total,
                               out.data_ptr<float>()};
    strips_loops::run<W4A8Strips<Scale>>(p, tiles, codes.data_ptr(), codes.numel(), streaming_choice.streaming());
  };
  int4_groups::with_scales(scales.data_ptr(), half_scales, run);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bento_llm, m) {
  m.def("w4a8_supported() -> bool", &w4a8_supported);
  m.def("w4a8_linear(Tensor x, Tensor codes, Tensor scales, int n_total) -> Tensor", &w4a8_linear);
  // Tests and benchmarks: whether calls of up to strips_loops::kStreamingRows rows take the streaming
  // loop (None: the CPU's rule), as set_f32_linear_streaming.
  m.def("set_w4a8_linear_streaming(bool? on) -> ()", [](std::optional<bool> on) { streaming_choice.force(on); });
}
