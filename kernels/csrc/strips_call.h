// A matmul call on amx_linear_pack's column strips ([ceil(N / 16)][K / 32][16][32] bfloat16): the
// argument checks and the output both kernels that read the strips share, amx_linear
// (amx_linear.cpp, AMX tiles) and bf16_linear (bf16_linear.cpp, AVX512-BF16).

#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace strips_call {

constexpr int64_t kColumns = 16;  // output columns of a strip
constexpr int64_t kK = 32;        // K of one step of a strip (16 pairs of 16 columns: one AMX B tile)

struct Call {
  int64_t rows, k, steps, tiles;
  const c10::BFloat16* bias;  // null: no bias
  at::Tensor out;             // [rows, n_total] bfloat16, uninitialized
};

// x [rows, K] bfloat16 (rows may be strided), packed, bias [n_total] or none, checked against each
// other; the error messages name the argument.
inline Call check(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                  int64_t n_total) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1, "x: a [rows, K] bfloat16 matrix");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kBFloat16 && packed.is_contiguous() &&
                  packed.size(2) == kK / 2 && packed.size(3) == 2 * kColumns,
              "packed: amx_linear_pack's [N/16, K/32, 16, 32] layout");
  const int64_t rows = x.size(0), k = x.size(1), steps = packed.size(1), tiles = packed.size(0);
  TORCH_CHECK(k == steps * kK, "x has ", k, " columns, the weight ", steps * kK);
  TORCH_CHECK(n_total > (tiles - 1) * kColumns && n_total <= tiles * kColumns, "out_features ", n_total,
              " does not match the packed weight");
  const c10::BFloat16* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->is_contiguous() && bias->numel() == n_total,
                "bias: [out_features] bfloat16");
    bias_ptr = bias->data_ptr<c10::BFloat16>();
  }
  return {rows, k, steps, tiles, bias_ptr, at::empty({rows, n_total}, x.options())};
}

}  // namespace strips_call
