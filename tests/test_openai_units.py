"""Fast unit tests of the server's pieces that need no model: settings, error mapping,
auth, metrics rendering and the background-loading state machine."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import threading
import time

import pytest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

from bento_llm.app import create_app
from bento_llm.auth import APIKeyMiddleware
from bento_llm.errors import from_validation_error, from_value_error
from bento_llm.metrics import ServerMetrics
from bento_llm.protocol import ChatCompletionRequest, CompletionRequest
from bento_llm.runtime import LLMRuntime
from bento_llm.settings import Settings, load_settings
from engine import SamplingParams
from engine.config import DEFAULT_MODEL, EngineConfig


# ---------------------------------------------------------------- settings


@pytest.fixture
def environ(monkeypatch):
    """A clean BENTO_LLM_* environment: whatever the developer's shell exports stays out."""
    for name in [n for n in os.environ if n.startswith("BENTO_LLM_")]:
        monkeypatch.delenv(name)
    return monkeypatch


def test_settings_defaults_serve_the_default_model(environ):
    s = load_settings({})
    assert s.model == DEFAULT_MODEL and s.model_name == DEFAULT_MODEL
    assert s.api_key is None and s.max_concurrency >= 64 and s.timeout >= 600
    assert not s.trace_generation  # BentoML's tracing would open a span per token streamed
    assert s.engine_config() == EngineConfig()  # the engine's own defaults, not a copy of them


def test_arguments_win_over_environment_and_are_coerced(environ):
    for name, value in {"NUM_KV_BLOCKS": "100", "MAX_MODEL_LEN": "256", "API_KEY": "from-env"}.items():
        environ.setenv(f"BENTO_LLM_{name}", value)
    s = load_settings({"num_kv_blocks": "512", "kv_cache_memory": "1GiB", "served-model-name": "m"})
    assert s.num_kv_blocks == 512 and s.max_model_len == 256
    assert s.kv_cache_memory_bytes == 2**30 and s.model_name == "m"
    assert s.api_key is not None and s.api_key.get_secret_value() == "from-env"
    assert "from-env" not in repr(s)  # the key never shows in logs
    config = s.engine_config()
    assert config.num_kv_blocks == 512 and config.kv_cache_memory_bytes == 2**30 and type(config.kv_cache_memory_bytes) is int


def test_every_engine_setting_is_a_server_setting(environ):
    """No list of engine fields to keep in step: each EngineConfig field is an argument and a variable."""
    engine_fields = {f.name for f in dataclasses.fields(EngineConfig)}
    assert engine_fields <= set(Settings.model_fields)
    environ.setenv("BENTO_LLM_ATTENTION_BACKEND", "torch")
    environ.setenv("BENTO_LLM_KV_CACHE_MEMORY_BYTES", "512MiB")
    s = load_settings({"swap_space": "2", "enable_prefix_caching": "false", "preemption_mode": "swap"})
    assert s.swap_space == 2.0 and s.enable_prefix_caching is False and s.attention_backend == "torch"
    assert load_settings({"swap_space": "512MiB"}).swap_space == 0.5
    config = load_settings({"model": "/m", "swap_space": "1", "enable_prefix_caching": "0"}).engine_config()
    assert config.swap_space == 1.0 and config.enable_prefix_caching is False and config.kv_cache_memory_bytes == 2**29


def test_settings_refuse_unknown_names_and_bad_values(environ):
    with pytest.raises(ValueError, match="num_kv_blokcs"):
        load_settings({"num_kv_blokcs": "5"})
    with pytest.raises(ValueError, match="num_kv_blocks.*'many'"):
        load_settings({"num_kv_blocks": "many"})
    with pytest.raises(ValueError, match="max_concurrency"):
        load_settings({"max_concurrency": "0"})
    with pytest.raises(ValueError, match="max_request_bytes.*'lots'"):
        load_settings({"max_request_bytes": "lots"})
    with pytest.raises(ValueError, match="block_size must be one of"):  # the engine's own range check
        load_settings({"block_size": "7"}).engine_config()
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        load_settings({"kv_cache_dtype": "int3"}).engine_config()
    with pytest.raises(ValueError, match=r"stream_interval must be in \[1, 4096\] tokens, got 0"):
        load_settings({"stream_interval": "0"}).engine_config()
    with pytest.raises(ValueError, match=r"stream_interval must be in \[1, 4096\] tokens, got 4097"):
        load_settings({"stream_interval": "4097"}).engine_config()


def test_sizes_are_pydantic_byte_sizes(environ):
    assert load_settings({"max_request_bytes": "2GiB"}).max_request_bytes == 2 * 2**30
    assert load_settings({"max_request_bytes": "512MB"}).max_request_bytes == 512 * 10**6
    assert load_settings({"max_request_bytes": 4096}).max_request_bytes == 4096


def test_served_name_defaults_to_last_path_component():
    assert Settings(model="/models/my-llama/").model_name == "my-llama"
    assert Settings(model="/m/x.gguf", served_model_name="prod").model_name == "prod"


# ---------------------------------------------------------------- errors


def _validation_error(model, body) -> dict:
    with pytest.raises(ValidationError) as info:
        model.model_validate_json(body if isinstance(body, (str, bytes)) else json.dumps(body))
    return from_validation_error(info.value).body()["error"]


@pytest.mark.parametrize(
    "body, param, code",
    [
        ("{not json", None, "invalid_json"),
        ([], None, "invalid_type"),
        ({"prompt": 3}, "prompt", "invalid_type"),
        ({"prompt": "x", "temperature": "hot"}, "temperature", "invalid_type"),
        ({"prompt": "x", "max_tokens": 1.5}, "max_tokens", "invalid_type"),
        ({"prompt": "x", "stream": 1}, "stream", "invalid_type"),
        ({"prompt": "x", "frobnicate": True}, "frobnicate", "unknown_parameter"),
        ({"max_tokens": 3}, "prompt", "missing_required_parameter"),
        ('{"prompt": "x", "temperature": NaN}', "temperature", "invalid_value"),  # non-finite JSON
        ('{"prompt": "x", "top_p": -Infinity}', "top_p", "invalid_value"),
        ('{"prompt": "x", "presence_penalty": 1e999}', "presence_penalty", "invalid_value"),
    ],
)
def test_validation_errors_name_the_field(body, param, code):
    error = _validation_error(CompletionRequest, body)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param and error["code"] == code, error
    if param:
        assert param in error["message"]


def test_chat_validation_error_points_into_messages():
    error = _validation_error(ChatCompletionRequest, {"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]})
    assert error["param"] == "messages.[1].role"
    error = _validation_error(ChatCompletionRequest, {"messages": []})
    assert error["param"] == "messages"


def test_engine_value_errors_become_400_naming_the_request_field():
    with pytest.raises(ValueError) as info:
        SamplingParams(top_p=3.0)
    error = from_value_error(info.value).body()["error"]
    assert error["param"] == "top_p" and "top_p" in error["message"] and "SamplingParams" not in error["message"]
    with pytest.raises(ValueError) as info:
        SamplingParams(logprobs=50)
    error = from_value_error(info.value, {"logprobs": "top_logprobs"}).body()["error"]
    assert error["param"] == "top_logprobs"


# ---------------------------------------------------------------- auth


async def _ok_app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_api_key_middleware():
    client = TestClient(APIKeyMiddleware(_ok_app, "s3cret", prefixes=("/v1",), paths=("/generate",)))
    for path in ("/v1/models", "/v1", "/generate"):
        response = client.get(path)
        assert response.status_code == 401, path
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert client.get(path, headers={"Authorization": "Bearer wrong"}).json()["error"]["code"] == "invalid_api_key"
        assert client.get(path, headers={"Authorization": "Basic s3cret"}).status_code == 401
        assert client.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get(path, headers={"Authorization": "bearer s3cret"}).status_code == 200
    for path in ("/livez", "/readyz", "/metrics", "/v1x", "/"):
        assert client.get(path).status_code == 200, path


def test_the_api_docs_stay_open_behind_a_key():
    client = TestClient(APIKeyMiddleware(_ok_app, "s3cret", prefixes=("/v1",), open_paths=("/v1/docs",)))
    assert client.get("/v1/docs").status_code == 200 and client.get("/v1/models").status_code == 401


def test_body_limit_answers_413_in_openai_shape():
    from bento_llm.limits import BodySizeLimitMiddleware

    async def echo_length(scope, receive, send):
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RuntimeError("client went away")  # what a real app does; the 413 still goes out
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(len(body)).encode()})

    client = TestClient(BodySizeLimitMiddleware(echo_length, max_bytes=1000), raise_server_exceptions=False)
    assert client.post("/v1/completions", content=b"x" * 1000).text == "1000"
    for content in (b"x" * 1001, iter([b"x" * 600, b"x" * 600])):  # declared, then chunked
        response = client.post("/v1/completions", content=content)
        assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_unknown_paths_share_one_metrics_label():
    from bento_llm.http_metrics import OTHER, path_label

    known, prefixes = frozenset({"/livez", "/v1/completions"}), [("/v1/models/", "/v1/models/{model}")]
    assert path_label("/livez", known, prefixes) == "/livez"
    assert path_label("/v1/models/tiny", known, prefixes) == "/v1/models/{model}"
    assert {path_label(p, known, prefixes) for p in ("/x", "/v1/x\x00", "/livez/", "")} == {OTHER}


def test_stream_events_go_past_the_middlewares_while_start_and_end_go_through_them():
    """BentoML's metrics and access log act on a response's start and its last message; the token
    events between go to the outermost middleware's `send`, past every wrapper (direct_send.py)."""
    from starlette.middleware import Middleware

    from bento_llm.direct_send import DirectSendMiddleware, install_direct_send
    from bento_llm.streaming import EventStreamResponse

    seen_by_middleware: list[dict] = []

    class Recording:  # a middleware wrapping `send`, as BentoML's and Starlette's do
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            async def recorded(message):
                if message["type"].startswith("http."):
                    seen_by_middleware.append(message)
                await send(message)

            await self.app(scope, receive, recorded)

    async def events():
        for text in ("data: a\n\n", "data: b\n\n", "data: [DONE]\n\n"):
            yield text

    async def endpoint(scope, receive, send):
        await EventStreamResponse(events())(scope, receive, send)

    app = Starlette(routes=[Mount("/v1", app=endpoint)], middleware=[Middleware(DirectSendMiddleware), Middleware(Recording)])
    with TestClient(app) as client:
        response = client.get("/v1/stream")
    assert response.text == "data: a\n\ndata: b\n\ndata: [DONE]\n\n"
    assert [m["type"] for m in seen_by_middleware] == ["http.response.start", "http.response.body"]
    assert seen_by_middleware[-1]["more_body"] is False
    # Without the outermost middleware (the in-process app), every message takes the stack.
    seen_by_middleware.clear()
    with TestClient(Starlette(routes=[Mount("/v1", app=endpoint)], middleware=[Middleware(Recording)])) as client:
        assert client.get("/v1/stream").text == response.text
    assert len(seen_by_middleware) == 5
    # The installed BentoML puts it outermost in the service apps it builds.
    from _bentoml_impl.server.app import ServiceAppFactory

    assert install_direct_send() and install_direct_send()
    assert ServiceAppFactory.middlewares.fget.direct_send


def test_a_server_listening_beyond_loopback_without_a_key_warns(caplog):
    import socket

    from bento_llm.exposure import is_loopback, listening_addresses, warn_if_exposed

    assert is_loopback("127.0.0.1") and is_loopback("::1") and not is_loopback("0.0.0.0")
    with socket.socket() as listener:
        listener.bind(("0.0.0.0", 0))
        listener.listen()
        assert "0.0.0.0" in listening_addresses()
        with caplog.at_level("WARNING", logger="bento_llm"):
            warn_if_exposed(api_key_set=True)
            assert not caplog.records
            warn_if_exposed(api_key_set=False)
        assert "without an API key" in caplog.text


def test_no_api_key_means_open():
    client = TestClient(APIKeyMiddleware(_ok_app, None))
    assert client.get("/v1/models").status_code == 200


# ---------------------------------------------------------------- stream chunks


@pytest.mark.parametrize("object_name", ["chat.completion.chunk", "text_completion"])
@pytest.mark.parametrize("include_usage", [True, False])
@pytest.mark.parametrize("model", ["SmolLM2", 'a "choices": [] model', "modèle/ü"])
def test_pre_rendered_chunks_are_byte_for_byte_the_generic_ones(object_name, include_usage, model):
    from bento_llm.formatting import chunk
    from bento_llm.streaming import ChunkEvents, sse

    events = ChunkEvents(object_name, "chatcmpl-1", 1700000000, model, include_usage)
    for choices in ([], [{"index": 0, "delta": {"content": 'h\u00e9 "quoted"\n'}, "logprobs": None, "finish_reason": None}],
                    [{"index": 1, "text": "x", "logprobs": {"tokens": ["x"]}, "finish_reason": "stop", "stop_reason": None}] * 2):  # fmt: skip
        assert events.event(choices) == sse(chunk(object_name, "chatcmpl-1", 1700000000, model, choices, include_usage))
    for text in ["", " word", 'é "\\ \u2028 \x00']:
        content = [{"index": 3, "delta": {"content": text}, "logprobs": None, "finish_reason": None}]
        assert events.content(3, text) == sse(chunk(object_name, "chatcmpl-1", 1700000000, model, content, include_usage))
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    assert events.usage(usage) == sse(chunk(object_name, "chatcmpl-1", 1700000000, model, [], True, usage))


# ---------------------------------------------------------------- metrics


def test_latency_histograms_are_prometheus_histograms_with_vllm_buckets():
    metrics = ServerMetrics("m", lambda: None)
    for value in (0.0005, 0.003, 0.003, 5000.0):
        metrics.ttft.observe(value)
    text = metrics.render()
    assert 'vllm:time_to_first_token_seconds_bucket{le="0.001",model_name="m"} 1.0' in text
    assert 'vllm:time_to_first_token_seconds_bucket{le="0.005",model_name="m"} 3.0' in text
    assert 'vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 4.0' in text
    totals = metrics.latency_totals()
    assert totals["ttft_count"] == 4 and totals["ttft_sum"] == pytest.approx(5000.0065) and totals["itl_count"] == 0


def test_inter_token_latencies_added_in_bulk_give_the_histogram_one_observe_per_token_gives():
    """ITL is counted on the event loop and added to prometheus_client's histogram in bulk: the
    same buckets, count and sum as observing each token (and never one left uncounted)."""
    import random

    from bento_llm.metrics import ITL_BUCKETS, BufferedHistogram

    buffered, direct = ServerMetrics("m", lambda: None), ServerMetrics("m", lambda: None)
    rng = random.Random(0)
    gaps = [rng.choice(ITL_BUCKETS) for _ in range(20)] + [rng.uniform(0, 100) for _ in range(200)] + [0.0, 1e6]
    for i, gap in enumerate(gaps):
        times = 1 + i % 3
        buffered.itl.observe(gap, times)
        for _ in range(times):
            direct.itl.child.observe(gap)
        if i % 50 == 0:
            buffered.itl.flush()
    assert buffered.itl.pending
    buffered.itl.flush()
    assert not buffered.itl.pending

    def itl_samples(metrics: ServerMetrics) -> dict[str, float]:
        (family,) = metrics.histograms["inter_token_latency"].collect()
        return {f"{s.name}{s.labels.get('le', '')}": s.value for s in family.samples if not s.name.endswith("_created")}

    got, want = itl_samples(buffered), itl_samples(direct)
    assert got.keys() == want.keys() and len(got) == len(ITL_BUCKETS) + 3  # buckets, +Inf, count, sum
    assert {k: v for k, v in got.items() if not k.endswith("_sum")} == {k: v for k, v in want.items() if not k.endswith("_sum")}
    assert got["vllm:inter_token_latency_seconds_sum"] == pytest.approx(want["vllm:inter_token_latency_seconds_sum"])
    assert isinstance(buffered.itl, BufferedHistogram)


def test_a_request_that_ends_flushes_its_inter_token_latencies():
    metrics = ServerMetrics("m", lambda: None)
    metrics.itl.FLUSH_INTERVAL_S = 3600.0  # after the first flush, only the request's end flushes
    timer = metrics.timer()
    timer.tokens_seen(1)
    timer.tokens_seen(2)  # the first gap is flushed at once; the next wait for the interval
    timer.tokens_seen(5)
    assert metrics.latency_totals()["itl_count"] == 1
    timer.finished("stop")
    assert metrics.latency_totals()["itl_count"] == 4


def test_every_token_after_the_first_counts_one_gap_however_the_tokens_arrive():
    """A lagging consumer can see its first item carry several tokens: those after the first
    count as gaps of 0, so ITL counts tokens - 1 and sums to the first-to-last time."""
    metrics = ServerMetrics("m", lambda: None)
    timer = metrics.timer()
    timer.tokens_seen(3)
    first = timer.last
    time.sleep(0.01)
    timer.tokens_seen(8)
    timer.finished("length")
    totals = metrics.latency_totals()
    assert totals["ttft_count"] == 1 and totals["itl_count"] == 7
    assert totals["itl_sum"] == pytest.approx(timer.last - first) and totals["itl_sum"] >= 0.01


def test_metrics_render_vllm_names():
    class Stats:
        num_running, num_waiting, num_swapped = 2, 1, 0
        num_kv_blocks, num_kv_blocks_used, kv_cache_usage = 10, 4, 0.4
        prefix_cache_queries = prefix_cache_hits = num_preemptions = 0
        prompt_tokens, generation_tokens = 30, 12
        step_handoff_seconds = 1.5

    metrics = ServerMetrics("m", lambda: Stats())
    timer = metrics.timer()
    timer.tokens_seen(1)
    timer.tokens_seen(3)
    timer.finished("stop")
    text = metrics.render()
    for name in (
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:num_requests_swapped",
        "vllm:kv_cache_usage_perc", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
        "vllm:num_preemptions_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
        "vllm:e2e_request_latency_seconds_count", "vllm:request_success_total", "bento_llm:step_handoff_seconds_total",
    ):  # fmt: skip
        assert f'{name}{{' in text, name
    assert 'vllm:num_requests_running{model_name="m"} 2.0' in text
    assert 'bento_llm:step_handoff_seconds_total{model_name="m"} 1.5' in text
    assert 'vllm:inter_token_latency_seconds_count{model_name="m"} 2.0' in text
    assert 'vllm:request_success_total{finished_reason="stop",model_name="m"} 1.0' in text
    # Before the engine is loaded there are no engine numbers, but the page still renders.
    assert "vllm:num_requests_running" not in ServerMetrics("m", lambda: None).render()


# ---------------------------------------------------------------- background loading


class _Tokenizer:
    chat_template = None

    def __len__(self):
        return 10

    def encode(self, text, add_special_tokens=True):
        return [1] * len(text)

    def decode(self, ids, **_):
        return "x" * len(ids)


class _Engine:
    tokenizer = _Tokenizer()
    max_model_len = 32
    is_dead = False

    class model_config:
        vocab_size = 10

    def stats(self):
        return None

    async def shutdown(self):
        pass


def _client(runtime) -> TestClient:
    return TestClient(Starlette(routes=[Mount("/v1", create_app(lambda: runtime))]))


def test_routes_answer_503_while_loading_then_serve():
    gate = threading.Event()

    def factory(config):
        assert gate.wait(10)
        return _Engine()

    runtime = LLMRuntime(Settings(model="/nowhere/tiny"), engine_factory=factory)
    runtime.start()
    client = _client(runtime)
    try:
        assert not runtime.ready and not runtime.failed
        response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "model_not_ready"
    finally:
        gate.set()
    assert runtime.wait(10)
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    asyncio.run(runtime.shutdown())


def test_server_runtime_freezes_the_loaded_heap_once_ready():
    import gc

    runtime = LLMRuntime(Settings(model="/nowhere/tiny"), engine_factory=lambda config: _Engine(),
                         freeze_heap_when_loaded=True)
    gc.unfreeze()
    try:
        runtime.start()
        assert runtime.wait(10)
        assert gc.get_freeze_count() > 0  # the loaded engine is out of the collector's reach
    finally:
        gc.unfreeze()  # this test process builds many runtimes: nothing stays frozen
    asyncio.run(runtime.shutdown())


def test_test_runtimes_leave_the_heap_unfrozen():
    import gc

    gc.unfreeze()
    runtime = LLMRuntime(Settings(model="/nowhere/tiny"), engine_factory=lambda config: _Engine())
    runtime.start()
    assert runtime.wait(10)
    assert gc.get_freeze_count() == 0
    asyncio.run(runtime.shutdown())


def test_failed_load_is_reported():
    def factory(config):
        raise FileNotFoundError("no weights here")

    runtime = LLMRuntime(Settings(model="/nowhere/tiny"), engine_factory=factory)
    runtime.start()
    assert not runtime.wait(10)
    assert runtime.failed and "no weights here" in runtime.error
    response = _client(runtime).post("/v1/completions", json={"prompt": "hi"})
    assert response.status_code == 503 and "no weights here" in response.json()["error"]["message"]


def test_routes_before_the_service_exists():
    response = TestClient(Starlette(routes=[Mount("/v1", create_app(lambda: None))])).get("/v1/models")
    assert response.status_code == 503 and set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_concurrency_limit_answers_429_in_openai_shape():
    import anyio

    from bento_llm.limits import ConcurrencyLimitMiddleware

    gate = anyio.Event()
    statuses: list[int] = []

    async def slow_app(scope, receive, send):
        await gate.wait()
        await _ok_app(scope, receive, send)

    limiter = ConcurrencyLimitMiddleware(slow_app, max_concurrency=2, prefixes=("/v1",))

    async def call(path: str) -> None:
        sent = []

        async def send(message):
            sent.append(message)

        async def receive():
            return {"type": "http.request", "body": b""}

        await limiter({"type": "http", "path": path, "method": "GET", "headers": []}, receive, send)
        statuses.append(sent[0]["status"])
        if sent[0]["status"] == 429:
            assert json.loads(sent[1]["body"])["error"]["code"] == "too_many_requests"

    async def main():
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "/v1/a")
            tg.start_soon(call, "/v1/b")
            await anyio.sleep(0.05)
            await call("/v1/c")  # over the limit: refused at once
            gate.set()  # health and other paths are never limited
        await call("/v1/d")  # the slots came back

    anyio.run(main)
    assert statuses == [429, 200, 200, 200]


def test_openapi_has_every_schema_it_refers_to():
    import re

    spec = create_app(lambda: None).openapi()
    refs = set(re.findall(r"#/components/schemas/(\w+)", json.dumps(spec)))
    assert {"ChatMessage", "StreamOptions", "ChatCompletionResponse"} <= refs
    assert refs <= set(spec["components"]["schemas"])
