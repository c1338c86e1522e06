// Float32 views of a row and the row helpers that cpu_ops.cpp's kernels and sampler_ops.cpp's
// sampling share: loads and stores in any storage dtype, the vectorizable exp, the greedy argmax.
// The definitions sit in an unnamed namespace: each translation unit inlines its own copy.

#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

namespace {

// Loads and stores convert to and from float32 on raw bits, in forms the compiler vectorizes
// (c10's conversion operators keep these loops scalar). The loops vectorize under the math
// flags kernels/cpu_ops.py passes (-fno-trapping-math, -fassociative-math for the reductions).
template <typename T>
inline float load(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}

template <>
inline float load<c10::BFloat16>(const c10::BFloat16* p, int64_t i) {
  // bfloat16 is the top half of a float32.
  return std::bit_cast<float>(static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16);
}

template <typename T>
inline void store(T* p, int64_t i, float v) {
  p[i] = static_cast<T>(v);
}

template <>
inline void store<c10::BFloat16>(c10::BFloat16* p, int64_t i, float v) {
  // Round to nearest even, as torch's float -> bfloat16 conversion; NaN stays a quiet NaN.
  const uint32_t bits = std::bit_cast<uint32_t>(v);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  reinterpret_cast<uint16_t*>(p)[i] = v != v ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
}

// exp for the softmax and SiLU: Cephes' single-precision polynomial after a base-2 range
// reduction, written branch-free so that loops over it vectorize (std::exp does not here).
// Relative error about 2e-7 inside [-80, 80]; above, the input is clamped to 80. The clamp is
// kept well inside float's normal range on purpose: denormal intermediates (say 1 / (1 + e^88))
// cost a microcode assist per vector, measured 9x slower SiLU.
inline float fast_exp(float x_in) {
  const float x = std::min(std::max(x_in, -80.0f), 80.0f);
  const float k = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - k * 0.693359375f + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const float value = e * std::bit_cast<float>(static_cast<uint32_t>(static_cast<int32_t>(k) + 127) << 23);
  // Below the range, 0 rather than e^-80: a softmax weight of 1e-35 times a small V element
  // would be a denormal product in the PV loop.
  return x_in < -80.0f ? 0.0f : value;
}

// The index of a row's largest value, as torch.argmax: the first of equal maxima, the first NaN
// if any. Each of kLanes lanes keeps the first maximum of its own columns (strict >), so the
// lowest index among the lanes holding the row's maximum is the row's first; the loop vectorizes
// (AVX-512 or AVX2) and reads a bfloat16 row once, without a float32 copy of the logits.
template <typename T>
int64_t argmax_row(const T* x, int64_t n) {
  constexpr int64_t kLanes = 32;
  float best[kLanes];
  int32_t at[kLanes];
  int32_t nan = 0;
  for (int64_t l = 0; l < kLanes; ++l) {
    best[l] = -std::numeric_limits<float>::infinity();
    at[l] = static_cast<int32_t>(l);  // a row of -inf: index 0, as torch
  }
  const int64_t full = n - n % kLanes;
  for (int64_t j = 0; j < full; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const float v = load(x, j + l);
      const bool larger = v > best[l];
      best[l] = larger ? v : best[l];
      at[l] = larger ? static_cast<int32_t>(j + l) : at[l];
      nan |= v != v;
    }
  }
  for (int64_t l = 0; l < n - full; ++l) {
    const float v = load(x, full + l);
    if (v > best[l]) best[l] = v, at[l] = static_cast<int32_t>(full + l);
    nan |= v != v;
  }
  if (nan) {
    for (int64_t i = 0;; ++i) {
      if (load(x, i) != load(x, i)) return i;
    }
  }
  int64_t l_best = 0;
  for (int64_t l = 1; l < kLanes; ++l) {
    if (best[l] > best[l_best] || (best[l] == best[l_best] && at[l] < at[l_best])) l_best = l;
  }
  return at[l_best];
}

}  // namespace
