// The kernels that factor an int4 weight per group (f32_linear.cpp's int4_f32_linear,
// w4a8_linear.cpp's w4a8_linear) take sum(x * (code * scale + offset)) = scale * sum(x * code) +
// offset * sum(x) and read each group's scale and offset (int4 strips: [strips][K/group][2][16],
// float32 or float16's bits) once per group: load_scales. int4_f32_linear's sums of x are
// group_sums, once per call (w4a8_linear sums its rounded inputs instead, as it rounds them).

#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace int4_groups {

#define INT4_GROUPS_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

constexpr int64_t kColumns = 16;  // output columns of a strip (one zmm of float32)

// sums[r][g] = the sum of a[r] over group g's inputs, 16 at a time then across the lanes: one
// fixed order per row, whatever the row count.
INT4_GROUPS_TARGET inline void group_sums(const float* a, int64_t lda, int64_t rows, int64_t k, int64_t group, float* sums) {
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

// 16 of a group's scales or offsets as floats (float16: exact; vcvtph2ps).
INT4_GROUPS_TARGET inline __m512 load_scales(const float* p) { return _mm512_loadu_ps(p); }
INT4_GROUPS_TARGET inline __m512 load_scales(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

}  // namespace int4_groups
