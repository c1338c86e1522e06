"""Prometheus metrics of the engine and of request latencies, with vLLM's names.

Latencies and finished requests are prometheus_client's own Histogram and Counter. BentoML runs
prometheus_client in multiprocess mode (PROMETHEUS_MULTIPROC_DIR): there every metric object
writes its values to files in that directory and BentoML's /metrics collects them all, so ours
appear in BentoML's part of the page; in a single process they live in this module's registry
and `render` adds them. Engine gauges and counters are read from `engine.stats()` at scrape time
by a collector, so they can never drift from the engine (and need no multiprocess mode).
"""

from __future__ import annotations

import bisect
import time
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# vLLM's buckets, so that dashboards built for vLLM read the same.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]  # fmt: skip
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0]  # fmt: skip
E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0]  # fmt: skip


class BufferedHistogram:
    """A prometheus_client histogram child whose observations are counted here and added to it in
    bulk, at most FLUSH_INTERVAL_S apart (and when a request ends). For inter-token latency, an
    observation per token per request: in BentoML's multiprocess mode each `observe` writes two
    mmapped values under a lock, on the event loop, which on a small CPU shares the cores with
    the step's threads (profiled at c=64: a quarter of the event loop's Python time). The bulk
    add uses the child's `_sum` and `_buckets`, which prometheus_client's own `observe` updates;
    tests/test_openai_units.py checks that both give the same histogram."""

    FLUSH_INTERVAL_S = 0.25

    def __init__(self, child: Any) -> None:
        self.child = child
        self.bounds = list(child._upper_bounds)  # ends with +Inf
        self.counts = [0] * len(self.bounds)
        self.total = 0.0
        self.pending = False
        self.due = 0.0  # perf_counter time of the next flush

    def observe(self, value: float, times: int = 1) -> None:
        """`value`, `times` times. Its bucket is the first bound >= value, as `Histogram.observe`'s."""
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.total += value * times
        self.pending = True

    def flush(self, now: float | None = None) -> None:
        self.due = (now if now is not None else time.perf_counter()) + self.FLUSH_INTERVAL_S
        if not self.pending:
            return
        self.child._sum.inc(self.total)
        for bucket, count in zip(self.child._buckets, self.counts):
            if count:
                bucket.inc(count)
        self.counts = [0] * len(self.bounds)
        self.total, self.pending = 0.0, False


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
        # Several tokens can arrive in one item when the consumer lags a step. Each token after
        # the first still counts one gap, and the gaps sum to the time from the first token seen
        # to the last: an item's gap is spread over its tokens, and the tokens that came with the
        # first one had none.
        if self.last is None:
            self.metrics.ttft.observe(now - self.start)
            new -= 1  # the first token has no gap before it
            gap = 0.0
        else:
            gap = (now - self.last) / new
        if new > 0:
            self.metrics.itl.observe(gap, new)
            if now >= self.metrics.itl.due:
                self.metrics.itl.flush(now)
        self.last = now
        self.tokens = total_tokens

    def finished(self, reason: str | None) -> None:
        if self.done:
            return
        self.done = True
        self.metrics.itl.flush()
        self.metrics.e2e.observe(time.perf_counter() - self.start)
        self.metrics.count_finished(reason or "abort")


class ServerMetrics:
    def __init__(self, model_name: str, stats: Callable[[], Any | None]) -> None:
        self.model_name = model_name
        self.stats = stats  # returns the engine's EngineStats, or None before it is loaded
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        # In multiprocess mode BentoML's /metrics already carries these (see the module doc).
        multiprocess = values.ValueClass is not values.MutexValue
        registry = None if multiprocess else self.registry
        self.histograms = {
            name: Histogram(f"vllm:{name}_seconds", doc, ["model_name"], buckets=buckets, registry=registry)
            for name, doc, buckets in (
                ("time_to_first_token", "Histogram of time to first token in seconds.", TTFT_BUCKETS),
                ("inter_token_latency", "Histogram of inter-token latency in seconds.", ITL_BUCKETS),
                ("e2e_request_latency", "Histogram of end to end request latency in seconds.", E2E_BUCKETS),
            )
        }  # fmt: skip
        self.ttft, itl, self.e2e = (h.labels(model_name=model_name) for h in self.histograms.values())
        self.itl = BufferedHistogram(itl)  # one observation per token: counted here, added in bulk
        self.finished = Counter(
            "vllm:request_success", "Count of finished requests, by finish reason.", ["model_name", "finished_reason"],
            registry=registry,
        )  # fmt: skip

    def timer(self) -> RequestTimer:
        return RequestTimer(self)

    def count_finished(self, reason: str) -> None:
        self.finished.labels(model_name=self.model_name, finished_reason=reason).inc()

    def latency_totals(self) -> dict[str, float]:
        """Sums and counts of the TTFT and inter-token histograms, for the dashboard's timeline."""
        totals = {}
        for key, name in (("ttft", "time_to_first_token"), ("itl", "inter_token_latency")):
            (family,) = self.histograms[name].collect()
            for sample in family.samples:
                if sample.labels.get("model_name") == self.model_name and sample.name.endswith(("_sum", "_count")):
                    totals[f"{key}_{sample.name.rpartition('_')[2]}"] = sample.value
        return totals

    def render(self) -> str:
        return generate_latest(self.registry).decode()

    def collect(self) -> Iterator[Any]:  # the prometheus_client Collector protocol
        names, label_values = ["model_name"], [self.model_name]
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
                gauge.add_metric(label_values, float(value))
                yield gauge
            for name, doc, value in (
                ("vllm:prefix_cache_queries", "Prefix-cache queries, in tokens.", stats.prefix_cache_queries),
                ("vllm:prefix_cache_hits", "Prefix-cache hits, in tokens.", stats.prefix_cache_hits),
                ("vllm:num_preemptions", "Cumulative number of preemptions.", stats.num_preemptions),
                ("vllm:prompt_tokens", "Number of prefill tokens processed.", stats.prompt_tokens),
                ("vllm:generation_tokens", "Number of generation tokens processed.", stats.generation_tokens),
                ("bento_llm:step_handoff_seconds", "Seconds the step loop waited for the event loop to hand out a step's outputs.",
                 stats.step_handoff_seconds),
            ):  # fmt: skip
                counter = CounterMetricFamily(name, doc, labels=names)
                counter.add_metric(label_values, float(value))
                yield counter

