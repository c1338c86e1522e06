// A 16 x 16 transpose of 32-bit elements in AVX-512 registers, the step shared by the bfloat16 pair
// layouts: amx_linear.cpp's unpack of weight strips, cpu_ops.cpp's K^T packing for attention.
// Its own target attribute: it builds in any x86-64 translation unit and inlines into AVX-512 code.

#pragma once

#include <immintrin.h>

namespace transpose16 {

// out[x] lane l = rows[l] lane x (2 x 2 blocks of elements, then of pairs, then of 128-bit lanes twice).
__attribute__((target("avx512f"))) inline void transpose_16x16(const __m512i* rows, __m512i* out) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(rows[2 * i], rows[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(rows[2 * i], rows[2 * i + 1]);
  }
  // u[4 i + c], 128-bit lane l: column 4 l + c of rows 4 i..4 i + 3.
  for (int i = 0; i < 4; ++i) {
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i even0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88), even1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88);
    const __m512i odd0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xdd), odd1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xdd);
    out[c] = _mm512_shuffle_i32x4(even0, even1, 0x88);
    out[8 + c] = _mm512_shuffle_i32x4(even0, even1, 0xdd);
    out[4 + c] = _mm512_shuffle_i32x4(odd0, odd1, 0x88);
    out[12 + c] = _mm512_shuffle_i32x4(odd0, odd1, 0xdd);
  }
}

}  // namespace transpose16
