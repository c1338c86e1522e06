// 8-bit KV cache codes <-> float32 in vector registers, for cpu_ops.cpp's attention over an int8 or
// float8_e4m3fn cache (rows of head_dim codes and a float16 scale, see kernels/reference.py) and
// its cache write.
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

// 16 floats, already clamped to the code's range, -> 16 codes at p as torch converts them (round
// to nearest even). int8: convert and narrow. e4m3: |v| >= 2^-6 keeps float32's exponent (rebiased
// from 127 to 7) and its mantissa rounded to 3 bits (a carry moves the exponent, as it should);
// below, the subnormal code m = |v| * 2^9 rounded (8 is 2^-6, the smallest normal's code).
__attribute__((target("avx512f"))) inline void store_int8_codes(void* p, __m512 v) {
  _mm_storeu_si128(static_cast<__m128i*>(p), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
}

__attribute__((target("avx512f"))) inline void store_e4m3_codes(void* p, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(bits, 24), _mm512_set1_epi32(0x80));
  const __m512i mag = _mm512_and_si512(bits, _mm512_set1_epi32(0x7FFFFFFF));
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(mag, 20), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(mag, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFFF)));
  const __m512i normal = _mm512_sub_epi32(_mm512_srli_epi32(rounded, 20), _mm512_set1_epi32(120 << 3));
  const __m512 a = _mm512_castsi512_ps(mag);
  const __m512i subnormal = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(512.0f)));
  const __mmask16 tiny = _mm512_cmp_ps_mask(a, _mm512_set1_ps(0.015625f), _CMP_LT_OQ);
  const __m512i code = _mm512_or_si512(_mm512_mask_blend_epi32(tiny, normal, subnormal), sign);
  _mm_storeu_si128(static_cast<__m128i*>(p), _mm512_cvtepi32_epi8(code));
}

}  // namespace kv_codes
