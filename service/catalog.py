"""The gateway's model catalog (`GET {GATEWAY_URL}/models`, no key needed): each model's context
length, so a conversation that names no budget never forwards more than its model can take.

Read in the background from start-up on and refreshed hourly (`GET /v1/models` reads it again when
its copy is older than a minute); a failed read keeps the last copy
(or none: budgets are then TOKEN_BUDGET alone) and is tried again after a minute. Turns only read
the copy in memory: no call, no wait, and start-up never waits for the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from service.models import JSONObject

log = logging.getLogger("service.catalog")

REFRESH_SECONDS = 3600.0
RETRY_SECONDS = 60.0
FETCH_TIMEOUT_SECONDS = 5.0
MAX_MODELS = 10_000


@dataclass(frozen=True, slots=True)
class ModelLimits:
    context_length: int
    max_completion_tokens: int | None


def _positive(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def parse_catalog(body: Any) -> dict[str, ModelLimits]:
    """`{"data": [{"id", "context_length", "top_provider": {"max_completion_tokens"}}]}`;
    entries without a usable id or context length are skipped."""
    entries = body.get("data") if isinstance(body, dict) else body
    limits: dict[str, ModelLimits] = {}
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            continue
        context = _positive(entry.get("context_length"))
        if context is None:
            continue
        top = entry.get("top_provider")
        completion = _positive(top.get("max_completion_tokens")) if isinstance(top, dict) else None
        limits[entry["id"]] = ModelLimits(context, completion)
        if len(limits) >= MAX_MODELS:
            break
    return limits


def catalog_budget(
    default: int, limits: ModelLimits | None, max_tokens: int | None
) -> tuple[int, str]:
    """(budget, which limit applied) for a conversation that names none:
    min(TOKEN_BUDGET, context_length - max_tokens of the turn). Without the turn's max_tokens,
    the model's own longest completion is kept free."""
    if limits is None:
        return default, "token_budget_setting"
    reserve = max_tokens if max_tokens is not None else (limits.max_completion_tokens or 0)
    room = max(1, limits.context_length - reserve)
    if room < default:
        return room, "model_context_length"
    return default, "token_budget_setting"


def listed_models(body: Any) -> list[JSONObject]:
    """The catalog's entries that have an id, as the gateway listed them (`GET /v1/models`)."""
    entries = body.get("data") if isinstance(body, dict) else body
    return [
        entry
        for entry in (entries if isinstance(entries, list) else [])[:MAX_MODELS]
        if isinstance(entry, dict) and isinstance(entry.get("id"), str)
    ]


class ModelCatalog:
    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self._session = session
        self._url = base_url.rstrip("/") + "/models"
        self._limits: dict[str, ModelLimits] = {}
        self._entries: list[JSONObject] | None = None  # None: never read
        self._read_at = 0.0  # monotonic time of the last successful read
        self._reading = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def limits(self, model: str) -> ModelLimits | None:
        return self._limits.get(model)

    async def listing(self, max_age_seconds: float) -> list[JSONObject] | None:
        """The gateway's model list, read again when the copy is older than `max_age_seconds`
        (one read at a time); the last copy when that read fails; None if none was ever read."""
        if self._entries is None or time.monotonic() - self._read_at > max_age_seconds:
            async with self._reading:
                if self._entries is None or time.monotonic() - self._read_at > max_age_seconds:
                    await self.refresh()
        return self._entries

    async def refresh(self) -> bool:
        """Read the catalog once; False (keeping the last copy) when that fails."""
        try:
            timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_SECONDS)
            async with self._session.get(self._url, timeout=timeout) as response:
                if response.status != 200:
                    raise ValueError(f"status {response.status}")
                body = orjson.loads(await response.read())
        except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as exc:
            log.warning("model catalog not read", extra={"error": type(exc).__name__})
            return False
        limits = parse_catalog(body)
        if limits:
            self._limits = limits
        self._entries = listed_models(body)
        self._read_at = time.monotonic()
        return True

    def start(self) -> None:
        self._task = asyncio.create_task(self._keep())

    async def _keep(self) -> None:
        while True:
            read = await self.refresh()
            await asyncio.sleep(REFRESH_SECONDS if read else RETRY_SECONDS)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
