"""GatewayClient against a scripted upstream on loopback: retries, timeouts, error mapping."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from email.utils import formatdate

import aiohttp
import pytest
from aiohttp import web
from pydantic import SecretStr

from service.errors import (
    GatewayError,
    GatewayRateLimited,
    GatewayRejected,
    GatewayTimeout,
    ServiceError,
    Unauthorized,
)
from service.gateway import AuthScheme, GatewayClient, Reply
from service.models import JSONObject
from service.upstream_errors import redact
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
    upstream: Upstream | None,
    *,
    key: str | None = "gw-key",
    retries: int = 2,
    timeout: float = 5.0,
    scheme: AuthScheme = "raw",
    port: int | None = None,
    attempts: list[str] | None = None,
    read_timeout: float | None = None,
) -> AsyncIterator[GatewayClient]:
    """A GatewayClient pointed at `upstream` served on loopback (None: `port`, or a port nobody
    serves); each connection attempt is appended to `attempts`."""
    app = web.Application()
    if upstream is not None:
        app.router.add_post("/v1/chat/completions", upstream.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    port = port or free_port()
    if upstream is not None:
        await web.TCPSite(runner, "127.0.0.1", port).start()
    trace = aiohttp.TraceConfig()

    async def on_attempt(*_: object) -> None:
        if attempts is not None:
            attempts.append("connect")

    trace.on_connection_create_start.append(on_attempt)
    try:
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(sock_connect=0.3, sock_read=read_timeout),
            trace_configs=[trace],
        ) as session:
            yield GatewayClient(
                session,
                base_url=f"http://127.0.0.1:{port}/v1",
                api_key=SecretStr(key) if key else None,
                timeout_seconds=timeout,
                max_retries=retries,
                retry_after_cap_seconds=1,
                auth_scheme=scheme,
            )
    finally:
        await runner.cleanup()


async def complete(
    upstream: Upstream | None, **options: int | float | str | None
) -> tuple[JSONObject, Reply]:
    async with gateway_for(upstream, **options) as gateway:  # type: ignore[arg-type]
        return await gateway.complete(PAYLOAD, client_key="client", request_id="r1")


async def test_connection_errors_are_retried_then_502() -> None:
    attempts: list[str] = []
    with pytest.raises(GatewayError, match="could not connect"):
        async with gateway_for(None, retries=2, attempts=attempts) as gateway:
            await gateway.complete(PAYLOAD, client_key="client", request_id="r1")
    assert len(attempts) == 3  # refused: nothing was sent, so each retry is safe


@pytest.fixture
def unanswered_port() -> Iterator[int]:
    """A port whose listen backlog is full: a connection attempt hangs until it times out."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port: int = server.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    yield port
    for sock in (*fillers, server):
        sock.close()


async def test_a_connect_timeout_is_retried_and_reported_as_such(unanswered_port: int) -> None:
    attempts: list[str] = []
    async with gateway_for(None, port=unanswered_port, retries=1, attempts=attempts) as gateway:
        with pytest.raises(GatewayError, match="connect timeout") as caught:
            await gateway.complete(PAYLOAD, client_key="client", request_id="r1")
    assert caught.value.status_code == 502  # not "did not answer within 5 s" (504)
    assert len(attempts) == 2


async def test_a_dropped_connection_after_sending_is_not_retried() -> None:
    upstream = Upstream("reset", answer(200, COMPLETION))
    with pytest.raises(GatewayError, match="broke off"):
        await complete(upstream)
    assert len(upstream.calls) == 1  # the request may have reached a model: never sent twice
    assert upstream.calls[0][0]["Authorization"] == "gw-key"
    assert upstream.calls[0][0]["X-Request-ID"] == "r1"


async def test_503_with_retry_after_is_retried_with_the_same_idempotency_key() -> None:
    upstream = Upstream(answer(503, b"busy", **{"Retry-After": "0"}), answer(200, COMPLETION))
    async with gateway_for(upstream) as gateway:
        _, reply = await gateway.complete(PAYLOAD, client_key="client", request_id="r1")
        await gateway.complete(PAYLOAD, client_key="client", request_id="r2")
    assert reply.message["content"] == "hi"
    assert len(upstream.calls) == 3
    keys = [headers["Idempotency-Key"] for headers, _ in upstream.calls]
    assert keys[0] == keys[1]  # one call, two attempts: one key
    assert keys[2] != keys[0]  # another call: another key
    assert upstream.calls[0][1] == upstream.calls[1][1]  # the same body each time


@pytest.mark.parametrize(
    "behaviour",
    [
        answer(502, b"bad gateway", **{"Retry-After": "0"}),
        answer(500, b'{"error": "internal"}', **{"Retry-After": "0"}),
        answer(503, b"busy"),  # no Retry-After: nothing says it was not taken on
        answer(503, b"busy", **{"Retry-After": "soon"}),
        answer(429, b'{"error": "slow down"}'),
    ],
)
async def test_failures_that_may_have_reached_a_model_are_not_retried(
    behaviour: web.Response,
) -> None:
    upstream = Upstream(behaviour, answer(200, COMPLETION))
    with pytest.raises(ServiceError):
        await complete(upstream, retries=2)
    assert len(upstream.calls) == 1


@pytest.mark.parametrize(
    ("behaviour", "error"),
    [
        ("hang", GatewayTimeout),
        (answer(200, b"<html>oops</html>"), GatewayError),
        (answer(401, b'{"error": "bad key"}'), GatewayError),
        (answer(403, b'{"error": "forbidden"}', **{"Retry-After": "0"}), GatewayError),
    ],
)
async def test_failures_map_to_service_errors(
    behaviour: Behaviour, error: type[ServiceError]
) -> None:
    upstream = Upstream(behaviour)
    with pytest.raises(error):
        await complete(upstream, retries=2, timeout=0.3)
    assert len(upstream.calls) == 1  # auth failures (even with a Retry-After) are not retried


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


@pytest.mark.parametrize(
    ("scheme", "client_key", "service_key", "sent"),
    [
        ("bearer", None, "gw-key", "Bearer gw-key"),
        ("raw", None, "gw-key", "gw-key"),
        ("bearer", "own-key", None, "Bearer own-key"),  # pass-through: the caller's key
        ("raw", "own-key", None, "own-key"),
    ],
)
async def test_the_auth_scheme_applies_in_both_modes(
    scheme: AuthScheme, client_key: str | None, service_key: str | None, sent: str
) -> None:
    upstream = Upstream(answer(200, COMPLETION))
    async with gateway_for(upstream, key=service_key, scheme=scheme) as gateway:
        await gateway.complete(PAYLOAD, client_key=client_key, request_id="r")
    assert upstream.calls[0][0]["Authorization"] == sent


@pytest.mark.parametrize(
    "leak",
    [
        "gw-canary-secret-0000",
        "GW-CANARY-SECRET-0000",  # the key upper-cased
        "gw-canary-se...",  # the key cut short
        "Gw-Canary-Secret-0000-and-more",
    ],
)
async def test_the_key_never_comes_back_in_a_detail(leak: str) -> None:
    body = b'{"error": {"message": "bad key ' + leak.encode() + b' given"}}'
    for status in (400, 429, 500):
        upstream = Upstream(answer(status, body, **{"X-RateLimit-Remaining": leak}))
        with pytest.raises(ServiceError) as caught:
            await complete(upstream, key="gw-canary-secret-0000", retries=0)
        text = caught.value.detail + repr(caught.value.headers)
        assert "canary" not in text.lower()
        assert "[redacted]" in caught.value.detail


def test_redaction_leaves_other_text_alone() -> None:
    assert redact("model gpt-x is unknown", ("gw-canary-secret",)) == "model gpt-x is unknown"
    assert redact("key GW-CANARY-SECRET!", ("gw-canary-secret",)) == "key [redacted]"


async def test_only_chosen_headers_and_no_raw_body_are_passed_on() -> None:
    upstream = Upstream(
        answer(
            429,
            b'{"error": "slow down"}',
            **{
                "Retry-After": "30",
                "X-RateLimit-Remaining-Requests": "0",
                "X-RateLimit-Internal-Node": "gw-node-17",
                "X-RateLimit-Limit": "30\tsee https://evil",
                "Set-Cookie": "session=abc",
            },
        )
    )
    with pytest.raises(GatewayRateLimited) as caught:
        await complete(upstream, retries=0)
    assert caught.value.headers == {"x-ratelimit-remaining-requests": "0", "Retry-After": "30"}
    html = Upstream(answer(500, b"<html>upstream 10.0.0.7 config dump</html>"))
    with pytest.raises(GatewayError) as failed:
        await complete(html, retries=0)
    assert "10.0.0.7" not in failed.value.detail


@pytest.mark.parametrize(
    ("status", "ours"),
    [(404, 422), (413, 422), (409, 502), (415, 502), (400, 400), (422, 422)],
)
async def test_gateway_statuses_never_collide_with_the_services_own(status: int, ours: int) -> None:
    upstream = Upstream(answer(status, b'{"error": {"message": "unknown model nope"}}'))
    with pytest.raises(ServiceError) as caught:
        await complete(upstream, retries=0)
    assert caught.value.status_code == ours
    assert "unknown model nope" in caught.value.detail


async def test_stream_options_refused_is_asked_again_without_and_remembered() -> None:
    refused = answer(
        400,
        b'{"error": {"message": "invalid request body",'
        b' "metadata": {"errors": ["stream_options: unsupported"]}}}',
    )
    sse = answer(200, b"data: [DONE]\n\n", **{"Content-Type": "text/event-stream"})
    upstream = Upstream(refused, sse)
    async with gateway_for(upstream) as gateway:
        for _ in range(2):
            stream = await gateway.open_stream(PAYLOAD, client_key=None, request_id="r")
            await stream.aclose()
        other = await gateway.open_stream(
            {**PAYLOAD, "model": "other"}, client_key=None, request_id="r"
        )
        await other.aclose()
    asked = [b'"stream_options":{"include_usage":true}' in body for _, body in upstream.calls]
    assert asked == [True, False, False, True]  # refused once for "m", then never asked for it


async def test_another_400_of_a_stream_is_not_retried() -> None:
    upstream = Upstream(answer(400, b'{"error": {"message": "bad temperature"}}'))
    async with gateway_for(upstream) as gateway:
        with pytest.raises(GatewayRejected, match="bad temperature"):
            await gateway.open_stream(PAYLOAD, client_key=None, request_id="r")
    assert len(upstream.calls) == 1


async def test_no_answer_within_the_read_timeout_is_504_and_not_retried() -> None:
    upstream = Upstream("hang")
    async with gateway_for(upstream, read_timeout=0.2, timeout=30) as gateway:
        with pytest.raises(GatewayTimeout):
            await gateway.complete(PAYLOAD, client_key=None, request_id="r")
    assert len(upstream.calls) == 1  # sent: the model may be working on it
