"""One bad request never hurts another, over a real `bentoml serve` (with faults a request can
trigger, tests/fault_service.py): every bad value is a 400 naming its field while a normal
request runs on untouched, a failure in one request's bookkeeping fails it alone, a huge body
is a 413 and never stalls /livez, unknown paths do not grow /metrics, and a failure pinned to
no request turns both probes to 503. The server is the one the server tests share
(tests/shared_server.py); the two tests that kill its engine take it for themselves."""

from __future__ import annotations

import asyncio
import json
import random
import string
import threading
import time

import httpx
import pytest

from bento_llm.testing import ServerProcess, metric, scrape
from engine.llm_engine import MAX_CONSECUTIVE_FORWARD_FAILURES
from tests.fault_service import BREAK_FORWARD, FAIL_BOOKKEEPING, KILL_ENGINE
from tests.shared_server import AUTH

pytestmark = pytest.mark.slow

NORMAL = {"prompt": "A normal request", "max_tokens": 60, "temperature": 0, "ignore_eos": True}
BEAM = {"use_beam_search": True, "n": 2, "temperature": 0}


@pytest.fixture(scope="module")
def server(shared_server) -> ServerProcess:
    """The server the server test modules share (tests/shared_server.py serves tests/fault_service.py)."""
    return shared_server.get()


@pytest.fixture(scope="module")
def alone(server) -> str:
    response = httpx.post(server.url + "/v1/completions", headers=AUTH, json=NORMAL, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def wait_idle(server: ServerProcess, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while metric(scrape(server.url), "bento_llm:kv_blocks_used") != 0:
        assert time.monotonic() < deadline, "KV blocks still held"
        time.sleep(0.05)


def openai_error(response: httpx.Response) -> dict:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


BAD_VALUES = [  # raw bodies: Python's json module writes NaN and Infinity, as a careless client would
    ('{"prompt": "x", "temperature": NaN}', "temperature"),
    ('{"prompt": "x", "temperature": Infinity}', "temperature"),
    ('{"prompt": "x", "temperature": 1e999}', "temperature"),
    ('{"prompt": "x", "repetition_penalty": NaN}', "repetition_penalty"),
    ('{"prompt": "x", "repetition_penalty": 1e-300}', "repetition_penalty"),
    ('{"prompt": "x", "top_k": 9223372036854775808}', "top_k"),
    ('{"prompt": "x", "seed": 18446744073709551616}', "seed"),
    ('{"prompt": "x", "logit_bias": {"5": -Infinity}}', "logit_bias.5"),
    ('{"prompt": "x", "stop_token_ids": [999999999]}', "stop_token_ids"),
    (json.dumps({"prompt": "x", "length_penalty": 1e308, **BEAM}), "length_penalty"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "top_p": 1e-320, "min_p": 2.0}), "min_p"),
]


def test_bad_values_are_400s_naming_the_field_while_a_normal_request_runs_on(server, alone):
    async def main():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as client:
            normal = asyncio.create_task(client.post("/v1/completions", json=NORMAL))
            await asyncio.sleep(0.2)  # the normal request is decoding
            bad = []
            for body, param in BAD_VALUES:
                path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
                bad.append((param, await client.post(path, content=body, headers={"content-type": "application/json"})))
            tiny_temperature = await client.post("/v1/completions", json={"prompt": "x", "temperature": 1e-40, "max_tokens": 3})
            ready = await client.get("/readyz")
            return await normal, bad, tiny_temperature, ready

    normal, bad, tiny_temperature, ready = asyncio.run(main())
    for param, response in bad:
        assert response.status_code == 400, (param, response.text)
        assert openai_error(response)["param"] == param, response.text
    assert tiny_temperature.status_code == 200  # clamped to 0.01, as vLLM does
    assert ready.status_code == 200
    assert normal.status_code == 200 and normal.json()["choices"][0]["text"] == alone
    wait_idle(server)


def test_a_failure_in_one_requests_bookkeeping_fails_it_alone(server, alone):
    async def main():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as client:
            doomed = {"prompt": "doomed", "max_tokens": 20, "ignore_eos": True, "stop": [FAIL_BOOKKEEPING]}
            return await asyncio.gather(client.post("/v1/completions", json=NORMAL), client.post("/v1/completions", json=doomed))

    normal, doomed = asyncio.run(main())
    assert doomed.status_code == 500 and openai_error(doomed)["type"] == "server_error"
    assert normal.status_code == 200 and normal.json()["choices"][0]["text"] == alone
    assert httpx.get(server.url + "/readyz").status_code == 200
    wait_idle(server)
    assert "injected bookkeeping failure" in server.log_tail(chars=200_000)


def test_a_huge_body_is_a_413_and_a_big_prompt_never_stalls_livez(server):
    five_mb = json.dumps({"prompt": "word " * 1_000_000}).encode()
    response = httpx.post(server.url + "/v1/completions", headers=AUTH, content=five_mb, timeout=30)
    assert response.status_code == 413 and openai_error(response)["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit counts what arrives
        for _ in range(6):
            yield b" " * 1_000_000

    response = httpx.post(server.url + "/v1/completions", headers=AUTH, content=chunks(), timeout=30)
    assert response.status_code == 413

    # Just under the limit: tokenized (seconds of work) off the event loop, then refused.
    big = json.dumps({"prompt": "The quick brown fox. " * 190_000})
    latencies: list[float] = []
    done = threading.Event()

    def probe():
        with httpx.Client(base_url=server.url, timeout=10) as client:
            while not done.is_set():
                start = time.perf_counter()
                assert client.get("/livez").status_code == 200
                latencies.append(time.perf_counter() - start)
                time.sleep(0.02)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        response = httpx.post(server.url + "/v1/completions", headers={**AUTH, "content-type": "application/json"}, content=big, timeout=60)
    finally:
        done.set()
        prober.join()
    assert response.status_code == 400 and openai_error(response)["code"] == "context_length_exceeded"
    assert len(latencies) > 5
    # 100 ms on a quiet machine; a shared CI box gets slack, never the seconds a blocked loop takes.
    assert max(latencies) < 0.5, max(latencies)


def test_unknown_paths_do_not_grow_metrics(server):
    def series() -> set[str]:
        text = httpx.get(server.url + "/metrics").text
        assert "\x00" not in text
        return {line.rpartition(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}

    rng = random.Random(0)

    def random_paths(count: int):
        for i in range(count):
            name = "".join(rng.choices(string.ascii_letters, k=12))
            yield [f"/{name}", f"/v1/{name}", f"/{name}%00x", f"/v1/models/{name}/{i}"][i % 4]

    with httpx.Client(base_url=server.url) as client:
        for path in random_paths(4):  # each shared label (route template x status) now exists
            client.get(path)
        before = series()
        for path in random_paths(100):
            assert client.get(path).status_code in (401, 404)
    assert series() == before


def test_the_api_docs_are_open_and_list_the_real_status_codes(server):
    spec = httpx.get(server.url + "/v1/openapi.json")
    assert spec.status_code == 200
    responses = spec.json()["paths"]["/completions"]["post"]["responses"]
    assert set(responses) == {"200", "400", "401", "404", "413", "429", "503"}
    assert "422" not in spec.text
    docs = httpx.get(server.url + "/v1/docs")
    assert docs.status_code == 200 and "/v1/openapi.json" in docs.text
    assert httpx.get(server.url + "/v1/models").status_code == 401  # the API itself still needs the key


def test_a_failure_pinned_to_no_request_turns_both_probes_503(shared_server):
    """It kills the engine: it takes the shared server for itself (a later user gets a new one)."""
    with shared_server.take() as server:
        killer = {"prompt": "kill", "max_tokens": 5, "stop": [KILL_ENGINE]}
        response = httpx.post(server.url + "/v1/completions", headers=AUTH, json=killer, timeout=30)
        assert response.status_code >= 500 and openai_error(response)["type"] == "server_error"
        assert server.status("/readyz") == 503 and server.status("/livez") == 503
        after = httpx.post(server.url + "/v1/completions", headers=AUTH, json=NORMAL, timeout=30)
        assert after.status_code == 503 and openai_error(after)["type"] == "server_error"


def test_a_forward_pass_that_keeps_failing_turns_both_probes_503_instead_of_failing_request_after_request(shared_server):
    """It kills the engine, so it takes the shared server for itself (a later user gets a new
    one): once every forward pass fails, a few requests get a 500 and then the engine reports
    itself dead, so an orchestrator restarts it."""
    with shared_server.take() as server:
        breaker = {"prompt": "break", "max_tokens": 5, "stop": [BREAK_FORWARD]}
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:
            assert client.post("/v1/completions", json=NORMAL).status_code == 200
            failed = [client.post("/v1/completions", json=breaker)]
            failed += [client.post("/v1/completions", json=NORMAL) for _ in range(MAX_CONSECUTIVE_FORWARD_FAILURES - 1)]
            for response in failed:
                assert response.status_code == 500 and openai_error(response)["type"] == "server_error"
            assert server.status("/readyz") == 503 and server.status("/livez") == 503
            after = client.post("/v1/completions", json=NORMAL)
            assert after.status_code == 503 and openai_error(after)["type"] == "server_error"
        assert f"failed {MAX_CONSECUTIVE_FORWARD_FAILURES} times in a row" in server.log_tail(chars=200_000)
