"""What every decoder-only family shares: the embedding -> layers -> norm -> LM head loop over a
flat, unpadded token batch, loading Hugging Face-named weights into layers that take their own
shard, and the post-load steps (float32 norms, each projection's weight into its one layout).

A family subclasses CausalLM with its decoder layer; a layer returns (its output, the residual
stream before that output is added): the add happens in the next norm, fused with it (vLLM's
layout).
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Iterable

import torch
from torch import nn

from engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from engine.layers.linear import Linear, loader_of
from engine.layers.logits import LogitsProcessor
from engine.layers.moe import FusedMoE, expert_param
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding
from engine.models.config import ModelConfig
from engine.parallel_state import ParallelState, kv_head_range, rank_and_size

# (fused parameter part, Hugging Face part, shard id): q/k/v and gate/up load into one matmul each,
# since on CPU one large matmul beats several small ones.
FUSED_QKV_GATE_UP = (
    (".qkv_proj.", ".q_proj.", "q"),
    (".qkv_proj.", ".k_proj.", "k"),
    (".qkv_proj.", ".v_proj.", "v"),
    (".gate_up_proj.", ".gate_proj.", 0),
    (".gate_up_proj.", ".up_proj.", 1),
)


class CausalLM(nn.Module):
    stacked_params: tuple[tuple[str, str, object], ...] = FUSED_QKV_GATE_UP

    def __init__(self, config: ModelConfig, max_positions: int, parallel: ParallelState | None = None):
        super().__init__()
        self.config, self.max_positions, self.parallel = config, max_positions, parallel
        rank, size = rank_and_size(parallel)
        self.num_local_kv_heads = kv_head_range(config.num_kv_heads, rank, size)[1]
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, parallel)
        self.layers = nn.ModuleList(self.make_layer(i) for i in range(config.num_layers))
        self.norm = self.make_norm(config.hidden_size)
        self.lm_head = ParallelLMHead(self.embed_tokens, config.tie_word_embeddings)
        self.logits_processor = self.make_logits_processor()
        self.init_buffers()

    # ---- what a family defines ------------------------------------------------------------
    def make_layer(self, layer_idx: int) -> nn.Module:
        raise NotImplementedError

    def make_norm(self, dim: int) -> RMSNorm:
        return RMSNorm(dim, self.config.rms_norm_eps)

    def make_logits_processor(self) -> LogitsProcessor:
        return LogitsProcessor(self.config.vocab_size, self.parallel)

    def init_buffers(self, device: torch.device | None = None) -> None:
        """Non-weight tensors (rotary tables): built at construction, again on the real device."""
        self.rotary = RotaryEmbedding(self.config, self.max_positions)
        if device is not None:
            self.rotary = self.rotary.to(device)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(token_ids)

    # ---- the forward --------------------------------------------------------------------------
    def rope_tables(self, positions: torch.Tensor, dtype: torch.dtype):
        """What each decoder layer takes as `rope`: this step's rotary table."""
        return self.rotary.table(positions, dtype)

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, logits_indices: torch.Tensor | None) -> torch.Tensor | None:
        """Logits (in the dtype LogitsProcessor gives) for the tokens at logits_indices only: the
        LM head is the largest matmul of a small model, so prefill positions that sample nothing
        skip it. Runs inside the runner's forward_context. Tensor parallel: rank 0 gets the full
        vocabulary's logits, the other ranks None."""
        return self.compute_logits(self.hidden_states(token_ids, positions, logits_indices))

    def hidden_states(self, token_ids: torch.Tensor, positions: torch.Tensor,
                      logits_indices: torch.Tensor | None) -> torch.Tensor:
        """The final norm's output at logits_indices (None: every token, in order): what a
        CUDA graph of the decode step records (engine/cuda_graphs.py)."""
        x = self.embed(token_ids)
        rope = self.rope_tables(positions, x.dtype)
        x, residual = self.run_layers(x, rope)
        if logits_indices is not None:  # None: every token's row, in order (no gather)
            x, residual = x[logits_indices], residual[logits_indices]
        return self.norm(x, residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden)

    def run_layers(self, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder layers over the embeddings x: (the last layer's output, the residual stream
        before it is added)."""
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, rope)
        return x, residual

    # ---- after construction -----------------------------------------------------------------
    def keep_norms_in_float32(self) -> None:
        """After a cast to a half dtype: norm weights are tiny and the norms run in float32, so
        keeping them there saves a conversion per norm and step."""
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.weight.data = module.weight.data.float()

    def finalize_module(self, module: nn.Module, quantization: str | None, group_size: int, pack: bool,
                        embedding_quantization: str | None = None) -> None:
        """A loaded projection (or the embedding) into the one layout its matmul reads
        (quantized, oneDNN-packed, or float), once. Called as each module's last weight lands,
        so a quantized load holds one module's float weight at a time, not the whole model's."""
        layouts = self.__dict__.setdefault("layouts", {})
        if module in layouts:
            return
        if isinstance(module, VocabParallelEmbedding):
            layouts[module] = module.finalize(embedding_quantization, quantization, group_size)
        elif isinstance(module, ParallelLMHead):
            layouts[module] = module.finalize(embedding_quantization, group_size, pack, quantization)
        elif isinstance(module, Linear):
            layouts[module] = module.finalize(quantization, group_size, pack)
        elif isinstance(module, FusedMoE):
            layouts[module] = module.finalize()

    def quantize_experts_at_load(self, quantization: str | None, group_size: int, attention_backend: str) -> None:
        """Before loading: MoE experts are quantized as each one's tensors arrive (FusedMoE)."""
        for module in self.modules():
            if isinstance(module, FusedMoE):
                module.quantize_at_load(quantization, group_size, attention_backend)

    def finalize_weights(self, quantization: str | None, group_size: int, pack: bool,
                         embedding_quantization: str | None = None) -> Counter:
        """After loading: every module not finalized yet; how many took each layout."""
        for m in self.modules():
            self.finalize_module(m, quantization, group_size, pack, embedding_quantization)
        return Counter(self.__dict__["layouts"].values())

    def hf_to_param_name(self, hf_name: str) -> str | None:
        """The parameter a checkpoint tensor loads into (before fusing), or None to skip it."""
        if "rotary_emb.inv_freq" in hf_name:
            return None
        if hf_name == "lm_head.weight" and self.config.tie_word_embeddings:
            return None
        return hf_name.removeprefix("model.")

    def stacked_name(self, name: str) -> tuple[str, object]:
        """(parameter, shard id) a checkpoint tensor loads into: experts stack, q/k/v and gate/up fuse."""
        expert = expert_param(name)
        if expert is not None:
            return expert
        for fused, part, shard_id in self.stacked_params:
            if part in name:
                return name.replace(part, fused), shard_id
        return name, None

    def _loader(self, param_name: str):
        module_name, _, local = param_name.rpartition(".")
        return loader_of(self.get_submodule(module_name), local)

    def load_weights(self, weights: Iterable[tuple[str, object]], source: str,
                     on_module_loaded: Callable[[nn.Module], None] | None = None) -> None:
        """Copy Hugging Face-named weights in, each through its parameter's weight_loader (which
        reads only this rank's part of a lazy slice); every parameter must be covered exactly
        once. on_module_loaded(module) runs as soon as all of a module's own weights are in."""
        params = dict(self.named_parameters())
        expected = {(name, s) for name in params for s in self._loader(name)[1]}
        expected_by_module: dict[str, set[tuple[str, object]]] = {}
        for name, s in expected:
            expected_by_module.setdefault(name.rpartition(".")[0], set()).add((name, s))
        loaded: set[tuple[str, object]] = set()
        for hf_name, weight in weights:
            name = self.hf_to_param_name(hf_name)
            if name is None:
                continue
            name, shard_id = self.stacked_name(name)
            param = params.get(name)
            if param is None:
                raise ValueError(f"{source}: unexpected weight {hf_name!r} for a {self.config.model_type} model")
            loader, shard_ids = self._loader(name)
            try:
                loader(param, weight, shard_id)
            except ValueError as e:
                raise ValueError(f"{source}: weight {hf_name!r} {e}") from None
            del weight  # the checkpoint's copy is not held while the module is finalized below
            loaded.update((name, s) for s in (shard_ids if shard_id is None else (shard_id,)))
            module_name = name.rpartition(".")[0]
            if on_module_loaded is not None and expected_by_module[module_name] <= loaded:
                for done, _ in expected_by_module[module_name]:
                    params.pop(done, None)  # holding the Parameter would keep its float storage alive
                on_module_loaded(self.get_submodule(module_name))
        missing = sorted(f"{name}#{s}" if s is not None else name for name, s in expected - loaded)
        if missing:
            raise ValueError(f"{source}: missing weights {missing[:5]}{' ...' if len(missing) > 5 else ''}")
