"""Models named by their Hugging Face Hub id, fetched through huggingface_hub.

`org/name` (the `main` revision), `org/name@revision` (a branch, tag or commit) and
`org/name:file.gguf` (one GGUF file of a repository; `org/name:file.gguf@revision` too).
huggingface_hub does the rest the way every tool in the ecosystem does: its cache
(HF_HUB_CACHE, HF_HOME), HF_TOKEN for gated and private repositories, HF_HUB_OFFLINE, and a
progress bar per file. Only what the engine reads is downloaded: the config, the tokenizer
files and the safetensors weights (never .bin, .pth, ONNX or other formats' copies), or the
one GGUF file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from engine.model_files import ModelLoadError

# Hub repository names: letters, digits, '-', '_', '.'; one namespace.
_HUB_ID = re.compile(
    r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<file>[^:@]+\.gguf))?(?:@(?P<revision>[^:@\s]+))?"
)

# What load_model_source reads from a Hugging Face directory. `model*.safetensors*` covers the
# single file, the shards and their index; a root-level pattern keeps other formats' folders out.
SAFETENSORS_CHECKPOINT_FILES = [
    "config.json",
    "generation_config.json",
    "model*.safetensors*",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
]


@dataclass(frozen=True)
class HubModel:
    """A parsed Hub id."""

    repo_id: str
    revision: str | None = None  # None: the repository's default branch
    gguf_file: str | None = None

    @property
    def allow_patterns(self) -> list[str]:
        return [self.gguf_file] if self.gguf_file else SAFETENSORS_CHECKPOINT_FILES


def parse_hub_id(model: str) -> HubModel | None:
    """The Hub id that `model` names, or None when it cannot be one (a path such as
    './x', '/x', '~/x' or 'a/b/c')."""
    match = _HUB_ID.fullmatch(model)
    if match is None:
        return None
    return HubModel(match["repo"], match["revision"], match["file"])


def hub_cache_dir() -> Path:
    """huggingface_hub's cache, read from the environment now: its own constants are fixed
    when it is first imported."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def download(hub: HubModel, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local path of the model: its snapshot directory, or the GGUF file in it. Reads the
    cache only when offline; otherwise fetches what is missing or changed."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    cache = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    offline = hub_offline()
    name = f"{hub.repo_id}{':' + hub.gguf_file if hub.gguf_file else ''}{'@' + hub.revision if hub.revision else ''}"
    try:
        snapshot = snapshot_download(
            hub.repo_id,
            revision=hub.revision,
            cache_dir=cache,
            allow_patterns=hub.allow_patterns,
            local_files_only=offline,
        )
    except LocalEntryNotFoundError as e:
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        raise ModelLoadError(
            f"model {name!r} is not in the Hugging Face cache at {cache} and {why}: download it first "
            f"(`hf download {hub.repo_id}`{' --revision ' + hub.revision if hub.revision else ''}) or pass a local path ({e})"
        ) from e
    except (HfHubHTTPError, HFValidationError) as e:  # not found, gated without HF_TOKEN, bad revision
        raise ModelLoadError(f"model {name!r}: the Hugging Face Hub refused it ({type(e).__name__}: {e})") from e
    path = Path(snapshot)
    if hub.gguf_file:
        path = path / hub.gguf_file
        if not path.is_file():
            raise ModelLoadError(f"model {name!r}: {hub.gguf_file} is not in the repository (snapshot {snapshot})")
    return path


def cached_commit(hub: HubModel, cache_dir: str | os.PathLike | None = None) -> str | None:
    """The commit the cache holds for the model's revision, without asking the Hub; None when
    that revision is not cached."""
    repo = Path(cache_dir or hub_cache_dir()) / f"models--{hub.repo_id.replace('/', '--')}"
    revision = hub.revision or "main"
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision if (repo / "snapshots" / revision).is_dir() else None
    ref = repo / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else ""
    return commit if commit and (repo / "snapshots" / commit).is_dir() else None
