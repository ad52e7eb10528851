"""Slow and idle connections, and the concurrency cap, against a real uvicorn server over raw
sockets: in this process (uvicorn.Server with the service's protocol), and as `python -m service`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import orjson
import uvicorn
from redis.asyncio import Redis

from service import connections
from service.app import create_app
from service.config import Settings
from tests.conftest import CLIENT_KEY, free_port, make_settings, with_gateway
from tests.fake_gateway import FakeGateway, serve_in_process
from tests.polling import eventually
from tests.processes import E2E_CLIENT_KEY, Replica

READ_TIMEOUT = 30.0  # generous: the machine is shared; the server's own deadlines are ~1 s
TURN = b'{"message": {"role": "user", "content": "hi"}}'


@asynccontextmanager
async def uvicorn_server(
    settings: Settings, gateway: FakeGateway, *, header_timeout: float = 1.0
) -> AsyncIterator[int]:
    port = free_port()
    async with serve_in_process(gateway) as gateway_url:
        app = create_app(with_gateway(settings, gateway_url))
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_config=None, timeout_keep_alive=1
        )
        connections.configure(config, header_timeout)
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        try:
            await eventually(lambda: server.started, what="uvicorn started", timeout=READ_TIMEOUT)
            yield port
        finally:
            server.should_exit = True
            await task


def settings_for(redis_url: str, **overrides: object) -> Settings:
    return make_settings(
        redis_url, body_timeout_seconds=1.0, keepalive_timeout_seconds=1, **overrides
    )


async def read_all(reader: asyncio.StreamReader) -> bytes:
    """Everything until the server closes the connection."""
    return await asyncio.wait_for(reader.read(), READ_TIMEOUT)


def status_and_body(raw: bytes) -> tuple[int, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def post_head(length: int, key: str = CLIENT_KEY) -> bytes:
    return (
        b"POST /conversations/slow/messages HTTP/1.1\r\nHost: t\r\n"
        b"Content-Type: application/json\r\nAuthorization: Bearer " + key.encode() + b"\r\n"
        b"Content-Length: " + str(length).encode() + b"\r\n\r\n"
    )


async def assert_slow_body_gets_408(port: int, key: str, redis: Redis) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(post_head(len(TURN), key) + TURN[:1])  # then nothing more, as a trickle would
    await writer.drain()
    status, body = status_and_body(await read_all(reader))
    writer.close()
    assert status == 408
    assert orjson.loads(body)["status"] == 408
    assert await redis.exists("conv:{acme:slow}:log") == 0


async def assert_slow_headers_get_408(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")  # headers never finished
    await writer.drain()
    status, body = status_and_body(await read_all(reader))
    writer.close()
    assert status == 408
    assert b"headers" in body


async def assert_idle_connection_is_closed(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await read_all(reader) == b""  # closed without a word: it never asked anything
    writer.close()


async def test_a_body_that_trickles_in_gets_408(
    redis_url: str, redis: Redis, gateway: FakeGateway
) -> None:
    async with uvicorn_server(settings_for(redis_url), gateway) as port:
        await assert_slow_body_gets_408(port, CLIENT_KEY, redis)
    assert gateway.calls == 0


async def test_headers_that_trickle_in_get_408(
    redis_url: str, redis: Redis, gateway: FakeGateway
) -> None:
    async with uvicorn_server(settings_for(redis_url), gateway) as port:
        await assert_slow_headers_get_408(port)


async def test_idle_connections_are_closed(
    redis_url: str, redis: Redis, gateway: FakeGateway
) -> None:
    async with uvicorn_server(settings_for(redis_url), gateway) as port:
        await assert_idle_connection_is_closed(port)
        # After a response, the keep-alive timeout closes it; the next request's headers are
        # still held to their own deadline.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        await writer.drain()
        raw = await read_all(reader)
        writer.close()
        assert raw.startswith(b"HTTP/1.1 200")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\nGET /healthz HTTP/1.1\r\n")
        await writer.drain()
        raw = await read_all(reader)
        writer.close()
        assert raw.startswith(b"HTTP/1.1 200")
        assert b"HTTP/1.1 408" in raw


async def test_over_the_concurrency_cap_gets_503(
    redis_url: str, redis: Redis, gateway: FakeGateway
) -> None:
    gateway.hold = asyncio.Event()
    async with uvicorn_server(settings_for(redis_url, max_concurrency=1), gateway) as port:
        first_reader, first_writer = await asyncio.open_connection("127.0.0.1", port)
        first_writer.write(post_head(len(TURN)) + TURN)
        await first_writer.drain()
        await eventually(lambda: gateway.calls == 1, what="the first turn upstream")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /conversations HTTP/1.1\r\nHost: t\r\n\r\n")
        await writer.drain()
        raw = await read_all(reader)
        writer.close()
        status, body = status_and_body(raw)
        assert status == 503
        assert b"retry-after: 1" in raw.lower()
        assert b"MAX_CONCURRENCY" in body
        probe_reader, probe_writer = await asyncio.open_connection("127.0.0.1", port)
        probe_writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        await probe_writer.drain()
        assert (await read_all(probe_reader)).startswith(b"HTTP/1.1 200")
        probe_writer.close()
        scrape_reader, scrape_writer = await asyncio.open_connection("127.0.0.1", port)
        scrape_writer.write(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        await scrape_writer.drain()
        scraped = await read_all(scrape_reader)
        scrape_writer.close()
        assert b"\nconvproxy_requests_in_flight 2.0\n" in scraped  # the held turn, this scrape
        gateway.hold.set()
        first, _ = status_and_body(await asyncio.wait_for(first_reader.read(12), READ_TIMEOUT))
        first_writer.close()
    assert first == 200


async def test_python_m_service_applies_the_deadlines(
    spawn_replica: Callable[..., Replica], redis: Redis
) -> None:
    replica = spawn_replica(
        HEADER_TIMEOUT_SECONDS="1", BODY_TIMEOUT_SECONDS="1", KEEPALIVE_TIMEOUT_SECONDS="1"
    )
    await assert_idle_connection_is_closed(replica.port)
    await assert_slow_headers_get_408(replica.port)
    await assert_slow_body_gets_408(replica.port, E2E_CLIENT_KEY, redis)
