"""Prometheus metrics (prometheus-client's default registry), served at /metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
)

REQUESTS = Counter("proxy_requests_total", "HTTP requests served", ["route", "method", "status"])
LATENCY = Histogram(
    "proxy_request_seconds",
    "HTTP request latency",
    ["route", "method", "status"],
    buckets=_LATENCY_BUCKETS,
)
UPSTREAM_LATENCY = Histogram(
    "proxy_upstream_seconds", "Gateway call latency, retries included", buckets=_LATENCY_BUCKETS
)
UPSTREAM_RETRIES = Counter("proxy_upstream_retries_total", "Gateway calls retried")
TOKENS = Counter("proxy_tokens_total", "Tokens reported by the gateway", ["direction"])
DROPPED_MESSAGES = Counter(
    "proxy_dropped_messages_total", "Stored messages left out of forwarded windows by trimming"
)
LOCK_WAIT = Histogram(
    "proxy_turn_lock_wait_seconds",
    "Time a turn waited for its conversation",
    buckets=_LATENCY_BUCKETS,
)
TURNS = Counter("proxy_turns_total", "Turns by outcome", ["outcome"])
IN_FLIGHT = Gauge("proxy_requests_in_flight", "Requests being served")
UNREADABLE_RECORDS = Counter(
    "proxy_unreadable_records_total", "Stored messages that did not read back and were skipped"
)
INDEX_WRITE_FAILURES = Counter(
    "proxy_index_write_failures_total",
    "Writes of a tenant's conversation index that failed after the conversation was stored",
)
OVERLOADED = Counter(
    "proxy_overloaded_total", "Requests refused with 503 at MAX_CONCURRENCY requests in flight"
)
