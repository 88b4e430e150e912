"""Prometheus metrics of the server (`GET /metrics`), on a registry of its own.

Gauges and totals are read from the engine's `stats()` and the server's counters at
scrape time (a collector), so they can never drift from the engine; the latency
histograms are observed by the HTTP side as tokens arrive.
"""

from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """The issue's metric names; `stats` is a callable returning the engine's stats."""

    def __init__(self, stats):
        self.registry = CollectorRegistry()
        self.stats = stats
        self.lock = threading.Lock()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.registry.register(self)
        self.ttft = Histogram("ftjax_time_to_first_token_seconds",
                              "Request arrival to its first generated token", buckets=_LATENCY,
                              registry=self.registry)
        self.itl = Histogram("ftjax_inter_token_latency_seconds",
                             "Between a sequence's generated tokens (a decode chunk's "
                             "tokens arrive together: its gap is shared among them)",
                             buckets=_LATENCY, registry=self.registry)
        self.e2e = Histogram("ftjax_e2e_request_latency_seconds",
                             "Request arrival to its last token", buckets=_LATENCY,
                             registry=self.registry)

    # -- EngineRunner's observer (called on the engine thread) ------------------

    def added(self, handle):
        with self.lock:
            self.prompt_tokens += len(handle.prompt)

    def output(self, handle, out):
        now, k = time.monotonic(), len(out.new_tokens)
        with self.lock:
            self.generation_tokens += k
        last = handle.times.get(out.sample)
        if k:
            if last is None:
                self.ttft.observe(now - handle.arrival)
                k -= 1                   # the first token has no gap before it
                last = now
            for _ in range(k):
                self.itl.observe((now - last) / k)
            handle.times[out.sample] = now
        if out.finished and handle.finished + 1 == handle.sampling.n:
            self.e2e.observe(now - handle.arrival)

    def collect(self):
        s = self.stats()
        yield GaugeMetricFamily("ftjax_requests_running", "Requests in prefill or decode",
                                value=s.get("running", 0))
        yield GaugeMetricFamily("ftjax_requests_waiting", "Requests queued for a slot",
                                value=s.get("waiting", 0) + s.get("submitted", 0))
        yield GaugeMetricFamily("ftjax_kv_pages_in_use", "KV cache pages held by sequences",
                                value=s.get("pages_in_use", 0))
        yield GaugeMetricFamily("ftjax_kv_pages_total", "KV cache pages in the pool",
                                value=s.get("pages_total", 0))
        yield CounterMetricFamily("ftjax_prompt_tokens", "Prompt tokens of accepted requests",
                                  value=self.prompt_tokens)
        yield CounterMetricFamily("ftjax_generation_tokens", "Tokens generated",
                                  value=self.generation_tokens)
        yield CounterMetricFamily("ftjax_prefix_cache_hits", "Prompt blocks found in the "
                                  "prefix cache", value=s.get("prefix_hits", 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
