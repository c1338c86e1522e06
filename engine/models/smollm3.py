"""SmolLM3: Llama with the rotary embedding left out of some layers (no_rope_layers[i] == 0)."""

from __future__ import annotations

from engine.models.config import ModelConfig
from engine.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from engine.parallel_state import ParallelState


class SmolLM3Attention(LlamaAttention):
    def __init__(self, config: ModelConfig, layer_idx: int, parallel: ParallelState | None):
        super().__init__(config, layer_idx, parallel)
        no_rope = getattr(config.hf_config, "no_rope_layers", None)
        self.use_rope = bool(no_rope[layer_idx]) if no_rope else True


class SmolLM3DecoderLayer(LlamaDecoderLayer):
    attention_class = SmolLM3Attention


class SmolLM3ForCausalLM(LlamaForCausalLM):
    layer_class = SmolLM3DecoderLayer
