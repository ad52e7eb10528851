"""Waiting for a condition, never for a fixed time: poll it until it holds or a deadline passes."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

POLL_SECONDS = 0.01


def wait_until(
    condition: Callable[[], bool],
    *,
    what: str,
    timeout: float = 20.0,
    ignore: tuple[type[BaseException], ...] = (),
) -> None:
    """Poll `condition` until it holds; errors of the `ignore` types count as "not yet"."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except ignore:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(POLL_SECONDS)


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]], *, what: str, timeout: float = 10.0
) -> None:
    """Poll `condition` (plain or async) until it holds, without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(POLL_SECONDS)
