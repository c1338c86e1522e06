"""Every OpenAI and vLLM sampling field of an HTTP request reaches the engine's SamplingParams
with the value sent: the real /v1 app and a real tiny engine, the params read where the
server hands them to the engine."""

from __future__ import annotations

import dataclasses

import pytest

from engine import SamplingParams
from tests.helpers import running_app

CHAT = [{"role": "user", "content": "Say hi"}]

# Every sampling field set away from its default, in one request; each value differs from every
# other field's, so a conversion that reads the wrong field shows up too.
SAMPLED = dict(
    n=2, best_of=3, temperature=0.7, top_p=0.9, top_k=5, min_p=0.05, seed=123,
    presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.1, min_tokens=1,
    stop=["zzz", "yyy"], stop_token_ids=[7, 8], include_stop_str_in_output=True, ignore_eos=True,
    logit_bias={"11": 2.5}, skip_special_tokens=False, spaces_between_special_tokens=False,
)
SAMPLED_PARAMS = dict(SAMPLED, logit_bias={11: 2.5})
BEAM = dict(use_beam_search=True, n=2, best_of=3, temperature=0.0, length_penalty=0.5, early_stopping="never",
            stop_token_ids=[9])


@pytest.fixture(scope="module")
def app(tiny_path):
    with running_app(tiny_path, num_kv_blocks=64) as runtime_and_client:
        yield runtime_and_client


@pytest.fixture
def client(app):
    return app[1]


@pytest.fixture
def received(app, monkeypatch) -> list[SamplingParams]:
    """The SamplingParams of each request the server hands to the engine (which then runs it)."""
    engine = app[0].engine
    seen: list[SamplingParams] = []
    add_request = engine.add_request

    def recording(request_id, prompt, params=None, **kwargs):
        seen.append(params)
        return add_request(request_id, prompt, params, **kwargs)

    monkeypatch.setattr(engine, "add_request", recording)
    return seen


def sent(client, received, path: str, body: dict) -> dict:
    """POST body; return every field of the one SamplingParams it produced."""
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    assert len(received) == 1
    return dataclasses.asdict(received.pop())


def expected(**fields) -> dict:
    return dataclasses.asdict(SamplingParams(**fields))


def test_completion_defaults_are_the_engine_defaults_with_16_tokens(client, received):
    assert sent(client, received, "/v1/completions", {"prompt": "Hi"}) == expected(max_tokens=16)


def test_chat_defaults_are_the_engine_defaults_up_to_the_context_length(client, received):
    assert sent(client, received, "/v1/chat/completions", {"messages": CHAT}) == expected(max_tokens=None)


def test_every_sampling_field_of_a_completion_request_reaches_the_engine(client, received):
    body = dict(SAMPLED, prompt="Hi", max_tokens=3, logprobs=2, prompt_logprobs=1)
    assert sent(client, received, "/v1/completions", body) == expected(
        **SAMPLED_PARAMS, max_tokens=3, logprobs=2, prompt_logprobs=1
    )


def test_every_sampling_field_of_a_chat_request_reaches_the_engine(client, received):
    body = dict(SAMPLED, messages=CHAT, max_completion_tokens=3, logprobs=True, top_logprobs=2)
    assert sent(client, received, "/v1/chat/completions", body) == expected(**SAMPLED_PARAMS, max_tokens=3, logprobs=2)


@pytest.mark.parametrize("path, extra", [("/v1/completions", {"prompt": "Hi"}), ("/v1/chat/completions", {"messages": CHAT})])
def test_beam_search_fields_reach_the_engine(client, received, path, extra):
    assert sent(client, received, path, dict(BEAM, **extra, max_tokens=3)) == expected(**BEAM, max_tokens=3)


@pytest.mark.parametrize(
    "body, fields",
    [
        ({"stop": "zzz"}, {"stop": ["zzz"]}),  # a lone string is a one-item list
        ({"top_k": 0}, {}),  # 0 disables top-k, as -1
        ({"temperature": 0, "logprobs": 0}, {"temperature": 0.0, "logprobs": 0}),  # 0 is a value, not "unset"
        ({"n": 3}, {"n": 3, "best_of": 3}),  # best_of defaults to n
    ],
)
def test_completion_field_forms(client, received, body, fields):
    assert sent(client, received, "/v1/completions", dict(body, prompt="Hi", max_tokens=2)) == expected(
        **fields, max_tokens=2
    )


def test_chat_logprobs_without_top_logprobs_report_the_chosen_token_only(client, received):
    body = {"messages": CHAT, "max_tokens": 2, "logprobs": True}
    assert sent(client, received, "/v1/chat/completions", body) == expected(max_tokens=2, logprobs=0)


def test_chat_max_tokens_is_read_when_max_completion_tokens_is_absent(client, received):
    body = {"messages": CHAT, "max_tokens": 4}
    assert sent(client, received, "/v1/chat/completions", body) == expected(max_tokens=4)
