"""The model-agnostic model config: what the runner, the engine and every layer need to know
about a checkpoint, translated once from its transformers config. Family-specific settings
(experts, multipliers) are read by the family's file from hf_config."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.layers.activation import ACTIVATIONS
from engine.layers.rotary import rope_parameters, rope_spec
from engine.models import registry
from engine.parallel_state import check_tensor_parallel


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # on q/k/v
    o_proj_bias: bool
    mlp_bias: bool
    inv_freq: torch.Tensor  # RoPE inverse frequencies, scaling applied (layers.rotary.RopeSpec's fields)
    rope_attention_scaling: float
    eos_token_ids: list[int]
    sliding_window: int | None  # the checkpoint's window, where it uses one
    architecture: str = "LlamaForCausalLM"
    hidden_act: str = "silu"
    long_inv_freq: torch.Tensor | None = None
    original_max: int = 0
    hf_config: object = field(default=None, repr=False)
    # Per layer: the sliding window its attention applies, None for attention over everything.
    layer_windows: tuple[int | None, ...] = ()

    @property
    def kv_window(self) -> int | None:
        """When every layer slides: the most tokens back from a query that any layer reads, so
        blocks further back can be freed. None when some layer attends to the whole context."""
        if not self.layer_windows or None in self.layer_windows:
            return None
        return max(self.layer_windows)

    @classmethod
    def from_hf(cls, hf_config, source: str) -> "ModelConfig":
        """Translate a transformers config; a field we cannot honour is an error naming it."""

        def unsupported(name: str, value, why: str) -> ValueError:
            return ValueError(f"{source}: config field {name}={value!r} is not supported: {why}")

        architecture = registry.architecture_of(
            getattr(hf_config, "architectures", None), getattr(hf_config, "model_type", None), source
        )
        act = getattr(hf_config, "hidden_activation", None) or getattr(hf_config, "hidden_act", None) or "silu"
        if act not in ACTIVATIONS:
            raise unsupported("hidden_act", act, f"implemented are {sorted(ACTIVATIONS)}")
        if getattr(hf_config, "pretraining_tp", 1) not in (1, None):
            raise unsupported("pretraining_tp", hf_config.pretraining_tp, "only 1 is implemented")
        num_heads = hf_config.num_attention_heads
        num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
        if num_heads % num_kv_heads:
            raise unsupported("num_key_value_heads", num_kv_heads, f"must divide num_attention_heads ({num_heads})")
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        try:
            rope = rope_spec(hf_config, head_dim)
        except ValueError as e:
            raise unsupported("rope_parameters", rope_parameters(hf_config), str(e)) from None

        eos = getattr(hf_config, "eos_token_id", None)
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        sliding_window = getattr(hf_config, "sliding_window", None)
        model_type = hf_config.model_type
        if not getattr(hf_config, "use_sliding_window", True):  # Qwen2/3 name a window they do not use
            sliding_window = None
        layer_windows = [sliding_window] * hf_config.num_hidden_layers  # Mistral, Mixtral, Phi-3: every layer
        if sliding_window is not None and getattr(hf_config, "layer_types", None):
            # Gemma 2/3, Qwen2/3 (layers from max_window_layers on), SmolLM3: some layers only.
            layer_windows = [sliding_window if t == "sliding_attention" else None for t in hf_config.layer_types]
        # Qwen2 has a bias on q/k/v but not on o_proj; Llama's attention_bias covers all four.
        qwen2 = model_type in ("qwen2", "qwen2_moe")
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=hf_config.rms_norm_eps,
            max_position_embeddings=hf_config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            attention_bias=qwen2 or attention_bias,
            o_proj_bias=not qwen2 and attention_bias,
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            inv_freq=rope.inv_freq,
            rope_attention_scaling=rope.rope_attention_scaling,
            eos_token_ids=eos_ids,
            sliding_window=sliding_window,
            architecture=architecture,
            hidden_act=act,
            long_inv_freq=rope.long_inv_freq,
            original_max=rope.original_max,
            hf_config=hf_config,
            layer_windows=tuple(layer_windows),
        )

    def split_dims(self) -> dict[str, int]:
        """Config sizes every tensor-parallel rank takes an equal part of."""
        dims = {"num_attention_heads": self.num_heads, "intermediate_size": self.intermediate_size}
        for name in ("moe_intermediate_size", "shared_expert_intermediate_size"):
            if getattr(self.hf_config, name, None):
                dims[name] = getattr(self.hf_config, name)
        return dims

    def check_tensor_parallel(self, size: int) -> None:
        check_tensor_parallel(self.split_dims(), self.num_kv_heads, size)
