"""Prometheus metrics (prometheus-client's default registry), served at /metrics.

Names follow Prometheus conventions: the product prefix `convproxy_`, base units in the name
(`_seconds`), `_total` for counters. The HPA scales on `convproxy_requests_in_flight`.
"""

from __future__ import annotations

import threading
from typing import Any, TypeVar

from prometheus_client import Counter, Gauge, Histogram

from service.usage import Usage

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

REQUESTS = Counter(
    "convproxy_requests_total", "HTTP requests served", ["route", "method", "status"]
)
LATENCY = Histogram(
    "convproxy_request_duration_seconds",
    "HTTP request latency",
    ["route", "method", "status"],
    buckets=_LATENCY_BUCKETS,
)
UPSTREAM_LATENCY = Histogram(
    "convproxy_upstream_request_duration_seconds",
    "Gateway calls, retries included, failed and cut-off streams too",
    buckets=_LATENCY_BUCKETS,
)
UPSTREAM_RETRIES = Counter("convproxy_upstream_retries_total", "Gateway calls retried")
TOKENS = Counter(
    "convproxy_tokens_total",
    "Tokens of turns reported by the gateway: input (the prompts' full size) and output",
    ["direction"],
)
PROMPT_TOKENS = Counter(
    "convproxy_prompt_tokens_total",
    "Prompt tokens of turns by model and kind: uncached, cache_read, cache_write",
    ["model", "kind"],
)
CACHE_HIT_RATIO = Gauge(
    "convproxy_prompt_cache_hit_ratio",
    "Share of this process's prompt tokens served from the provider's cache, by model",
    ["model"],
)
MAX_MODEL_LABELS = 100  # model names come from clients: past this many, they count as "other"
_models: set[str] = set()
_cache_totals: dict[str, tuple[int, int]] = {}  # model label -> (cache-read tokens, all prompt)
_lock = threading.Lock()
DROPPED_MESSAGES = Counter(
    "convproxy_dropped_messages_total", "Stored messages left out of forwarded windows by trimming"
)
LOCK_WAIT = Histogram(
    "convproxy_lock_wait_duration_seconds",
    "Time a turn waited for its conversation, waits that timed out (409) included",
    buckets=_LATENCY_BUCKETS,
)
TURNS = Counter("convproxy_turns_total", "Turns by outcome", ["outcome"])
# Detached turns (issue 16), by how they ended: done, failed, cancelled, unjournaled.
DETACHED_TURNS = Counter("convproxy_detached_turns_total", "Detached turns ended", ["outcome"])
DETACHED_READERS = Gauge("convproxy_detached_readers", "Clients following a detached turn")
IN_FLIGHT = Gauge("convproxy_requests_in_flight", "Requests being served")
UNREADABLE_RECORDS = Counter(
    "convproxy_unreadable_records_total", "Stored messages that did not read back and were skipped"
)
INDEX_WRITE_FAILURES = Counter(
    "convproxy_index_write_failures_total",
    "Writes of a tenant's conversation index that failed after the conversation was stored",
)
OVERLOADED = Counter(
    "convproxy_overloaded_requests_total",
    "Requests refused with 503 at MAX_CONCURRENCY requests in flight",
)
SUMMARY_JOBS = Counter(
    "convproxy_summary_jobs_total",
    "Rolling-summary job rounds by outcome (stored, failed, stale, busy, backoff, covered, gone, "
    "skipped)",
    ["outcome"],
)
SUMMARY_TOKENS = Counter(
    "convproxy_summary_tokens_total",
    "Tokens of summary calls, as the gateway reports them",
    ["direction"],
)
SUMMARY_DURATION = Histogram(
    "convproxy_summary_duration_seconds",
    "Rolling-summary job rounds that held the lease, from the lease to the commit or failure",
    buckets=_LATENCY_BUCKETS,
)
SUMMARY_RUNNING = Gauge(
    "convproxy_summary_jobs_running", "Rolling-summary jobs running in this process"
)
SUMMARY_LAGGED_TURNS = Counter(
    "convproxy_summary_lagged_turns_total",
    "Turns with summaries on that left out messages no summary covered yet",
)


M = TypeVar("M", Counter, Gauge, Histogram)
# (metric, label values) -> the labelled child; values are bounded (routes, statuses, model_label).
_children: dict[tuple[object, tuple[str, ...]], Any] = {}


def child(metric: M, *values: str) -> M:
    """`metric.labels(*values)`, looked up once: labels() checks its arguments and takes a lock
    on every call, several times per turn (measured by `make bench`, issue 10)."""
    key = (metric, values)
    found: M | None = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*values)
    return found


def model_label(model: str) -> str:
    """A bounded label for a client-chosen model name."""
    if model in _models:  # the usual case, without the lock: labels are only ever added
        return model
    with _lock:
        if model in _models:
            return model
        if len(_models) < MAX_MODEL_LABELS:
            _models.add(model)
            return model
    return "other"


def record_usage(model: str, usage: Usage) -> None:
    """One turn's usage: totals, the uncached / cache-read / cache-write split, the hit rate."""
    label = model_label(model)
    # Each series is created (child) on a model's first turn, so all are exposed from then on;
    # a zero is not added: a counter's inc takes a lock, and most turns cache or write nothing.
    for counter, amount in (
        (child(TOKENS, "input"), usage.prompt),
        (child(TOKENS, "output"), usage.output),
        (child(PROMPT_TOKENS, label, "uncached"), usage.uncached),
        (child(PROMPT_TOKENS, label, "cache_read"), usage.cache_read),
        (child(PROMPT_TOKENS, label, "cache_write"), usage.cache_write),
    ):
        if amount:
            counter.inc(amount)
    with _lock:
        read, total = _cache_totals.get(label, (0, 0))
        _cache_totals[label] = (read + usage.cache_read, total + usage.prompt)
    if not total and usage.prompt:  # the model's first prompt: its ratio exists from now on
        child(CACHE_HIT_RATIO, label).set_function(lambda: _cache_hit_ratio(label))


def _cache_hit_ratio(label: str) -> float:
    """Computed when scraped, not set on every turn."""
    with _lock:
        read, total = _cache_totals[label]
    return read / total
