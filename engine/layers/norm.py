"""RMSNorm, with the residual add fused in (the backend's add_rms_norm)."""

from __future__ import annotations

import torch
from torch import nn

from engine.forward_context import get_forward_context
from engine.layers.linear import check_shape, set_loader
from engine.layers.step_module import StepModule
from engine.parallel_state import read_all


class RMSNorm(StepModule):
    """The weight stays float32 whatever the model's dtype (the norm is computed in float32).
    weight_offset 1 is Gemma's (1 + weight) scaling, folded into the weight at load so every
    backend's plain RMSNorm kernel computes it."""

    def __init__(self, dim: int, eps: float, weight_offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.weight_offset = weight_offset
        self.weight = nn.Parameter(torch.ones(dim))
        set_loader(self, "weight", self.load)

    def load(self, param: nn.Parameter, weight, shard_id=None) -> None:
        check_shape(weight, param.shape)
        param.data.copy_(read_all(weight).float() + self.weight_offset)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Without a residual: the norm of x (any leading dims). With one: residual += x in place
        first, and the norm of the sum."""
        ops = get_forward_context().backend.ops
        if residual is not None:
            return ops.add_rms_norm(residual, x, self.weight, self.eps)
        if x.dim() == 2:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view(x.shape)
