"""The /v1 app in-process over a real tiny engine: response shapes, streaming framing,
prompt forms, logprobs, every 400 class, and a failing request that stays alone."""

from __future__ import annotations

import itertools
import json
import time

import pytest

from tests.app_fixtures import app_client, assert_no_request_left, loaded_runtime
from tests.helpers import make_tiny_llama

GREEDY = {"temperature": 0, "max_tokens": 8, "ignore_eos": True}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    with loaded_runtime(make_tiny_llama(tmp_path_factory.mktemp("tiny"))) as rt:
        yield rt


@pytest.fixture(scope="module")
def client(runtime):
    with app_client(runtime) as c:
        yield c


@pytest.fixture(autouse=True)
def no_request_left(runtime):
    yield
    assert_no_request_left(runtime)


def events(response) -> list:
    """The data payloads of an SSE body; checks the framing on the way."""
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = response.text.split("\n\n")
    assert blocks[-1] == "" and blocks[-2] == "data: [DONE]"
    payloads = []
    for block in blocks[:-2]:
        assert block.startswith("data: "), block
        payloads.append(json.loads(block[len("data: "):]))
    return payloads


def test_models(client, runtime):
    body = client.get("/v1/models").json()
    assert body["object"] == "list" and body["data"][0]["id"] == runtime.model_name
    assert client.get(f"/v1/models/{runtime.model_name}").json()["id"] == runtime.model_name
    assert client.get("/v1/models/nope").status_code == 404


def test_chat_shape_and_stream_agree(client):
    body = client.post("/v1/chat/completions", json={"messages": CHAT, **GREEDY}).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert isinstance(body["created"], int) and abs(body["created"] - time.time()) < 60
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 8
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 8

    chunks = events(client.post("/v1/chat/completions", json={"messages": CHAT, **GREEDY, "stream": True, "stream_options": {"include_usage": True}}))
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == choice["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == body["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])
    # Without include_usage there is no usage key at all, as with OpenAI.
    plain = events(client.post("/v1/chat/completions", json={"messages": CHAT, **GREEDY, "stream": True}))
    assert all("usage" not in c for c in plain)


def test_a_lagging_stream_sends_the_tokens_it_missed_in_one_chunk(client, runtime, monkeypatch):
    """While the event loop is busy the engine runs on; the stream then sends every token it
    missed in one chunk, whose text, logprobs, finish_reason, usage and latency metrics are as
    if it had kept up."""
    from bento_llm.chat_output import MessageStream

    request = {"messages": CHAT, **GREEDY, "logprobs": True, "top_logprobs": 2}
    body = client.post("/v1/chat/completions", json=request).json()
    delta = MessageStream.delta
    calls = []

    def busy_after_the_first_token(self, text, finished):
        calls.append(text)
        if len(calls) == 1:  # blocks the event loop until the engine has generated everything
            deadline = time.monotonic() + 60
            while runtime.engine.engine.has_unfinished_requests() and time.monotonic() < deadline:
                time.sleep(0.005)
        return delta(self, text, finished)

    monkeypatch.setattr(MessageStream, "delta", busy_after_the_first_token)
    before = runtime.metrics.latency_totals()
    chunks = events(client.post("/v1/chat/completions", json={**request, "stream": True, "stream_options": {"include_usage": True}}))
    after = runtime.metrics.latency_totals()
    tokens = [c for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    assert len(calls) == 2 and len(tokens) == 2  # the first token, then the seven it missed
    assert sum(len(c["choices"][0]["logprobs"]["content"]) for c in tokens) == 8
    assert "".join(c["choices"][0]["delta"]["content"] for c in tokens) == body["choices"][0]["message"]["content"]
    streamed = [lp for c in tokens for lp in c["choices"][0]["logprobs"]["content"]]
    whole = body["choices"][0]["logprobs"]["content"]
    # Tokens exactly; logprob values to rounding: the stream's prompt is a prefix-cache hit, whose
    # attention runs in other chunks than the first request's prefill (bfloat16 here).
    assert [(lp["token"], [t["token"] for t in lp["top_logprobs"]]) for lp in streamed] == \
        [(lp["token"], [t["token"] for t in lp["top_logprobs"]]) for lp in whole]
    assert [lp["logprob"] for lp in streamed] == pytest.approx([lp["logprob"] for lp in whole], abs=1e-3)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"] == body["usage"]
    # The metrics still count every token: one first token, seven gaps after it.
    assert after["ttft_count"] - before["ttft_count"] == 1 and after["itl_count"] - before["itl_count"] == 7


def test_a_non_streaming_request_counts_its_first_token_and_every_gap(client, runtime):
    """The engine hands a non-streaming request's reader only its first output and its last;
    the latency metrics still see the first token and the seven gaps after it."""
    before = runtime.metrics.latency_totals()
    body = client.post("/v1/chat/completions", json={"messages": CHAT, **GREEDY}).json()
    after = runtime.metrics.latency_totals()
    assert body["usage"]["completion_tokens"] == 8
    assert after["ttft_count"] - before["ttft_count"] == 1 and after["itl_count"] - before["itl_count"] == 7


def test_stream_interval_sends_the_first_token_then_every_third(tmp_path):
    """`stream_interval=3` (vLLM's --stream-interval): fewer, longer events; the same text and
    logprobs as one token at a time, and the latency metrics still count every token."""
    with loaded_runtime(make_tiny_llama(tmp_path), stream_interval=3) as rt, app_client(rt) as client:
        request = {"messages": CHAT, **GREEDY, "logprobs": True}
        body = client.post("/v1/chat/completions", json=request).json()
        before = rt.metrics.latency_totals()
        chunks = events(client.post("/v1/chat/completions", json={**request, "stream": True}))
        after = rt.metrics.latency_totals()
        tokens = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
        counts = [len(choice["logprobs"]["content"]) for choice in tokens]
        # Each chunk ends where the engine handed an output over: after tokens 1, 4, 7 and 8 ([1, 3, 3, 1]
        # when the reader keeps up; a reader that lags sends several of them as one).
        assert set(itertools.accumulate(counts)) <= {1, 4, 7, 8} and sum(counts) == 8, counts
        assert "".join(choice["delta"]["content"] for choice in tokens) == body["choices"][0]["message"]["content"]
        assert [lp["token"] for choice in tokens for lp in choice["logprobs"]["content"]] == \
            [lp["token"] for lp in body["choices"][0]["logprobs"]["content"]]
        assert after["ttft_count"] - before["ttft_count"] == 1 and after["itl_count"] - before["itl_count"] == 7
        assert_no_request_left(rt)


def test_max_completion_tokens_and_stop(client):
    body = client.post("/v1/chat/completions", json={"messages": CHAT, "temperature": 0, "max_completion_tokens": 3, "ignore_eos": True}).json()
    assert body["usage"]["completion_tokens"] == 3
    full = client.post("/v1/completions", json={"prompt": "The cat", **GREEDY}).json()["choices"][0]["text"]
    stop = full[len(full) // 2:][:3]
    cut = client.post("/v1/completions", json={"prompt": "The cat", **GREEDY, "stop": [stop]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and stop not in cut["text"] and full.startswith(cut["text"])
    assert cut["stop_reason"] == stop


def test_completion_prompt_forms(client, runtime):
    one = client.post("/v1/completions", json={"prompt": "Hello world", **GREEDY}).json()
    assert one["object"] == "text_completion" and one["id"].startswith("cmpl-")
    ids = runtime.tokenizer.encode("Hello world")
    by_ids = client.post("/v1/completions", json={"prompt": ids, **GREEDY}).json()
    assert by_ids["choices"][0]["text"] == one["choices"][0]["text"]
    assert by_ids["usage"]["prompt_tokens"] == len(ids) == one["usage"]["prompt_tokens"]
    many = client.post("/v1/completions", json={"prompt": ["Hello world", "Goodbye"], **GREEDY}).json()
    assert [c["index"] for c in many["choices"]] == [0, 1]
    assert many["choices"][0]["text"] == one["choices"][0]["text"]
    assert many["usage"]["completion_tokens"] == 16
    many_ids = client.post("/v1/completions", json={"prompt": [ids, runtime.tokenizer.encode("Goodbye")], **GREEDY}).json()
    assert [c["text"] for c in many_ids["choices"]] == [c["text"] for c in many["choices"]]
    echo = client.post("/v1/completions", json={"prompt": "Hello world", **GREEDY, "echo": True}).json()
    assert echo["choices"][0]["text"] == "Hello world" + one["choices"][0]["text"]
    streamed = events(client.post("/v1/completions", json={"prompt": ["Hello world", "Goodbye"], **GREEDY, "stream": True, "echo": True}))
    for index, prompt in enumerate(["Hello world", "Goodbye"]):
        text = "".join(c["choices"][0]["text"] for c in streamed if c["choices"][0]["index"] == index)
        assert text == prompt + many["choices"][index]["text"]


def test_logprobs(client):
    body = client.post("/v1/completions", json={"prompt": "Hello", **GREEDY, "logprobs": 3}).json()
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 8
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert value <= 0 and 3 <= len(top) <= 4 and token in top
        assert value == pytest.approx(max(top.values()))  # greedy picks the most likely
    assert lp["text_offset"][0] == 0
    chat = client.post("/v1/chat/completions", json={"messages": CHAT, **GREEDY, "logprobs": True, "top_logprobs": 2}).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == 8
    assert "".join(c["token"] for c in content) == chat["choices"][0]["message"]["content"]
    for entry in content:
        assert entry["bytes"] == list(entry["token"].encode()) and len(entry["top_logprobs"]) == 2
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])
    none = client.post("/v1/chat/completions", json={"messages": CHAT, **GREEDY}).json()
    assert none["choices"][0]["logprobs"] is None
    streamed = events(client.post("/v1/chat/completions", json={"messages": CHAT, **GREEDY, "logprobs": True, "stream": True}))
    tokens = [e for c in streamed if c["choices"] and c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]]
    assert [t["token"] for t in tokens] == [c["token"] for c in content]


def test_prompt_logprobs_in_completions(client, runtime):
    body = client.post("/v1/completions", json={"prompt": "Hello there, friend", **GREEDY, "prompt_logprobs": 2}).json()
    prompt_ids = runtime.tokenizer.encode("Hello there, friend")
    entries = body["choices"][0]["prompt_logprobs"]
    assert len(entries) == len(prompt_ids) and entries[0] is None
    for token_id, entry in zip(prompt_ids[1:], entries[1:]):
        assert str(token_id) in entry and 2 <= len(entry) <= 3
        assert all(v["logprob"] <= 0 and v["rank"] >= 1 and isinstance(v["decoded_token"], str) for v in entry.values())
    plain = client.post("/v1/completions", json={"prompt": "Hello", **GREEDY}).json()
    assert plain["choices"][0]["prompt_logprobs"] is None


def test_seeded_sampling_repeats(client):
    request = {"prompt": "Once upon", "max_tokens": 8, "temperature": 1.0, "seed": 7, "top_k": 50, "min_p": 0.01,
               "presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.1, "min_tokens": 2}  # fmt: skip
    first = client.post("/v1/completions", json=request).json()
    assert first["choices"][0]["text"] == client.post("/v1/completions", json=request).json()["choices"][0]["text"]


def test_logit_bias_forces_a_token(client, runtime):
    token = runtime.tokenizer.encode(" banana", add_special_tokens=False)[0]
    body = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "logit_bias": {str(token): 100}, "ignore_eos": True}).json()
    assert body["choices"][0]["text"] == runtime.tokenizer.decode([token] * 3)


ERRORS = [
    # (path, body, status, param)
    ("/v1/completions", b"{oops", 400, None),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "logprobs": 99}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 2, "temperature": 0}, 400, "n"),  # n equal greedy samples
    ("/v1/completions", {"prompt": "x", "n": 3, "best_of": 2}, 400, "best_of"),
    ("/v1/completions", {"prompt": "x", "use_beam_search": True, "best_of": 2, "temperature": 0.7}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "length_penalty": 2.0}, 400, "length_penalty"),
    ("/v1/completions", {"prompt": "x", "early_stopping": "sometimes"}, 400, "early_stopping"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/v1/completions", {"prompt": "x", "prompt_logprobs": 21}, 400, "prompt_logprobs"),
    ("/v1/completions", {"prompt": "x", "prompt_logprobs": 1, "stream": True}, 400, "prompt_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "prompt_logprobs": 1}, 400, "prompt_logprobs"),
    ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 1}, 400, "echo"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"999999": 5}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": [10**9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-9"}, 404, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}, 400, "response_format.type"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages.[0].content.[0].type"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages.[0].tool_call_id"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "gpt-9"}, 404, "model"),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
    ("/v1/embeddings", {"input": "x"}, 404, None),
]


@pytest.mark.parametrize("path, body, status, param", ERRORS)
def test_errors_have_openai_shape(client, path, body, status, param):
    if isinstance(body, bytes):
        response = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = client.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error


def test_prompt_over_the_context_names_both_counts(client, runtime):
    limit = runtime.max_model_len
    words = "hello " * (limit + 10)
    error = client.post("/v1/completions", json={"prompt": words}).json()["error"]
    n_prompt = len(runtime.tokenizer.encode(words))
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert str(limit) in error["message"] and str(n_prompt) in error["message"]
    # A prompt that fits, with a completion that does not.
    error = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": limit}).json()["error"]
    assert error["code"] == "context_length_exceeded" and str(limit) in error["message"]
    error = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": words}]}).json()["error"]
    assert error["param"] == "messages" and str(limit) in error["message"]


def test_a_failing_request_gets_500_and_the_others_go_on(client, runtime, monkeypatch):
    original = runtime.engine.add_request

    def add_request(request_id, prompt, params, **kwargs):
        stream = original(request_id, prompt, params, **kwargs)
        if runtime.tokenizer.decode(prompt).endswith("BOOM"):

            async def exploding():
                async for item in stream:
                    await stream.aclose()  # the engine request ends; then this one fails
                    raise RuntimeError("injected failure")
                    yield item

            return exploding()
        return stream

    monkeypatch.setattr(runtime.engine, "add_request", add_request)
    response = client.post("/v1/completions", json={"prompt": "BOOM", **GREEDY})
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
    streamed = client.post("/v1/completions", json={"prompt": "BOOM", **GREEDY, "stream": True})
    assert streamed.status_code == 200
    assert '"server_error"' in streamed.text and streamed.text.endswith("data: [DONE]\n\n")
    assert client.post("/v1/completions", json={"prompt": "fine", **GREEDY}).status_code == 200


def test_parallel_sampling_n(client):
    body = client.post("/v1/completions", json={"prompt": ["Once", "Twice"], "n": 2, "temperature": 1.0, "seed": 3, "max_tokens": 6, "ignore_eos": True}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["completion_tokens"] == 24
    assert body["choices"][0]["text"] != body["choices"][1]["text"]
    request = {"messages": CHAT, "n": 3, "temperature": 1.0, "seed": 5, "max_tokens": 6, "ignore_eos": True, "logprobs": True}
    reply = client.post("/v1/chat/completions", json=request).json()
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2] and reply["usage"]["completion_tokens"] == 18
    assert all(len(c["logprobs"]["content"]) == 6 for c in reply["choices"])
    chunks = events(client.post("/v1/chat/completions", json={**request, "stream": True}))
    for j in range(3):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == j]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert [m["finish_reason"] for m in mine].count("length") == 1 and mine[-1]["finish_reason"] == "length"
        # Seeded: the stream repeats the non-streaming answer, choice by choice.
        assert "".join(m["delta"].get("content") or "" for m in mine) == reply["choices"][j]["message"]["content"]


def test_best_of_and_beam_search(client):
    best = client.post("/v1/completions", json={"prompt": "Once", "best_of": 3, "temperature": 1.0, "seed": 1, "max_tokens": 6}).json()
    assert len(best["choices"]) == 1
    streamed = events(client.post("/v1/completions", json={"prompt": "Once", "best_of": 3, "temperature": 1.0, "seed": 1, "max_tokens": 6, "stream": True}))
    # The best sample is only known at the end: one chunk carries it.
    assert [c["choices"][0]["text"] for c in streamed] == [best["choices"][0]["text"]]
    beam = {"prompt": "Once", "n": 2, "best_of": 3, "use_beam_search": True, "temperature": 0, "max_tokens": 6, "length_penalty": 0.5}
    body = client.post("/v1/completions", json=beam).json()
    assert [c["index"] for c in body["choices"]] == [0, 1] and body["choices"][0]["text"] != body["choices"][1]["text"]
    streamed = events(client.post("/v1/completions", json={**beam, "stream": True}))
    texts = {c["choices"][0]["index"]: c["choices"][0]["text"] for c in streamed}
    assert texts == {0: body["choices"][0]["text"], 1: body["choices"][1]["text"]}
