"""Tiny random checkpoints of any family transformers knows, and the greedy scenarios every
family's test runs against transformers' generate."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from tests.helpers import DEFAULT_TINY_CONFIG, _reinitialize, default_tokenizer, default_tokenizer_dir, written_once


def make_tiny_checkpoint(tmp_path: str | os.PathLike, config_class: str, *, seed: int = 0, init_std: float = 0.2,
                         name: str | None = None, **config_overrides) -> str:
    """Like helpers.make_tiny_llama for any transformers config class (by name, e.g.
    "Qwen3Config"): float32, every parameter re-drawn from a seeded generator (see helpers), the
    default tokenizer beside it (written once per process, as helpers.written_once says)."""
    directory = Path(tmp_path) / (name or config_class)
    key = repr(("make_tiny_checkpoint", config_class, seed, init_std, sorted(config_overrides.items())))
    return written_once(key, directory, lambda out: _write_tiny_checkpoint(out, config_class, seed, init_std, config_overrides))


def _write_tiny_checkpoint(directory: Path, config_class: str, seed: int, init_std: float, config_overrides: dict) -> None:
    import transformers
    from transformers import AutoModelForCausalLM

    tokenizer = default_tokenizer()
    settings = dict(DEFAULT_TINY_CONFIG)
    settings.update(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=init_std,
    )
    settings.update(config_overrides)
    config = getattr(transformers, config_class)(**settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _reinitialize(model, seed, init_std)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    for file in Path(default_tokenizer_dir()).iterdir():
        shutil.copy(file, directory / file.name)
