"""Models by Hugging Face Hub id, with no network: a Hub cache laid out in a temporary directory
as huggingface_hub writes it (tests/helpers.py: add_hub_snapshot) and HF_HUB_OFFLINE=1."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from engine.hub import HubModel, parse_hub_id
from engine.loader import default_gguf_path, load_model_source
from tests.helpers import add_hub_snapshot, make_tiny_llama

MAIN_COMMIT, V1_COMMIT, GGUF_COMMIT = "a" * 40, "b" * 40, "c" * 40


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return make_tiny_llama(root, name="two-layers"), make_tiny_llama(root, name="one-layer", num_hidden_layers=1)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, checkpoints):
    cache = tmp_path / "hub"
    two_layers, one_layer = (Path(p) for p in checkpoints)
    add_hub_snapshot(cache, "org/tiny", MAIN_COMMIT, {f.name: f for f in two_layers.iterdir()}, refs=("main",))
    # An older revision, tagged v1, with another config: which one loads shows the revision was honored.
    add_hub_snapshot(cache, "org/tiny", V1_COMMIT, {f.name: f for f in one_layer.iterdir()}, refs=("v1",))
    add_hub_snapshot(cache, "org/smol-gguf", GGUF_COMMIT, {default_gguf_path().name: default_gguf_path()}, refs=("main",))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_ids_are_parsed_and_paths_are_not():
    assert parse_hub_id("Qwen/Qwen3-0.6B") == HubModel("Qwen/Qwen3-0.6B")
    assert parse_hub_id("org/name@v1.0") == HubModel("org/name", revision="v1.0")
    assert parse_hub_id("org/name:q4.gguf") == HubModel("org/name", gguf_file="q4.gguf")
    assert parse_hub_id("org/name:q4.gguf@" + MAIN_COMMIT) == HubModel("org/name", MAIN_COMMIT, "q4.gguf")
    for path in ("./org/name", "/models/x", "~/x", "a/b/c", "name", "org/name:weights.bin"):
        assert parse_hub_id(path) is None, path


def test_a_model_is_resolved_by_id_from_the_cache(hub_cache):
    source = load_model_source("org/tiny")
    assert Path(source.path) == hub_cache / "models--org--tiny" / "snapshots" / MAIN_COMMIT
    assert source.hf_config.num_hidden_layers == 2


def test_a_revision_selects_its_snapshot(hub_cache):
    assert load_model_source("org/tiny@v1").hf_config.num_hidden_layers == 1
    assert load_model_source(f"org/tiny@{V1_COMMIT}").hf_config.num_hidden_layers == 1


def test_a_gguf_file_of_a_repository_is_resolved_by_name(hub_cache):
    source = load_model_source(f"org/smol-gguf:{default_gguf_path().name}")
    assert source.path == str(hub_cache / "models--org--smol-gguf" / "snapshots" / GGUF_COMMIT / default_gguf_path().name)
    assert source.hf_config.model_type == "llama" and source.checkpoint_dtype is None


def test_a_model_by_id_generates_what_its_directory_does(hub_cache, checkpoints):
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    settings = dict(num_kv_blocks=16, dtype="float32", attention_backend="torch")  # no C++ build needed here
    by_id = LLM("org/tiny", **settings).generate(["Hello there"], params, use_tqdm=False)
    by_path = LLM(checkpoints[0], **settings).generate(["Hello there"], params, use_tqdm=False)
    assert by_id[0].outputs[0].token_ids == by_path[0].outputs[0].token_ids


def test_offline_and_not_cached_names_the_id_and_the_cache(hub_cache):
    with pytest.raises(ValueError, match=rf"'meta-llama/Llama-3.2-1B'.*{hub_cache}.*HF_HUB_OFFLINE"):
        load_model_source("meta-llama/Llama-3.2-1B")
    with pytest.raises(ValueError, match=r"'org/tiny@v2'.*not in the Hugging Face cache"):
        load_model_source("org/tiny@v2")
    with pytest.raises(ValueError, match=r"missing\.gguf"):
        load_model_source("org/smol-gguf:missing.gguf")
