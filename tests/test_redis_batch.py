"""CommandBatcher against a real Redis: concurrent commands share round trips, each caller gets
its own reply or error, a caller that left is not sent."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.redis_batch import CommandBatcher
from service.redis_client import open_redis
from tests.conftest import free_port
from tests.polling import eventually


@pytest.fixture
async def batcher(redis: Redis) -> AsyncIterator[CommandBatcher]:
    batcher = CommandBatcher(redis)
    try:
        yield batcher
    finally:
        await batcher.aclose()  # closes the connection it keeps


@contextlib.asynccontextmanager
async def _batcher_over(client: Redis) -> AsyncIterator[CommandBatcher]:
    """A batcher over a client of the test's own making; both closed after."""
    batcher = CommandBatcher(client)
    try:
        yield batcher
    finally:
        await batcher.aclose()
        await client.aclose()


async def _reads(redis: Redis) -> int:
    return int((await redis.info("stats"))["total_reads_processed"])


async def test_concurrent_commands_share_round_trips(redis: Redis, batcher: CommandBatcher) -> None:
    await batcher.execute("PING")  # opens the connection it keeps (a handshake of its own)
    before = await _reads(redis)
    replies = await asyncio.gather(
        *(batcher.execute("EVAL", "return ARGV[1]", 0, str(n)) for n in range(20))
    )
    after = await _reads(redis)
    assert replies == [str(n).encode() for n in range(20)]
    # The first goes out alone, the 19 that came while it was in flight in one pipeline; the
    # second INFO is the third read. Unbatched, this would be 21.
    assert after - before <= 3


async def test_the_first_command_goes_out_on_the_kept_connection(redis: Redis) -> None:
    """No pool checkout for an uncontended command: the same connection each time, the
    batcher's own (not one of the pool's, which the client's other calls use); closed with the
    batcher."""
    pool = redis.connection_pool
    batcher = CommandBatcher(redis)
    try:
        kept = {await batcher.execute("CLIENT", "ID") for _ in range(3)}
        assert len(kept) == 1
        assert await redis.client_id() not in kept  # the client's own call: another connection
        assert len(pool._available_connections) == 1  # only the client's (private: no count)
        assert not pool._in_use_connections
    finally:
        await batcher.aclose()

    async def closed() -> bool:
        return not kept & {int(c["id"]) for c in await redis.client_list()}

    await eventually(closed, what="the kept connection to close")


async def test_a_command_past_the_socket_timeout_fails_and_leaves_no_reply_behind(
    redis_url: str,
) -> None:
    """The pool's socket timeout bounds a command's round trip on the kept connection: past it,
    redis-py's TimeoutError, and the connection is dropped, so the next command reads its own
    reply and not the late one."""
    slow = Redis.from_url(redis_url, socket_timeout=0.2)  # its connections retry nothing
    async with _batcher_over(slow) as batcher:
        with pytest.raises(RedisTimeoutError, match=r"within 0\.2 s"):
            await batcher.execute("BLPOP", "never-pushed", 1)
        assert await batcher.execute("ECHO", "next") == b"next"


async def test_the_kept_connection_comes_back_after_redis_drops_it(
    redis_url: str, redis: Redis
) -> None:
    """A dead kept connection costs no command: the connection's Retry (the service's, from
    open_redis) sends it again on a fresh one, as the client does for its own commands."""
    service_client, _ = open_redis(redis_url, pool_size=4, pool_timeout_seconds=1)
    assert isinstance(service_client, Redis)
    async with _batcher_over(service_client) as batcher:
        kept = await batcher.execute("CLIENT", "ID")
        assert await redis.client_kill_filter(_id=kept) == 1
        assert await batcher.execute("ECHO", "after") == b"after"
        assert await batcher.execute("CLIENT", "ID") != kept  # a new connection, kept again


async def test_a_command_cancelled_on_the_kept_connection_leaves_no_reply_behind(
    redis: Redis, batcher: CommandBatcher
) -> None:
    """A caller cancelled while its reply is due: the connection is dropped, so the next command
    reads its own reply, not the abandoned one."""
    await redis.delete("nothing")
    blocked = asyncio.ensure_future(batcher.execute("BLPOP", "nothing", 5))
    await eventually(
        lambda: _blocked_clients(redis, 1), what="the BLPOP to block on the kept connection"
    )
    blocked.cancel()
    await redis.rpush("nothing", "late")  # answers the BLPOP, if Redis has not dropped it yet
    assert await batcher.execute("ECHO", "mine") == b"mine"
    with pytest.raises(asyncio.CancelledError):
        await blocked


async def _blocked_clients(redis: Redis, count: int) -> bool:
    return int((await redis.info("clients"))["blocked_clients"]) == count


async def test_replies_are_parsed_as_the_client_parses_them(
    redis: Redis, batcher: CommandBatcher
) -> None:
    await redis.delete("h")
    await redis.hset("h", mapping={"a": "1", "b": "2"})
    assert (
        await batcher.execute("HGETALL", "h")
        == await redis.hgetall("h")
        == {
            b"a": b"1",
            b"b": b"2",
        }
    )
    assert await batcher.execute("PING") is True


async def test_a_pool_of_one_is_not_kept_from_the_others(redis_url: str) -> None:
    """The batcher's connection is its own, not the pool's: a pool of one still serves every
    other call."""
    pool = BlockingConnectionPool.from_url(redis_url, max_connections=1, timeout=1)
    small = Redis.from_pool(pool)  # closing it closes the pool
    async with _batcher_over(small) as batcher:
        assert await batcher.execute("PING")
        assert await small.ping()  # would time out waiting for the pool's only connection


async def test_each_caller_gets_its_own_error(batcher: CommandBatcher) -> None:
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
    async with _batcher_over(Redis(port=free_port(), socket_connect_timeout=1)) as batcher:
        results = await asyncio.gather(
            *(batcher.execute("INCR", "n") for _ in range(3)), return_exceptions=True
        )
    assert all(isinstance(r, RedisConnectionError) for r in results)


async def test_a_caller_that_left_is_not_sent(redis: Redis, batcher: CommandBatcher) -> None:
    await redis.delete("batched")
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
async def test_a_batch_of_any_size_is_answered(batcher: CommandBatcher, size: int) -> None:
    replies = await asyncio.gather(*(batcher.execute("PING") for _ in range(1 + size)))
    assert all(r is True or r == b"PONG" for r in replies)
