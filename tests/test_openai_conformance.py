"""Every response and stream-chunk shape the /v1 app produces validates against OpenAI's
published schemas (tests/openai_spec/schemas.json, vendored from github.com/openai/openai-openapi;
see its "source" for the commit), over a real tiny engine.

One documented departure: OpenAI's legacy completions schema (used for its stream chunks too)
says `finish_reason` is a string, but OpenAI itself streams `"finish_reason": null` until the
last chunk, as this server does; stream chunks of completions are checked with that allowed."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from tests.app_fixtures import app_client, loaded_runtime
from tests.helpers import make_tiny_llama
from tests.test_openai_app import events

SPEC = json.loads((Path(__file__).parent / "openai_spec" / "schemas.json").read_text())
GREEDY = {"temperature": 0, "max_tokens": 4, "ignore_eos": True}
CHAT = [{"role": "user", "content": "Say hi"}]


def _validator(name: str, spec: dict = SPEC) -> Draft202012Validator:
    return Draft202012Validator({**spec, "$ref": f"#/components/schemas/{name}"})


def _streamed_completion_spec() -> dict:
    spec = copy.deepcopy(SPEC)
    choice = spec["components"]["schemas"]["CreateCompletionResponse"]["properties"]["choices"]["items"]
    choice["properties"]["finish_reason"] = {"anyOf": [choice["properties"]["finish_reason"], {"type": "null"}]}
    return spec


VALIDATORS = {
    "chat": _validator("CreateChatCompletionResponse"),
    "chat_chunk": _validator("CreateChatCompletionStreamResponse"),
    "completion": _validator("CreateCompletionResponse"),
    "completion_chunk": _validator("CreateCompletionResponse", _streamed_completion_spec()),
    "models": _validator("ListModelsResponse"),
    "model": _validator("Model"),
    "error": _validator("ErrorResponse"),
}


def conforms(kind: str, body: dict) -> dict:
    errors = sorted(VALIDATORS[kind].iter_errors(body), key=lambda e: list(e.absolute_path))
    assert not errors, f"{kind} does not match OpenAI's schema: " + "; ".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5]
    )
    return body


def stream_conforms(kind: str, response) -> list[dict]:
    return [conforms(kind, chunk) for chunk in events(response)]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with loaded_runtime(make_tiny_llama(tmp_path_factory.mktemp("tiny"))) as runtime, app_client(runtime) as c:
        yield c


def test_the_vendored_spec_names_its_source():
    assert SPEC["source"].startswith("https://github.com/openai/openai-openapi/blob/")
    # The validator must be able to fail: a chat response without "refusal" in its message does.
    bad = {"id": "x", "object": "chat.completion", "created": 1, "model": "m",
           "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None, "message": {"role": "assistant", "content": "hi"}}]}  # fmt: skip
    assert list(VALIDATORS["chat"].iter_errors(bad))
    assert list(VALIDATORS["chat"].iter_errors({**bad, "system_fingerprint": None}))


def test_models_conform(client):
    body = conforms("models", client.get("/v1/models").json())
    # bento-llm's extension: what the model can do (this template has no tool format, no <think>).
    capabilities = body["data"][0]["capabilities"]
    assert capabilities["tool_calling"] is False and capabilities["reasoning_parser"] is None and body["data"][0]["max_model_len"] > 0
    conforms("model", client.get(f"/v1/models/{body['data'][0]['id']}").json())


@pytest.mark.parametrize(
    "extra",
    [{}, {"logprobs": 2}, {"n": 2, "temperature": 1.0, "seed": 1}, {"echo": True}, {"prompt_logprobs": 1}, {"stop": ["e"]}],
    ids=["plain", "logprobs", "n2", "echo", "prompt_logprobs", "stop"],
)
def test_completions_conform(client, extra):
    conforms("completion", client.post("/v1/completions", json={"prompt": "Hello", **GREEDY, **extra}).json())
    if "prompt_logprobs" not in extra:
        stream = {"stream": True, "stream_options": {"include_usage": True}}
        chunks = stream_conforms("completion_chunk", client.post("/v1/completions", json={"prompt": "Hello", **GREEDY, **extra, **stream}))
        assert chunks[-1]["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize(
    "extra",
    [{}, {"logprobs": True, "top_logprobs": 2}, {"n": 2, "temperature": 1.0, "seed": 1}, {"best_of": 2, "n": 1, "temperature": 1.0}],
    ids=["plain", "logprobs", "n2", "best_of"],
)
def test_chat_conforms(client, extra):
    body = conforms("chat", client.post("/v1/chat/completions", json={"messages": CHAT, **GREEDY, **extra}).json())
    if extra.get("logprobs"):
        assert body["choices"][0]["logprobs"]["refusal"] is None
    assert "system_fingerprint" not in body
    for stream in ({"stream": True}, {"stream": True, "stream_options": {"include_usage": True}}):
        stream_conforms("chat_chunk", client.post("/v1/chat/completions", json={"messages": CHAT, **GREEDY, **extra, **stream}))


@pytest.mark.parametrize(
    "method,path,body,status",
    [
        ("post", "/v1/chat/completions", {"messages": CHAT, "temperature": "hot"}, 400),
        ("post", "/v1/completions", {"prompt": "x", "bogus": 1}, 400),
        ("post", "/v1/completions", {"prompt": "x", "model": "nope"}, 404),
        ("get", "/v1/models/nope", None, 404),
        ("get", "/v1/nowhere", None, 404),
    ],
)
def test_errors_conform(client, method, path, body, status):
    response = client.request(method.upper(), path, json=body)
    assert response.status_code == status
    conforms("error", response.json())

