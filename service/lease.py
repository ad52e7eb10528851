"""The turn lease from the service's side: waiting for it, and keeping it while a turn runs.

The lease itself lives in Redis (ConversationStore: a token with a TTL, taken by the begin script,
checked by the commit script). This module owns the policy: how a turn waits for a busy
conversation, and how it renews its lease without outliving the turn's time limit.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from service import metrics
from service.errors import ConversationBusy, IdempotentRequestInFlight, ServiceError
from service.store import ConversationRef, ConversationStore, Waiting

log = logging.getLogger("service.lease")
R = TypeVar("R")

FIRST_PAUSE_SECONDS = 0.005
MAX_PAUSE_SECONDS = 0.25


async def wait_for_lease(
    attempt: Callable[[], Awaitable[Waiting | R]], *, wait_seconds: float
) -> R:
    """Retry `attempt` with jittered, growing pauses while another turn holds the lease; past
    `wait_seconds`, 409 (ConversationBusy, or IdempotentRequestInFlight for a duplicate)."""
    started = time.monotonic()
    deadline = started + wait_seconds
    pause = FIRST_PAUSE_SECONDS
    while True:
        result = await attempt()
        if not isinstance(result, Waiting):
            metrics.LOCK_WAIT.observe(time.monotonic() - started)
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            headers = {"Retry-After": "1"}
            if result.inflight:
                metrics.TURNS.labels("idempotent_in_flight").inc()
                raise IdempotentRequestInFlight(
                    "the first request with this Idempotency-Key is still running", headers=headers
                )
            metrics.TURNS.labels("busy").inc()
            raise ConversationBusy(
                f"another turn of this conversation ran past {wait_seconds:g} s", headers=headers
            )
        await asyncio.sleep(min(remaining, pause * random.uniform(0.5, 1.5)))  # noqa: S311 - jitter
        pause = min(pause * 2, MAX_PAUSE_SECONDS)


class Renewal:
    """Keeps a turn's lease alive: a timer until the first renewal is due, a task from then on.

    Most turns end long before a third of the lease, so they cost one timer handle, cancelled
    cheaply, rather than a task that is started, parked and cancelled (measured by make bench).
    Renewal goes on until `until` (loop time: the turn's deadline, past which nothing of the turn
    runs but its commit) has passed, so a turn whose cleanup never ran (a stream the server never
    started) cannot hold its conversation forever; a lease lost any other way is caught at commit
    (fencing)."""

    __slots__ = ("_handle", "_lease_ms", "_lock_value", "_ref", "_store", "_task", "_until")

    def __init__(
        self,
        store: ConversationStore,
        ref: ConversationRef,
        lock_value: str,
        *,
        lease_ms: int,
        until: float,
    ) -> None:
        self._store = store
        self._ref = ref
        self._lock_value = lock_value
        self._lease_ms = lease_ms
        self._until = until
        self._task: asyncio.Task[None] | None = None
        self._handle = asyncio.get_running_loop().call_later(self._interval, self._start)

    @property
    def _interval(self) -> float:
        return self._lease_ms / 3000

    def _start(self) -> None:
        self._task = asyncio.ensure_future(self._renew())

    async def _renew(self) -> None:
        loop = asyncio.get_running_loop()
        # The last renewal, at or after `until`, holds the lease one more lease past it.
        while True:
            try:
                if not await self._store.renew(self._ref, self._lock_value, self._lease_ms):
                    return
            except ServiceError:
                log.warning("lease renewal failed")
            if loop.time() >= self._until:
                return
            await asyncio.sleep(self._interval)

    def cancel(self) -> None:
        self._handle.cancel()
        if self._task is not None:
            self._task.cancel()
