"""The embedded default: with no REDIS_URL the service runs its own redis-server, with AOF."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from redis.asyncio import Redis

from service.embedded_redis import EmbeddedRedis
from tests.conftest import make_settings, serve
from tests.fake_gateway import FakeGateway


async def test_without_redis_url_the_service_keeps_data_under_data_dir(
    tmp_path: Path, gateway: FakeGateway, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings("", data_dir=tmp_path / "data")
    assert settings.redis_url is None
    for turn in ("first", "second"):  # two runs of the service on the same data directory
        async with serve(settings, gateway) as http:
            response = await http.post(
                "/conversations/e/messages", json={"message": {"role": "user", "content": turn}}
            )
            assert response.status_code == 200
    # The second run found the first run's turn on disk (AOF), then both stopped cleanly.
    assert response.json()["conversation"]["message_count"] == 4
    assert gateway.received[1]["messages"][0]["content"] == "first"
    aof = tmp_path / "data" / "appendonly.aof"
    assert aof.exists()
    assert b"second" in aof.read_bytes()
    server = EmbeddedRedis(tmp_path / "data")
    assert not server.answers()  # stopped with the app
    # Development only, and said loudly: replicas each with their own Redis share nothing.
    warned = [r for r in caplog.records if "REDIS_URL unset" in r.getMessage()]
    assert warned
    assert all(r.levelno == logging.WARNING for r in warned)


async def test_embedded_server_on_a_port(tmp_path: Path) -> None:
    from tests.conftest import free_port

    server = EmbeddedRedis(tmp_path, port=free_port(), persist=False)
    url = server.start()
    try:
        client = Redis.from_url(url)
        assert await client.ping()
        await client.aclose()
    finally:
        server.stop()
    assert not server.answers()
    server.stop()  # stopping twice is harmless
