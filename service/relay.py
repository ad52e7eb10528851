"""Relaying the gateway's stream: a deadline that holds while the upstream is silent, keep-alive
pings while it thinks, and each event checked before it is passed on.

Reading the next upstream event runs in its own task that is waited on, never cancelled, between
pings: cancelling it would break the upstream stream. A timeout around the whole relay would not
do either: it would also cancel whatever the consumer awaits while the relay is suspended at a
`yield` (sending to a slow client), far from where the relay could turn it into `event: error`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Generic, TypeVar

import orjson

from service.errors import GatewayError, GatewayTimeout
from service.gateway import UpstreamStream
from service.streaming import PING_COMMENT, StreamAssembler, sse_relayed

T = TypeVar("T")


class Ping:
    """Yielded when the upstream has been silent for a ping interval."""


PING = Ping()


class _End(Generic[T]):
    pass


async def _next(source: AsyncIterator[T]) -> T | _End[T]:
    try:
        return await anext(source)
    except StopAsyncIteration:
        return _End()


async def paced(
    source: AsyncIterator[T], *, deadline: float, ping_seconds: float, limit_seconds: float
) -> AsyncGenerator[T | Ping, None]:
    """The items of `source` as they come, PING whenever it stays silent for `ping_seconds`, and
    GatewayTimeout once the loop clock passes `deadline`, whether or not anything arrives."""
    loop = asyncio.get_running_loop()
    pending: asyncio.Task[T | _End[T]] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(_next(source))
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise GatewayTimeout(
                    f"the turn ran past GATEWAY_TIMEOUT_SECONDS ({limit_seconds:g} s)"
                )
            done, _ = await asyncio.wait({pending}, timeout=min(remaining, ping_seconds))
            if not done:
                if loop.time() < deadline:
                    yield PING
                continue
            item = pending.result()
            pending = None
            if isinstance(item, _End):
                return
            yield item
    finally:
        if pending is not None:
            if pending.done():
                with contextlib.suppress(BaseException):
                    pending.result()  # retrieved, so asyncio does not report it as lost
            else:
                pending.cancel()


async def relay_upstream(
    upstream: UpstreamStream,
    assembler: StreamAssembler,
    *,
    deadline: float,
    ping_seconds: float,
    limit_seconds: float,
) -> AsyncGenerator[bytes, None]:
    """The upstream's events as SSE for our client, each folded into `assembler` first; ends
    when the answer is whole, raises a ServiceError (or ValueError: a chunk that is not JSON)
    when it is not."""
    events = paced(
        upstream.events(), deadline=deadline, ping_seconds=ping_seconds, limit_seconds=limit_seconds
    )
    async with contextlib.aclosing(events):
        async for item in events:
            if isinstance(item, Ping):  # so an idle-timeout proxy does not cut a slow model
                yield PING_COMMENT
                continue
            if item.data == "[DONE]":
                return
            if item.event == "error":
                raise upstream.error_in(item.data.encode())
            chunk = orjson.loads(item.data)
            if isinstance(chunk, dict) and "error" in chunk:
                raise upstream.error_in(item.data.encode())
            assembler.add(chunk)
            yield sse_relayed(item.event, item.data)
    if not assembler.finished:
        raise GatewayError("the gateway's stream ended before the answer did")
