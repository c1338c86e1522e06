"""Structured outputs over the OpenAI API, in-process on the default model: response_format
(json_object, json_schema), vLLM's guided_* fields and structured_outputs object on chat and
completions, streaming and not; the official SDK's chat.completions.parse with a pydantic model;
and a 400 naming the field for every constraint that cannot be honoured."""

from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from engine import DEFAULT_MODEL
from tests.helpers import running_app
from tests.structured_schemas import SCHEMAS
from tests.test_openai_app import events

pytestmark = pytest.mark.slow  # the default model

PERSON = SCHEMAS["flat_required"]
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.fixture(scope="module")
def app():
    with running_app(DEFAULT_MODEL, num_kv_blocks=256) as (runtime, client):
        yield runtime, client


@pytest.fixture
def client(app):
    return app[1]


def chat_json(client, body: dict) -> dict:
    response = client.post("/v1/chat/completions", json={"messages": ASK, "temperature": 1.0, "max_tokens": 80, **body})
    assert response.status_code == 200, response.text
    return response.json()


def streamed_texts(response) -> tuple[dict[int, str], dict[int, str]]:
    """Choice index -> reassembled text and finish reason, from chat or completion chunks."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for chunk in events(response):
        for choice in chunk["choices"]:
            piece = choice["delta"].get("content") if "delta" in choice else choice["text"]
            texts[choice["index"]] = texts.get(choice["index"], "") + (piece or "")
            if choice.get("finish_reason"):
                reasons[choice["index"]] = choice["finish_reason"]
    return texts, reasons


def test_response_format_json_schema_and_json_object(client):
    body = chat_json(client, {"n": 2, "seed": 3, "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}})
    for choice in body["choices"]:
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)
    body = chat_json(client, {"seed": 1, "max_tokens": 12, "response_format": {"type": "json_object"}})
    assert body["choices"][0]["message"]["content"].startswith("{")  # free-form: may be cut at max_tokens
    body = chat_json(client, {"seed": 1, "max_tokens": 4, "response_format": {"type": "text"}})
    assert body["choices"][0]["message"]["content"]


@pytest.mark.parametrize("field", ["response_format", "guided_json", "structured_outputs"])
def test_streamed_chat_reassembles_to_valid_json(client, field):
    schema = SCHEMAS["array_of_objects"]
    constraint = {
        "response_format": {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}},
        "guided_json": {"guided_json": json.dumps(schema)},
        "structured_outputs": {"structured_outputs": {"json": schema}},
    }[field]
    body = {"messages": ASK, "temperature": 1.0, "max_tokens": 100, "n": 2, "seed": 5, "stream": True, **constraint}
    texts, reasons = streamed_texts(client.post("/v1/chat/completions", json=body))
    assert sorted(texts) == [0, 1] and set(reasons.values()) == {"stop"}
    for text in texts.values():
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("stream", [False, True])
def test_completions_take_every_guided_form(client, stream):
    cases = [
        ({"guided_regex": r"\d{3}-[A-Z]{2}"}, lambda t: re.fullmatch(r"\d{3}-[A-Z]{2}", t)),
        ({"guided_choice": ["cat", "dog"]}, lambda t: t in ("cat", "dog")),
        ({"guided_grammar": 'root ::= "x" [0-9] [0-9]?'}, lambda t: re.fullmatch(r"x[0-9]{1,2}", t)),
        ({"structured_outputs": {"choice": ["up", "down"]}}, lambda t: t in ("up", "down")),
        ({"guided_json": SCHEMAS["enum_field"]}, lambda t: jsonschema.validate(json.loads(t), SCHEMAS["enum_field"]) is None),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMAS["top_level_array"]}}},
         lambda t: jsonschema.validate(json.loads(t), SCHEMAS["top_level_array"]) is None),
    ]
    for constraint, check in cases:
        body = {"prompt": "Answer:", "temperature": 1.0, "max_tokens": 40, "n": 2, "seed": 2, "stream": stream, **constraint}
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        if stream:
            texts, reasons = streamed_texts(response)
        else:
            texts = {c["index"]: c["text"] for c in response.json()["choices"]}
            reasons = {c["index"]: c["finish_reason"] for c in response.json()["choices"]}
        assert len(texts) == 2 and set(reasons.values()) == {"stop"}, (constraint, texts, reasons)
        for text in texts.values():
            assert check(text), (constraint, text)


class Step(BaseModel):
    action: Literal["search", "answer"]
    query: str = Field(max_length=20)


class Plan(BaseModel):
    goal: str = Field(max_length=30)
    steps: list[Step] = Field(min_length=1, max_length=2)
    confidence: float = Field(ge=0, le=1)


def test_the_openai_sdk_parses_into_a_pydantic_model(client):
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)
    completion = sdk.chat.completions.parse(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Plan a trip."}], response_format=Plan,
        temperature=1.0, seed=0, n=3, max_tokens=150,
    )  # fmt: skip
    assert len(completion.choices) == 3
    for choice in completion.choices:
        assert isinstance(choice.message.parsed, Plan) and choice.message.refusal is None, choice.message


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}}},
     "response_format.json_schema.schema", "uniqueItems"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": PERSON}}}, "response_format.json_schema.name", "name"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": PERSON, "strictly": True}}},
     "response_format.json_schema.strictly", "strictly"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "yaml"),
    ({"guided_json": {"type": "object", "properties": {"a": {"$ref": "#/$defs/nowhere"}}}}, "guided_json", "cannot be compiled"),
    ({"guided_json": "{oops"}, "guided_json", "not valid JSON"),
    ({"guided_regex": "(unclosed"}, "guided_regex", "cannot be compiled"),
    ({"guided_grammar": "root ::= missing"}, "guided_grammar", "cannot be compiled"),
    ({"guided_choice": []}, "guided_choice", "non-empty"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern", "whitespace_pattern"),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice", "only one"),
    ({"guided_regex": "a+", "use_beam_search": True, "n": 2, "temperature": 0}, "guided_regex", "beam search"),
    ({"guided_regex": "a+", "min_tokens": 3}, "min_tokens", "structured_outputs"),
]


@pytest.mark.parametrize("extra, param, words", BAD)
def test_constraints_that_cannot_be_honoured_are_400s_naming_the_field(client, extra, param, words):
    response = client.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 4, **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error
