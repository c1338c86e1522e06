// A bfloat16 matmul on AMX for the few rows of a decode step against a plain [N, K] weight (the
// tied LM head: its weight is the embedding table, so it stays in the layout the embedding reads),
// through oneDNN's brgemm ukernel (at::native::cpublas::brgemm: bfloat16 x bfloat16 -> float32).
//
// Why: torch.mv / torch.mm read the 49152 x 576 head of the default model at well below memory
// bandwidth. Here the weight is brgemm's A operand as it lies (64 of its rows per call), the input
// is packed once per call into the VNNI pairs [K/2][rows][2] as its B, and each block's result^T
// [64][rows] is stored transposed; an AMX tile product reads a 1 KB weight tile per 16 cycles, so
// the loop is bound by the weight's bytes (measured on one thread: 1-64 rows at
// 1.03-1.4x the speed of torch.mv/mm or F.linear; from ~128 rows F.linear is faster, and the
// caller switches).
// (A VNNI-blocked copy of the weight as brgemm's B beat oneDNN's packed matmul at 1-64 rows but
// lost 1.3-1.7x at prefill sizes, so the projections keep oneDNN's layout: see this file's history.)
// Where the CPU has no AMX but AVX512-BF16, bf16_mm_rows does the same product on
// _mm512_dpbf16_ps dot products along K against the weight as it lies (see its section below:
// 1-64 rows, faster than torch.mv/mm and F.linear there; engine/layers/linear.py picks it).
// Functions with AVX-512 bodies carry their own target attribute, so the file builds on any
// x86-64; bf16_mm_amx refuses to run unless the CPU has AMX-BF16 (the same test as quant_ops.cpp's
// amx_bf16_supported, which callers use), bf16_mm_rows unless it has AVX512-BF16/F/BW/VL/DQ
// (cpu_features.h; the engine asks avx512_bf16_kernels_supported). Registered by the extension
// kernels/cpu_ops.py builds.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>

#include "cpu_features.h"
#include "thread_pool.h"

namespace {

#define BENTO_AMX_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

constexpr int64_t kBlockN = 64;     // weight rows (output columns) per brgemm call
// Input rows per brgemm call: the float32 result [64][64] stays in L1. brgemm JIT-compiles and
// keeps a kernel per shape: at most 64 row counts per weight shape.
constexpr int64_t kRowChunk = 64;

bool amx_ready() { return __builtin_cpu_supports("avx512bf16") && at::native::cpublas::could_pack(at::kBFloat16); }

BENTO_AMX_TARGET inline void store16(c10::BFloat16* p, __mmask16 mask, __m512 v) {
  _mm256_mask_storeu_epi16(p, mask, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}

inline __mmask16 first(int64_t n) { return static_cast<__mmask16>((1u << std::min<int64_t>(16, n)) - 1); }

// out[r, j] = result[j, r] for r < rows, j < columns, in bfloat16: a column of the transposed
// result (in L1) is gathered per 16 outputs.
BENTO_AMX_TARGET void store_transposed(const float* result, int64_t rows, int64_t columns, c10::BFloat16* out,
                                       int64_t out_stride) {
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t j = 0; j < columns; j += 16) {
    const __mmask16 mask = first(columns - j);
    const __m512i index = _mm512_mullo_epi32(_mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int32_t>(j))),
                                             _mm512_set1_epi32(static_cast<int32_t>(rows)));
    for (int64_t r = 0; r < rows; ++r)
      store16(out + r * out_stride + j, mask, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, index, result + r, 4));
  }
}

// x [M, K] bfloat16 @ weight [N, K]^T -> [M, N] bfloat16 (no bias: the LM head has none).
at::Tensor bf16_mm_amx(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(amx_ready(), "bf16_mm_amx needs a CPU with AMX-BF16");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1, "x: a [rows, K] bfloat16 matrix");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.is_contiguous() &&
                  weight.size(1) % 2 == 0,
              "weight: a contiguous [N, K] bfloat16 matrix with K even");
  const int64_t rows = x.size(0), n_total = weight.size(0), k_total = weight.size(1), lda = x.stride(0);
  TORCH_CHECK(x.size(1) == k_total, "x has ", x.size(1), " columns, the weight ", k_total);
  at::Tensor out = at::empty({rows, n_total}, x.options());
  if (rows == 0) return out;
  // B operand: the chunk of rows [m, m + mb) at m * K as [K/2][mb][2], column pairs side by side.
  at::Tensor packed = at::empty({rows * k_total}, x.options());
  const auto* in = x.data_ptr<c10::BFloat16>();
  auto* pairs = packed.data_ptr<c10::BFloat16>();
  for (int64_t m = 0; m < rows; m += kRowChunk) {
    const int64_t mb = std::min(kRowChunk, rows - m);
    for (int64_t r = 0; r < mb; ++r)
      for (int64_t k = 0; k < k_total; ++k) pairs[m * k_total + (k / 2 * mb + r) * 2 + k % 2] = in[(m + r) * lda + k];
  }
  const auto* w = weight.data_ptr<c10::BFloat16>();
  const auto* xp = packed.data_ptr<c10::BFloat16>();
  auto* y = out.data_ptr<c10::BFloat16>();
  const int64_t blocks = (n_total + kBlockN - 1) / kBlockN;
  kernel_pool::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float res[kBlockN * kRowChunk];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * kBlockN, columns = std::min(kBlockN, n_total - n0);
      for (int64_t m = 0; m < rows; m += kRowChunk) {
        const int64_t mb = std::min(kRowChunk, rows - m);
        // The last block has fewer weight rows: reading 64 would run past the weight.
        at::native::cpublas::brgemm(columns, mb, k_total, k_total, mb, mb, false, w + n0 * k_total, xp + m * k_total, res);
        store_transposed(res, mb, columns, y + m * n_total + n0, n_total);
      }
    }
    at::native::cpublas::brgemm_release();
  });
  return out;
}

// ---- bf16_mm_rows: the same product on AVX512-BF16 dot products, for CPUs without AMX ----
// The weight is read as it lies ([N, K] rows, K contiguous): a weight row's 32 bfloat16 meet an
// input row's 32 in one _mm512_dpbf16_ps (16 float lanes, each the sum of one pair of products),
// so a (weight row, input row) pair accumulates in one register over all of K; a tile of 16 such
// registers (16 weight rows x 1 input row, 8 x 2 or 4 x 4) is summed across lanes together at the
// end (sum_lanes16: a transpose-add tree of 45 shuffles and adds for 16 outputs, not 16 reductions).
// Weight rows come in blocks of 16 (the threads split the blocks); within a block every group of
// input rows runs against the block while it is in L1/L2, and a group's input rows (4 x K) stay in
// L1 across the block's sub-tiles. While the first input rows run against a block, the next
// block's rows are prefetched into L2, column chunk by column chunk as the tiles read theirs (one
// thread's CPU time, the default model's 49152 x 576 head, A/B in one process on a loaded 2-vCPU
// Sapphire Rapids without AMX: 1 row 6.1 -> 4.4 ms, 4 rows 11.7 -> 7.0, 16 rows 21.4 -> 15.0,
// 64 rows 58.7 -> 49.6 prefetching into L1; into L2 rather than L1 0-20% faster again in three
// A/B runs (e.g. 4 rows 6.6 -> 6.0, 16 rows 15.2 -> 14.4; two threads, 1 row 3.9 -> 2.6); two
// blocks ahead no better; non-temporal 2x slower). At 64 rows the loop runs near the in-cache rate
// of _mm512_dpbf16_ps here (~1.1-1.3 G/s a core, as oneDNN's bfloat16 matmul).
// From 8 input rows the prefetches are spread over all the block's groups of 4 input rows rather
// than issued by the first group alone (dot_block). On an EPYC Zen 4 (2 vCPUs, no AMX; the same
// head, A/B in one process, load 3-4), the time before -> after, median: one thread's CPU time,
// 8 rows 4.16 -> 3.33 ms, 16 rows 6.56 -> 5.81, 32 rows 10.73 -> 9.88, 64 rows 19.12 -> 17.61;
// two threads' wall time, 8 rows 2.42 -> 2.04, 16 rows 3.56 -> 3.09, 64 rows 17.0 -> 15.2 (fastest
// 9.76 -> 9.23); there as fast as bf16_linear on the same weight in column strips, or faster
// (16 rows 3.43, 64 rows 16.2 / 9.40). Summing the lanes costs nothing measurable there (a loop
// that skips sum_lanes16's shuffles ran as fast), and the alternatives measured slower: each
// thread re-packing 48 weight rows at a time into strips for bf16_linear's micro-kernel (1.07-1.4x
// at 16-64 rows) or broadcasting the weight's pairs against the input packed as strips (1.0-1.1x).
// K needs no particular size: the last 1-31 columns are masked loads (zeros multiply zeros); the
// last 1-15 weight rows repeat the last row and are not stored.

#define BENTO_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

constexpr int64_t kRowsBlockN = 16;  // weight rows per block: one tile's 16 outputs at 1 input row

bool bf16_rows_supported() { return cpu_features::avx512_bf16(); }

// What the loops below multiply: bfloat16 (32 per 512-bit register, one _mm512_dpbf16_ps pair
// product per register, the sums rounded to bfloat16) or float32 (16 per register, one FMA, the
// sums stored as they are: f32_mm_rows, the float32 LM head, where ATen's GEMV read the 49152 x 576
// head at a third of a float32 sum's rate on two threads).
struct Bf16Elems {
  using T = c10::BFloat16;
  using Vec = __m512bh;
  using Mask = __mmask32;
  static constexpr int64_t kStep = 32;
  template <bool Masked>
  BENTO_BF16_TARGET static Vec load(const T* p, Mask mask) {
    return reinterpret_cast<__m512bh>(Masked ? _mm512_maskz_loadu_epi16(mask, p) : _mm512_loadu_si512(p));
  }
  BENTO_BF16_TARGET static __m512 dot(__m512 acc, Vec w, Vec x) { return _mm512_dpbf16_ps(acc, w, x); }
  BENTO_BF16_TARGET static void store16(T* p, __mmask16 mask, __m512 v) {
    _mm256_mask_storeu_epi16(p, mask, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
  }
};

struct F32Elems {
  using T = float;
  using Vec = __m512;
  using Mask = __mmask16;
  static constexpr int64_t kStep = 16;
  template <bool Masked>
  BENTO_BF16_TARGET static Vec load(const T* p, Mask mask) { return Masked ? _mm512_maskz_loadu_ps(mask, p) : _mm512_loadu_ps(p); }
  BENTO_BF16_TARGET static __m512 dot(__m512 acc, Vec w, Vec x) { return _mm512_fmadd_ps(w, x, acc); }
  BENTO_BF16_TARGET static void store16(T* p, __mmask16 mask, __m512 v) { _mm512_mask_storeu_ps(p, mask, v); }
};

// Lane i of the result = the sum of acc[i]'s 16 lanes: pairs of registers are interleaved and added
// (halving the registers, doubling the registers' sums each holds) four times.
BENTO_BF16_TARGET inline __m512 sum_lanes16(const __m512* acc) {
  __m512 pairs[8], quads[4], halves[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: acc[2i], acc[2i+1], acc[2i], acc[2i+1]
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(acc[2 * i], acc[2 * i + 1]), _mm512_unpackhi_ps(acc[2 * i], acc[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: acc[4i] .. acc[4i+3]
    const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int i = 0; i < 2; ++i)  // 128-bit lanes: quads[2i] (two halves), quads[2i+1] (two halves)
    halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0x88),
                              _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], 0x88), _mm512_shuffle_f32x4(halves[0], halves[1], 0xdd));
}

// acc[m * NB + i] += the products of weight row w[i] and input row m over columns [k, k + E::kStep)
// (one 64-byte line of each); with Prefetch and now, the same line of weight rows ahead[i] is
// asked into L2.
template <class E, int NB, int MB, bool Masked, bool Prefetch>
BENTO_BF16_TARGET inline void accumulate(__m512* acc, const typename E::T* const* w, const typename E::T* const* ahead,
                                         const typename E::T* x, int64_t ldx, int64_t k, typename E::Mask mask, bool now) {
  typename E::Vec in[MB];
  for (int m = 0; m < MB; ++m) in[m] = E::template load<Masked>(x + m * ldx + k, mask);
  for (int i = 0; i < NB; ++i) {
    if (Prefetch && now) _mm_prefetch(reinterpret_cast<const char*>(ahead[i] + k), _MM_HINT_T1);
    const typename E::Vec row = E::template load<Masked>(w[i] + k, mask);
    for (int m = 0; m < MB; ++m) acc[m * NB + i] = E::dot(acc[m * NB + i], row, in[m]);
  }
}

// out[m, i] = x[m] . w[i] for m < MB, i < columns (<= NB), in E's type (bfloat16: rounded to nearest even).
// With Prefetch, the column chunks c = phase (mod phases) of weight rows ahead[i] are asked into L2.
// RowByRow (one input row): each weight row is read whole before the next (one sequential stream
// through the block rather than 16 streams a weight row apart), each line asking for the same line
// of the next block's row into L2 as it goes. On an EPYC Zen 4 (2 vCPUs, a standalone C++
// microbenchmark of this loop: the 49152 x 576 head in 4 copies, median of 31 interleaved rounds against a
// float32 sum in the same round, load 4.1-4.4) 1 input row reads 0.84-1.00 of the sum's rate this
// way, 0.79-0.89 column chunk by chunk across the 16 rows (without the prefetch: 0.74-0.88 row by
// row, 0.53 by chunks); at 4 rows row by row is bound by each register's chain of dependent
// vdpbf16ps (0.40 of the sum against 0.80).
template <class E, int NB, int MB, bool Prefetch, bool RowByRow = false>
BENTO_BF16_TARGET void dot_tile(const typename E::T* const* w, const typename E::T* const* ahead, const typename E::T* x,
                                int64_t ldx, int64_t k_total, int64_t columns, typename E::T* out, int64_t ldo,
                                int64_t phase = 0, int64_t phases = 1) {
  static_assert(NB * MB == 16, "a tile is 16 registers, summed across lanes together");
  static_assert(!RowByRow || MB == 1, "row by row: one input row");
  constexpr int64_t step = E::kStep;
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  const int64_t whole = k_total / step * step;
  const auto last = static_cast<typename E::Mask>((1ull << (k_total - whole)) - 1);
  if constexpr (RowByRow) {
    for (int i = 0; i < NB; ++i) {
      for (int64_t k = 0; k < whole; k += step) accumulate<E, 1, 1, false, Prefetch>(acc + i, w + i, ahead + i, x, ldx, k, 0, true);
      if (whole < k_total) accumulate<E, 1, 1, true, Prefetch>(acc + i, w + i, ahead + i, x, ldx, whole, last, true);
    }
  } else {
    int64_t wait = phase;  // chunks until the next prefetching one
    for (int64_t k = 0; k < whole; k += step) {
      const bool now = wait == 0;
      wait = now ? phases - 1 : wait - 1;
      accumulate<E, NB, MB, false, Prefetch>(acc, w, ahead, x, ldx, k, 0, now);
    }
    if (whole < k_total) accumulate<E, NB, MB, true, Prefetch>(acc, w, ahead, x, ldx, whole, last, wait == 0);
  }
  const __m512 sums = sum_lanes16(acc);
  if (MB == 1) {
    E::store16(out, static_cast<__mmask16>((1u << columns) - 1), sums);
    return;
  }
  alignas(64) typename E::T lanes[16];
  E::store16(lanes, 0xffff, sums);
  for (int m = 0; m < MB; ++m) std::memcpy(out + m * ldo, lanes + m * NB, columns * sizeof(typename E::T));
}

// Whether a 1-row call (the tied LM head at batch 1) reads each weight row of a block whole before
// the next (dot_tile's RowByRow) or the block's 16 rows a 32-column chunk at a time: the CPU's rule
// (cpu_features::few_rows_stream_weights) unless set_bf16_mm_rows_streaming forced one (both
// bf16_mm_rows and f32_mm_rows follow it).
cpu_features::StreamingChoice one_row_streaming_choice;

// Weight rows [n0, n0 + 16) against every input row: 4 rows at a time (4 x 4 tiles), then 2, then 1
// (a single input row: weight row by weight row, dot_tile's RowByRow).
// The tiles also prefetch the next block's rows into L2 (the last block: its own last row again),
// spread over the groups of 4 input rows: group g asks for the column chunks c = g (mod groups), so
// the next block's lines arrive while the whole block computes rather than in a burst during its
// first group (below 8 rows the first group or tile asks for them all, as before).
template <class E>
BENTO_BF16_TARGET void dot_block(const typename E::T* weight, int64_t n_total, int64_t k_total, int64_t n0,
                                 const typename E::T* x, int64_t rows, int64_t ldx, typename E::T* out) {
  using T = typename E::T;
  const T *w[kRowsBlockN], *ahead[kRowsBlockN];
  for (int64_t i = 0; i < kRowsBlockN; ++i) {
    w[i] = weight + std::min(n0 + i, n_total - 1) * k_total;
    ahead[i] = weight + std::min(n0 + kRowsBlockN + i, n_total - 1) * k_total;
  }
  const int64_t columns = std::min(kRowsBlockN, n_total - n0);
  auto part = [&](int64_t first, int64_t width) { return std::clamp<int64_t>(columns - first, 0, width); };
  int64_t m = 0;
  for (; m + 4 <= rows; m += 4)
    for (int64_t s = 0; s < 16 && s < columns; s += 4) {
      T* o = out + m * n_total + n0 + s;
      dot_tile<E, 4, 4, true>(w + s, ahead + s, x + m * ldx, ldx, k_total, part(s, 4), o, n_total, m / 4, rows / 4);
    }
  if (rows - m >= 2) {
    for (int64_t s = 0; s < 16 && s < columns; s += 8) {
      T* o = out + m * n_total + n0 + s;
      if (m == 0) dot_tile<E, 8, 2, true>(w + s, ahead + s, x, ldx, k_total, part(s, 8), o, n_total);
      else dot_tile<E, 8, 2, false>(w + s, ahead + s, x + m * ldx, ldx, k_total, part(s, 8), o, n_total);
    }
    m += 2;
  }
  if (m < rows) {
    T* o = out + m * n_total + n0;
    if (rows == 1 && one_row_streaming_choice.streaming()) dot_tile<E, 16, 1, true, true>(w, ahead, x, ldx, k_total, columns, o, n_total);
    else if (m == 0) dot_tile<E, 16, 1, true>(w, ahead, x, ldx, k_total, columns, o, n_total);
    else dot_tile<E, 16, 1, false>(w, ahead, x + m * ldx, ldx, k_total, columns, o, n_total);
  }
}

// A thread's part: weight blocks [begin, end). Its own function with the target attribute (the
// parallel_for lambda has none).
template <class E>
BENTO_BF16_TARGET void dot_blocks(const typename E::T* weight, int64_t n_total, int64_t k_total, const typename E::T* x,
                                  int64_t rows, int64_t ldx, typename E::T* out, int64_t begin, int64_t end) {
  for (int64_t b = begin; b < end; ++b) dot_block<E>(weight, n_total, k_total, b * kRowsBlockN, x, rows, ldx, out);
}

// x [M, K] @ weight [N, K]^T -> [M, N] in E's type, for any M (the caller keeps it to the few rows
// where it beats PyTorch's matmul), any K.
template <class E>
at::Tensor mm_rows(const char* name, at::ScalarType dtype, const char* dtype_name, const at::Tensor& x_in,
                   const at::Tensor& weight) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == dtype, name, ": x must be a [rows, K] ", dtype_name, " matrix");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == dtype && weight.is_contiguous(), name,
              ": weight must be a contiguous [N, K] ", dtype_name, " matrix");
  TORCH_CHECK(x_in.device().is_cpu() && weight.device().is_cpu(), name, ": CPU tensors only");
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const int64_t rows = x.size(0), n_total = weight.size(0), k_total = weight.size(1), ldx = x.stride(0);
  TORCH_CHECK(x.size(1) == k_total, name, ": x has ", x.size(1), " columns, the weight ", k_total);
  at::Tensor out = at::empty({rows, n_total}, x.options());
  if (rows == 0 || n_total == 0) return out;
  using T = typename E::T;
  const T* w = weight.data_ptr<T>();
  const T* in = x.data_ptr<T>();
  T* y = out.data_ptr<T>();
  kernel_pool::parallel_for(0, (n_total + kRowsBlockN - 1) / kRowsBlockN, 1, [&](int64_t begin, int64_t end) {
    dot_blocks<E>(w, n_total, k_total, in, rows, ldx, y, begin, end);
  }, {w, n_total * k_total * static_cast<int64_t>(sizeof(T))});
  return out;
}

at::Tensor bf16_mm_rows(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(bf16_rows_supported(), "bf16_mm_rows needs a CPU with AVX512-BF16 (and AVX512F/BW/VL)");
  return mm_rows<Bf16Elems>("bf16_mm_rows", at::kBFloat16, "bfloat16", x, weight);
}

// The same loops in float32 (the exact mode's tied LM head). The file's functions are compiled for
// AVX512-BF16 (one target attribute for both element types), so this asks the same CPU check.
at::Tensor f32_mm_rows(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(bf16_rows_supported(), "f32_mm_rows needs a CPU with AVX512-BF16 (and AVX512F/BW/VL)");
  return mm_rows<F32Elems>("f32_mm_rows", at::kFloat, "float32", x, weight);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bento_llm, m) {
  m.def("bf16_mm_amx(Tensor x, Tensor weight) -> Tensor", &bf16_mm_amx);
  m.def("bf16_mm_rows(Tensor x, Tensor weight) -> Tensor", &bf16_mm_rows);
  m.def("f32_mm_rows(Tensor x, Tensor weight) -> Tensor", &f32_mm_rows);
  // Benchmarks and tests: bf16_mm_rows and f32_mm_rows at one row on their streaming loop (true), the prefetching one
  // (false) or the CPU's rule (None).
  m.def("set_bf16_mm_rows_streaming(bool? on) -> ()", [](std::optional<bool> on) { one_row_streaming_choice.force(on); });
}
