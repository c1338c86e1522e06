// SiLU and the exponentials under it on 16 float lanes, shared by cpu_ops.cpp's silu_mul (and its
// attention's softmax weights, exp2_lanes) and amx_linear.cpp's fused SwiGLU MLP, so the fused MLP
// computes the activation exactly as the unfused path's silu_mul does.
// Each function carries its own target attribute: the header builds in any x86-64 translation unit
// (cpu_ops.cpp's AVX2 build includes it) and inlines into AVX-512 code.

#pragma once

#include <immintrin.h>

// e^x on 16 lanes: float_rows.h's scalar fast_exp (clamp to [-80, 80], a base-2 range reduction, the
// Cephes polynomial), 2^k applied by scalef.
__attribute__((target("avx512f"))) inline __m512 fast_exp_lanes(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-80.0f)), _mm512_set1_ps(80.0f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r =
      _mm512_fmadd_ps(k, _mm512_set1_ps(2.12194440e-4f), _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 e = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(e, k);
}

// 2^t for |t| <= 126: 2^k (scalef) times a degree-4 polynomial for 2^f, f = t - k in [-1/2, 1/2]
// (near-minimax in relative error: at most 2.7e-6 evaluated in float32, far below bfloat16's 2^-8,
// in half the operations of fast_exp_lanes).
__attribute__((target("avx512f"))) inline __m512 exp2_lanes(__m512 t) {
  const __m512 k = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, k);
  __m512 poly = _mm512_set1_ps(9.570101434e-3f);
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(5.591786028e-2f));
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(2.402474484e-1f));
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(6.931218147e-1f));
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(9.999992614e-1f));
  return _mm512_scalef_ps(poly, k);
}

// silu(g) * u = g * u / (1 + e^-g) on 16 lanes, the reciprocal as rcp14 refined by one Newton step
// (relative error near float32's rounding) rather than vdivps (10+ cycles a vector: the largest
// cost of the loop the compiler made of silu_mul_tail). e^-g: fast_exp_lanes for float32 results,
// exp2_lanes where they are rounded to bfloat16; e^-g is clamped to e^80 or 2^120 (1e36), so the
// Newton step sees no infinity (or NaN from inf * 0) and the reciprocal stays a normal float.
template <bool kRoundedToBFloat16>
__attribute__((target("avx512f"))) inline __m512 silu_mul_lanes(__m512 g, __m512 u) {
  __m512 e;
  if constexpr (kRoundedToBFloat16) {
    const __m512 t = _mm512_mul_ps(g, _mm512_set1_ps(-1.44269504088896341f));
    e = exp2_lanes(_mm512_min_ps(_mm512_max_ps(t, _mm512_set1_ps(-120.0f)), _mm512_set1_ps(120.0f)));
  } else {
    e = fast_exp_lanes(_mm512_sub_ps(_mm512_setzero_ps(), g));
  }
  const __m512 d = _mm512_add_ps(e, _mm512_set1_ps(1.0f));
  const __m512 y = _mm512_rcp14_ps(d);
  const __m512 inv = _mm512_fmadd_ps(_mm512_fnmadd_ps(d, y, _mm512_set1_ps(1.0f)), y, y);
  return _mm512_mul_ps(_mm512_mul_ps(g, inv), u);
}
