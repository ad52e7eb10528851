"""Lease renewal against real Redis: it lasts as long as the turn may run, and no longer."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from service.lease import Renewal, wait_for_lease
from service.store import ConversationRef, Waiting
from tests.conftest import OpenStore
from tests.polling import eventually


async def test_renewal_holds_the_lease_until_the_deadline_then_lets_it_lapse(
    redis: Redis, open_store: OpenStore
) -> None:
    store = open_store(redis)
    await store.load_scripts()
    ref = ConversationRef("acme", "lease")
    lock = ref.key("lock")
    await redis.set(lock, "token", px=300)
    loop = asyncio.get_running_loop()
    until = loop.time() + 1.0  # over three leases
    renewal = Renewal(store, ref, "token", lease_ms=300, until=until)
    try:

        async def deadline_passed() -> bool:
            assert await redis.exists(lock), "the lease lapsed before the deadline"
            return loop.time() > until

        await eventually(deadline_passed, what="the deadline")
        # Past it, renewal stops: the lease runs out by itself, one lease later at most.
        await eventually(lambda: _gone(redis, lock), what="the lease to lapse", timeout=5)
    finally:
        renewal.cancel()


async def test_renewal_stops_when_the_lease_is_someone_elses(
    redis: Redis, open_store: OpenStore
) -> None:
    store = open_store(redis)
    await store.load_scripts()
    ref = ConversationRef("acme", "taken")
    lock = ref.key("lock")
    await redis.set(lock, "other", px=300)
    renewal = Renewal(store, ref, "mine", lease_ms=300, until=asyncio.get_running_loop().time() + 5)
    try:
        await eventually(lambda: _gone(redis, lock), what="the other lease to lapse", timeout=5)
    finally:
        renewal.cancel()


async def _gone(redis: Redis, key: str) -> bool:
    return not await redis.exists(key)


async def test_a_wait_shorter_than_a_second_still_waits() -> None:
    """A busy conversation is retried until `wait_seconds` have passed, however short."""
    answers: list[Waiting | str] = [Waiting(retry_in_ms=1, inflight=False), "begun"]

    async def attempt() -> Waiting | str:
        return answers.pop(0)

    assert await wait_for_lease(attempt, wait_seconds=0.5) == "begun"
