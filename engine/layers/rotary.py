"""Rotary position embeddings: the frequencies of every rope type transformers defines that
does not depend on the batch (default, linear, llama3, YaRN, longrope), as cos/sin tables.

Frequencies come from transformers' own initialisers, so they match the reference exactly.
Longrope (Phi-3 "su"): positions below original_max_position_embeddings rotate with the short
factors, later ones with the long factors. transformers switches a whole forward to the long
factors once any position passes that length; with a KV cache that is the same per new
position, and differs only for a prompt that starts beyond it in one prefill (as vLLM does).
"dynamic" NTK scaling recomputes frequencies from the batch's longest sequence, which a paged
batch of unrelated sequences cannot honour, so it is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from engine.forward_context import get_forward_context
from kernels import reference

ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


@dataclass
class RopeSpec:
    inv_freq: torch.Tensor  # [rotary_dim / 2], float32, scaling applied
    rope_attention_scaling: float  # cos and sin are multiplied by it (YaRN, longrope)
    long_inv_freq: torch.Tensor | None = None  # longrope: used from original_max on
    original_max: int = 0


def rope_parameters(hf_config, layer_type: str | None = None) -> dict:
    # transformers 5 keeps rope_theta and scaling in rope_parameters (per layer type for Gemma 3);
    # older configs in rope_scaling.
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    if layer_type is not None and layer_type in params:
        params = params[layer_type]
    return dict(params)


def rope_spec(hf_config, head_dim: int, layer_type: str | None = None) -> RopeSpec:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = rope_parameters(hf_config, layer_type)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} (rope_parameters={params!r}); implemented are {ROPE_TYPES}")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        dim = int(head_dim * params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0)))
        return RopeSpec(1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0)
    init = ROPE_INIT_FUNCTIONS[rope_type]
    kwargs = {"layer_type": layer_type} if layer_type is not None else {}
    with torch.device("cpu"):  # also when the model is being built on the meta device
        inv_freq, scaling = init(hf_config, torch.device("cpu"), **kwargs)
    if rope_type != "longrope":
        return RopeSpec(inv_freq.float(), float(scaling))
    original = params.get("original_max_position_embeddings") or getattr(
        hf_config, "original_max_position_embeddings", hf_config.max_position_embeddings
    )
    with torch.device("cpu"):
        long_inv_freq, _ = init(hf_config, torch.device("cpu"), seq_len=original + 1, **kwargs)
    return RopeSpec(inv_freq.float(), float(scaling), long_inv_freq.float(), int(original))


class RopeTable(NamedTuple):
    """cos and sin at one step's positions [tokens, 1, rotary_dim], shared by every layer."""

    cos: torch.Tensor
    sin: torch.Tensor

    def rotate_(self, qk: torch.Tensor) -> None:
        """In place on qk [tokens, heads, head_dim]; partial rotary turns the first rotary_dim only."""
        if self.cos.shape[-1] == qk.shape[-1]:
            get_forward_context().backend.ops.rotary_embedding_(qk, self.cos, self.sin)
        else:
            reference.rotary_embedding_(qk[..., : self.cos.shape[-1]], self.cos, self.sin)


class RotaryEmbedding(nn.Module):
    """Built from a RopeSpec (or anything with its fields, such as a ModelConfig)."""

    def __init__(self, spec, max_positions: int):
        super().__init__()
        inv_freq = spec.inv_freq
        positions = torch.arange(max_positions, dtype=torch.float, device=inv_freq.device)
        freqs = positions[:, None] * inv_freq[None, :]
        long_inv_freq = getattr(spec, "long_inv_freq", None)
        if long_inv_freq is not None:
            long = positions[:, None] >= getattr(spec, "original_max", 0)
            freqs = torch.where(long, positions[:, None] * long_inv_freq.to(inv_freq.device)[None, :], freqs)
        scaling = spec.rope_attention_scaling
        # Full-width tables, sin signed for the first half: rotation is x * cos + roll(x) * sin.
        cos, sin = freqs.cos() * scaling, freqs.sin() * scaling
        self.register_buffer("cos", torch.cat((cos, cos), dim=-1), persistent=False)
        self.register_buffer("sin", torch.cat((-sin, sin), dim=-1), persistent=False)

    def table(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeTable:
        """cos and sin at this step's positions, looked up once and shared by every layer; in
        the model's dtype, as transformers rotates (computed in float32, rounded once).

        The tables are rounded to dtype once and kept [max_positions, 1, rotary_dim] (a bfloat16
        model keeps them at half the float32 tables' size besides), so a step is one index_select
        each: indexing, a view and a cast per table per step cost ~15 us of a batch-1 decode step
        (more right after the step's weight read has cycled the caches). Rounding commutes with
        the gather, so the values are the same bits."""
        # Kept with the buffers they were rounded from (a .to() of the module replaces them) and their dtype.
        cos_source, sin_source, rounded_dtype, cos, sin = self.__dict__.get("rounded", (None,) * 5)
        if cos_source is not self._buffers["cos"] or sin_source is not self._buffers["sin"] or rounded_dtype != dtype:
            cos, sin = self.cos.to(dtype)[:, None, :], self.sin.to(dtype)[:, None, :]
            self.__dict__["rounded"] = (self._buffers["cos"], self._buffers["sin"], dtype, cos, sin)
        return RopeTable(cos.index_select(0, positions), sin.index_select(0, positions))
