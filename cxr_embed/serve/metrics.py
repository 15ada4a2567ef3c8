"""Prometheus metrics of one server (its own registry, so several apps in one process never clash).

With ``--workers N`` each worker process counts its own requests; scrape them through one port with
the counters summed by the client, or run one worker per port.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class ServeMetrics:
    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    batch_size: Histogram
    batch_seconds: Histogram
    errors: Counter
    abstentions: Counter
    store_rows: Gauge

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)


def make_metrics() -> ServeMetrics:
    reg = CollectorRegistry()
    return ServeMetrics(
        registry=reg,
        requests=Counter(
            "cxr_serve_requests",
            "API requests by endpoint and HTTP status.",
            ["endpoint", "status"],
            registry=reg,
        ),
        latency=Histogram(
            "cxr_serve_request_seconds",
            "Request latency by endpoint.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        ),
        batch_size=Histogram(
            "cxr_serve_batch_size",
            "Images per model forward (micro-batching).",
            buckets=BATCH_BUCKETS,
            registry=reg,
        ),
        batch_seconds=Histogram(
            "cxr_serve_batch_seconds",
            "Seconds per batch (embed, classify, search).",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        ),
        errors=Counter("cxr_serve_errors", "Failed requests by kind.", ["kind"], registry=reg),
        abstentions=Counter(
            "cxr_serve_abstentions", "Inputs answered with abstain, by reason code.", ["code"], registry=reg
        ),
        store_rows=Gauge(
            "cxr_serve_store_rows", "Rows in the store the server is answering from.", registry=reg
        ),
    )
