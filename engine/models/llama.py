"""Llama-family decoders: Llama 2/3, SmolLM2, Mistral, Qwen2 (q/k/v biases), and the parts other
families reuse (attention with fused q/k/v and rotary, the gated MLP, the pre-norm layer).

Tensor parallel: q/k/v and gate/up are column-parallel (each rank holds its heads and MLP
columns), o and down are row-parallel (partial sums all-reduced), the embedding and LM head are
split by vocabulary rows. Without a ParallelState the model is the single-process one.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.forward_context import get_forward_context
from engine.layers.activation import SiluAndMul, gated_activation
from engine.layers.attention import Attention
from engine.layers.linear import ColumnParallelLinear, Linear, RowParallelLinear
from engine.layers.linear_kernels import amx_linear_ops
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RopeTable, RotaryEmbedding
from engine.layers.step_module import StepModule
from engine.models.base import CausalLM
from engine.models.config import ModelConfig
from engine.parallel_state import ParallelState, rank_and_size

__all__ = ["LlamaForCausalLM", "ModelConfig", "RotaryEmbedding"]


class LlamaAttention(StepModule):
    def __init__(self, config: ModelConfig, layer_idx: int, parallel: ParallelState | None):
        super().__init__()
        rank, size = rank_and_size(parallel)
        c = config
        self.qkv_proj = ColumnParallelLinear.qkv(
            c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads, c.attention_bias, parallel
        )
        self.num_heads = c.num_heads // size
        self.num_kv_heads = self.qkv_proj.blocks[1].rows // c.head_dim
        self.head_dim = c.head_dim
        self.q_size, self.kv_size = self.num_heads * c.head_dim, self.num_kv_heads * c.head_dim
        self.o_proj = RowParallelLinear(c.num_heads * c.head_dim, c.hidden_size, c.o_proj_bias, parallel)
        window = c.layer_windows[layer_idx] if c.layer_windows else None
        self.attn = Attention(layer_idx, self.num_heads, self.num_kv_heads, c.head_dim, self.scale(config), window)

    def scale(self, config: ModelConfig) -> float:
        return config.head_dim**-0.5

    def qk_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the fused projection's q and k heads [tokens, heads, head_dim]."""
        qk = qkv[:, : self.q_size + self.kv_size].view(-1, self.num_heads + self.num_kv_heads, self.head_dim)
        return qk[:, : self.num_heads], qk[:, self.num_heads :]

    use_rope = True
    norms_qk = False  # True where the family has per-head q_norm and k_norm (Qwen3, Gemma 3)

    def norm_qk_(self, qkv: torch.Tensor) -> None:
        """The query and key heads normalized before the rotation, in place in the fused projection."""
        q, k = self.qk_heads(qkv)
        q.copy_(self.q_norm(q))
        k.copy_(self.k_norm(k))

    def forward(self, x: torch.Tensor, rope: RopeTable) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        if self.norms_qk:
            self.norm_qk_(qkv)
        return self.o_proj(self.attn(qkv, rope if self.use_rope else None))


def silu_mlp_fused_rows(gate_up: Linear, down: Linear) -> int:
    """Rows up to which a SwiGLU MLP of these projections runs as one AMX op (amx_silu_mlp in
    kernels/csrc/amx_linear.cpp: one parallel region for gate/up, the activation and down, where
    the three calls took two): both weights in column strips on an AMX CPU, no biases, down not
    split over ranks, bfloat16 (float32 strips are f32_linear's). 0 where it cannot."""
    fusable = (gate_up.strips and down.strips and gate_up.packed_weight.dtype == torch.bfloat16
               and gate_up.bias is None and down.bias is None
               and getattr(down, "parallel", None) is None and amx_linear_ops() is not None)
    # Asked only then: strips mean the kernels are built; a float32 model must not build them here.
    return amx_linear_ops().amx_silu_mlp_max_rows() if fusable else 0


class GatedMLP(StepModule):
    # Rows up to which the MLP is one fused op (silu_mlp_fused_rows); None until the first forward,
    # which runs after the weights took their layout.
    fused_rows: int | None = None

    def __init__(self, hidden_size: int, intermediate_size: int, act: str, bias: bool, parallel: ParallelState | None):
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear.split(hidden_size, [intermediate_size] * 2, bias, parallel)
        self.act = gated_activation(act)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias, parallel)

    def amx_fused_rows(self) -> int:
        if self.fused_rows is None:
            self.fused_rows = silu_mlp_fused_rows(self.gate_up_proj, self.down_proj) if isinstance(self.act, SiluAndMul) else 0
        return self.fused_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= self.amx_fused_rows():
            return amx_linear_ops().amx_silu_mlp(x if x.stride(-1) == 1 else x.contiguous(),
                                                 self.gate_up_proj.packed_weight, self.down_proj.packed_weight,
                                                 self.down_proj.out_features)
        return self.down_proj(self.act(self.gate_up_proj(x)))


# Input rows up to which a decoder layer may run as one backend op (decoder_layer, kernels/csrc/
# step_ops.cpp): decode batches, where the Python-level calls cost as much as the kernels between the
# projections; a plan (the ops and arguments) is kept per row count, so their number is bounded.
LAYER_OP_MAX_ROWS = 64


def layer_op_plan(layer: "LlamaDecoderLayer", rows: int, rope: RopeTable | None) -> tuple | None:
    """(the layer's cache index, decoder_layer's arguments after the step's: norm weights, eps, the
    projections' ops and arguments, heads, scale, window, soft cap) where the layer is the plain
    Llama one (no q/k norms, full-width rotary, a SwiGLU MLP not fused on AMX) and each projection
    is one registered op at `rows` rows (Linear.kernel_call); else None: its Python path."""
    attn, mlp, norms = layer.self_attn, layer.mlp, (layer.input_layernorm, layer.post_attention_layernorm)
    if (type(attn).forward is not LlamaAttention.forward or attn.norms_qk or not attn.use_rope or rope is None
            or rope.cos.shape[-1] != attn.head_dim or type(attn.attn) is not Attention
            or type(mlp) is not GatedMLP or type(mlp.act) is not SiluAndMul
            or any(type(n) is not RMSNorm for n in norms) or norms[0].eps != norms[1].eps):
        return None
    calls = [p.kernel_call(rows) for p in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
    if rows <= mlp.amx_fused_rows() or None in calls:
        return None
    op = attn.attn
    return op.layer_idx, (norms[0].weight, norms[1].weight, norms[0].eps, [c[0] for c in calls],
                          [t for c in calls for t in c[1]], [i for c in calls for i in c[2]], op.num_heads, op.scale,
                          op.sliding_window, op.soft_cap)


class LlamaDecoderLayer(nn.Module):
    attention_class = LlamaAttention
    # Whether decode batches run the layer as one decoder_layer op where it can (layer_op_plan);
    # bench/profile_step.py --ab-layer-op switches it off to compare.
    layer_op = True
    # Whether such a step runs all the layers as one DecoderStack call where every layer has a plan
    # (decoder_stack); --ab-layer-op compares it with one op per layer.
    layer_stack = True

    def __init__(self, config: ModelConfig, layer_idx: int, parallel: ParallelState | None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = self.attention_class(config, layer_idx, parallel)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = self.make_mlp(config, layer_idx, parallel)

    def make_mlp(self, config: ModelConfig, layer_idx: int, parallel: ParallelState | None) -> nn.Module:
        return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, config.mlp_bias, parallel)

    def forward(self, x, residual, rope) -> tuple[torch.Tensor, torch.Tensor]:
        rows = x.shape[0]
        if self.layer_op and rows <= LAYER_OP_MAX_ROWS:
            ctx = get_forward_context()
            backend = ctx.backend
            plan = self.op_plan(rows, rope, backend)
            if plan is not None:
                meta, i = ctx.meta, plan[0]
                if residual is None:  # the first layer: the embeddings are the residual stream
                    residual, x = x, None
                # The op's overload, not its packet: the packet's Python-level call cost ~0.8 us more a layer.
                return backend.ops.decoder_layer.default(
                    residual, x, rope.cos, rope.sin, backend.k_caches[i], backend.v_caches[i], meta.slot_mapping,
                    meta.block_tables, meta.context_lens, None if meta.all_decode else meta.cu_query_lens, *plan[1],
                ), residual
        if residual is None:  # the first layer: the embeddings are the residual stream
            residual, h = x, self.input_layernorm(x)
        else:
            h = self.input_layernorm(x, residual)
        h = self.post_attention_layernorm(self.self_attn(h, rope), residual)
        return self.mlp(h), residual

    def op_plan(self, rows: int, rope: RopeTable, backend) -> tuple | None:
        """This layer's layer_op_plan at `rows` rows, kept (forget_layer_op_plans drops it)."""
        plans = self.__dict__.setdefault("layer_op_plans", {})
        plan = plans.get(rows, False)
        if plan is False:
            plan = plans[rows] = layer_op_plan(self, rows, rope) if backend.name == "cpu" else None
        return plan


def build_decoder_stack(layers: nn.ModuleList, rows: int, rope: RopeTable) -> tuple | None:
    """(a DecoderStack of every layer's plan at `rows` rows on the backend's KV caches, the layers'
    forward hook dicts) where every layer is a LlamaDecoderLayer (its forward, not a
    family's own) with a plan; else None."""
    backend = get_forward_context().backend
    if backend.name != "cpu" or any(type(layer).forward is not LlamaDecoderLayer.forward or "forward" in layer.__dict__
                                      for layer in layers):
        return None
    plans = [layer.op_plan(rows, rope, backend) for layer in layers]
    if None in plans:
        return None
    stack = torch.classes.bento_llm.DecoderStack()
    for cache_index, args in plans:
        stack.add_layer(cache_index, *args)
    stack.set_caches(backend.k_caches, backend.v_caches)
    hooks = [d for layer in layers for d in (layer._forward_hooks, layer._forward_pre_hooks)]
    return stack, hooks + [nn.modules.module._global_forward_hooks, nn.modules.module._global_forward_pre_hooks]


class DecoderStacks(dict):
    """A model's DecoderStacks by row count (None: no stack at that count), all on one backend's KV
    caches: a forward on another backend (a test's, a profiling run's) replaces them all, so no
    stack writes to, or keeps alive, caches its forward does not use."""

    def __init__(self, backend):
        super().__init__()
        self.backend = backend


def decoder_stack(model: nn.Module, rows: int, rope: RopeTable):
    """The model's DecoderStack for a step of `rows` rows on this forward's backend (built once per
    row count and backend, kept in the model's __dict__ until forget_layer_op_plans), or None: the
    per-layer path, also while any layer has a forward hook (bench/profile_step.py's per-layer
    attribution)."""
    if not (LlamaDecoderLayer.layer_op and LlamaDecoderLayer.layer_stack) or rows > LAYER_OP_MAX_ROWS:
        return None
    backend = get_forward_context().backend
    stacks = model.__dict__.get("layer_op_plans")
    if stacks is None or stacks.backend is not backend:
        stacks = model.__dict__["layer_op_plans"] = DecoderStacks(backend)
    entry = stacks.get(rows, False)
    if entry is False:
        entry = stacks[rows] = build_decoder_stack(model.layers, rows, rope)
    return None if entry is None or any(entry[1]) else entry[0]


def forget_layer_op_plans(model: nn.Module) -> None:
    """Drop the decoder layers' kept decoder_layer plans and the model's DecoderStacks (the same
    __dict__ key): after a projection's weight or kernel changes, the next step builds them again."""
    for module in model.modules():
        module.__dict__.pop("layer_op_plans", None)


class LlamaForCausalLM(CausalLM):
    layer_class = LlamaDecoderLayer

    def make_layer(self, layer_idx: int) -> nn.Module:
        return self.layer_class(self.config, layer_idx, self.parallel)

    def run_layers(self, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
        """At decode batch sizes, every layer in one DecoderStack call where each has a plan (the
        same decoder_layer per layer, without the Python between them); else the layers one by one."""
        stack = decoder_stack(self, x.shape[0], rope)
        if stack is not None:
            ctx = get_forward_context()
            meta, backend = ctx.meta, ctx.backend
            if backend.name == "cpu":  # the stack runs the cpu backend's decoder_layer, on its caches
                return stack.run(x, rope.cos, rope.sin, meta.slot_mapping, meta.block_tables, meta.context_lens,
                                 None if meta.all_decode else meta.cu_query_lens)
        return super().run_layers(x, rope)
