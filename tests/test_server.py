"""A real `bentoml serve` on 127.0.0.1 with a tiny model and an API key, driven by the
official openai SDK, bentoml.SyncHTTPClient and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import bentoml
import httpx
import openai
import pytest

from bento_llm.sampling import STRUCTURED_OUTPUTS
from bento_llm.testing import ServerProcess, metric, scrape
from tests.shared_server import AUTH, KEY

# A server process and a tiny model take ~15 s to start (once, shared); the tests then take ~30 s together.
pytestmark = pytest.mark.slow

GREEDY = dict(temperature=0, max_tokens=12)
NO_EOS = {"ignore_eos": True}
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def model_dir(shared_server):
    return shared_server.model


@pytest.fixture(scope="module")
def server(shared_server):
    """The server the server test modules share (tests/shared_server.py)."""
    process = shared_server.get()
    yield process
    # After the whole module: no request was left running, waiting, swapped or holding blocks.
    values = wait_idle(process)
    assert metric(values, "vllm:num_requests_waiting") == 0 and metric(values, "vllm:num_requests_swapped") == 0


@pytest.fixture(scope="module")
def sdk(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def offline(model_dir):
    from engine import LLM

    return LLM(model_dir, num_kv_blocks=128)


def wait_idle(server: ServerProcess, timeout: float = 10) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        values = scrape(server.url)
        if metric(values, "bento_llm:kv_blocks_used") == 0 and metric(values, "vllm:num_requests_running") == 0:
            return values
        if time.monotonic() > deadline:
            raise AssertionError(f"blocks still held: {metric(values, 'bento_llm:kv_blocks_used')}")
        time.sleep(0.05)


def test_health_metrics_and_models_stay_open(server, sdk):
    for path in ("/livez", "/readyz", "/metrics"):
        assert httpx.get(server.url + path).status_code == 200, path
    assert [m.id for m in sdk.models.list().data] == ["tiny"]


def test_the_server_log_says_what_the_engine_decided(server):
    log = server.log_tail(chars=10**9)  # from the start: other modules' traffic follows
    assert "KV cache: 128 blocks of 16 tokens" in log
    assert "torch threads" in log


def test_api_key_is_required(server):
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/generate"),
                         ("POST", "/tokenize"), ("POST", "/detokenize")):  # fmt: skip
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = httpx.request(method, server.url + path, headers=headers, json={"prompt": "x"})
            assert response.status_code == 401, (path, headers)
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny", messages=CHAT)


def test_tokenize_and_detokenize_at_the_root(server):
    """vLLM's paths, next to BentoML's own routes (which the root mount must not shadow)."""
    body = httpx.post(server.url + "/tokenize", headers=AUTH, json={"prompt": "Hello there"}).json()
    assert body["count"] == len(body["tokens"]) > 0 and body["max_model_len"] > 0
    assert httpx.post(server.url + "/detokenize", headers=AUTH, json={"tokens": body["tokens"]}).json()["prompt"].endswith("Hello there")
    chat = httpx.post(server.url + "/tokenize", headers=AUTH, json={"messages": CHAT}).json()
    reply = httpx.post(server.url + "/v1/chat/completions", headers=AUTH, json={"messages": CHAT, "max_tokens": 1}).json()
    assert chat["count"] == reply["usage"]["prompt_tokens"]
    assert httpx.post(server.url + "/tokenize", headers=AUTH, json={"prompt": 1}).json()["error"]["param"] == "prompt"
    assert httpx.get(server.url + "/livez").status_code == 200 and httpx.get(server.url + "/docs.json").status_code == 200
    assert httpx.get(server.url + "/tokenize", headers=AUTH).status_code in (404, 405)


@pytest.mark.skipif(not STRUCTURED_OUTPUTS, reason="forcing a call needs structured outputs (SamplingParams.structured_outputs)")
def test_openai_sdk_agent_loop_with_required_tool_choice(sdk):
    """The issue's agent loop against a real server: the model must call a tool (forced to a valid
    call by structured outputs, whatever the tiny model would write), the client runs it and
    answers with a tool message, the model answers."""
    from jsonschema import Draft202012Validator

    from tests.test_tool_calling import FORCED_TOOLS, PARAMETERS

    question = {"role": "user", "content": "Is the museum in Oslo open?"}
    first = sdk.chat.completions.create(model="tiny", messages=[question], tools=FORCED_TOOLS, tool_choice="required",
                                        temperature=1.0, seed=3, max_tokens=64, parallel_tool_calls=False)  # fmt: skip
    assert first.choices[0].finish_reason == "tool_calls"
    calls = first.choices[0].message.tool_calls
    for call in calls:
        Draft202012Validator(PARAMETERS[call.function.name]).validate(json.loads(call.function.arguments))
    history = [question, first.choices[0].message.model_dump(exclude_none=True)]
    history += [{"role": "tool", "tool_call_id": c.id, "content": json.dumps({"ok": True})} for c in calls]
    # This model's template has no tool-call format, so "auto" is refused (as vLLM does without a
    # parser); the client asks for the answer with tool_choice "none".
    second = sdk.chat.completions.create(model="tiny", messages=history, tools=FORCED_TOOLS, tool_choice="none", max_tokens=8,
                                         temperature=0, extra_body=NO_EOS)  # fmt: skip
    assert second.choices[0].message.content and second.usage.prompt_tokens > first.usage.prompt_tokens


def test_chat_sync_and_stream(sdk):
    reply = sdk.chat.completions.create(model="tiny", messages=CHAT, extra_body=NO_EOS, **GREEDY)
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"
    assert reply.model == "tiny" and abs(reply.created - time.time()) < 120
    assert reply.choices[0].finish_reason == "length" and reply.choices[0].message.content
    assert reply.usage.completion_tokens == 12
    stream = sdk.chat.completions.create(
        model="tiny", messages=CHAT, stream=True, stream_options={"include_usage": True}, extra_body=NO_EOS, **GREEDY
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.model_dump() == reply.usage.model_dump()
    assert len({c.id for c in chunks}) == 1


def test_chat_stops_at_eos_with_finish_reason_stop(sdk):
    reply = sdk.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_completion_tokens=4,
                                        logit_bias={"2": 100})  # fmt: skip  # 2 is the tokenizer's <|im_end|> (EOS)
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens == 1


def test_completions_sync_stream_and_prompt_forms(sdk):
    one = sdk.completions.create(model="tiny", prompt="The sky is", extra_body=NO_EOS, **GREEDY)
    assert one.id.startswith("cmpl-") and one.object == "text_completion" and one.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in sdk.completions.create(model="tiny", prompt="The sky is", stream=True, extra_body=NO_EOS, **GREEDY))
    assert streamed == one.choices[0].text
    several = sdk.completions.create(model="tiny", prompt=["The sky is", "Water is"], extra_body=NO_EOS, **GREEDY)
    assert [c.index for c in several.choices] == [0, 1] and several.choices[0].text == one.choices[0].text
    echo = sdk.completions.create(model="tiny", prompt="The sky is", echo=True, extra_body=NO_EOS, **GREEDY)
    assert echo.choices[0].text == "The sky is" + one.choices[0].text


def test_logprobs(sdk):
    chat = sdk.chat.completions.create(model="tiny", messages=CHAT, logprobs=True, top_logprobs=3, extra_body=NO_EOS, **GREEDY)
    content = chat.choices[0].logprobs.content
    assert len(content) == 12 and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)  # greedy
    completion = sdk.completions.create(model="tiny", prompt="Hi", logprobs=2, extra_body=NO_EOS, **GREEDY)
    lp = completion.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 12


def test_n_above_one_and_beam_search(sdk):
    reply = sdk.chat.completions.create(model="tiny", messages=CHAT, n=3, temperature=1.0, seed=4, max_tokens=5, extra_body=NO_EOS)
    assert [c.index for c in reply.choices] == [0, 1, 2] and reply.usage.completion_tokens == 15
    stream = sdk.chat.completions.create(model="tiny", messages=CHAT, n=3, temperature=1.0, seed=4, max_tokens=5, stream=True, extra_body=NO_EOS)
    texts = ["", "", ""]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in reply.choices]
    completion = sdk.completions.create(model="tiny", prompt=["Hi", "Bye"], n=2, temperature=0.9, max_tokens=4, logprobs=1, extra_body=NO_EOS)
    assert [c.index for c in completion.choices] == [0, 1, 2, 3] and all(len(c.logprobs.tokens) == 4 for c in completion.choices)
    beams = sdk.completions.create(model="tiny", prompt="Hi", n=2, best_of=2, temperature=0, max_tokens=4, extra_body={"use_beam_search": True})
    assert len(beams.choices) == 2
    with pytest.raises(openai.BadRequestError) as info:  # n equal greedy samples make no sense
        sdk.chat.completions.create(model="tiny", messages=CHAT, n=2, temperature=0, max_tokens=4)
    assert info.value.body["param"] == "n"


def test_sync_http_client_streams(server, sdk):
    expected = sdk.completions.create(model="tiny", prompt="Hello there", extra_body=NO_EOS, **GREEDY).choices[0].text
    expected_chat = sdk.chat.completions.create(model="tiny", messages=CHAT, extra_body=NO_EOS, **GREEDY).choices[0].message.content
    with bentoml.SyncHTTPClient(server.url, token=KEY) as client:
        pieces = list(client.generate(prompt="Hello there", max_tokens=12, temperature=0, ignore_eos=True))
        assert len(pieces) > 1 and "".join(pieces) == expected
        assert "".join(client.chat(messages=CHAT, max_tokens=12, temperature=0, ignore_eos=True)) == expected_chat
        with pytest.raises(bentoml.exceptions.BentoMLException):
            list(client.generate(prompt="Hello", max_tokens=10**6))


BAD_REQUESTS = [
    ("/v1/chat/completions", b'{"messages": [', 400, None),  # malformed JSON
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}, 400, "max_tokens"),  # wrong type
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": -0.5}, 400, "temperature"),  # out of range
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),  # the default template has no tool-call format
    ("/v1/completions", {"prompt": "x", "prompt_logprobs": 21}, 400, "prompt_logprobs"),  # over 20
    ("/v1/completions", {"prompt": "x", "colour": "red"}, 400, "colour"),  # unknown
    ("/v1/completions", {"prompt": "x", "model": "gpt-4o"}, 404, "model"),  # unknown model
    ("/v1/responses", {"input": "x"}, 404, None),  # unknown route
]


@pytest.mark.parametrize("path, body, status, param", BAD_REQUESTS)
def test_errors_over_http(server, path, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(server.url + path, content=content, headers={**AUTH, "content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param


def test_prompt_over_the_context_is_a_400_with_both_counts(server):
    prompt = list(range(100, 700))  # 600 token ids against a 512-token context
    response = httpx.post(server.url + "/v1/completions", headers=AUTH, json={"prompt": prompt, "max_tokens": 5})
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "512" in message and "600" in message and response.json()["error"]["code"] == "context_length_exceeded"


def test_aborted_stream_gives_its_blocks_back(server):
    before = metric(wait_idle(server), "vllm:request_success_total", finished_reason="abort") or 0
    body = {"model": "tiny", "prompt": "Tell me everything", "max_tokens": 450, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", server.url + "/v1/completions", headers=AUTH, json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            seen = 0
            for line in lines:
                seen += line.startswith("data: {")
                if seen == 3:
                    break
            held = metric(scrape(server.url), "bento_llm:kv_blocks_used")
            assert held and held > 0
        # Leaving the block closes the connection mid-stream.
    values = wait_idle(server, timeout=5)
    assert metric(values, "vllm:request_success_total", finished_reason="abort") == before + 1


def test_abandoned_non_streaming_request_is_aborted(server):
    """A client that hangs up mid-generation: the server aborts the request and frees its blocks.
    The client hangs up once the metrics show the request running (a read timeout of a fixed
    0.5 s let a fast host finish all 480 tokens first: the test then failed there)."""
    before = metric(wait_idle(server), "vllm:request_success_total", finished_reason="abort") or 0
    body = json.dumps({"model": "tiny", "prompt": "Tell me more", "max_tokens": 480, "n": 3, "ignore_eos": True})
    url = httpx.URL(server.url)
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: {url.host}:{url.port}\r\nAuthorization: {AUTH['Authorization']}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}")
    with socket.create_connection((url.host, url.port), timeout=5) as client:
        client.sendall(request.encode())
        deadline = time.monotonic() + 10
        while not metric(scrape(server.url), "vllm:num_requests_running"):
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.005)
    values = wait_idle(server, timeout=5)
    assert metric(values, "vllm:request_success_total", finished_reason="abort") == before + 1


def test_32_concurrent_requests_match_the_offline_engine(server, offline):
    from engine import SamplingParams

    prompts = [f"Request number {i} says" for i in range(16)]
    chats = [[{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}] for i in range(16)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    expected = [o.outputs[0].text for o in offline.generate(prompts, params, use_tqdm=False)]
    expected_chat = [o.outputs[0].text for o in offline.chat(chats, params, use_tqdm=False)]

    async def run() -> tuple[list[str], list[str]]:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        async with client:
            completions = [client.completions.create(model="tiny", prompt=p, temperature=0, max_tokens=16, extra_body=NO_EOS) for p in prompts]
            replies = [client.chat.completions.create(model="tiny", messages=m, temperature=0, max_tokens=16, extra_body=NO_EOS) for m in chats]
            results = await asyncio.gather(*completions, *replies)
        return [r.choices[0].text for r in results[:16]], [r.choices[0].message.content for r in results[16:]]

    texts, chat_texts = asyncio.run(run())
    assert texts == expected
    assert chat_texts == expected_chat
    wait_idle(server)


def test_metrics_have_vllm_and_bentoml_names(server, sdk):
    sdk.completions.create(model="tiny", prompt="Count", max_tokens=4)
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:num_requests_swapped",
        "vllm:kv_cache_usage_perc", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
        "vllm:num_preemptions_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket", "bentoml_service_request_total",
    ):  # fmt: skip
        assert name in text, name
    values = scrape(server.url)
    assert metric(values, "vllm:generation_tokens_total") >= 4
    assert metric(values, "vllm:e2e_request_latency_seconds_count") >= 1


def test_native_stream_disconnect_aborts(server):
    before = metric(wait_idle(server), "vllm:request_success_total", finished_reason="abort") or 0
    body = {"prompt": "Go on", "max_tokens": 450, "ignore_eos": True}
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", server.url + "/generate", headers=AUTH, json=body) as response:
            assert response.status_code == 200
            received = 0
            for piece in response.iter_text():
                received += len(piece)
                if received > 20:
                    break
    values = wait_idle(server, timeout=5)
    assert metric(values, "vllm:request_success_total", finished_reason="abort") == before + 1
