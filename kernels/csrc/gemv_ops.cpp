// bfloat16 projections on AMX at every row count, from one copy of each weight, through oneDNN's
// brgemm ukernel (at::native::cpublas::brgemm: bfloat16 x bfloat16 -> float32 tiles).
//
// Why: oneDNN's packed matmul (mkldnn._linear_pointwise) runs 1-64 rows well below memory
// bandwidth (a batch-1 decode step is one pass over every weight: the default model's projections
// took 1.5x its weight-read time). A brgemm call per 64 output columns is bound by the weight's
// bytes from one row up, since an AMX tile product reads a 1 KB weight tile per 16 cycles.
//
// Two ways to call it:
// - bf16_mm_amx: the weight packed once at load (amx_pack_bf16) into brgemm's B layout,
//   [N/64][K/2][64][2] (column pairs of 64 output rows side by side, N padded with zero rows);
//   the input is brgemm's A as it lies. Rows go in chunks of at most kRowChunk, so a chunk's input
//   stays in L2 while every column block passes over it. This is the projections' one layout.
// - bf16_mm_amx_plain: the plain [N, K] weight (the tied LM head: it is the embedding table) as
//   brgemm's A, the input packed per call into [K/2][rows][2] as its B; each block's result^T is
//   stored transposed. For the few rows of a decode step's LM head.
// Functions with AVX-512 bodies carry their own target attribute, so the file builds on any
// x86-64; the ops refuse to run unless the CPU has AMX-BF16 (torch.ops.bento_llm.amx_bf16_supported
// in quant_ops.cpp is the same test). Registered by the extension kernels/cpu_ops.py builds.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace {

#define BENTO_AMX_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

constexpr int64_t kBlockN = 64;     // output columns per brgemm call (the B tile's width)
constexpr int64_t kRowChunk = 256;  // input rows per brgemm call: [256, K] bfloat16 stays in L2

bool amx_ready() { return __builtin_cpu_supports("avx512bf16") && at::native::cpublas::could_pack(at::kBFloat16); }

// (first row, rows) of each brgemm call: kRowChunk at a time, then the rest's multiple of 16 in
// powers of two, then its last 1-15 rows. brgemm JIT-compiles and keeps a kernel per shape, so the
// row counts a server meets map onto about 20 shapes per weight shape.
std::vector<std::pair<int64_t, int64_t>> row_chunks(int64_t rows) {
  std::vector<std::pair<int64_t, int64_t>> chunks;
  int64_t m = 0;
  for (; rows - m >= kRowChunk; m += kRowChunk) chunks.emplace_back(m, kRowChunk);
  for (int64_t size = kRowChunk / 2; size >= 16; size /= 2) {
    if (rows - m >= size) {
      chunks.emplace_back(m, size);
      m += size;
    }
  }
  if (m < rows) chunks.emplace_back(m, rows - m);
  return chunks;
}

// 16 bfloat16 values (masked: zeros past the mask) as float32.
BENTO_AMX_TARGET inline __m512 widen(const c10::BFloat16* p, __mmask16 mask) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

BENTO_AMX_TARGET inline void store16(c10::BFloat16* p, __mmask16 mask, __m512 v) {
  _mm256_mask_storeu_epi16(p, mask, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}

inline __mmask16 first(int64_t n) { return static_cast<__mmask16>((1u << std::min<int64_t>(16, n)) - 1); }

// out[m, j] = result[m, j] (+ bias[j]) for m < rows, j < columns, in bfloat16.
BENTO_AMX_TARGET void store_block(const float* result, int64_t rows, int64_t columns, const c10::BFloat16* bias,
                                  c10::BFloat16* out, int64_t out_stride) {
  for (int64_t j = 0; j < columns; j += 16) {
    const __mmask16 mask = first(columns - j);
    const __m512 b = bias == nullptr ? _mm512_setzero_ps() : widen(bias + j, mask);
    for (int64_t m = 0; m < rows; ++m)
      store16(out + m * out_stride + j, mask, _mm512_add_ps(_mm512_loadu_ps(result + m * kBlockN + j), b));
  }
}

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

void check_input(const at::Tensor& x, int64_t k_total) {
  TORCH_CHECK(amx_ready(), "the AMX bfloat16 matmuls need a CPU with AMX-BF16");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1, "x: a [rows, K] bfloat16 matrix");
  TORCH_CHECK(x.size(1) == k_total, "x has ", x.size(1), " columns, the weight ", k_total);
}

// weight [N, K] bfloat16, K even -> [N/64, K/2, 64, 2] (N padded to 64 with zero rows).
at::Tensor amx_pack_bf16(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.size(1) % 2 == 0,
              "weight: a [N, K] bfloat16 matrix with K even");
  const int64_t n_total = weight.size(0), k_total = weight.size(1);
  const int64_t n_padded = (n_total + kBlockN - 1) / kBlockN * kBlockN;
  at::Tensor padded = at::zeros({n_padded, k_total}, weight.options());
  padded.narrow(0, 0, n_total).copy_(weight);
  return padded.view({n_padded / kBlockN, kBlockN, k_total / 2, 2}).permute({0, 2, 1, 3}).contiguous();
}

// x [M, K] bfloat16 @ a weight packed by amx_pack_bf16 (+ bias [N]) -> [M, out_features] bfloat16.
at::Tensor bf16_mm_amx(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                       int64_t out_features) {
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kBFloat16 && packed.is_contiguous() &&
                  packed.size(1) * 2 == x.size(1) && packed.size(2) == kBlockN && packed.size(3) == 2 &&
                  out_features <= packed.size(0) * kBlockN,
              "packed: amx_pack_bf16's [N/64, K/2, 64, 2] layout of the weight");
  const int64_t rows = x.size(0), k_total = packed.size(1) * 2, lda = x.stride(0);
  check_input(x, k_total);
  at::Tensor bias_c;
  const c10::BFloat16* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->numel() == out_features, "bias: [N] bfloat16");
    bias_c = bias->contiguous();
    b = bias_c.data_ptr<c10::BFloat16>();
  }
  at::Tensor out = at::empty({rows, out_features}, x.options());
  if (rows == 0) return out;
  const auto* a = x.data_ptr<c10::BFloat16>();
  const auto* w = packed.data_ptr<c10::BFloat16>();
  auto* y = out.data_ptr<c10::BFloat16>();
  const int64_t blocks = (out_features + kBlockN - 1) / kBlockN;
  const std::vector<std::pair<int64_t, int64_t>> chunks = row_chunks(rows);
  const int64_t chunk_rows = chunks.front().second;
  // Work item i: row chunk i / blocks, column block i % blocks. A thread's run of items passes
  // over the weight once per row chunk while that chunk's input stays in its L2.
  at::parallel_for(0, static_cast<int64_t>(chunks.size()) * blocks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor result = at::empty({chunk_rows * kBlockN}, x.options().dtype(at::kFloat));
    float* res = result.data_ptr<float>();
    for (int64_t i = begin; i < end; ++i) {
      const auto [m, mb] = chunks[i / blocks];
      const int64_t n0 = (i % blocks) * kBlockN, columns = std::min(kBlockN, out_features - n0);
      at::native::cpublas::brgemm(mb, kBlockN, k_total, lda, kBlockN, kBlockN, false, a + m * lda, w + n0 * k_total, res);
      store_block(res, mb, columns, b == nullptr ? nullptr : b + n0, y + m * out_features + n0, out_features);
    }
    at::native::cpublas::brgemm_release();
  });
  return out;
}

// x [M, K] bfloat16 @ a plain weight [N, K]^T -> [M, N] bfloat16 (no bias: the LM head's case).
at::Tensor bf16_mm_amx_plain(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.is_contiguous() &&
                  weight.size(1) % 2 == 0,
              "weight: a contiguous [N, K] bfloat16 matrix with K even");
  const int64_t rows = x.size(0), n_total = weight.size(0), k_total = weight.size(1), lda = x.stride(0);
  check_input(x, k_total);
  TORCH_CHECK(lda % 2 == 0, "x: rows must start at even offsets (bfloat16 pairs)");
  at::Tensor out = at::empty({rows, n_total}, x.options());
  if (rows == 0) return out;
  const std::vector<std::pair<int64_t, int64_t>> chunks = row_chunks(rows);
  // B operand: chunk (m, mb) at m * K as [K/2][mb][2], the input's column pairs side by side.
  at::Tensor packed = at::empty({rows * k_total}, x.options());
  const auto* in = reinterpret_cast<const uint32_t*>(x.data_ptr<c10::BFloat16>());
  auto* pairs = reinterpret_cast<uint32_t*>(packed.data_ptr<c10::BFloat16>());
  for (const auto& [m, mb] : chunks)
    for (int64_t r = 0; r < mb; ++r)
      for (int64_t p = 0; p < k_total / 2; ++p) pairs[m * k_total / 2 + p * mb + r] = in[(m + r) * (lda / 2) + p];
  const auto* w = weight.data_ptr<c10::BFloat16>();
  const auto* xp = packed.data_ptr<c10::BFloat16>();
  auto* y = out.data_ptr<c10::BFloat16>();
  const int64_t blocks = (n_total + kBlockN - 1) / kBlockN;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor result = at::empty({kBlockN * chunks.front().second}, x.options().dtype(at::kFloat));
    float* res = result.data_ptr<float>();
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * kBlockN, columns = std::min(kBlockN, n_total - n0);
      for (const auto& [m, mb] : chunks) {
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
  m.def("amx_pack_bf16(Tensor weight) -> Tensor", &amx_pack_bf16);
  m.def("bf16_mm_amx(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor", &bf16_mm_amx);
  m.def("bf16_mm_amx_plain(Tensor x, Tensor weight) -> Tensor", &bf16_mm_amx_plain);
}
