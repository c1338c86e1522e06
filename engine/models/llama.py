"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) over a flat, unpadded token batch.

Plain PyTorch in the manner of gpt-fast. q/k/v and gate/up are fused into one matmul each,
since on CPU one large matmul beats three small ones. Attention reads and writes the paged
KV cache through an AttentionBackend.

Tensor parallel (given a ParallelState): q/k/v and gate/up are column-parallel (each rank holds
its heads and MLP columns, sliced per projection before fusing), o and down are row-parallel
(partial sums all-reduced), the embedding and LM head are split by vocabulary rows. Each rank
loads only its slices. Without one, the model is exactly the single-process one: no collectives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionBackend, AttentionMetadata
from engine.distributed import ParallelState, ShardLayout
from engine.loader import weight_shape

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


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
    attention_bias: bool
    o_proj_bias: bool
    mlp_bias: bool
    inv_freq: torch.Tensor  # RoPE inverse frequencies, scaling applied
    rope_attention_scaling: float
    eos_token_ids: list[int]
    sliding_window: int | None

    @classmethod
    def from_hf(cls, hf_config, source: str) -> "ModelConfig":
        """Translate a transformers config; a field we cannot honour is an error naming it."""

        def unsupported(field: str, value, why: str) -> ValueError:
            return ValueError(f"{source}: config field {field}={value!r} is not supported: {why}")

        model_type = getattr(hf_config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise unsupported("model_type", model_type, f"supported are {SUPPORTED_MODEL_TYPES}")
        act = getattr(hf_config, "hidden_act", "silu")
        if act != "silu":
            raise unsupported("hidden_act", act, "only silu (SwiGLU) is implemented")
        if getattr(hf_config, "pretraining_tp", 1) not in (1, None):
            raise unsupported("pretraining_tp", hf_config.pretraining_tp, "only 1 is implemented")
        rope = _rope_parameters(hf_config)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise unsupported("rope_scaling", rope, f"rope types {SUPPORTED_ROPE_TYPES} are implemented")
        inv_freq, attention_scaling = _rope_inv_freq(hf_config, rope_type)

        num_heads = hf_config.num_attention_heads
        num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
        if num_heads % num_kv_heads:
            raise unsupported("num_key_value_heads", num_kv_heads, f"must divide num_attention_heads ({num_heads})")
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads

        eos = getattr(hf_config, "eos_token_id", None)
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        sliding_window = getattr(hf_config, "sliding_window", None)
        if model_type == "qwen2" and not getattr(hf_config, "use_sliding_window", False):
            sliding_window = None
        qwen = model_type == "qwen2"
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
            # Qwen2 has a bias on q/k/v but not on o_proj; Llama's attention_bias covers all four.
            attention_bias=True if qwen else bool(getattr(hf_config, "attention_bias", False)),
            o_proj_bias=False if qwen else bool(getattr(hf_config, "attention_bias", False)),
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            inv_freq=inv_freq,
            rope_attention_scaling=attention_scaling,
            eos_token_ids=eos_ids,
            sliding_window=sliding_window,
        )

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.finfo(dtype).bits // 8


def _rope_parameters(hf_config) -> dict:
    # transformers 5 keeps rope_theta and scaling in rope_parameters; older configs in rope_scaling.
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    return dict(params)


def _rope_inv_freq(hf_config, rope_type: str) -> tuple[torch.Tensor, float]:
    # transformers' own RoPE initialisers, so frequencies (llama3 scaling included) match the reference.
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type == "default":
        params = _rope_parameters(hf_config)
        base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, ops, residual: torch.Tensor | None = None) -> torch.Tensor:
        """In float32 whatever the model's dtype (the weight stays float32: keep_norms_in_float32).
        With a residual: residual += x in place first, and the norm is of the sum (one fused op
        in the CPU backend). ops is the attention backend's op module."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.add_rms_norm(residual, x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int):
        super().__init__()
        positions = torch.arange(max_positions, dtype=torch.float, device=config.inv_freq.device)
        freqs = positions[:, None] * config.inv_freq[None, :]
        # Full-width tables, sin signed for the first half: rotation is x * cos + roll(x) * sin.
        cos, sin = freqs.cos() * config.rope_attention_scaling, freqs.sin() * config.rope_attention_scaling
        self.register_buffer("cos", torch.cat((cos, cos), dim=-1), persistent=False)
        self.register_buffer("sin", torch.cat((-sin, sin), dim=-1), persistent=False)

    def table(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at this step's positions, looked up once and shared by every layer; in
        the model's dtype, as transformers rotates (computed in float32, rounded once)."""
        return self.cos[positions][:, None, :].to(dtype), self.sin[positions][:, None, :].to(dtype)


class Linear(nn.Linear):
    """nn.Linear that on CPU can also hold its weight packed, once at load, into oneDNN's
    blocked layout (pack_for_cpu). Measured on a 2-core AVX-512 Xeon, float32: matmuls of 4-200
    rows (decode batches) run 1.2-2x faster through the packed weight than through F.linear's
    BLAS call, but 1-3 rows (a lone decode) run up to 2x slower; so both copies are kept and the
    row count picks one. bfloat16 runs about 2x faster packed at any row count, 1 included."""

    packed_weight: torch.Tensor | None = None
    min_packed_rows = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x, self.bias)

    def project(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.packed_weight is None or x.shape[0] < self.min_packed_rows:
            return F.linear(x, self.weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, bias, "none", [], "")

    def pack_for_cpu(self) -> None:
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)
        self.min_packed_rows = 4 if self.weight.dtype == torch.float32 else 1


def can_pack_for_cpu(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class RowParallelLinear(Linear):
    """Input features split across ranks: each computes a partial product, an all-reduce sums
    them, and the bias (whole on every rank) is added once, after the sum."""

    def __init__(self, in_features: int, out_features: int, bias: bool, parallel: ParallelState):
        super().__init__(in_features, out_features, bias=bias)
        self.parallel = parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.parallel.all_reduce(self.project(x, None))
        return y if self.bias is None else y + self.bias


def _row_linear(in_features: int, out_features: int, bias: bool, parallel: ParallelState | None) -> Linear:
    if parallel is None:
        return Linear(in_features, out_features, bias=bias)
    return RowParallelLinear(in_features, out_features, bias, parallel)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, shard: ShardLayout, parallel: ParallelState | None):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = shard.num_heads
        self.num_kv_heads = shard.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * config.head_dim
        self.kv_size = self.num_kv_heads * config.head_dim
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = _row_linear(self.q_size, config.hidden_size, config.o_proj_bias, parallel)
        self.scale = self.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        backend: AttentionBackend,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        # q and k rotate together, in place in the fused projection's output.
        qk = qkv[:, : self.q_size + self.kv_size].view(-1, self.num_heads + self.num_kv_heads, self.head_dim)
        backend.ops.rotary_embedding_(qk, *rope)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.q_size + self.kv_size :].view(-1, self.num_kv_heads, self.head_dim)
        out = backend.forward(self.layer_idx, q, k, v, meta, self.scale)
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, shard: ShardLayout, parallel: ParallelState | None):
        super().__init__()
        self.intermediate_size = shard.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * self.intermediate_size, bias=config.mlp_bias)
        self.down_proj = _row_linear(self.intermediate_size, config.hidden_size, config.mlp_bias, parallel)

    def forward(self, x: torch.Tensor, ops) -> torch.Tensor:
        return self.down_proj(ops.silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, shard: ShardLayout, parallel: ParallelState | None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx, shard, parallel)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, shard, parallel)

    def forward(self, x, residual, rope, backend, meta) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, the residual stream before it is added): the add
        happens in the next norm, fused with it (vLLM's layout)."""
        ops = backend.ops
        if residual is None:  # the first layer: the embeddings are the residual stream
            residual, h = x, self.input_layernorm(x, ops)
        else:
            h = self.input_layernorm(x, ops, residual)
        h = self.post_attention_layernorm(self.self_attn(h, rope, backend, meta), ops, residual)
        return self.mlp(h, ops), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int, parallel: ParallelState | None = None):
        super().__init__()
        self.config = config
        self.parallel = parallel
        self.shard = (
            ShardLayout.of(config) if parallel is None else ShardLayout.of(config, parallel.rank, parallel.world_size)
        )
        # Vocabulary rows [vocab_start, vocab_start + vocab_rows) on this rank; the last rank's
        # rows past vocab_size are padding, zero in both the embedding and the LM head.
        self.embed_tokens = nn.Embedding(self.shard.vocab_rows, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, self.shard, parallel) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, self.shard.vocab_rows, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(config, max_positions)

    @torch.inference_mode()
    def forward(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        backend: AttentionBackend,
        meta: AttentionMetadata,
        logits_indices: torch.Tensor,
    ) -> torch.Tensor:
        """Logits (float32) for the tokens at logits_indices only: the LM head is the largest
        matmul of a small model, so prefill positions that sample nothing skip it. Tensor
        parallel: rank 0 gets the full vocabulary's logits, the other ranks None."""
        x = self._embed(token_ids)
        rope = self.rotary.table(positions, x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, rope, backend, meta)
        x = self.norm(x[logits_indices], backend.ops, residual[logits_indices])
        logits = self.lm_head(x).float()
        if self.parallel is None:
            return logits
        logits = self.parallel.gather_to_first(logits)
        return None if logits is None else logits[:, : self.config.vocab_size]

    def keep_norms_in_float32(self) -> None:
        """After a cast to a half dtype: norm weights are tiny and the norms run in float32, so
        keeping them there saves a conversion per norm and step."""
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.weight.data = module.weight.data.float()

    def pack_linear_weights_for_cpu(self) -> None:
        """After loading: every projection and the LM head also get a oneDNN-packed copy."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack_for_cpu()

    def _embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.parallel is None:
            return self.embed_tokens(token_ids)
        # Each rank embeds the ids in its rows (zeros for the rest); the all-reduce fills them in.
        local = token_ids - self.shard.vocab_start
        mine = (local >= 0) & (local < self.shard.vocab_rows)
        x = self.embed_tokens(local.clamp(0, self.shard.vocab_rows - 1)) * mine[:, None].to(self.embed_tokens.weight.dtype)
        return self.parallel.all_reduce(x)

    def load_weights(self, weights: Iterable[tuple[str, object]], source: str) -> None:
        """Copy Hugging Face-named weights in, fusing q/k/v and gate/up; every parameter must be
        covered exactly once. A weight is a tensor or a lazy slice (loader.iter_weight_slices);
        tensor parallel, only this rank's rows or columns of it are read."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        fused = {
            "q_proj": ("qkv_proj", 0),
            "k_proj": ("qkv_proj", 1),
            "v_proj": ("qkv_proj", 2),
            "gate_proj": ("gate_up_proj", 0),
            "up_proj": ("gate_up_proj", 1),
        }
        c, sh = self.config, self.shard
        q, kv, inter = sh.num_heads * c.head_dim, sh.num_kv_heads * c.head_dim, sh.intermediate_size
        offsets = {"qkv_proj": [(0, q), (q, kv), (q + kv, kv)], "gate_up_proj": [(0, inter), (inter, inter)]}
        # HF projection -> (dim split across ranks, this rank's start, its size, full size).
        real_vocab_rows = max(0, min(sh.vocab_rows, c.vocab_size - sh.vocab_start))
        splits = {
            "q_proj": (0, sh.rank * q, q, c.num_heads * c.head_dim),
            "k_proj": (0, sh.kv_head_start * c.head_dim, kv, c.num_kv_heads * c.head_dim),
            "v_proj": (0, sh.kv_head_start * c.head_dim, kv, c.num_kv_heads * c.head_dim),
            "gate_proj": (0, sh.rank * inter, inter, c.intermediate_size),
            "up_proj": (0, sh.rank * inter, inter, c.intermediate_size),
            "o_proj.weight": (1, sh.rank * q, q, c.num_heads * c.head_dim),
            "down_proj.weight": (1, sh.rank * inter, inter, c.intermediate_size),
            "embed_tokens": (0, sh.vocab_start, real_vocab_rows, c.vocab_size),
            "lm_head": (0, sh.vocab_start, real_vocab_rows, c.vocab_size),
        }
        for name in ("embed_tokens.weight", "lm_head.weight"):
            if name in params:  # a tied lm_head is the embedding
                params[name].data[real_vocab_rows:].zero_()  # padding rows of the last rank

        def split_of(name: str):
            parts = name.split(".")
            if parts[0] in ("embed_tokens", "lm_head"):
                return splits[parts[0]]
            if len(parts) >= 2 and parts[-2] in ("o_proj", "down_proj"):
                return splits.get(f"{parts[-2]}.{parts[-1]}")  # their bias is whole on every rank
            return splits.get(parts[-2]) if len(parts) >= 2 else None

        for hf_name, weight in weights:
            name = hf_name.removeprefix("model.")
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and c.tie_word_embeddings:
                continue
            split = split_of(name)
            part = None
            for old, (new, index) in fused.items():
                if f".{old}." in name:
                    name, part = name.replace(f".{old}.", f".{new}."), index
                    break
            param = params.get(name)
            if param is None:
                raise ValueError(f"{source}: unexpected weight {hf_name!r} for a {c.model_type} model")
            target = param.data
            key = name
            if part is not None:
                start, size = offsets[name.split(".")[-2]][part]
                target = target.narrow(0, start, size)
                key = f"{name}#{part}"
            shape = weight_shape(weight)
            expected = list(target.shape)
            if split is not None:
                dim, start, size, full = split
                expected[dim] = full
                if name.split(".")[0] in ("embed_tokens", "lm_head"):
                    target = target.narrow(0, 0, size)
            if tuple(shape) != tuple(expected):
                raise ValueError(
                    f"{source}: weight {hf_name!r} has shape {tuple(shape)}, the config implies {tuple(expected)}"
                )
            if split is not None and (self.parallel is not None or not isinstance(weight, torch.Tensor)):
                weight = weight[start : start + size] if dim == 0 else weight[:, start : start + size]
            elif not isinstance(weight, torch.Tensor):
                weight = weight[:]
            target.copy_(weight)
            loaded.add(key)
        expected_keys = set()
        for name in params:
            if name.endswith("qkv_proj.weight") or name.endswith("qkv_proj.bias"):
                expected_keys.update(f"{name}#{i}" for i in range(3))
            elif "gate_up_proj." in name:
                expected_keys.update(f"{name}#{i}" for i in range(2))
            else:
                expected_keys.add(name)
        if c.tie_word_embeddings:
            expected_keys.discard("lm_head.weight")
        missing = sorted(expected_keys - loaded)
        if missing:
            raise ValueError(f"{source}: missing weights {missing[:5]}{' ...' if len(missing) > 5 else ''}")
