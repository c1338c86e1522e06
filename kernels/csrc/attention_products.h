// Paged attention's two float32 tile products (Q.K^T and P.V) on CPUs without AMX, as
// register-blocked AVX-512 FMA loops: no ATen, BLAS or OpenMP call inside a kernel_pool part
// (at::mm there hung a forked child, which cannot restart the OpenMP team its parent used, and
// nested MKL's threads inside our two-thread pool).
//
// Both products have one shape: C [m][n] (+)= A [m][k] . B [k][ldb], A's rows lda apart, C's ldc
// apart (Q.K^T: B = K^T as transpose_rows stages it; P.V: B = V as staged). A block of R rows x
// 16 W columns of C stays in R x W registers through the whole reduction; each step loads W
// vectors of B once for the R rows and broadcasts one element of each A row. R = 6, W = 4: 24
// accumulators, 4 B vectors, 1 broadcast (29 of the 32 registers), 10 loads per 24 FMAs. Every
// column tail is masked: nothing reads B or C past column n. The loops over R and W carry
// `#pragma GCC unroll`: without it GCC 12 kept the accumulators in a stack array and stored all 24
// every step (a 2048-token prefill's attention then took 2.4x MKL's, now 1.1x).
//
// bfloat16 inputs: on Intel's CPUs without AMX they are staged to float32 for these too, not
// multiplied as bfloat16 pairs: on a Sapphire Rapids without AMX, _mm512_dpbf16_ps issued 0.75 G/s
// on one core against _mm512_fmadd_ps's 3 G/s (24 independent accumulators each), half the FLOPs
// per cycle, and a 2048-token bfloat16 prefill's attention ran 1.4x slower on dpbf16 tiles than
// on these. On AMD's Zen 4 vdpbf16ps issues as fast as an FMA, so the same blocks on bfloat16
// pairs (PairBlock) do twice the multiply-adds per instruction: a 2000-token prefill's attention
// (one layer of SmolLM2, one thread) took 29 ms on them against 56 ms on FloatBlock. Which CPUs
// take which: cpu_features::bf16_pair_products_fast.

#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "transpose16.h"

namespace attention_products {

constexpr int kBlockRows = 6;     // R (above)
constexpr int kBlockVectors = 4;  // W: 64 columns

inline __mmask16 column_mask(int64_t columns) {
  return columns >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << std::max<int64_t>(columns, 0)) - 1);
}

// A block's start: each column vector's mask (nothing past `columns`) and its accumulators (C's
// values if add, else zeros); and its end, C's columns stored. Inlined into both blocks' loops.
template <int R, int W>
__attribute__((target("avx512f"), always_inline)) inline void start_block(__m512 (&acc)[R][W], __mmask16 (&mask)[W],
                                                                          const float* c, int64_t ldc,
                                                                          int64_t columns, bool add) {
  #pragma GCC unroll 16
  for (int w = 0; w < W; ++w) {
    mask[w] = column_mask(columns - 16 * w);
    const __mmask16 load_mask = add ? mask[w] : __mmask16(0);  // C's values, or zeros
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r][w] = _mm512_maskz_loadu_ps(load_mask, c + r * ldc + 16 * w);
  }
}

template <int R, int W>
__attribute__((target("avx512f"), always_inline)) inline void end_block(float* c, int64_t ldc,
                                                                        const __mmask16 (&mask)[W],
                                                                        const __m512 (&acc)[R][W]) {
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    #pragma GCC unroll 16
    for (int w = 0; w < W; ++w) _mm512_mask_storeu_ps(c + r * ldc + 16 * w, mask[w], acc[r][w]);
  }
}

template <int R, int W>
struct FloatBlock {
__attribute__((target("avx512f"))) static void run(float* c, int64_t ldc, const float* a, int64_t lda, const float* b,
                                                   int64_t ldb, int64_t depth, int64_t columns, bool add) {
  __mmask16 mask[W];
  __m512 acc[R][W];
  start_block<R, W>(acc, mask, c, ldc, columns, add);
  for (int64_t k = 0; k < depth; ++k) {
    __m512 x[W];
    #pragma GCC unroll 16
    for (int w = 0; w < W; ++w) x[w] = _mm512_maskz_loadu_ps(mask[w], b + k * ldb + 16 * w);
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 q = _mm512_set1_ps(a[r * lda + k]);
      #pragma GCC unroll 16
      for (int w = 0; w < W; ++w) acc[r][w] = _mm512_fmadd_ps(q, x[w], acc[r][w]);
    }
  }
  end_block<R, W>(c, ldc, mask, acc);
}
};

// The same block on bfloat16 pairs, for CPUs where AVX512-BF16's dot product issues at FMA's
// rate (cpu_features::bf16_pair_products_fast): each vdpbf16ps adds to every float32 lane the
// two products of one pair, twice an FMA's multiply-adds. A's rows are bfloat16 read as pairs
// (elements 2i, 2i + 1: 32 bits, broadcast), lda pairs apart; B's rows are pairs (elements 2i
// and 2i + 1 of the reduction for one column, as cpu_ops.cpp's pack_keys and pack_values lay
// them out), ldb pairs apart; depth counts pairs. Each product of two bfloat16 values is exact in
// float32; the sums are float32. Its own loop, not FloatBlock's on another step: its target must
// include AVX512-BF16, which FloatBlock's CPUs may lack, and GCC inlines no function into one
// whose target lacks the callee's.
template <int R, int W>
struct PairBlock {
__attribute__((target("avx512f,avx512bw,avx512bf16"))) static void run(float* c, int64_t ldc, const uint32_t* a,
                                                                       int64_t lda, const uint32_t* b, int64_t ldb,
                                                                       int64_t depth, int64_t columns, bool add) {
  __mmask16 mask[W];
  __m512 acc[R][W];
  start_block<R, W>(acc, mask, c, ldc, columns, add);
  for (int64_t k = 0; k < depth; ++k) {
    __m512bh x[W];
    #pragma GCC unroll 16
    for (int w = 0; w < W; ++w) x[w] = (__m512bh)_mm512_maskz_loadu_epi32(mask[w], b + k * ldb + 16 * w);
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512bh q = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r * lda + k]));
      #pragma GCC unroll 16
      for (int w = 0; w < W; ++w) acc[r][w] = _mm512_dpbf16_ps(acc[r][w], q, x[w]);
    }
  }
  end_block<R, W>(c, ldc, mask, acc);
}
};

// AVX2 builds' float32 blocks (CPUs without AVX-512): 8 lanes, R = 6 rows x W = 2 vectors (12
// accumulators, 2 B vectors, 1 broadcast: 15 of the 16 registers); no mask registers, so column
// tails load and store through lane masks (vmaskmovps: nothing read or written past column n).
// They replace at::mm there, which nested MKL's OpenMP team in our pool's parts (a forked child
// hung in it).
inline __m256i lane_mask8(int64_t columns) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::clamp<int64_t>(columns, 0, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

template <int R, int W>
struct Avx2FloatBlock {
__attribute__((target("avx2,fma"))) static void run(float* c, int64_t ldc, const float* a, int64_t lda, const float* b,
                                                    int64_t ldb, int64_t depth, int64_t columns, bool add) {
  __m256i mask[W];
  __m256 acc[R][W];
  #pragma GCC unroll 16
  for (int w = 0; w < W; ++w) {
    mask[w] = lane_mask8(columns - 8 * w);
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r][w] = add ? _mm256_maskload_ps(c + r * ldc + 8 * w, mask[w]) : _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < depth; ++k) {
    __m256 x[W];
    #pragma GCC unroll 16
    for (int w = 0; w < W; ++w) x[w] = _mm256_maskload_ps(b + k * ldb + 8 * w, mask[w]);
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m256 q = _mm256_set1_ps(a[r * lda + k]);
      #pragma GCC unroll 16
      for (int w = 0; w < W; ++w) acc[r][w] = _mm256_fmadd_ps(q, x[w], acc[r][w]);
    }
  }
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    #pragma GCC unroll 16
    for (int w = 0; w < W; ++w) _mm256_maskstore_ps(c + r * ldc + 8 * w, mask[w], acc[r][w]);
  }
}
};

// Rows [0, m) of one column strip of `columns` (at most Lanes W): blocks of R rows, the last ones
// in one block of the rows left (blocks[R]: FloatBlock<R, W>, PairBlock<R, W> or Avx2FloatBlock).
template <typename E>
using Block = void (*)(float*, int64_t, const E*, int64_t, const E*, int64_t, int64_t, int64_t, bool);

template <typename E>
inline void strip_rows(const Block<E>* blocks, int64_t m, float* c, int64_t ldc, const E* a, int64_t lda,
                       const E* b, int64_t ldb, int64_t depth, int64_t columns, bool add) {
  int64_t r = 0;
  for (; r + kBlockRows <= m; r += kBlockRows) {
    blocks[kBlockRows](c + r * ldc, ldc, a + r * lda, lda, b, ldb, depth, columns, add);
  }
  if (r < m) blocks[m - r](c + r * ldc, ldc, a + r * lda, lda, b, ldb, depth, columns, add);
}

// C [m][n] (+ C if add) = A [m][k] . B [k][ldb] on Kernel<R, W> blocks of Lanes-wide vectors
// (FloatBlock: float32; PairBlock: k pairs of bfloat16, lda and ldb counting pairs, only on a CPU
// with AVX512-BF16; Avx2FloatBlock: float32 in AVX2 builds): strips of Lanes x Wide columns, then
// of Lanes.
template <typename E, template <int, int> class Kernel, int Lanes, int Wide>
inline void product(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add, const E* a,
                    const E* b, float* c) {
  static constexpr Block<E> wide[] = {nullptr, Kernel<1, Wide>::run, Kernel<2, Wide>::run, Kernel<3, Wide>::run,
                                      Kernel<4, Wide>::run, Kernel<5, Wide>::run, Kernel<6, Wide>::run};
  static constexpr Block<E> narrow[] = {nullptr, Kernel<1, 1>::run, Kernel<2, 1>::run, Kernel<3, 1>::run,
                                        Kernel<4, 1>::run, Kernel<5, 1>::run, Kernel<6, 1>::run};
  int64_t j = 0;
  for (; j + Lanes * Wide <= n; j += Lanes * Wide) {
    strip_rows(wide, m, c + j, ldc, a, lda, b + j, ldb, k, Lanes * Wide, add);
  }
  for (; j < n; j += Lanes) strip_rows(narrow, m, c + j, ldc, a, lda, b + j, ldb, k, std::min<int64_t>(Lanes, n - j), add);
}

// float32 on the build's blocks: AVX-512's, or AVX2's in AVX2 builds.
inline void float_product(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add,
                          const float* a, const float* b, float* c) {
#if defined(__AVX512F__)
  product<float, FloatBlock, 16, kBlockVectors>(m, n, k, lda, ldb, ldc, add, a, b, c);
#else
  product<float, Avx2FloatBlock, 8, 2>(m, n, k, lda, ldb, ldc, add, a, b, c);
#endif
}

inline void pair_product(int64_t m, int64_t n, int64_t pairs, int64_t lda, int64_t ldb, int64_t ldc, bool add,
                         const uint32_t* a, const uint32_t* b, float* c) {
  product<uint32_t, PairBlock, 16, kBlockVectors>(m, n, pairs, lda, ldb, ldc, add, a, b, c);
}

#if defined(__AVX512F__)
// dst [cols][ld] = src [rows][cols]^T (float32), 16 x 16 blocks in registers; masked at both edges.
__attribute__((target("avx512f"))) inline void transpose_rows(float* dst, int64_t ld, const float* src, int64_t rows,
                                                              int64_t cols) {
  for (int64_t j = 0; j < rows; j += 16) {
    const __mmask16 row_mask = column_mask(rows - j);
    for (int64_t d = 0; d < cols; d += 16) {
      const __mmask16 col_mask = column_mask(cols - d);
      __m512i in[16], out[16];
      #pragma GCC unroll 16
      for (int l = 0; l < 16; ++l) {
        in[l] = j + l < rows ? _mm512_maskz_loadu_epi32(col_mask, src + (j + l) * cols + d) : _mm512_setzero_si512();
      }
      transpose16::transpose_16x16(in, out);
      for (int x = 0; x < 16 && d + x < cols; ++x) _mm512_mask_storeu_epi32(dst + (d + x) * ld + j, row_mask, out[x]);
    }
  }
}
#else
// dst [cols][ld] = src [rows][cols]^T (float32), AVX2 builds: element by element (a tile's K^T for
// the products; its cost is small beside theirs).
inline void transpose_rows(float* dst, int64_t ld, const float* src, int64_t rows, int64_t cols) {
  for (int64_t j = 0; j < rows; ++j) {
    for (int64_t d = 0; d < cols; ++d) dst[d * ld + j] = src[j * cols + d];
  }
}
#endif

}  // namespace attention_products
