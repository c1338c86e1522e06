// Paged attention's two tile products (Q.K^T and P.V) on CPUs without AMX, as register-blocked
// AVX-512 loops: no ATen, BLAS or OpenMP call inside a kernel_pool part (at::mm there hung a
// forked child, which cannot restart the OpenMP team its parent used, and nested MKL's threads
// inside our two-thread pool).
//
// Both products have one shape: C [M][N] (+)= A [M][K] . B, A's rows lda apart, C's ldc apart.
// A block of R rows x 16 W columns of C stays in R x W registers through the whole reduction;
// each step loads W vectors of B once for the R rows and broadcasts one element (or bfloat16
// pair) of each A row. R = 6, W = 4: 24 accumulators, 4 B vectors, 1 broadcast (29 of the 32
// registers), 10 loads per 24 FMAs.
//  - bfloat16: B in the VNNI pair layout brgemm takes ([K/2][ldb] pairs: elements 2i, 2i + 1 of
//    a column), so the tiles cpu_ops.cpp packs for AMX serve both; _mm512_dpbf16_ps multiplies
//    pairs exactly and sums in float32, as AMX's tiles do (AVX512-BF16: callers check for it).
//  - float32: B row-major [K][ldb] (V as staged, K^T transposed by transpose_rows).
// Every column tail is masked: nothing reads B or C past column N.

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

template <int R, int W>
__attribute__((target("avx512f,avx512bf16"))) inline void bf16_block(float* c, int64_t ldc, const uint16_t* a,
                                                                      int64_t lda, const uint32_t* b, int64_t ldb,
                                                                      int64_t pairs, int64_t columns, bool add) {
  __mmask16 mask[W];
  __m512 acc[R][W];
  for (int w = 0; w < W; ++w) mask[w] = column_mask(columns - 16 * w);
  for (int r = 0; r < R; ++r) {
    for (int w = 0; w < W; ++w) {
      acc[r][w] = add ? _mm512_maskz_loadu_ps(mask[w], c + r * ldc + 16 * w) : _mm512_setzero_ps();
    }
  }
  for (int64_t i = 0; i < pairs; ++i) {
    __m512i x[W];
    for (int w = 0; w < W; ++w) x[w] = _mm512_maskz_loadu_epi32(mask[w], b + i * ldb + 16 * w);
    for (int r = 0; r < R; ++r) {
      uint32_t pair;
      __builtin_memcpy(&pair, a + r * lda + 2 * i, sizeof(pair));
      const __m512bh q = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int32_t>(pair)));
      for (int w = 0; w < W; ++w) acc[r][w] = _mm512_dpbf16_ps(acc[r][w], reinterpret_cast<__m512bh>(x[w]), q);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int w = 0; w < W; ++w) _mm512_mask_storeu_ps(c + r * ldc + 16 * w, mask[w], acc[r][w]);
  }
}

template <int R, int W>
__attribute__((target("avx512f"))) inline void float_block(float* c, int64_t ldc, const float* a, int64_t lda,
                                                           const float* b, int64_t ldb, int64_t depth,
                                                           int64_t columns, bool add) {
  __mmask16 mask[W];
  __m512 acc[R][W];
  for (int w = 0; w < W; ++w) mask[w] = column_mask(columns - 16 * w);
  for (int r = 0; r < R; ++r) {
    for (int w = 0; w < W; ++w) {
      acc[r][w] = add ? _mm512_maskz_loadu_ps(mask[w], c + r * ldc + 16 * w) : _mm512_setzero_ps();
    }
  }
  for (int64_t k = 0; k < depth; ++k) {
    __m512 x[W];
    for (int w = 0; w < W; ++w) x[w] = _mm512_maskz_loadu_ps(mask[w], b + k * ldb + 16 * w);
    for (int r = 0; r < R; ++r) {
      const __m512 q = _mm512_set1_ps(a[r * lda + k]);
      for (int w = 0; w < W; ++w) acc[r][w] = _mm512_fmadd_ps(q, x[w], acc[r][w]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int w = 0; w < W; ++w) _mm512_mask_storeu_ps(c + r * ldc + 16 * w, mask[w], acc[r][w]);
  }
}

// Rows [0, m) of one column strip of `columns` (at most 16 W): blocks of R rows, the last ones
// in one block of the rows left. Product: bf16_block or float_block; args: the rest of its arguments.
template <typename In, typename B>
using Block = void (*)(float*, int64_t, const In*, int64_t, const B*, int64_t, int64_t, int64_t, bool);

template <typename In, typename B>
inline void strip_rows(const Block<In, B>* blocks, int64_t m, float* c, int64_t ldc, const In* a, int64_t lda,
                       const B* b, int64_t ldb, int64_t depth, int64_t columns, bool add) {
  int64_t r = 0;
  for (; r + kBlockRows <= m; r += kBlockRows) {
    blocks[kBlockRows](c + r * ldc, ldc, a + r * lda, lda, b, ldb, depth, columns, add);
  }
  if (r < m) blocks[m - r](c + r * ldc, ldc, a + r * lda, lda, b, ldb, depth, columns, add);
}

// C [m][n] (+ C if add) = A [m][k] (bfloat16) . B ([k/2][ldb] bfloat16 pairs), k even.
inline void bf16_product(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add,
                         const uint16_t* a, const uint32_t* b, float* c) {
  static constexpr Block<uint16_t, uint32_t> wide[] = {nullptr, bf16_block<1, 4>, bf16_block<2, 4>, bf16_block<3, 4>,
                                                         bf16_block<4, 4>, bf16_block<5, 4>, bf16_block<6, 4>};
  static constexpr Block<uint16_t, uint32_t> narrow[] = {nullptr, bf16_block<1, 1>, bf16_block<2, 1>, bf16_block<3, 1>,
                                                           bf16_block<4, 1>, bf16_block<5, 1>, bf16_block<6, 1>};
  int64_t j = 0;
  for (; j + 16 * kBlockVectors <= n; j += 16 * kBlockVectors) {
    strip_rows(wide, m, c + j, ldc, a, lda, b + j, ldb, k / 2, 16 * kBlockVectors, add);
  }
  for (; j < n; j += 16) strip_rows(narrow, m, c + j, ldc, a, lda, b + j, ldb, k / 2, std::min<int64_t>(16, n - j), add);
}

// C [m][n] (+ C if add) = A [m][k] . B [k][ldb], float32.
inline void float_product(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add,
                          const float* a, const float* b, float* c) {
  static constexpr Block<float, float> wide[] = {nullptr, float_block<1, 4>, float_block<2, 4>, float_block<3, 4>,
                                                          float_block<4, 4>, float_block<5, 4>, float_block<6, 4>};
  static constexpr Block<float, float> narrow[] = {nullptr, float_block<1, 1>, float_block<2, 1>, float_block<3, 1>,
                                                            float_block<4, 1>, float_block<5, 1>, float_block<6, 1>};
  int64_t j = 0;
  for (; j + 16 * kBlockVectors <= n; j += 16 * kBlockVectors) {
    strip_rows(wide, m, c + j, ldc, a, lda, b + j, ldb, k, 16 * kBlockVectors, add);
  }
  for (; j < n; j += 16) strip_rows(narrow, m, c + j, ldc, a, lda, b + j, ldb, k, std::min<int64_t>(16, n - j), add);
}

// dst [cols][ld] = src [rows][cols]^T (float32), 16 x 16 blocks in registers; masked at both edges.
__attribute__((target("avx512f"))) inline void transpose_rows(float* dst, int64_t ld, const float* src, int64_t rows,
                                                              int64_t cols) {
  for (int64_t j = 0; j < rows; j += 16) {
    const __mmask16 row_mask = column_mask(rows - j);
    for (int64_t d = 0; d < cols; d += 16) {
      const __mmask16 col_mask = column_mask(cols - d);
      __m512i in[16], out[16];
      for (int l = 0; l < 16; ++l) {
        in[l] = j + l < rows ? _mm512_maskz_loadu_epi32(col_mask, src + (j + l) * cols + d) : _mm512_setzero_si512();
      }
      transpose16::transpose_16x16(in, out);
      for (int x = 0; x < 16 && d + x < cols; ++x) _mm512_mask_storeu_epi32(dst + (d + x) * ld + j, row_mask, out[x]);
    }
  }
}

}  // namespace attention_products
