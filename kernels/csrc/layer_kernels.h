// cpu_ops.cpp's norms and SiLU-and-multiply writing into a caller's output (dense, shaped and
// typed as the registered op's would be, else refused), for step_ops.cpp's decoder_layer: it
// keeps its intermediates across calls instead of allocating them (an allocation cost about as
// much as a batch-1 norm). The registered ops (rms_norm, add_rms_norm, silu_mul) are these into a
// new tensor: one implementation.

#pragma once

#include <ATen/ATen.h>

namespace layer_kernels {

void rms_norm_into(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& out);
void add_rms_norm_into(at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& out);
void silu_mul_into(const at::Tensor& gate_up, at::Tensor& out);

}  // namespace layer_kernels
