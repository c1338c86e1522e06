// What the kernels that factor an int4 weight per group share (f32_linear.cpp's int4_f32_linear,
// w4a8_linear.cpp's w4a8_linear): both take sum(x * (code * scale + offset)) = scale * sum(x *
// code) + offset * sum(x) and read each group's scale and offset from int4 strips' groups
// ([strips][K/group][2][16], float32 or float16's bits) once per group.

#pragma once

#include <immintrin.h>

#include <cstdint>

namespace int4_groups {

#define INT4_GROUPS_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

constexpr int64_t kColumns = 16;  // output columns of a strip (one zmm of float32)

// 16 of a group's scales or offsets as floats (float16: exact; vcvtph2ps).
INT4_GROUPS_TARGET inline __m512 load_scales(const float* p) { return _mm512_loadu_ps(p); }
INT4_GROUPS_TARGET inline __m512 load_scales(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// f(scales) with the groups' data as the kernels read it: const float*, or const uint16_t* (float16's
// bits) where half.
template <class F>
void with_scales(const void* data, bool half, const F& f) {
  if (half) {
    f(static_cast<const uint16_t*>(data));
  } else {
    f(static_cast<const float*>(data));
  }
}

}  // namespace int4_groups
