"""CommandBatcher: Redis commands of concurrent requests sent together, as one redis-py pipeline.

redis-py spends far more CPU on each call (pool checkout, timeouts, retry wrapper) than on the
command itself: measured under 32 concurrent turns, an EVALSHA cost 55 us of CPU alone and 17 us
in a pipeline with the others waiting (issue 10). So the first command goes out at once, as
before; commands issued while it is in flight wait for it and then go out together in one
non-transactional pipeline, each still atomic on its own (they are scripts), each answered with
its own reply or its own error. An uncontended request sees exactly the calls it made before.

The first command goes out on a connection the batcher keeps (redis-py's single-connection client
over the same pool): a command on a pooled connection costs 275,000 instructions, of which
checking the connection out and back in (a condition, a timeout timer, two locks, release events)
is 113,000 (callgrind; issue 10). At one request at a time that is every command of a turn.
Only one command or batch is in flight at a time, so one connection is all the first needs;
batches take a pooled one as before.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis


class CommandBatcher:
    """Pipelines what concurrent callers send while a call is in flight (one node, not a
    Cluster: a Cluster's pipeline splits by node, and its client keeps its own path)."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        pool = redis.connection_pool
        # Kept only if the pool has another connection for everything else to use.
        self._direct = (
            Redis(connection_pool=pool, single_connection_client=True)
            if pool.max_connections > 1
            else redis
        )
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
            return await self._direct.execute_command(*args)  # type: ignore[no-untyped-call] # redis-py leaves it untyped
        finally:
            self._next()

    async def connect(self) -> None:
        """Opens the kept connection now (a handshake of several commands), not on a turn."""
        await self._direct.initialize()

    async def aclose(self) -> None:
        """Gives the kept connection back to the pool (before the pool closes)."""
        if self._direct is not self._redis:
            await self._direct.aclose()

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
