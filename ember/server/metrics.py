"""Prometheus metrics for /metrics, on a per-app CollectorRegistry (several apps may live in one
process, e.g. in tests).

Two sources: the engine's own counters and gauges, read from `engine.stats()` at scrape time by a
custom collector (so they are never stale and cost nothing between scrapes), also under the `vllm:` names
that gateways and autoscalers read (the Gateway API Inference Extension's model-server protocol: queue
length, running batch, KV usage, the LoRA adapters in use and the KV cache's shape); and latency
histograms (TTFT, inter-token, end-to-end) observed by the server per request, as a client sees
them, tokenization and queueing included."""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

logger = logging.getLogger("ember.server")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)

# (stats attribute, metric name, help) for the engine's cumulative counters
_COUNTERS = (
    ("prompt_tokens_total", "ember_prompt_tokens", "Prompt tokens processed."),
    ("generation_tokens_total", "ember_generation_tokens", "Tokens generated."),
    ("prefix_cache_queries", "ember_prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
    ("prefix_cache_hits", "ember_prefix_cache_hits", "Prompt tokens found in the prefix cache."),
    ("num_draft_tokens_total", "ember_spec_decode_num_draft_tokens", "Speculative tokens proposed."),
    ("num_accepted_tokens_total", "ember_spec_decode_num_accepted_tokens", "Speculative tokens accepted."),
)


def _num(stats, name: str) -> float:
    value = getattr(stats, name, 0)
    return float(value or 0)


class EngineStatsCollector:
    """Reads `engine.stats()` (duck-typed: any object with the EngineStats attributes) on scrape."""

    def __init__(self, engine):
        self.engine = engine

    def describe(self):
        return []  # no static description: the registry must not call stats() at registration

    def collect(self):
        healthy = GaugeMetricFamily("ember_engine_healthy", "1 while the engine loop runs, 0 once it died.")
        is_healthy = _call(self.engine, "is_healthy")
        healthy.add_metric([], 1.0 if is_healthy else 0.0)
        yield healthy
        stats = _call(self.engine, "stats")
        if stats is None:
            return
        for attr, name, doc in (
            ("num_running", "ember_num_requests_running", "Requests in the running batch."),
            ("num_waiting", "ember_num_requests_waiting", "Requests waiting to be scheduled."),
            ("kv_cache_usage", "ember_kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1)."),
        ):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], _num(stats, attr))
            yield g
        for attr, name, doc in _COUNTERS:
            c = CounterMetricFamily(name, doc)
            c.add_metric([], _num(stats, attr))
            yield c
        queries, hits = _num(stats, "prefix_cache_queries"), _num(stats, "prefix_cache_hits")
        rate = GaugeMetricFamily("ember_prefix_cache_hit_rate", "Prefix-cache hits / queries since start (tokens).")
        rate.add_metric([], hits / queries if queries else 0.0)
        yield rate
        drafts, accepted = _num(stats, "num_draft_tokens_total"), _num(stats, "num_accepted_tokens_total")
        acc = GaugeMetricFamily("ember_spec_decode_acceptance_rate", "Accepted / proposed speculative tokens since start.")
        acc.add_metric([], accepted / drafts if drafts else 0.0)
        yield acc
        yield from gateway_metrics(stats, getattr(self.engine, "served_model_name", "") or "")


def gateway_metrics(stats, model_name: str):
    """The series the Gateway API Inference Extension's endpoint picker (and vLLM-style HPA/KEDA recipes) scrape,
    named and shaped as vLLM exports them: gauges labelled with the model, KV usage a 0..1 fraction, and
    `vllm:lora_requests_info` whose labels list the adapters running and waiting (comma-separated) and the most
    a batch may mix, its value the scrape time (the picker keeps the newest sample)."""
    for attr, name, doc in (
        ("num_waiting", "vllm:num_requests_waiting", "Number of requests waiting to be processed."),
        ("num_running", "vllm:num_requests_running", "Number of requests in model execution batches."),
        ("kv_cache_usage", "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."),
    ):
        g = GaugeMetricFamily(name, doc, labels=["model_name"])
        g.add_metric([model_name], _num(stats, attr))
        yield g
    lora = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests.",
                             labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"])
    lora.add_metric([str(int(_num(stats, "max_loras"))), ",".join(getattr(stats, "waiting_lora_names", ()) or ()),
                     ",".join(getattr(stats, "running_lora_names", ()) or ())], time.time())
    yield lora
    cache = GaugeMetricFamily("vllm:cache_config_info", "Information of the KV cache (labels); the value is 1.",
                              labels=["block_size", "num_gpu_blocks"])
    cache.add_metric([str(int(_num(stats, "block_size"))), str(int(_num(stats, "num_blocks")))], 1.0)
    yield cache  # the endpoint picker's prefix-cache scorer sizes its model of each pod's cache from it


def _call(engine, name: str):
    try:
        return getattr(engine, name)()
    except Exception:  # noqa: BLE001 - a scrape must never fail because the engine did
        logger.warning("engine.%s() failed during a metrics scrape", name, exc_info=True)
        return None


class ServerMetrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(EngineStatsCollector(engine))
        r = self.registry
        self.ttft = Histogram("ember_time_to_first_token_seconds", "Time to first token.", buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("ember_inter_token_latency_seconds", "Time between output tokens.", buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("ember_e2e_request_latency_seconds", "Request latency, arrival to last token.", buckets=_LATENCY_BUCKETS, registry=r)
        self.finished = Counter("ember_request_success", "Finished sequences by finish reason.", ["finished_reason"], registry=r)
        self.failed = Counter("ember_request_errors", "Requests answered with an error, by HTTP status.", ["status"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self) -> "RequestTimer":
        return RequestTimer(self)


class RequestTimer:
    """Latency bookkeeping of one request (all its n sequences together)."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.arrival = time.monotonic()
        self.last_token_time: float | None = None
        self.num_tokens = 0

    def on_tokens(self, num_tokens_total: int) -> None:
        """Called with the cumulative number of output tokens after each engine output."""
        new = num_tokens_total - self.num_tokens
        if new <= 0:
            return
        now = time.monotonic()
        if self.last_token_time is None:
            self.metrics.ttft.observe(now - self.arrival)
            new -= 1
        elif new:
            gap = (now - self.last_token_time) / new
            for _ in range(min(new, 64)):  # a speculative burst counts once per token
                self.metrics.itl.observe(gap)
        self.last_token_time = now
        self.num_tokens = num_tokens_total

    def on_finish(self, finish_reasons: list[str | None]) -> None:
        self.metrics.e2e.observe(time.monotonic() - self.arrival)
        for reason in finish_reasons:
            self.metrics.finished.labels(finished_reason=reason or "unknown").inc()

    def on_error(self, status: int) -> None:
        self.metrics.failed.labels(status=str(status)).inc()
