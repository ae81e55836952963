"""Prometheus metrics of the cloud service, on a registry of their own (one per server).

What belongs here: metric definitions and the few calls that update them. What does not:
serving them over HTTP (the server mounts `render()` on its HTTP app).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Metrics:
    """All metrics of one server. A fresh registry each time, so tests can run many servers."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sessions_open = Gauge("tether_sessions_open", "Cloud sessions currently open", registry=r)
        self.sessions_evicted = Counter(
            "tether_sessions_evicted_total", "Sessions evicted", ["reason"], registry=r
        )
        self.requests = Counter(
            "tether_requests_total", "Session requests by operation and outcome", ["op", "outcome"], registry=r
        )
        self.request_latency = Histogram(
            "tether_request_seconds", "Request latency by operation", ["op"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.tokens_verified = Counter("tether_tokens_verified_total", "Draft tokens verified", registry=r)
        self.tokens_accepted = Counter("tether_tokens_accepted_total", "Draft tokens accepted", registry=r)
        self.tokens_committed = Counter(
            "tether_tokens_committed_total", "Tokens committed to sessions by verify/generate", registry=r
        )
        self.batch_size = Histogram(
            "tether_batch_size", "Sequences per batched forward pass", buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "tether_batch_tokens", "New tokens per batched forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=r,
        )
        self.queue_wait = Histogram(
            "tether_queue_wait_seconds", "Time a forward request waited for the model", buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.forward_latency = Histogram(
            "tether_forward_seconds", "Wall time of one (batched) forward pass", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.kv_bytes = Gauge("tether_kv_bytes", "Estimated bytes held by all sessions' KV caches", registry=r)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
