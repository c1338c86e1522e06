"""Every supported model: a Hugging Face `architectures` name -> the class implementing it.

The only list of what is supported: the loader checks a checkpoint against it before reading
any weight, the GGUF path maps a file's model_type through it, the runner builds the class it
names, and the error for an unsupported model lists it. Adding a family is a file under
engine/models/ and a line here.
"""

from __future__ import annotations

import importlib

# architecture -> (module under engine.models, class, transformers model_type)
_MODELS = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM", "llama"),
    "MistralForCausalLM": ("llama", "LlamaForCausalLM", "mistral"),
    "Qwen2ForCausalLM": ("llama", "LlamaForCausalLM", "qwen2"),
    # Phi-3/3.5/4: fused qkv_proj and gate_up_proj load as they are; longrope is a rope type.
    "Phi3ForCausalLM": ("llama", "LlamaForCausalLM", "phi3"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM", "qwen3"),
    "GraniteForCausalLM": ("granite", "GraniteForCausalLM", "granite"),
    "SmolLM3ForCausalLM": ("smollm3", "SmolLM3ForCausalLM", "smollm3"),
    "MixtralForCausalLM": ("mixtral", "MixtralForCausalLM", "mixtral"),
    "Qwen2MoeForCausalLM": ("qwen2_moe", "Qwen2MoeForCausalLM", "qwen2_moe"),
    "Qwen3MoeForCausalLM": ("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3_moe"),
    "Gemma2ForCausalLM": ("gemma", "Gemma2ForCausalLM", "gemma2"),
    "Gemma3ForCausalLM": ("gemma", "Gemma3ForCausalLM", "gemma3_text"),
}


class UnsupportedModelError(ValueError):
    """The checkpoint names an architecture no engine.models file implements."""


def supported_architectures() -> list[str]:
    return list(_MODELS)


def architecture_for_model_type(model_type: str | None) -> str | None:
    return next((arch for arch, (_, _, mt) in _MODELS.items() if mt == model_type), None)


def architecture_of(architectures, model_type: str | None, where: str) -> str:
    """The supported architecture a config names (architectures[0], or model_type where a config
    leaves architectures out), or UnsupportedModelError listing the supported ones."""
    if architectures:
        arch = architectures[0] if isinstance(architectures, list) and architectures[0] in _MODELS else None
    else:
        arch = architecture_for_model_type(model_type)
    if arch is None:
        raise UnsupportedModelError(
            f"{where}: unsupported model, architectures={architectures!r} (model_type={model_type!r}); "
            f"supported: {', '.join(_MODELS)}"
        )
    return arch


def model_class(architecture: str):
    module, name, _ = _MODELS[architecture]
    return getattr(importlib.import_module(f"engine.models.{module}"), name)
