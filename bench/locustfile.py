"""Load test of the chat endpoint with Locust (not a project dependency: `pip install locust`).

    locust -f bench/locustfile.py --host http://127.0.0.1:3000 --headless -u 16 -r 4 -t 2m

Each simulated user sends streaming chat requests back to back. For a stream, Locust's
request row times only the response headers; the "TTFT" row (time to the first token) and
the "TPOT" row (mean time per output token after the first) are the ones to read, and a
sweep over users shows where latency gives way. Settings come from the environment:

    BENCH_MAX_TOKENS (128)  BENCH_STREAM (1)  BENCH_MODEL (the server's first model)
    BENTO_LLM_API_KEY (none)  BENCH_TEMPERATURE (0.7)
"""

from __future__ import annotations

import json
import os
import random
import time

from locust import HttpUser, between, events, task

MAX_TOKENS = int(os.environ.get("BENCH_MAX_TOKENS", "128"))
STREAM = os.environ.get("BENCH_STREAM", "1") not in ("0", "false", "no")
TEMPERATURE = float(os.environ.get("BENCH_TEMPERATURE", "0.7"))
API_KEY = os.environ.get("BENTO_LLM_API_KEY")

QUESTIONS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how honeybees communicate.",
    "Give me three tips for baking bread at home.",
    "What causes volcanoes to erupt?",
    "Write a haiku about the moon landing.",
    "Describe a busy city at night.",
    "Why do chess players study openings?",
    "Summarise the history of maps in a paragraph.",
]


class ChatUser(HttpUser):
    wait_time = between(0, 0.5)
    model: str | None = os.environ.get("BENCH_MODEL")

    def on_start(self) -> None:
        if API_KEY:
            self.client.headers["Authorization"] = f"Bearer {API_KEY}"
        if self.model is None:
            response = self.client.get("/v1/models", name="/v1/models")
            type(self).model = response.json()["data"][0]["id"]

    @task
    def chat(self) -> None:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": random.choice(QUESTIONS)}],
            "max_tokens": MAX_TOKENS,
            "temperature": TEMPERATURE,
            "stream": STREAM,
        }
        if STREAM:
            body["stream_options"] = {"include_usage": True}
        start = time.perf_counter()
        name = "/v1/chat/completions" + (" (stream)" if STREAM else "")
        with self.client.post("/v1/chat/completions", json=body, stream=STREAM, catch_response=True, name=name) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            if not STREAM:
                response.success()
                return
            first = None
            tokens = 0
            try:
                for line in response.iter_lines():
                    if not line or not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        response.failure(chunk["error"]["message"])
                        return
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                        first = time.perf_counter()
            except Exception as e:  # noqa: BLE001 - reported as a failure row
                response.failure(repr(e))
                return
            end = time.perf_counter()
            response.success()
        if first is not None:
            events.request.fire(request_type="TTFT", name="chat", response_time=(first - start) * 1000,
                                response_length=0, exception=None, context={})  # fmt: skip
            if tokens > 1:
                events.request.fire(request_type="TPOT", name="chat", response_time=(end - first) * 1000 / (tokens - 1),
                                    response_length=tokens, exception=None, context={})  # fmt: skip
