"""Reading a model's files: safetensors headers (checked for truncation), shard indexes,
tokenizers, JSON, and writing a converted GGUF's cache entry. Every error is a ModelLoadError
naming the file."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
# Every dtype a tensor in a checkpoint may have (buffers, masks), for reading it.
_SAFETENSORS_ALL_DTYPES = {
    **_SAFETENSORS_DTYPES,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}

class ModelLoadError(ValueError):
    """A model's files are missing, unreadable or unsupported. The message names the file."""

def open_safetensors(file: str):
    try:
        return safe_open(file, framework="pt")
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"{file}: cannot read this safetensors file ({e})") from e

def weight_files(directory: Path) -> list[Path]:
    index_path = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index_path.is_file():
        weight_map = read_json(index_path).get("weight_map")
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
    """Parameter name -> (dtype, shape) from a safetensors header, checking the file is complete."""
    return {k: (dtype, shape) for k, (dtype, shape, _) in safetensors_entries(path).items()}


def safetensors_entries(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...], tuple[int, int]]]:
    """Parameter name -> (dtype, shape, (first byte, end byte) in the file) from a safetensors
    header, checking the file is complete.

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
            data = 8 + header_len
            entries = {k: (v["dtype"], tuple(v["shape"]), (data + v["data_offsets"][0], data + v["data_offsets"][1]))
                       for k, v in header.items()}
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            raise ModelLoadError(f"{path}: corrupt safetensors header ({e})") from e
    data_end = max((end for _, _, (_, end) in entries.values()), default=0)
    if data_end > size:
        raise ModelLoadError(
            f"{path}: truncated safetensors file: its header describes {data_end} bytes, the file has {size}"
        )
    return entries


def read_safetensors(path: str | os.PathLike, on_read=None, lazy_above: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for each tensor of a safetensors file, by name, each read with plain file
    reads into a buffer of its own when it is taken; on_read() after each. A tensor of more than
    `lazy_above` bytes comes unread (a TensorInFile), for a consumer that reads it in parts.

    Not safetensors' reader: it maps the whole file, and every page a load touches stays in this
    process's resident set until the file is closed (a 5 GB shard: 5 GB of RSS on top of the
    weights being quantized). Here a tensor costs its own bytes, freed as soon as the consumer
    drops it (this generator keeps no reference); the file's pages stay in the page cache, which
    the kernel reclaims as it needs.
    """
    entries = safetensors_entries(path)
    try:
        with open(path, "rb", buffering=0) as f:
            for name in sorted(entries):
                dtype, shape, (begin, end) = entries[name]
                unread = lazy_above is not None and end - begin > lazy_above and len(shape) >= 2
                pending = [(name, TensorInFile(path, name, dtype, shape, (begin, end)) if unread
                            else _read_tensor(f, path, name, *entries[name]))]
                if on_read is not None:
                    on_read()
                yield pending.pop()  # popped, so this frame holds no reference while suspended
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read its tensors ({e})") from e


class TensorInFile:
    """A tensor of a safetensors file, read when indexed: [a:b] reads rows a..b, [:, a:b] all
    rows then those columns, [:] the whole tensor (what parallel_state.read_part/read_all take,
    like safetensors' own lazy slice, without mapping the file)."""

    def __init__(self, path, name: str, dtype_name: str, shape: tuple[int, ...], span: tuple[int, int]):
        self.path, self.name, self.dtype_name, self.shape = path, name, dtype_name, shape
        self.begin, self.row_bytes = span[0], (span[1] - span[0]) // shape[0]  # span: its bytes in the file

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, index) -> torch.Tensor:
        rows, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        start, stop, stride = rows.indices(self.shape[0])
        if stride != 1:
            raise ValueError(f"{self.name}: rows are read in one contiguous range, not with a step")
        stop = max(start, stop)
        span = (self.begin + start * self.row_bytes, self.begin + stop * self.row_bytes)
        try:
            with open(self.path, "rb", buffering=0) as f:
                part = _read_tensor(f, self.path, self.name, self.dtype_name, (stop - start, *self.shape[1:]), span)
        except OSError as e:
            raise ModelLoadError(f"{self.path}: cannot read {self.name!r} ({e})") from e
        return part[(slice(None), *rest)] if rest else part


def _read_tensor(f, path, name: str, dtype_name: str, shape: tuple[int, ...], span: tuple[int, int]) -> torch.Tensor:
    dtype = _SAFETENSORS_ALL_DTYPES.get(dtype_name)
    if dtype is None:
        raise ModelLoadError(f"{path}: tensor {name!r} has dtype {dtype_name}, which no supported model uses")
    tensor = torch.empty(shape, dtype=dtype)
    begin, end = span
    if tensor.numel() * tensor.element_size() != end - begin:
        raise ModelLoadError(f"{path}: corrupt safetensors header: {name!r} {dtype_name}{list(shape)} "
                             f"does not fill its {end - begin} bytes")
    buffer = memoryview(tensor.view(-1).view(torch.uint8).numpy())
    f.seek(begin)
    done = 0
    while done < len(buffer):  # one read returns at most ~2 GiB
        n = f.readinto(buffer[done:])
        if not n:
            raise ModelLoadError(f"{path}: truncated safetensors file: {name!r} ends past the end of the file")
        done += n
    return tensor


def checkpoint_dtype(headers: dict[str, dict[str, tuple[str, tuple[int, ...]]]]) -> torch.dtype | None:
    # Weighted by element count, so a few float32 norms in a bf16 checkpoint do not decide it.
    counts: Counter[str] = Counter()
    for header in headers.values():
        for dtype, shape in header.values():
            if dtype in _SAFETENSORS_DTYPES:
                counts[dtype] += int(torch.Size(shape).numel())
    return _SAFETENSORS_DTYPES[counts.most_common(1)[0][0]] if counts else None


def load_tokenizer(directory: Path, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
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


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data

class FlatModel:
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


def moe_sizes_from_gguf_tensors(hf_config: PretrainedConfig, tensors: dict[str, torch.Tensor]) -> None:
    """transformers' GGUF reader maps no GGUF key to moe_intermediate_size or
    shared_expert_intermediate_size and leaves their config defaults, so a file whose experts are
    not the default size (Qwen3-235B-A22B, Qwen2-57B-A14B) would not load: the sizes come from the
    tensors (its stacked experts.down_proj [E, H, I], shared_expert.down_proj [H, I])."""
    for name, tensor in tensors.items():
        if name.endswith(".experts.down_proj") and hasattr(hf_config, "moe_intermediate_size"):
            hf_config.moe_intermediate_size = tensor.shape[-1]
        elif name.endswith(".shared_expert.down_proj.weight") and hasattr(hf_config, "shared_expert_intermediate_size"):
            hf_config.shared_expert_intermediate_size = tensor.shape[-1]


def write_cache(
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
    _remove_conversions_of_an_older_file(cache_dir, gguf_path)


def _remove_conversions_of_an_older_file(cache_dir: Path, gguf_path: Path) -> None:
    """Cache entries of the same GGUF path whose size or mtime it no longer has can never be read
    again (the key carries both): each is a whole float32 copy (517 MB for the default model).
    Entries of the same file under another transformers version or cache format stay: another
    installation may be reading them."""
    stat, source = gguf_path.stat(), str(gguf_path.resolve())
    for entry in cache_dir.parent.glob(f"{gguf_path.stem}-*"):
        try:
            recorded = json.loads((entry / "bento_llm_source.json").read_text())
        except (OSError, ValueError):
            continue  # not an entry (a temporary directory being written), or not ours to judge
        if entry != cache_dir and recorded.get("gguf") == source and (
                recorded.get("size"), recorded.get("mtime_ns")) != (stat.st_size, stat.st_mtime_ns):
            logger.info("%s: removing the conversion of an older version of %s", entry, gguf_path)
            shutil.rmtree(entry, ignore_errors=True)
