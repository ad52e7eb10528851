"""The conversation API on a real Redis Cluster (3 primaries) and behind a real Sentinel."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection, Connection
from redis.exceptions import DataError

from service.redis_client import open_redis
from service.store import ConversationRef
from tests.conftest import OTHER_KEY, free_port, make_settings, serve
from tests.fake_gateway import FakeGateway
from tests.redis_topologies import LocalCluster, LocalSentinel

Topology = LocalCluster | LocalSentinel


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSentinel]:
    sentinel = LocalSentinel(tmp_path_factory.mktemp("sentinel"))
    sentinel.start()
    yield sentinel
    sentinel.stop()


@pytest.fixture(params=["cluster", "sentinel"])
def topology(request: pytest.FixtureRequest) -> Topology:
    found: Topology = request.getfixturevalue(f"redis_{request.param}")
    found.flushall()
    return found


@pytest.fixture
async def topo_client(topology: Topology, gateway: FakeGateway) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(make_settings(topology.url), gateway) as http:
        yield http


@pytest.fixture
async def topo_redis(topology: Topology) -> AsyncIterator[Redis | RedisCluster]:
    """A client of the topology, opened the way the service opens it."""
    client, _ = open_redis(topology.url, pool_size=4, pool_timeout_seconds=5.0)
    yield client
    await client.aclose()


def user(content: str) -> dict[str, Any]:
    return {"message": {"role": "user", "content": content}}


async def turn(client: httpx.AsyncClient, cid: str, content: str, **kwargs: Any) -> httpx.Response:
    response = await client.post(f"/conversations/{cid}/messages", json=user(content), **kwargs)
    assert response.status_code == 200, response.text
    return response


async def test_ready(topo_client: httpx.AsyncClient) -> None:
    response = await topo_client.get("/readyz")
    assert response.status_code == 200, response.text


async def test_two_turns_forward_the_history(
    topo_client: httpx.AsyncClient, gateway: FakeGateway
) -> None:
    await turn(topo_client, "c1", "What is the capital of France?")
    second = await turn(topo_client, "c1", "What's the population?")

    assert [(m["role"], m["content"]) for m in gateway.received[1]["messages"]] == [
        ("user", "What is the capital of France?"),
        ("assistant", "reply to: What is the capital of France?"),
        ("user", "What's the population?"),
    ]
    assert second.json()["conversation"]["message_count"] == 4
    assert second.json()["choices"][0]["message"]["content"] == "reply to: What's the population?"


async def test_messages_paginate_backwards(topo_client: httpx.AsyncClient) -> None:
    for i in range(3):
        await turn(topo_client, "paged", f"question {i}")

    newest = await topo_client.get("/conversations/paged/messages", params={"limit": 4})
    assert newest.status_code == 200, newest.text
    page = newest.json()
    assert [m["seq"] for m in page["messages"]] == [3, 4, 5, 6]
    assert [m["content"] for m in page["messages"][::2]] == ["question 1", "question 2"]
    assert page["has_more"] is True

    older = await topo_client.get(
        "/conversations/paged/messages",
        params={"limit": 4, "before": page["messages"][0]["seq"]},
    )
    assert [m["seq"] for m in older.json()["messages"]] == [1, 2]
    assert older.json()["has_more"] is False
    assert (await topo_client.get("/conversations/nope/messages")).status_code == 404


async def test_put_get_delete_conversation(
    topo_client: httpx.AsyncClient, gateway: FakeGateway
) -> None:
    created = await topo_client.put(
        "/conversations/settings", json={"system": "Be brief.", "metadata": {"user": "u1"}}
    )
    assert created.status_code == 201, created.text
    updated = await topo_client.put("/conversations/settings", json={"model": "m-small"})
    assert updated.status_code == 200, updated.text

    got = (await topo_client.get("/conversations/settings")).json()
    assert (got["system"], got["model"], got["metadata"]) == (
        "Be brief.",
        "m-small",
        {"user": "u1"},
    )
    assert got["message_count"] == 0

    await turn(topo_client, "settings", "hello")
    assert gateway.received[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert gateway.received[0]["model"] == "m-small"

    assert (await topo_client.delete("/conversations/settings")).status_code == 204
    assert (await topo_client.get("/conversations/settings")).status_code == 404
    assert (await topo_client.get("/conversations/settings/messages")).status_code == 404
    assert (await topo_client.delete("/conversations/settings")).status_code == 404
    listed = (await topo_client.get("/conversations")).json()["conversations"]
    assert "settings" not in [item["id"] for item in listed]


async def test_listing_is_newest_activity_first(topo_client: httpx.AsyncClient) -> None:
    for cid in ("a", "b", "c"):
        await turn(topo_client, cid, f"first message of {cid}")
    await turn(topo_client, "a", "a again")

    everything = (await topo_client.get("/conversations")).json()
    assert [item["id"] for item in everything["conversations"]] == ["a", "c", "b"]
    assert everything["next_cursor"] is None
    assert [item["message_count"] for item in everything["conversations"]] == [4, 2, 2]

    first = (await topo_client.get("/conversations", params={"limit": 2})).json()
    assert [item["id"] for item in first["conversations"]] == ["a", "c"]
    rest = (
        await topo_client.get("/conversations", params={"limit": 2, "cursor": first["next_cursor"]})
    ).json()
    assert [item["id"] for item in rest["conversations"]] == ["b"]
    assert rest["next_cursor"] is None


async def test_idempotent_replay(topo_client: httpx.AsyncClient, gateway: FakeGateway) -> None:
    headers = {"Idempotency-Key": "turn-1"}
    first = await turn(topo_client, "idem", "once only", headers=headers)
    again = await turn(topo_client, "idem", "once only", headers=headers)

    assert again.headers.get("idempotent-replayed") == "true"
    assert again.json() == first.json()
    assert gateway.calls == 1
    conversation = (await topo_client.get("/conversations/idem")).json()
    assert conversation["message_count"] == 2

    other_body = await topo_client.post(
        "/conversations/idem/messages", json=user("something else"), headers=headers
    )
    assert other_body.status_code == 422, other_body.text


async def test_tenants_are_isolated(topo_client: httpx.AsyncClient, gateway: FakeGateway) -> None:
    await turn(topo_client, "shared-id", "acme's secret")
    beta = {"Authorization": f"Bearer {OTHER_KEY}"}

    assert (await topo_client.get("/conversations/shared-id", headers=beta)).status_code == 404
    messages = await topo_client.get("/conversations/shared-id/messages", headers=beta)
    assert messages.status_code == 404
    assert (await topo_client.delete("/conversations/shared-id", headers=beta)).status_code == 404
    listed = await topo_client.get("/conversations", headers=beta)
    assert listed.json()["conversations"] == []

    await turn(topo_client, "shared-id", "beta's own", headers=beta)
    assert [m["content"] for m in gateway.received[-1]["messages"]] == ["beta's own"]
    acme = (await topo_client.get("/conversations/shared-id")).json()
    assert acme["message_count"] == 2


async def test_lost_script_cache_is_reloaded(
    topology: Topology, topo_client: httpx.AsyncClient
) -> None:
    """After a restart or failover the primaries know no scripts: the store loads them again."""
    await turn(topo_client, "flushed", "before")
    for primary in topology.primaries():
        with primary:
            primary.script_flush()
    second = await turn(topo_client, "flushed", "after")
    assert second.json()["conversation"]["message_count"] == 4


@pytest.mark.parametrize("topology", ["cluster"], indirect=True)
async def test_conversation_keys_share_one_slot(
    topo_client: httpx.AsyncClient, topo_redis: Redis | RedisCluster
) -> None:
    assert isinstance(topo_redis, RedisCluster)
    await turn(topo_client, "slotted", "hello", headers={"Idempotency-Key": "k1"})
    ref = ConversationRef("acme", "slotted")
    keys = sorted([_text(key) async for key in topo_redis.scan_iter(match="conv:{acme:slotted}:*")])
    assert {key.rsplit(":", 1)[-1] for key in keys} >= {"log", "meta", "idemkeys"}
    assert any(":idem:" in key for key in keys)

    slots = {topo_redis.keyslot(key) for key in [*keys, ref.key("lock")]}
    server_slots = {
        await topo_redis.execute_command("CLUSTER KEYSLOT", key)
        for key in (ref.key("log"), ref.key("meta"), ref.key("lock"))
    }
    assert len(slots) == 1
    assert server_slots == slots
    assert await topo_redis.zscore(ref.index_key, "slotted") is not None


@pytest.mark.parametrize("topology", ["cluster"], indirect=True)
async def test_conversation_follows_a_resharded_slot(
    topology: LocalCluster, topo_client: httpx.AsyncClient, gateway: FakeGateway
) -> None:
    """Moving the conversation's slot to another primary (MOVED) is followed, scripts and all."""
    await turn(topo_client, "moving", "before the move", headers={"Idempotency-Key": "m1"})
    ref = ConversationRef("acme", "moving")
    with topology.primaries()[0] as conn:
        slot = int(conn.execute_command("CLUSTER", "KEYSLOT", ref.key("log")))
    source = topology.owner(slot)
    target = (source + 1) % topology.size
    await asyncio.to_thread(topology.move_slot, slot, target)

    await turn(topo_client, "moving", "after the move")
    assert [m["content"] for m in gateway.received[-1]["messages"]] == [
        "before the move",
        "reply to: before the move",
        "after the move",
    ]
    replay = await turn(topo_client, "moving", "before the move", headers={"Idempotency-Key": "m1"})
    assert replay.headers.get("idempotent-replayed") == "true"
    with topology.primaries()[target] as conn:
        assert conn.llen(ref.key("log")) == 4
    listed = (await topo_client.get("/conversations")).json()["conversations"]
    assert [item["id"] for item in listed] == ["moving"]
    assert (await topo_client.delete("/conversations/moving")).status_code == 204


@pytest.fixture
def sentinel_with_replica(tmp_path: Path) -> Iterator[LocalSentinel]:
    """A Sentinel set of its own (primary, replica), since the test kills its primary."""
    topology = LocalSentinel(tmp_path / "failover", replicas=1, down_after_ms=500)
    topology.start()
    yield topology
    topology.stop()


async def test_sentinel_failover_after_the_primary_dies(
    sentinel_with_replica: LocalSentinel, gateway: FakeGateway
) -> None:
    topology = sentinel_with_replica
    async with serve(make_settings(topology.url), gateway) as client:
        await turn(client, "failover", "before the failover")
        with topology.primaries()[0] as primary:
            assert primary.wait(1, 5000) == 1  # the replica has the turn before it is promoted
        promoted = await asyncio.to_thread(topology.kill_primary)
        assert promoted == topology.replicas[0].port

        # Until every pooled connection has met the new primary, a turn may get 503: retry.
        deadline = time.monotonic() + 20
        while True:
            response = await client.post(
                "/conversations/failover/messages", json=user("after the failover")
            )
            if response.status_code == 200 or time.monotonic() > deadline:
                break
            assert response.status_code == 503, response.text
            await asyncio.sleep(0.1)
        assert response.status_code == 200, response.text
        assert response.json()["conversation"]["message_count"] == 4
        assert [m["content"] for m in gateway.received[-1]["messages"]][:2] == [
            "before the failover",
            "reply to: before the failover",
        ]


@pytest.mark.parametrize("scheme", ["redis+cluster", "redis+sentinel"])
async def test_unreachable_topology_is_503(scheme: str, gateway: FakeGateway) -> None:
    url = f"{scheme}://127.0.0.1:{free_port()}" + ("/mymaster" if "sentinel" in scheme else "")
    async with serve(make_settings(url), gateway) as client:
        for response in (
            await client.post("/conversations/down/messages", json=user("hello")),
            await client.get("/conversations/down"),
            await client.get("/conversations"),
            await client.get("/readyz"),
        ):
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "1"
            assert response.headers["content-type"].startswith("application/problem+json")
    assert gateway.calls == 0


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis+sentinel://s1,s2:26380/mymaster", [("s1", 26379), ("s2", 26380)]),
        ("redis+sentinel://:pw@[::1]:5000,[::2]/mymaster/2", [("::1", 5000), ("::2", 26379)]),
    ],
)
async def test_sentinel_url_hosts(url: str, expected: list[tuple[str, int]]) -> None:
    """Sentinel hosts default to Sentinel's port, 26379; IPv6 goes in brackets."""
    client, cluster = open_redis(url, pool_size=1, pool_timeout_seconds=1.0)
    try:
        assert cluster is False
        sentinel = client.owned_sentinel  # type: ignore[union-attr] # a _SentinelPrimary here
        assert sentinel is not None
        found = [
            (
                s.connection_pool.connection_kwargs["host"],
                s.connection_pool.connection_kwargs["port"],
            )
            for s in sentinel.sentinels
        ]
        assert found == expected
    finally:
        await client.aclose()


# What the service sends: a script by its sha with keys and encoded JSON, a multi-word command
# (redis-py splits it), text beyond ASCII, integers and a float.
COMMANDS = [
    ("EVALSHA", "ab" * 20, 2, "conv:{t:c}:log", "conv:{t:c}:meta", b'{"role":"user"}', 3600),
    ("SCRIPT LOAD", "return 1"),
    ("SET", "k", "d\u00e9j\u00e0 \U0001f600", 0.1, 1e20, -7, b"", memoryview(b"mv")),
    ("SET", "k", bytearray(b"ba")),
]


def _python_packed(commands: list[tuple[Any, ...]]) -> bytes:
    """redis-py's own asyncio packing, in Python."""
    plain = Connection()
    return b"".join(bytes(chunk) for chunk in plain.pack_commands(commands))


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:1/0",
        "rediss://127.0.0.1:1/0",
        "unix:///tmp/none.sock",
        "redis+sentinel://127.0.0.1:1/m",
    ],
)
async def test_commands_are_packed_by_hiredis_into_the_same_bytes(url: str) -> None:
    """Single-node and Sentinel pools pack with hiredis (redis_client._HiredisPacking) whatever
    connection class the URL chose, byte for byte as redis-py's Python packer, with its error
    for a value Redis cannot take."""
    client, _ = open_redis(url, pool_size=1, pool_timeout_seconds=1.0)
    try:
        pool = client.connection_pool  # type: ignore[union-attr] # not a Cluster here
        connection: AbstractConnection = pool.make_connection()
        assert type(connection).__name__.startswith("Hiredis")
        for command in COMMANDS:
            assert b"".join(connection.pack_command(*command)) == _python_packed([command])
        assert b"".join(connection.pack_commands(COMMANDS)) == _python_packed(COMMANDS)
        for bad in (None, True, 1j):
            with pytest.raises(DataError):
                connection.pack_command("SET", "k", bad)  # type: ignore[arg-type]
    finally:
        await client.aclose()


async def test_cluster_url_hosts() -> None:
    client, cluster = open_redis(
        "redis+cluster://user:pw@a,b:7001,[::1]:7002", pool_size=1, pool_timeout_seconds=1.0
    )
    try:
        assert cluster is True
        assert isinstance(client, RedisCluster)
        nodes = client.nodes_manager.startup_nodes.values()
        assert sorted((n.host, n.port) for n in nodes) == [("::1", 7002), ("a", 6379), ("b", 7001)]
    finally:
        await client.aclose()


def test_sentinel_url_needs_a_master_name() -> None:
    with pytest.raises(ValueError, match="master name"):
        open_redis("redis+sentinel://127.0.0.1:26379", pool_size=1, pool_timeout_seconds=1.0)


async def test_sentinel_url_selects_the_database(redis_sentinel: LocalSentinel) -> None:
    client, cluster = open_redis(redis_sentinel.url + "/3", pool_size=2, pool_timeout_seconds=1.0)
    try:
        assert cluster is False
        assert isinstance(client, Redis)
        await client.set("probe", "1")
        assert (await client.client_info())["db"] == 3
    finally:
        await client.aclose()
        redis_sentinel.flushall()


async def test_bursts_queue_for_a_small_pool(topology: Topology, gateway: FakeGateway) -> None:
    """More requests at once than pooled connections: they wait for one, none fails."""
    settings = make_settings(topology.url, redis_pool_size=2)
    async with serve(settings, gateway) as client:
        reads = [client.get("/conversations") for _ in range(30)]
        turns = [client.post(f"/conversations/b{i}/messages", json=user("x")) for i in range(10)]
        responses = await asyncio.gather(*reads, *turns)
    assert [r.status_code for r in responses] == [200] * 40


async def test_a_failed_index_write_on_a_cluster_does_not_fail_the_turn(
    redis_cluster: LocalCluster, gateway: FakeGateway
) -> None:
    """The index lives in another slot than the conversation: here a key of the wrong type makes
    its write fail after the turn was committed."""
    redis_cluster.flushall()
    index = ConversationRef("acme", "").index_key
    client, _ = open_redis(redis_cluster.url, pool_size=4, pool_timeout_seconds=5.0)
    try:
        await client.set(index, "not a sorted set")
        async with serve(make_settings(redis_cluster.url), gateway) as http:
            response = await http.post("/conversations/ix/messages", json=user("a"))
            assert response.status_code == 200, response.text
            assert (await http.put("/conversations/iy", json={})).status_code == 201
        assert gateway.calls == 1
        assert await client.llen(ConversationRef("acme", "ix").key("log")) == 2
    finally:
        await client.aclose()


async def test_a_detached_turn_is_journaled_and_replayed(
    topo_client: httpx.AsyncClient, gateway: FakeGateway
) -> None:
    """Streams, blocking reads and the journal's script run on a Cluster and behind Sentinel."""
    body = {**user("far away"), "stream": True, "detach": True}
    first = await topo_client.post("/conversations/away/messages", json=body)
    assert first.status_code == 200, first.text
    assert first.text.startswith("id: ")
    assert first.text.endswith("data: [DONE]\n\n")
    again = await topo_client.get("/conversations/away/stream")
    assert again.content == first.content
    status = (await topo_client.get("/conversations/away")).json()
    assert status["turn"]["state"] == "done"
    assert status["message_count"] == 2
    assert (await topo_client.post("/conversations/away/cancel")).status_code == 409
    assert gateway.calls == 1


@pytest.mark.parametrize("topology", ["cluster"], indirect=True)
async def test_fork_across_slots_on_a_cluster(
    topology: LocalCluster, topo_client: httpx.AsyncClient, topo_redis: Redis | RedisCluster
) -> None:
    """Source and copy in slots of different primaries: the copy is staged under the new id's
    hash tag and created in one script there, with the index beside."""
    assert isinstance(topo_redis, RedisCluster)
    source, target = ConversationRef("acme", "src"), ConversationRef("acme", "fork-0")
    for n in range(50):  # an id whose slot another primary owns
        target = ConversationRef("acme", f"fork-{n}")
        if topology.owner(topo_redis.keyslot(target.key("log"))) != topology.owner(
            topo_redis.keyslot(source.key("log"))
        ):
            break
    await topo_client.put("/conversations/src", json={"system": "brief"})
    records = [
        orjson.dumps(
            {
                "tokens": 2,
                "seq": i + 1,
                "role": "user" if i % 2 == 0 else "assistant",
                "content": f"m{i + 1}",
                "created_at": 1.0,
            }
        )
        for i in range(1100)
    ]
    await topo_redis.rpush(source.key("log"), *records)
    await topo_redis.rpush(source.key("tok"), *([2] * len(records)))
    response = await topo_client.post(
        "/conversations/src/fork", json={"new_id": target.id, "through_seq": 1001}
    )
    assert response.status_code == 201, response.text
    assert await topo_redis.lrange(target.key("log"), 0, -1) == records[:1001]
    assert await topo_redis.llen(target.key("tok")) == 1001
    forked = (await topo_client.get(f"/conversations/{target.id}")).json()
    assert (forked["system"], forked["message_count"]) == ("brief", 1001)
    assert await topo_redis.zscore(target.index_key, target.id) is not None
    again = await topo_client.post("/conversations/src/fork", json={"new_id": target.id})
    assert again.status_code == 409
    # The key is claimed in the source's slot: another new_id under it is 422, creating nothing.
    keyed = {"Idempotency-Key": "fk"}
    other = ConversationRef("acme", "fork-keyed")
    done = await topo_client.post(
        "/conversations/src/fork", json={"new_id": "fork-k"}, headers=keyed
    )
    assert done.status_code == 201, done.text
    reused = await topo_client.post(
        "/conversations/src/fork", json={"new_id": other.id}, headers=keyed
    )
    assert reused.status_code == 422, reused.text
    assert await topo_redis.exists(other.key("meta"), other.key("log")) == 0
    assert [key async for key in topo_redis.scan_iter(match="*:stage:*")] == []


async def test_editing_on_each_topology(
    topo_client: httpx.AsyncClient, gateway: FakeGateway
) -> None:
    await turn(topo_client, "ed", "one")
    await turn(topo_client, "ed", "two")
    gateway.reply_prefix = "again: "
    regenerated = await topo_client.post("/conversations/ed/regenerate", json={})
    assert regenerated.status_code == 200, regenerated.text
    edited = await topo_client.post(
        "/conversations/ed/messages",
        json={**user("ONE"), "replace_from": 1, "stream": True},
    )
    assert edited.status_code == 200
    exported = await topo_client.get("/conversations/ed/export")
    imported = await topo_client.post(
        "/conversations/ed2/import",
        content=exported.content,
        headers={"Content-Type": "application/jsonl"},
    )
    assert imported.status_code == 201, imported.text
    cut = await topo_client.delete("/conversations/ed/messages", params={"from_seq": 2})
    assert cut.json() == {"id": "ed", "message_count": 1, "generation": 3}
    page = (await topo_client.get("/conversations/ed2/messages")).json()
    assert [m["content"] for m in page["messages"]] == ["ONE", "again: ONE"]
