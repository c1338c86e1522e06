// 8-bit KV cache codes -> float32 in vector registers, for cpu_ops.cpp's attention over an int8 or
// float8_e4m3fn cache (rows of head_dim codes and a float16 scale, see kernels/reference.py).
//
// int8: sign-extend to 32 bits, convert. e4m3: an exact detour through float16, whose conversion
// to float32 is one instruction: an e4m3 code s.eeee.mmm, sign-extended to 16 bits and shifted
// left 7, is the float16 s.0eeee.mmm0000000 once bit 14 is cleared; float16's exponent bias is 15
// where e4m3's is 7, so that float16 is the code's value / 2^8, subnormals included (e4m3's
// m * 2^-9 lands on float16's m * 2^-17). Callers fold the 2^8 into the row's scale
// (kE4m3Unit), so no per-code work is left. The two NaN codes (0x7F, 0xFF) read as +-480 here:
// no cache write produces them (reference.quantize_rows clamps to 448).
// Each function carries its own target attribute: the header builds in any x86-64 translation
// unit (cpu_ops.cpp's AVX2 build includes it) and inlines into code built for that target.

#pragma once

#include <immintrin.h>

#include <cstdint>

namespace kv_codes {

constexpr float kE4m3Unit = 256.0f;  // e4m3 lanes hold value / kE4m3Unit

// 16 codes at p -> 16 floats (int8: the codes; e4m3: the values / kE4m3Unit).
__attribute__((target("avx512f"))) inline __m512 int8_lanes(const void* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p))));
}

__attribute__((target("avx512f,avx2"))) inline __m512 e4m3_lanes(const void* p) {
  const __m256i wide = _mm256_cvtepi8_epi16(_mm_loadu_si128(static_cast<const __m128i*>(p)));
  return _mm512_cvtph_ps(_mm256_and_si256(_mm256_slli_epi16(wide, 7), _mm256_set1_epi16(static_cast<short>(0xBFFF))));
}

// The same on 8 codes and 8 lanes, for AVX2 builds.
__attribute__((target("avx2"))) inline __m256 int8_lanes8(const void* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(static_cast<const __m128i*>(p))));
}

__attribute__((target("avx2,f16c"))) inline __m256 e4m3_lanes8(const void* p) {
  const __m128i wide = _mm_cvtepi8_epi16(_mm_loadl_epi64(static_cast<const __m128i*>(p)));
  return _mm256_cvtph_ps(_mm_and_si128(_mm_slli_epi16(wide, 7), _mm_set1_epi16(static_cast<short>(0xBFFF))));
}

}  // namespace kv_codes
