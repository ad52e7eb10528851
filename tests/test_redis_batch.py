"""CommandBatcher against a real Redis: concurrent commands share round trips, each caller gets
its own reply or error, a caller that left is not sent."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from service.redis_batch import CommandBatcher
from tests.conftest import free_port


async def _reads(redis: Redis) -> int:
    return int((await redis.info("stats"))["total_reads_processed"])


async def test_concurrent_commands_share_round_trips(redis: Redis) -> None:
    batcher = CommandBatcher(redis)
    before = await _reads(redis)
    replies = await asyncio.gather(
        *(batcher.execute("EVAL", "return ARGV[1]", 0, str(n)) for n in range(20))
    )
    after = await _reads(redis)
    assert replies == [str(n).encode() for n in range(20)]
    # The first goes out alone, the 19 that came while it was in flight in one pipeline; the
    # second INFO is the third read. Unbatched, this would be 21.
    assert after - before <= 3


async def test_each_caller_gets_its_own_error(redis: Redis) -> None:
    batcher = CommandBatcher(redis)
    results = await asyncio.gather(
        batcher.execute("EVAL", "return 1", 0),
        batcher.execute("EVALSHA", "0" * 40, 0),  # batched: unknown script
        batcher.execute("EVAL", "return 2", 0),
        return_exceptions=True,
    )
    assert results[0] == 1
    assert isinstance(results[1], NoScriptError)
    assert results[2] == 2


async def test_a_failed_connection_fails_every_caller() -> None:
    nowhere = Redis(port=free_port(), socket_connect_timeout=1)
    batcher = CommandBatcher(nowhere)
    try:
        results = await asyncio.gather(
            *(batcher.execute("INCR", "n") for _ in range(3)), return_exceptions=True
        )
    finally:
        await nowhere.aclose()
    assert all(isinstance(r, RedisConnectionError) for r in results)


async def test_a_caller_that_left_is_not_sent(redis: Redis) -> None:
    await redis.delete("batched")
    batcher = CommandBatcher(redis)
    first = asyncio.ensure_future(batcher.execute("INCR", "batched"))
    waiting = [asyncio.ensure_future(batcher.execute("INCR", "batched")) for _ in range(3)]
    # One pass of the loop (a yield, not a wait): the first is sent, the others queue behind it.
    await asyncio.sleep(0)
    waiting[1].cancel()
    assert await first == 1
    done = await asyncio.gather(*waiting, return_exceptions=True)
    assert isinstance(done[1], asyncio.CancelledError)
    assert sorted(r for r in done if isinstance(r, int)) == [2, 3]
    assert int(await redis.get("batched") or 0) == 3
    # Idle again: the next command goes out at once and is answered.
    assert await batcher.execute("INCR", "batched") == 4


@pytest.mark.parametrize("size", [1, 2])
async def test_a_batch_of_any_size_is_answered(redis: Redis, size: int) -> None:
    batcher = CommandBatcher(redis)
    replies = await asyncio.gather(*(batcher.execute("PING") for _ in range(1 + size)))
    assert all(r is True or r == b"PONG" for r in replies)
