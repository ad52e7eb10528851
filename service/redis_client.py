"""Opening the Redis client for REDIS_URL's topology: a single node, a Cluster, or Sentinel.

  redis://host:port/db, rediss://..., unix:///path/redis.sock   a single node
  redis+cluster://host:port[,host:port...]                       Redis Cluster (seed nodes)
  redis+sentinel://host:port[,host:port...]/master-name[/db]     Sentinel-managed primary
(`rediss+cluster://` and `rediss+sentinel://` use TLS.)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.connection import HiredisRespSerializer

from service.store import RedisClient

SOCKET_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0
HEALTH_CHECK_SECONDS = 30


_PACKER = HiredisRespSerializer()


class _HiredisPacking(AbstractConnection):
    """Commands packed by hiredis, in C, as redis-py's own synchronous client packs them when
    hiredis is installed: its asyncio connections pack every argument in Python (an encoder
    call and several isinstance checks each), 4% of a turn's instructions (issue 10). Same
    bytes on the wire, the same DataError for a value Redis cannot take."""

    def pack_command(self, *args: Any) -> list[bytes]:
        first = args[0]
        if type(first) is str and " " not in first:  # a one-word command: every one we send
            try:
                return [hiredis.pack_command(args)]
            except TypeError:  # a bytearray, or a value Redis cannot take: redis-py's path says
                pass
        packed: list[bytes] = _PACKER.pack(*args)  # splits "SCRIPT LOAD", raises DataError
        return packed

    def pack_commands(self, commands: Iterable[Iterable[Any]]) -> list[bytes]:
        return [b"".join([self.pack_command(*command)[0] for command in commands])]


_PACKING: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def _pack_with_hiredis(pool: ConnectionPool) -> None:
    """The pool's connection class (TCP, TLS, Unix socket or Sentinel-managed: whichever the URL
    chose) packing with hiredis. Not for a Cluster: RedisCluster sets its nodes' connection class
    itself, from its own arguments, and is left as redis-py builds it."""
    base = pool.connection_class
    if base not in _PACKING:
        _PACKING[base] = type(f"Hiredis{base.__name__}", (_HiredisPacking, base), {})
    pool.connection_class = _PACKING[base]


class _SentinelPrimary(Redis):
    """The Sentinel-managed primary; closing it also closes the connections to the Sentinels,
    which redis-py leaves to the caller."""

    owned_sentinel: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            if self.owned_sentinel is not None:
                await self.owned_sentinel.aclose()


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's pool (follows failovers) that makes a request beyond `max_connections` wait,
    up to `timeout`, for a free connection instead of failing with "Too many connections"."""


def _reconnect() -> Retry:
    """Retry a command once or twice on a fresh connection when its pooled one is dead (Redis
    restarted or failed over), instead of failing the request. Safe for our scripts: a retried
    begin finds its own lease, a retried commit finds its own turn already stored."""
    return Retry(ExponentialBackoff(cap=0.1, base=0.01), 2)


def _hosts(netloc: str, default_port: int) -> list[tuple[str, int]]:
    """`host[:port],...` from a URL's netloc (IPv6 in brackets), without the credentials."""
    hosts = []
    for raw in netloc.rpartition("@")[2].split(","):
        item = raw.strip()
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port = rest.removeprefix(":")
        else:
            host, _, port = item.partition(":")
        hosts.append((host or "127.0.0.1", int(port) if port else default_port))
    return hosts


def open_redis(
    url: str, *, pool_size: int, pool_timeout_seconds: float
) -> tuple[RedisClient, bool]:
    """The client and whether it is a Cluster. A blocking pool makes bursts queue, not fail; the
    Cluster client has none (a full node pool raises), so ConversationStore queues its calls."""
    parts = urlsplit(url)
    password = unquote(parts.password) if parts.password else None
    username = unquote(parts.username) if parts.username else None
    tls = parts.scheme.startswith("rediss")
    if parts.scheme.endswith("+cluster"):
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in _hosts(parts.netloc, 6379)],
            username=username,
            password=password,
            ssl=tls,
            max_connections=pool_size,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=CONNECT_TIMEOUT,
            health_check_interval=HEALTH_CHECK_SECONDS,
        )
        return cluster, True
    if parts.scheme.endswith("+sentinel"):
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ValueError(
                "redis+sentinel:// needs the master name: redis+sentinel://host:port/name"
            )
        sentinel = Sentinel(  # type: ignore[no-untyped-call] # redis-py leaves it untyped
            _hosts(parts.netloc, 26379),  # Sentinel's own default port
            # One try per Sentinel, bounded: discovery moves on to the next Sentinel instead of
            # backing off on a dead one (redis-py's default retry adds seconds per lookup).
            sentinel_kwargs={
                "password": password,
                "socket_timeout": CONNECT_TIMEOUT,
                "socket_connect_timeout": CONNECT_TIMEOUT,
                "retry": Retry(NoBackoff(), 0),
            },
            username=username,
            password=password,
            ssl=tls,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=CONNECT_TIMEOUT,
            health_check_interval=HEALTH_CHECK_SECONDS,
        )
        db = int(path[1]) if len(path) > 1 else 0
        primary: _SentinelPrimary = sentinel.master_for(
            path[0],
            redis_class=_SentinelPrimary,
            connection_pool_class=_BlockingSentinelPool,
            db=db,
            max_connections=pool_size,
            timeout=pool_timeout_seconds,
            retry=_reconnect(),
        )
        primary.owned_sentinel = sentinel
        _pack_with_hiredis(primary.connection_pool)
        return primary, False
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=pool_size,
        timeout=pool_timeout_seconds,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=CONNECT_TIMEOUT,
        health_check_interval=HEALTH_CHECK_SECONDS,
        retry=_reconnect(),
    )
    _pack_with_hiredis(pool)
    return Redis.from_pool(pool), False  # from_pool: closing the client closes the pool
