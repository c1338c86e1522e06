"""Prometheus metrics of the engine and of request latencies, with vLLM's names, appended
to BentoML's own /metrics output.

Why a custom collector on a private registry rather than prometheus_client's Gauge and
Histogram: BentoML runs prometheus_client in multiprocess mode (PROMETHEUS_MULTIPROC_DIR),
where every metric object writes mmap files that BentoML's collector also reads, and
gauges need a multiprocess mode. Our numbers live in one worker, so we keep them in plain
Python and render them ourselves; engine gauges are read from `engine.stats()` at scrape
time, so they can never drift from the engine.
"""

from __future__ import annotations

import bisect
import threading
import time
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

# vLLM's buckets, so that dashboards built for vLLM read the same.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]  # fmt: skip
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0]  # fmt: skip
E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0]  # fmt: skip


class Histogram:
    """A thread-safe cumulative histogram."""

    def __init__(self, buckets: list[float]) -> None:
        self.buckets = list(buckets)
        self.counts = [0] * (len(buckets) + 1)  # the last is +Inf
        self.sum = 0.0
        self.lock = threading.Lock()

    def observe(self, value: float, times: int = 1) -> None:
        index = bisect.bisect_left(self.buckets, value)
        with self.lock:
            self.counts[index] += times
            self.sum += value * times

    def family(self, name: str, doc: str, labels: dict[str, str]) -> HistogramMetricFamily:
        with self.lock:
            counts, total = list(self.counts), self.sum
        cumulative, running = [], 0
        for bound, count in zip([*map(str, self.buckets), "+Inf"], counts):
            running += count
            cumulative.append((bound, running))
        family = HistogramMetricFamily(name, doc, labels=list(labels))
        family.add_metric(list(labels.values()), cumulative, total)
        return family


class RequestTimer:
    """Times one request from its arrival: first token, gaps between tokens, the end."""

    def __init__(self, metrics: "ServerMetrics") -> None:
        self.metrics = metrics
        self.start = time.perf_counter()
        self.last: float | None = None
        self.tokens = 0
        self.done = False

    def tokens_seen(self, total_tokens: int) -> None:
        new = total_tokens - self.tokens
        if new <= 0:
            return
        now = time.perf_counter()
        if self.last is None:
            self.metrics.ttft.observe(now - self.start)
            new -= 1  # the first token has no gap before it
        if new > 0 and self.last is not None:
            # Several tokens can arrive in one item when the consumer lags a step; spread the gap.
            self.metrics.itl.observe((now - self.last) / new, times=new)
        self.last = now
        self.tokens = total_tokens

    def finished(self, reason: str | None) -> None:
        if self.done:
            return
        self.done = True
        self.metrics.e2e.observe(time.perf_counter() - self.start)
        self.metrics.count_finished(reason or "abort")


class ServerMetrics:
    def __init__(self, model_name: str, stats: Callable[[], Any | None]) -> None:
        self.model_name = model_name
        self.stats = stats  # returns the engine's EngineStats, or None before it is loaded
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.finished: dict[str, int] = {}
        self.lock = threading.Lock()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def timer(self) -> RequestTimer:
        return RequestTimer(self)

    def count_finished(self, reason: str) -> None:
        with self.lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1

    def latency_totals(self) -> dict[str, float]:
        """Sums and counts of the latency histograms, for the dashboard's timeline."""
        totals = {}
        for name, histogram in (("ttft", self.ttft), ("itl", self.itl)):
            with histogram.lock:
                totals[f"{name}_sum"], totals[f"{name}_count"] = histogram.sum, sum(histogram.counts)
        return totals

    def render(self) -> str:
        return generate_latest(self.registry).decode()

    def collect(self) -> Iterator[Any]:  # the prometheus_client Collector protocol
        labels = {"model_name": self.model_name}
        names, values = list(labels), list(labels.values())
        stats = self.stats()
        if stats is not None:
            for name, doc, value in (
                ("vllm:num_requests_running", "Number of requests in model execution batches.", stats.num_running),
                ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", stats.num_waiting),
                ("vllm:num_requests_swapped", "Number of requests swapped to CPU.", stats.num_swapped),
                ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", stats.kv_cache_usage),
                ("vllm:gpu_cache_usage_perc", "KV-cache usage (vLLM v0 name). 1 means 100 percent.", stats.kv_cache_usage),
                ("bento_llm:kv_blocks_total", "KV-cache blocks in the pool.", stats.num_kv_blocks),
                ("bento_llm:kv_blocks_used", "KV-cache blocks held by requests.", stats.num_kv_blocks_used),
            ):  # fmt: skip
                gauge = GaugeMetricFamily(name, doc, labels=names)
                gauge.add_metric(values, float(value))
                yield gauge
            for name, doc, value in (
                ("vllm:prefix_cache_queries", "Prefix-cache queries, in tokens.", stats.prefix_cache_queries),
                ("vllm:prefix_cache_hits", "Prefix-cache hits, in tokens.", stats.prefix_cache_hits),
                ("vllm:num_preemptions", "Cumulative number of preemptions.", stats.num_preemptions),
                ("vllm:prompt_tokens", "Number of prefill tokens processed.", stats.prompt_tokens),
                ("vllm:generation_tokens", "Number of generation tokens processed.", stats.generation_tokens),
            ):  # fmt: skip
                counter = CounterMetricFamily(name, doc, labels=names)
                counter.add_metric(values, float(value))
                yield counter
        success = CounterMetricFamily(
            "vllm:request_success", "Count of finished requests, by finish reason.", labels=[*names, "finished_reason"]
        )
        with self.lock:
            finished = dict(self.finished)
        for reason, count in sorted(finished.items()):
            success.add_metric([*values, reason], float(count))
        yield success
        yield self.ttft.family("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", labels)
        yield self.itl.family("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", labels)
        yield self.e2e.family("vllm:e2e_request_latency_seconds", "Histogram of end to end request latency in seconds.", labels)
