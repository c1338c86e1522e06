"""Gated MLP activations over a fused gate/up projection's output [tokens, 2 * I]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.forward_context import get_forward_context
from engine.layers.step_module import StepModule


class SiluAndMul(StepModule):
    """SwiGLU: silu(gate) * up (the backend's fused op)."""

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        return get_forward_context().backend.ops.silu_mul(gate_up)


class GeluTanhAndMul(StepModule):
    """GeGLU with the tanh approximation (Gemma's gelu_pytorch_tanh)."""

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up


ACTIVATIONS = {"silu": SiluAndMul, "gelu_pytorch_tanh": GeluTanhAndMul, "gelu_tanh": GeluTanhAndMul}


def gated_activation(name: str) -> nn.Module:
    return ACTIVATIONS[name]()
