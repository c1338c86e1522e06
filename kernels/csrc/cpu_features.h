// The x86 features our AVX-512 kernels need, each asked once per process: every op checks before
// it runs, and a decode step makes ~200 op calls.

#pragma once

#include <atomic>
#include <optional>

namespace cpu_features {

// The AVX-512 subsets of x86-64-v4 our float32 kernels use (F, BW, VL, DQ): f32_linear, on every
// AVX-512 server CPU (Skylake-SP on, Zen 4 on), AVX512-BF16 or not.
inline bool avx512_core() {
  static const bool supported = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return supported;
}

// AVX512-BF16 with the AVX-512 subsets the bfloat16 kernels use (F, BW, VL, DQ): bf16_linear,
// bf16_mm_rows, attention's bfloat16 decode products, and (with VBMI) the int4/int8 vector loops.
inline bool avx512_bf16() {
  static const bool supported = avx512_core() && __builtin_cpu_supports("avx512bf16");
  return supported;
}

// Whether, on a CPU without AMX, AVX512-BF16's pair products (vdpbf16ps) are the fast way to
// multiply: on AMD's CPUs with AVX512-BF16 (Zen 4 on), not on Intel's. Two choices follow it:
// - attention's tile products (a prefill's Q.K^T and P.V) on bfloat16 pairs (attention_products.h's
//   PairBlock) rather than float32 FMAs on inputs staged to float32 (in AVX-512 builds: an AVX2
//   build's attention has its own FMA blocks). On an EPYC Zen 4 (family 25
//   model 17) a 2000-token prefill's attention (one SmolLM2 layer, one thread) took 29 ms on pairs
//   against 56 ms on FMAs; on a Sapphire Rapids whose hypervisor hid AMX, vdpbf16ps issued at a
//   quarter of FMA's rate and made that prefill 1.4x slower;
// - int8 weights at 4+ rows without AMX-INT8 on codes converted to bfloat16 (quant_ops.cpp's
//   int8_mm_dpbf16) rather than two VNNI byte products per weight (int8_mm_dpbusd): on Zen 4 the
//   byte products took 1.7-2.1x the pairs' time at 16-64 rows; on that Sapphire Rapids they ran at
//   1.07x/1.29x bfloat16's speed at 16/64 rows.
// A rule on the vendor, not a timing probe: a CPU always takes one path (and gives the same bits).
// Zen 5 is unmeasured and goes with Zen 4.
inline bool amd_with_avx512_bf16() {
  static const bool amd = avx512_bf16() && __builtin_cpu_is("amd");
  return amd;
}
inline bool bf16_pair_products_fast() { return amd_with_avx512_bf16(); }

// Whether a bfloat16 matmul of a few input rows without AMX reads its weight fastest as plain
// streams the hardware prefetcher follows (bf16_linear.cpp at 1-6 rows: no software prefetch,
// 8 strips at once at 1-2 rows; gemv_ops.cpp's bf16_mm_rows at 1 row: each weight row whole before
// the next): on an EPYC Zen 4 1.07-1.30x faster decode steps at batch 1. On a Xeon without AMX
// the software prefetch into L1 had measured 0.75-0.85x the time without it at 1 row, so Intel's
// CPUs keep the prefetching loops (the streaming ones are unmeasured there). Vendor rule, as above.
// The same rule picks int8_mm_rows' loop (quant_ops.cpp, int8 codes at 1-2 rows: the int4 model's
// LM head, int8's projections): no software prefetch and the high plane's +128 taken off per row,
// not per column, so two VNNI products per 64 codes and row where the prefetching loop makes three
// at one row (1.2-1.55x its speed with the weight in cache on Zen 4; bench/RESULTS.md, 13head).
inline bool few_rows_stream_weights() { return amd_with_avx512_bf16(); }

// One kernel's choice between its streaming few-row loop and its prefetching one: the rule above
// unless a benchmark or test forced one (force(true / false); force(nullopt): the rule again), so
// that an A/B can time both loops in one process and a test can check both on any CPU. Each kernel
// keeps its own (bf16_linear, bf16_mm_rows, int8_mm_rows). int8_mm_rows' two loops give the same bits;
// the bfloat16 ones are tested against the same error bound (tests/test_cpu_linear.py).
class StreamingChoice {
 public:
  bool streaming() const {
    const int forced = forced_.load(std::memory_order_relaxed);
    return forced < 0 ? few_rows_stream_weights() : forced == 1;
  }
  void force(std::optional<bool> on) { forced_.store(on.has_value() ? static_cast<int>(*on) : -1, std::memory_order_relaxed); }

 private:
  std::atomic<int> forced_{-1};  // -1: the rule; 0: the prefetching loop; 1: the streaming loop
};

}  // namespace cpu_features
