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

// Whether attention's tile products (a prefill's Q.K^T and P.V) on a CPU without AMX take
// AVX512-BF16 dot products on bfloat16 pairs (attention_products.h's PairBlock) rather than
// float32 FMAs on inputs staged to float32: on AMD's CPUs with AVX512-BF16 (Zen 4 on), not on
// Intel's. Measured: on an EPYC Zen 4 (family 25 model 17) a 2000-token prefill's attention (one
// SmolLM2 layer, one thread) took 29 ms on pairs against 56 ms on float32 FMAs; on a Sapphire
// Rapids whose hypervisor hid AMX vdpbf16ps issued at a quarter of FMA's rate and made that
// prefill 1.4x slower. A rule on the vendor, not a timing probe: a CPU always takes one path (and
// gives the same bits).
inline bool bf16_pair_products_fast() {
  static const bool fast = avx512_bf16() && __builtin_cpu_is("amd");
  return fast;
}

}  // namespace cpu_features
