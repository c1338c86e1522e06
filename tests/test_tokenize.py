"""POST /tokenize and /detokenize in vLLM's shapes (a prompt, or chat messages through the
chat template with tools), in-process over a real tiny engine. The API key and the mount at the
server's root are checked against a real `bentoml serve` in tests/test_server.py."""

from __future__ import annotations

import pytest

from tests.app_fixtures import app_client, loaded_runtime
from tests.chat_templates import HERMES_THINKING, write_chat_template
from tests.helpers import make_tiny_llama
from tests.test_tool_calling import TOOLS, USER


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    with loaded_runtime(write_chat_template(make_tiny_llama(tmp_path_factory.mktemp("tok")), HERMES_THINKING), num_kv_blocks=16) as rt:
        yield rt


@pytest.fixture(scope="module")
def client(runtime):
    with app_client(runtime) as c:
        yield c


def test_tokenize_a_prompt(client, runtime):
    text = "Hello world, tokenize me."
    body = client.post("/tokenize", json={"prompt": text}).json()
    ids = runtime.tokenizer.encode(text, add_special_tokens=True)
    assert body == {"count": len(ids), "max_model_len": runtime.max_model_len, "tokens": ids, "token_strs": None}
    strs = client.post("/tokenize", json={"prompt": text, "return_token_strs": True, "model": runtime.model_name}).json()["token_strs"]
    assert strs == runtime.tokenizer.convert_ids_to_tokens(ids)
    assert client.post("/detokenize", json={"tokens": ids}).json() == {"prompt": runtime.tokenizer.decode(ids)}


def test_tokenize_chat_messages_counts_what_chat_completions_sends(client):
    for extra in ({}, {"tools": TOOLS}):
        body = client.post("/tokenize", json={"messages": [USER], **extra}).json()
        chat = client.post("/v1/chat/completions", json={"messages": [USER], "max_tokens": 1, **extra}).json()
        assert body["count"] == len(body["tokens"]) == chat["usage"]["prompt_tokens"]
    bare = client.post("/tokenize", json={"messages": [USER], "add_generation_prompt": False}).json()
    assert bare["count"] < body["count"]


@pytest.mark.parametrize(
    "path,body,status,param",
    [
        ("/tokenize", {"prompt": 5}, 400, "prompt"),
        ("/tokenize", {"prompt": "x", "colour": 1}, 400, "colour"),
        ("/tokenize", {"messages": []}, 400, "messages"),
        ("/tokenize", {"messages": [USER], "add_generation_prompt": True, "continue_final_message": True}, 400, "continue_final_message"),
        ("/tokenize", {"prompt": "x", "model": "nope"}, 404, "model"),
        ("/detokenize", {"tokens": [1, -1]}, 400, "tokens"),
        ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
        ("/detokenize", {"tokens": "12"}, 400, "tokens"),
        ("/detokenize", None, 400, None),
    ],
)
def test_bad_requests_name_the_field(client, path, body, status, param):
    response = client.post(path, json=body) if body is not None else client.post(path, content=b"{not json")
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param
