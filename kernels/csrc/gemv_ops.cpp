// A bfloat16 matmul on AMX for the few rows of a decode step against a plain [N, K] weight (the
// tied LM head: its weight is the embedding table, so it stays in the layout the embedding reads),
// through oneDNN's brgemm ukernel (at::native::cpublas::brgemm: bfloat16 x bfloat16 -> float32).
//
// Why: torch.mv / torch.mm read the 49152 x 576 head of the default model at well below memory
// bandwidth. Here the weight is brgemm's A operand as it lies (64 of its rows per call), the input
// is packed once per call into the VNNI pairs [K/2][rows][2] as its B, and each block's result^T
// [64][rows] is stored transposed; an AMX tile product reads a 1 KB weight tile per 16 cycles, so
// the loop is bound by the weight's bytes (measured on one thread: 1-64 rows at
// 1.03-1.4x the speed of torch.mv/mm or F.linear; from ~128 rows F.linear is faster, and the
// caller switches).
// (A VNNI-blocked copy of the weight as brgemm's B beat oneDNN's packed matmul at 1-64 rows but
// lost 1.3-1.7x at prefill sizes, so the projections keep oneDNN's layout: see this file's history.)
// Functions with AVX-512 bodies carry their own target attribute, so the file builds on any
// x86-64; the op refuses to run unless the CPU has AMX-BF16 (the same test as quant_ops.cpp's
// amx_bf16_supported, which callers use). Registered by the extension kernels/cpu_ops.py builds.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "thread_pool.h"

namespace {

#define BENTO_AMX_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

constexpr int64_t kBlockN = 64;     // weight rows (output columns) per brgemm call
// Input rows per brgemm call: the float32 result [64][64] stays in L1. brgemm JIT-compiles and
// keeps a kernel per shape: at most 64 row counts per weight shape.
constexpr int64_t kRowChunk = 64;

bool amx_ready() { return __builtin_cpu_supports("avx512bf16") && at::native::cpublas::could_pack(at::kBFloat16); }

BENTO_AMX_TARGET inline void store16(c10::BFloat16* p, __mmask16 mask, __m512 v) {
  _mm256_mask_storeu_epi16(p, mask, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}

inline __mmask16 first(int64_t n) { return static_cast<__mmask16>((1u << std::min<int64_t>(16, n)) - 1); }

// out[r, j] = result[j, r] for r < rows, j < columns, in bfloat16: a column of the transposed
// result (in L1) is gathered per 16 outputs.
BENTO_AMX_TARGET void store_transposed(const float* result, int64_t rows, int64_t columns, c10::BFloat16* out,
                                       int64_t out_stride) {
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t j = 0; j < columns; j += 16) {
    const __mmask16 mask = first(columns - j);
    const __m512i index = _mm512_mullo_epi32(_mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int32_t>(j))),
                                             _mm512_set1_epi32(static_cast<int32_t>(rows)));
    for (int64_t r = 0; r < rows; ++r)
      store16(out + r * out_stride + j, mask, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, index, result + r, 4));
  }
}

// x [M, K] bfloat16 @ weight [N, K]^T -> [M, N] bfloat16 (no bias: the LM head has none).
at::Tensor bf16_mm_amx(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(amx_ready(), "bf16_mm_amx needs a CPU with AMX-BF16");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1, "x: a [rows, K] bfloat16 matrix");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.is_contiguous() &&
                  weight.size(1) % 2 == 0,
              "weight: a contiguous [N, K] bfloat16 matrix with K even");
  const int64_t rows = x.size(0), n_total = weight.size(0), k_total = weight.size(1), lda = x.stride(0);
  TORCH_CHECK(x.size(1) == k_total, "x has ", x.size(1), " columns, the weight ", k_total);
  at::Tensor out = at::empty({rows, n_total}, x.options());
  if (rows == 0) return out;
  // B operand: the chunk of rows [m, m + mb) at m * K as [K/2][mb][2], column pairs side by side.
  at::Tensor packed = at::empty({rows * k_total}, x.options());
  const auto* in = x.data_ptr<c10::BFloat16>();
  auto* pairs = packed.data_ptr<c10::BFloat16>();
  for (int64_t m = 0; m < rows; m += kRowChunk) {
    const int64_t mb = std::min(kRowChunk, rows - m);
    for (int64_t r = 0; r < mb; ++r)
      for (int64_t k = 0; k < k_total; ++k) pairs[m * k_total + (k / 2 * mb + r) * 2 + k % 2] = in[(m + r) * lda + k];
  }
  const auto* w = weight.data_ptr<c10::BFloat16>();
  const auto* xp = packed.data_ptr<c10::BFloat16>();
  auto* y = out.data_ptr<c10::BFloat16>();
  const int64_t blocks = (n_total + kBlockN - 1) / kBlockN;
  kernel_pool::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float res[kBlockN * kRowChunk];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * kBlockN, columns = std::min(kBlockN, n_total - n0);
      for (int64_t m = 0; m < rows; m += kRowChunk) {
        const int64_t mb = std::min(kRowChunk, rows - m);
        // The last block has fewer weight rows: reading 64 would run past the weight.
        at::native::cpublas::brgemm(columns, mb, k_total, k_total, mb, mb, false, w + n0 * k_total, xp + m * k_total, res);
        store_transposed(res, mb, columns, y + m * n_total + n0, n_total);
      }
    }
    at::native::cpublas::brgemm_release();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bento_llm, m) {
  m.def("bf16_mm_amx(Tensor x, Tensor weight) -> Tensor", &bf16_mm_amx);
}
