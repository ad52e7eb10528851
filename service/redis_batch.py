"""CommandBatcher: Redis commands of concurrent requests sent together, as one redis-py pipeline.

redis-py spends far more CPU on each call (pool checkout, timeouts, retry wrapper) than on the
command itself: measured under 32 concurrent turns, an EVALSHA cost 55 us of CPU alone and 17 us
in a pipeline with the others waiting (issue 10). So the first command goes out at once, as
before; commands issued while it is in flight wait for it and then go out together in one
non-transactional pipeline, each still atomic on its own (they are scripts), each answered with
its own reply or its own error. An uncontended request sees exactly the calls it made before.

The first command goes out on a connection the batcher keeps, taken from the same pool: a command
on a pooled connection costs 275,000 instructions, of which checking the connection out and back
in (a condition, a timeout timer, two locks, release events) is 113,000 (callgrind; issue 10). At
one request at a time that is every command of a turn. Only one command or batch is in flight at
a time, so one connection is all the first needs; batches take a pooled one as before.

On the kept connection a command is sent and read through redis-py's Connection, with the
connection's own Retry (a dead connection is dropped and the command sent again on a fresh one,
as the client does), which is how redis-py's Pipeline and PubSub use a connection: not through the
client's per-command wrapper, whose lock (the batcher already sends one command at a time),
observability hooks and maintenance-event checks were a third of a command's instructions
(164,000 on redis-py's single-connection client; issue 10).
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection


class CommandBatcher:
    """Pipelines what concurrent callers send while a call is in flight (one node, not a
    Cluster: a Cluster's pipeline splits by node, and its client keeps its own path)."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._callbacks = redis.response_callbacks
        # Kept only if the pool has another connection for everything else to use.
        self._keeps = redis.connection_pool.max_connections > 1
        self._kept: AbstractConnection | None = None
        self._waiting: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
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
            if not self._keeps:
                return await self._redis.execute_command(*args)  # type: ignore[no-untyped-call] # redis-py leaves it untyped
            conn = self._kept or await self._keep()
            return await conn.retry.call_with_retry(
                lambda: self._round_trip(conn, args), lambda _: conn.disconnect()
            )
        finally:
            self._next()

    async def _round_trip(self, conn: AbstractConnection, args: tuple[Any, ...]) -> Any:
        """One command on the kept connection, its reply as the client returns it."""
        # Connects again if the connection was dropped, and checks its health when due; the read
        # raises an error reply as its exception, and drops the connection if it fails or is
        # cancelled halfway, so that no later command reads this one's reply.
        await conn.send_command(*args)
        reply = await conn.read_response()
        callback = self._callbacks.get(args[0])
        return callback(reply) if callback is not None else reply

    async def _keep(self) -> AbstractConnection:
        self._kept = await self._redis.connection_pool.get_connection()  # type: ignore[no-untyped-call] # redis-py leaves it untyped
        return self._kept

    async def connect(self) -> None:
        """Opens the kept connection now (a handshake of several commands), not on a turn."""
        if self._keeps and self._kept is None:
            await self._keep()

    async def aclose(self) -> None:
        """Gives the kept connection back to the pool (before the pool closes)."""
        if self._kept is not None:
            kept, self._kept = self._kept, None
            await self._redis.connection_pool.release(kept)

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
                    await self._send(batch)
        finally:
            self._busy = False
            self._flusher = None

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for args, _ in batch:
                    pipe.execute_command(*args)
                replies: list[Any] = await pipe.execute(raise_on_error=False)
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
