"""Prometheus metrics, labelled by model and variant, in a registry of the app's own."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

disable_created_metrics()  # the *_created series only add noise to a scrape

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30)
RATE_WINDOW = 10.0  # seconds over which the tokens/s gauge is taken


class ServerMetrics:
    def __init__(self, variants: dict) -> None:
        self.registry = CollectorRegistry()
        labels = ["model", "variant"]
        self.requests = Counter("pocketlm_requests", "Requests answered, by endpoint and HTTP status",
                                labels + ["endpoint", "status"], registry=self.registry)
        self.errors = Counter("pocketlm_request_errors", "Requests answered with an error status",
                              labels + ["status"], registry=self.registry)
        self.latency = Histogram("pocketlm_request_latency_seconds", "Time from request to last token",
                                 labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("pocketlm_time_to_first_token_seconds", "Time from request to first token",
                              labels, buckets=TTFT_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter("pocketlm_prompt_tokens", "Prompt tokens processed", labels,
                                     registry=self.registry)
        self.generated_tokens = Counter("pocketlm_generated_tokens", "Tokens generated", labels,
                                        registry=self.registry)
        self.feedback = Counter("pocketlm_feedback", "Feedback votes", labels + ["rating"], registry=self.registry)
        self.retrieval = Histogram("pocketlm_retrieval_seconds", "Time to retrieve passages and build the prompt "
                                   "(variants with an index)", labels, buckets=TTFT_BUCKETS, registry=self.registry)
        self.embedded = Counter("pocketlm_embedded_inputs", "Inputs embedded by /v1/embeddings", ["model"],
                                registry=self.registry)
        self.embedded_tokens = Counter("pocketlm_embedded_tokens", "Tokens embedded by /v1/embeddings", ["model"],
                                       registry=self.registry)
        self.registry.register(_SchedulerCollector(variants))

    def labels(self, variant) -> dict[str, str]:
        return {"model": variant.spec.model, "variant": variant.name} if variant else {"model": "", "variant": ""}

    def token(self, variant) -> None:
        self.generated_tokens.labels(**self.labels(variant)).inc()

    def finished(self, variant, endpoint: str, status: int, latency: float | None, ttft: float | None,
                 prompt_tokens: int = 0) -> None:
        labels = self.labels(variant)
        self.requests.labels(**labels, endpoint=endpoint, status=str(status)).inc()
        if status >= 400:
            self.errors.labels(**labels, status=str(status)).inc()
        if status == 200 and latency is not None:
            self.latency.labels(**labels).observe(latency)
        if ttft is not None:
            self.ttft.labels(**labels).observe(ttft)
        if prompt_tokens:
            self.prompt_tokens.labels(**labels).inc(prompt_tokens)

    def retrieved(self, variant, seconds: float) -> None:
        self.retrieval.labels(**self.labels(variant)).observe(seconds)

    def embeddings(self, model: str, inputs: int, tokens: int) -> None:
        self.embedded.labels(model=model).inc(inputs)
        self.embedded_tokens.labels(model=model).inc(tokens)

    def vote(self, variant_name: str, model: str, rating: int) -> None:
        self.feedback.labels(model=model, variant=variant_name, rating="up" if rating > 0 else "down").inc()


class _SchedulerCollector(Collector):
    """Queue depth, running sequences and decode tokens/s, read from the schedulers at scrape time."""

    def __init__(self, variants: dict) -> None:
        self.variants = variants

    def collect(self):
        queue = GaugeMetricFamily("pocketlm_queue_depth", "Requests waiting for a free sequence", labels=["model", "variant"])
        active = GaugeMetricFamily("pocketlm_active_sequences", "Sequences being prefilled or decoded",
                                   labels=["model", "variant"])
        rate = GaugeMetricFamily("pocketlm_tokens_per_second", f"Tokens generated per second over the last "
                                 f"{RATE_WINDOW:.0f} s", labels=["model", "variant"])
        now = time.monotonic()
        for variant in self.variants.values():
            labels = [variant.spec.model, variant.name]
            scheduler = variant.scheduler
            queue.add_metric(labels, scheduler.queue_depth)
            active.add_metric(labels, scheduler.active)
            rate.add_metric(labels, scheduler.tokens_since(now - RATE_WINDOW) / RATE_WINDOW)
        yield from (queue, active, rate)
