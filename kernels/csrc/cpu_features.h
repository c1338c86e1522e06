// The x86 features our AVX-512 kernels need, each asked once per process: every op checks before
// it runs, and a decode step makes ~200 op calls.

#pragma once

namespace cpu_features {

// AVX512-BF16 with the AVX-512 subsets the bfloat16 kernels use (F, BW, VL, DQ): bf16_linear,
// bf16_mm_rows, attention's bfloat16 decode products, and (with VBMI) the int4/int8 vector loops.
inline bool avx512_bf16() {
  static const bool supported = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                                __builtin_cpu_supports("avx512bf16");
  return supported;
}

}  // namespace cpu_features
