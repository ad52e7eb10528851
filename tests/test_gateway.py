"""GatewayClient against a scripted upstream on loopback: retries, timeouts, error mapping."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from email.utils import formatdate

import aiohttp
import pytest
from aiohttp import web
from pydantic import SecretStr

from service.errors import (
    GatewayError,
    GatewayRateLimited,
    GatewayTimeout,
    ServiceError,
    Unauthorized,
)
from service.gateway import GatewayClient, Reply
from service.models import JSONObject
from tests.conftest import free_port

COMPLETION = b'{"choices": [{"message": {"role": "assistant", "content": "hi"}}], "usage": {}}'
PAYLOAD = {"model": "m", "messages": [{"role": "user", "content": "a"}]}

Behaviour = web.Response | str  # a response, "hang" (never answer) or "reset" (drop the socket)


class Upstream:
    """Answers each call with the next behaviour (the last one repeats) and records the calls."""

    def __init__(self, *behaviours: Behaviour) -> None:
        self.behaviours = list(behaviours)
        self.calls: list[tuple[dict[str, str], bytes]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.calls.append((dict(request.headers), await request.read()))
        behaviour = self.behaviours.pop(0) if len(self.behaviours) > 1 else self.behaviours[0]
        if behaviour == "hang":
            await asyncio.Event().wait()
        if behaviour == "reset":
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        assert isinstance(behaviour, web.Response)
        return web.Response(status=behaviour.status, body=behaviour.body, headers=behaviour.headers)


def answer(status: int, body: bytes, **headers: str) -> web.Response:
    return web.Response(status=status, body=body, headers=headers)


@asynccontextmanager
async def gateway_for(
    upstream: Upstream | None, *, key: str | None = "gw-key", retries: int = 2, timeout: float = 5.0
) -> AsyncIterator[GatewayClient]:
    """A GatewayClient pointed at `upstream` served on loopback (None: a port nobody serves)."""
    app = web.Application()
    if upstream is not None:
        app.router.add_post("/v1/chat/completions", upstream.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    if upstream is not None:
        await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as session:
            yield GatewayClient(
                session,
                base_url=f"http://127.0.0.1:{port}/v1",
                api_key=SecretStr(key) if key else None,
                timeout_seconds=timeout,
                max_retries=retries,
                retry_after_cap_seconds=1,
            )
    finally:
        await runner.cleanup()


async def complete(
    upstream: Upstream | None, **options: int | float | str | None
) -> tuple[JSONObject, Reply]:
    async with gateway_for(upstream, **options) as gateway:  # type: ignore[arg-type]
        return await gateway.complete(PAYLOAD, client_key="client", request_id="r1")


async def test_connection_errors_are_retried_then_502() -> None:
    with pytest.raises(GatewayError, match="unreachable"):
        await complete(None, retries=2)


async def test_a_dropped_connection_then_an_answer_succeeds() -> None:
    upstream = Upstream("reset", answer(200, COMPLETION))
    _, reply = await complete(upstream)
    assert reply.message["content"] == "hi"
    assert len(upstream.calls) == 2
    assert upstream.calls[0][1] == upstream.calls[1][1]  # the same body each time
    assert upstream.calls[0][0]["Authorization"] == "gw-key"
    assert upstream.calls[0][0]["X-Request-ID"] == "r1"


async def test_5xx_without_a_usable_retry_after_backs_off_and_retries() -> None:
    upstream = Upstream(
        answer(502, b"bad gateway", **{"Retry-After": "soon"}), answer(200, COMPLETION)
    )
    await complete(upstream, retries=1)
    assert len(upstream.calls) == 2


@pytest.mark.parametrize(
    ("behaviour", "error"),
    [
        ("hang", GatewayTimeout),
        (answer(200, b"<html>oops</html>"), GatewayError),
        (answer(401, b'{"error": "bad key"}'), GatewayError),
    ],
)
async def test_failures_map_to_service_errors(
    behaviour: Behaviour, error: type[ServiceError]
) -> None:
    upstream = Upstream(behaviour)
    with pytest.raises(error):
        await complete(upstream, retries=0, timeout=0.3)
    assert len(upstream.calls) == 1


async def test_pass_through_key_rejected_upstream_is_401() -> None:
    upstream = Upstream(answer(403, b'{"error": {"message": "invalid key"}}'))
    with pytest.raises(Unauthorized, match="invalid key"):
        await complete(upstream, key=None)
    assert upstream.calls[0][0]["Authorization"] == "client"


async def test_no_key_at_all_never_calls_upstream() -> None:
    upstream = Upstream(answer(200, COMPLETION))
    async with gateway_for(upstream, key=None) as gateway:
        with pytest.raises(Unauthorized):
            await gateway.complete(PAYLOAD, client_key=None, request_id="r")
    assert upstream.calls == []


async def test_a_stream_answered_with_broken_json_is_502() -> None:
    upstream = Upstream(answer(200, b"{nope", **{"Content-Type": "text/plain"}))
    async with gateway_for(upstream) as gateway:
        with pytest.raises(GatewayError, match="not JSON"):
            await gateway.open_stream(PAYLOAD, client_key=None, request_id="r")
    assert upstream.calls[0][1].count(b'"stream":true') == 1


async def test_a_stream_that_never_starts_is_504() -> None:
    async with gateway_for(Upstream("hang"), retries=0, timeout=0.2) as gateway:
        with pytest.raises(GatewayTimeout):
            await gateway.open_stream(PAYLOAD, client_key=None, request_id="r")


async def test_a_retry_after_date_is_honoured_as_seconds() -> None:
    when = formatdate(time.time() + 60, usegmt=True)
    upstream = Upstream(answer(429, b'{"error": "slow down"}', **{"Retry-After": when}))
    with pytest.raises(GatewayRateLimited) as caught:
        await complete(upstream, retries=2)
    assert len(upstream.calls) == 1  # a minute is over the cap: passed on, not waited for
    assert 55 <= int(caught.value.headers["Retry-After"]) <= 60
