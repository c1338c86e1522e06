"""The service follows BentoML's conventions: runtime, resources, traffic and labels declared in
code; a Hub model declared as a HuggingFaceModel pinned to a commit (resolved from the cache, so
`bentoml build` works offline); a deployment config that BentoML's own schema accepts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest
import yaml
from opentelemetry.util.http import ExcludeList
from packaging.requirements import Requirement

from bento_llm.testing import REPO_ROOT, ServerProcess
from tests.helpers import add_hub_snapshot, make_tiny_llama, own_kernel_cache

COMMIT = "d" * 40


@pytest.fixture(scope="module")
def hub_bento(tmp_path_factory) -> dict:
    """`bentoml build --arg model=org/name` offline (the Hub switched off, the model's commit in
    the cache): the Bento's tag, its directory, its bento.yaml and the environment it was built
    in. The tests below read what the build wrote down from service.py (one interpreter importing
    it for them all) and serve it."""
    root = tmp_path_factory.mktemp("hub")
    checkpoint = Path(make_tiny_llama(root / "checkpoint"))
    add_hub_snapshot(root / "hub", "org/tiny", COMMIT, {f.name: f for f in checkpoint.iterdir()}, refs=("main",))
    env = {"HF_HUB_OFFLINE": "1", "BENTOML_HOME": str(root / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    build = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "--arg", "model=org/tiny", "--output", "tag"], cwd=REPO_ROOT,
        env={**os.environ, **env, "HF_HUB_CACHE": str(root / "hub")}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    tag = re.search(r"bento-llm:[0-9a-z]+", build.stdout).group(0)
    directory = root / "bentoml" / "bentos" / Path(*tag.split(":"))
    info = yaml.safe_load((directory / "bento.yaml").read_text())
    return {"tag": tag, "dir": directory, "info": info, "root": root, "env": env}


@pytest.mark.slow  # shares hub_bento's build: ~10-20 s alone
def test_runtime_resources_traffic_and_labels_are_declared_in_code(hub_bento):
    info = hub_bento["info"]
    (service,) = info["services"]
    config, image = service["config"], info["image"]
    assert info["labels"]["openai_endpoint"] == "/v1"
    assert config["resources"]["cpu"] and config["resources"]["memory"]
    assert config["traffic"]["timeout"] > 0 and config["traffic"]["concurrency"] >= 1
    # BentoML's tracing would open a span per token streamed: the generation routes stay out of it.
    traced = ExcludeList(config["tracing"]["excluded_urls"])
    for path in ("/v1/chat/completions", "/v1/completions", "/generate", "/chat", "/v1/completions?x=1"):
        assert traced.url_disabled(f"http://127.0.0.1:3000{path}"), path
    for path in ("/v1/models", "/v1/chat/completions/x", "/tokenize", "/readyz", "/chat2"):
        assert not traced.url_disabled(f"http://127.0.0.1:3000{path}"), path
    assert image["python_version"] == "3.11"
    # Unlocked (so `bentoml build` stays offline): the Bento's requirements are the ones declared,
    # as written, where a lock would have replaced them with pinned versions of every package.
    python_env = hub_bento["dir"] / "env" / "python"
    assert (python_env / "requirements.txt").read_text() == (python_env / "requirements.in").read_text()
    assert any("g++" in command for command in image["commands"])
    # The container installs every runtime dependency pyproject.toml declares, in the versions it
    # allows (a missing one, like xgrammar once, breaks its feature only inside a built Bento; a
    # looser one, like transformers without pyproject's <5.25, breaks the whole Bento).
    declared = tomllib.loads((Path(REPO_ROOT) / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = image["python_requirements"].splitlines()
    in_image = {r.name: r for r in (Requirement(line) for line in lines if line.strip())}
    for requirement in map(Requirement, declared):
        if requirement.name != "bentoml":  # `bentoml build` installs its own version into every image
            assert requirement.name in in_image, f"{requirement.name} is in pyproject.toml but not in service.py's image"
            assert in_image[requirement.name].specifier == requirement.specifier, (
                f"service.py's image asks for {in_image[requirement.name]}, pyproject.toml for {requirement}"
            )
    # bentofile.yaml no longer says what the code says.
    bentofile = yaml.safe_load((Path(REPO_ROOT) / "bentofile.yaml").read_text())
    assert not {"python", "docker", "labels"} & set(bentofile)


@pytest.mark.slow  # shares hub_bento's build
def test_a_hub_model_is_declared_pinned_to_its_cached_commit(hub_bento):
    (service,) = hub_bento["info"]["services"]
    (model,) = service["models"]
    assert model["registry"] == "huggingface" and model["metadata"]["model_id"] == "org/tiny"
    assert model["metadata"]["revision"] == COMMIT  # from the cache, offline: no Hub call at build time
    assert "config.json" in model["metadata"]["include"] and "model*.safetensors*" in model["metadata"]["include"]


def test_the_deployment_example_is_valid_for_bentoml_deploy():
    from bentoml._internal.cloud.deployment import DeploymentAPI
    from bentoml._internal.cloud.schemas.schemasv2 import CreateDeploymentSchema
    from bentoml._internal.utils.cattr import bentoml_cattr

    from bento_llm.settings import Settings

    raw = yaml.safe_load((Path(REPO_ROOT) / "bento_llm" / "deployment.yaml").read_text())
    schema = bentoml_cattr.structure(raw, CreateDeploymentSchema)
    DeploymentAPI._fix_and_validate_schema(schema)
    # BentoML ignores unknown keys: everything written must survive the round trip.
    assert _contains(bentoml_cattr.unstructure(schema), raw)
    assert list(schema.services) == ["bento-llm"]  # the service's name in service.py
    scaling = schema.services["bento-llm"].scaling
    assert 1 <= scaling.min_replicas <= scaling.max_replicas
    assert schema.secrets and not any("KEY" in env.name for env in schema.envs)  # the key is a secret
    settings = {"BENTO_LLM_" + name.upper() for name in Settings.model_fields}
    assert {env.name for env in schema.envs} <= settings


def _contains(full, part) -> bool:
    if isinstance(part, dict):
        return isinstance(full, dict) and all(k in full and _contains(full[k], v) for k, v in part.items())
    if isinstance(part, list):
        return isinstance(full, list) and len(full) == len(part) and all(map(_contains, full, part))
    return full == part


@pytest.mark.slow  # hub_bento's build (~30 s) and a server start
def test_a_bento_of_a_hub_model_builds_and_serves_offline(hub_bento):
    """The Hub-model Bento served with the Hub switched off and only BentoML's copy of the files
    (BENTOML_HF_CACHE_DIR, as in a container) to read. On the plain-torch attention backend and,
    as on an AVX2-only CPU, without our AVX-512 matmul kernels (the float32 projections would take
    f32_linear's strips): that a Bento's own copy of the C++ kernels builds and runs is
    tests/test_server_default_model.py::test_bentoml_build_packs_the_default_model_and_the_bento_serves's
    check, and a second build of them here (~35 s) would test nothing more."""
    root = hub_bento["root"]
    (root / "empty-hf-cache").mkdir()
    serve_env = {**hub_bento["env"], "HF_HUB_CACHE": str(root / "empty-hf-cache"), "BENTOML_HF_CACHE_DIR": str(root / "hub"),
                 "BENTO_LLM_ATTENTION_BACKEND": "torch", "ATEN_CPU_CAPABILITY": "avx2", **own_kernel_cache(root / "kernels")}
    with ServerProcess(target=hub_bento["tag"], cwd=root, env=serve_env, log_path=root / "serve.log") as server:
        (model,) = httpx.get(server.url + "/v1/models").json()["data"]
        assert model["id"] == "org/tiny" and model["root"].endswith(f"snapshots/{COMMIT}")
        reply = httpx.post(server.url + "/v1/completions", json={"model": "org/tiny", "prompt": "Hi", "max_tokens": 4}, timeout=120)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4
    assert not (root / "kernels").exists()  # nothing was compiled
