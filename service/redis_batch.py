"""CommandBatcher: Redis commands of concurrent requests sent together, pipelined on one connection.

redis-py spends far more CPU on each call (pool checkout, timeouts, retry wrapper) than on the
command itself: measured under 32 concurrent turns, an EVALSHA cost 55 us of CPU alone and 17 us
in a pipeline with the others waiting (issue 10). So the first command goes out at once, as
before; commands issued while it is in flight wait for it and then go out together, pipelined,
each still atomic on its own (they are scripts), each answered with its own reply or its own
error. An uncontended request sees exactly the calls it made before.

Only one command or batch is in flight at a time, so the batcher keeps one connection of its own
for them (opened with the pool's settings, beside the pool, so that it never takes a connection
the client's other calls wait for) and uses it as redis-py's Pipeline and PubSub use theirs:
through redis-py's Connection (send, read, the connection's Retry: a dead connection is dropped
and the command or batch sent again on a fresh one, as the client does). Not through the client,
whose per-call machinery was most of a command's cost (callgrind, issue 10): a command on a
pooled connection took 275,000 instructions, 113,000 of them checking the connection out of the
pool and back in; on redis-py's single-connection client 164,000, a third of them its lock (the
batcher already sends one at a time), observability hooks and maintenance-event checks. The
socket timeout is one deadline over a command's write and read, as `asyncio.timeout`, instead of
redis-py's two, whose write timeout starts a task per command on CPython 3.11. With the batches
on the same connection: -4.2% of a turn at one request at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

Command = tuple[Any, ...]


class CommandBatcher:
    """Pipelines what concurrent callers send while a call is in flight (one node, not a
    Cluster: a Cluster's pipeline splits by node, and its client keeps its own path)."""

    def __init__(self, redis: Redis) -> None:
        pool = redis.connection_pool
        self._connection_class = pool.connection_class
        # The pool's settings (address, credentials, TLS, Sentinel, Retry, health checks), its
        # socket timeout applied over each round trip instead (_round_trip).
        self._kwargs = {**pool.connection_kwargs, "socket_timeout": None}
        self._timeout: float | None = pool.connection_kwargs.get("socket_timeout")
        self._callbacks = redis.response_callbacks
        self._kept: AbstractConnection | None = None
        self._waiting: list[tuple[Command, asyncio.Future[Any]]] = []
        self._busy = False
        self._flusher: asyncio.Task[None] | None = None  # referenced, so it is not collected

    async def execute(self, *args: Any) -> Any:
        """`execute_command(*args)`'s reply; raises what the command raised."""
        if self._busy:
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._waiting.append((args, future))
            return await future
        self._busy = True
        try:
            (reply,) = await self._send([args])
            if isinstance(reply, Exception):
                raise reply
            return reply
        finally:
            self._next()

    async def connect(self) -> None:
        """Opens the kept connection now (a handshake of several commands), not on a turn."""
        await self._connection().connect()  # type: ignore[no-untyped-call] # redis-py leaves it untyped

    async def aclose(self) -> None:
        """Closes the kept connection."""
        if self._kept is not None:
            kept, self._kept = self._kept, None
            await kept.disconnect()

    def _connection(self) -> AbstractConnection:
        if self._kept is None:
            self._kept = self._connection_class(**self._kwargs)
        return self._kept

    async def _send(self, commands: Sequence[Command]) -> list[Any]:
        """Each command's reply, or the error Redis answered it with, in order; raises what
        failed the connection (after its Retry)."""
        conn = self._connection()
        replies: list[Any] = await conn.retry.call_with_retry(
            lambda: self._round_trip(conn, commands), lambda _: conn.disconnect()
        )
        return replies

    async def _round_trip(self, conn: AbstractConnection, commands: Sequence[Command]) -> list[Any]:
        # Sending connects again if the connection was dropped, and checks its health when due.
        # A read that fails or is cancelled halfway drops the connection, so that no later
        # command reads this one's reply.
        replies: list[Any] = []
        try:
            async with asyncio.timeout(self._timeout):
                await conn.send_packed_command(conn.pack_commands(commands))
                for args in commands:
                    try:
                        reply = await conn.read_response()
                    except ResponseError as error:
                        replies.append(error)
                        continue
                    callback = self._callbacks.get(args[0])
                    replies.append(callback(reply) if callback is not None else reply)
        except TimeoutError:
            raise RedisTimeoutError(f"no reply from Redis within {self._timeout} s") from None
        return replies

    def _next(self) -> None:
        if self._waiting:  # stays busy: the batch goes out from its own task, which no
            # caller's cancellation can stop halfway
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        else:
            self._busy = False

    async def _flush(self) -> None:
        try:
            while self._waiting:
                batch = [(args, f) for args, f in self._waiting if not f.done()]  # not cancelled
                self._waiting = []
                if batch:
                    await self._answer(batch)
        finally:
            self._busy = False
            self._flusher = None

    async def _answer(self, batch: list[tuple[Command, asyncio.Future[Any]]]) -> None:
        try:
            replies = await self._send([args for args, _ in batch])
        except Exception as exc:  # the connection failed: every caller in the batch sees it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except BaseException:  # cancelled (the loop is closing): nobody waits forever
            for _, future in batch:
                future.cancel()
            raise
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)
