"""Detached turns across replicas (issue 16): real `python -m service` processes on one Redis, in
front of the stand-in gateway process. A client cut off at a random event resumes on another
replica; a replica killed mid-turn; cancel from another replica; the journal's keys expire."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest
from redis.asyncio import Redis

from service.store import ConversationRef
from tests.polling import eventually
from tests.processes import E2E_CLIENT_KEY, GatewayControl, Replica
from tests.test_detached import Reader, blocks, event_id
from tests.test_streaming import content_of, events_of

AUTH = {"Authorization": f"Bearer {E2E_CLIENT_KEY}"}
REPLY_PREFIX = "reply to: "
CLIENT_TIMEOUT = httpx.Timeout(30.0)
RESUMES = 200


def detached(content: str) -> dict[str, Any]:
    return {"message": {"role": "user", "content": content}, "stream": True, "detach": True}


def url(replica: Replica, conversation_id: str, part: str = "") -> str:
    return f"{replica.url}/conversations/{conversation_id}{part}"


def last_problem(raw: bytes) -> Any:
    name, data = events_of(raw.decode())[-1]
    assert name == "error", raw
    return orjson.loads(data)["error"]


@pytest.fixture
async def fresh(redis: Redis, gateway_control: GatewayControl) -> GatewayControl:
    """An empty Redis (the `redis` fixture flushes it) and a reset stand-in gateway."""
    return gateway_control


async def test_a_client_cut_off_anywhere_resumes_on_another_replica_byte_for_byte(
    replicas: list[Replica], fresh: GatewayControl
) -> None:
    await fresh.configure(chunk_size=3)
    chance = random.Random(16)  # where to cut, reproducibly
    async with httpx.AsyncClient(headers=AUTH, timeout=CLIENT_TIMEOUT) as http:
        for i in range(RESUMES):
            conversation_id = f"resume-{i}"
            question = f"question number {i}: where does the light go at night?"
            origin, resumer, checker = (replicas[(i + k) % 3] for k in range(3))
            live = i % 5 == 0  # every fifth turn is still running when its client comes back
            if live:
                await fresh.configure(stream_gate=True)
            async with http.stream(
                "POST", url(origin, conversation_id, "/messages"), json=detached(question)
            ) as response:
                assert response.status_code == 200
                reader = Reader(response)
                cut = 1 if live else chance.randint(1, 20)
                seen = await reader.events(cut)
            # The client's connection is gone; it comes back on another replica.
            async with http.stream(
                "GET",
                url(resumer, conversation_id, "/stream"),
                headers={"Last-Event-ID": event_id(seen[-1])},
            ) as resumed:
                if live:
                    await fresh.release()
                rest = await Reader(resumed).rest()
            whole = b"".join(seen) + b"".join(blocks(rest))
            reference = await http.get(url(checker, conversation_id, "/stream"))
            assert whole == b"".join(blocks(reference.content)), f"turn {i} cut at {cut}"
            assert content_of(events_of(whole.decode())) == REPLY_PREFIX + question
            stored = await http.get(url(checker, conversation_id, "/messages"))
            assert [m["content"] for m in stored.json()["messages"]] == [
                question,
                REPLY_PREFIX + question,
            ]
    received = await fresh.received()
    assert len(received) == RESUMES  # exactly one gateway call per turn
    assert len({b["messages"][-1]["content"] for b in received}) == RESUMES


async def test_a_replica_killed_while_running_a_detached_turn_stores_nothing(
    replicas: list[Replica],
    fresh: GatewayControl,
    redis: Redis,
    spawn_replica: Callable[..., Replica],
) -> None:
    """The upstream call lives on the replica that took the turn: it dies with it. Its lease
    expires, nothing was stored, readers elsewhere are told, and the turn can be sent again."""
    victim = spawn_replica()
    conversation_id = "killed"
    ref = ConversationRef("acme", conversation_id)
    await fresh.configure(stream_gate=True)
    headers = {"Idempotency-Key": "killed-1"}
    async with httpx.AsyncClient(headers=AUTH, timeout=CLIENT_TIMEOUT) as http:
        await http.put(url(replicas[0], conversation_id), json={})
        async with http.stream(
            "POST",
            url(victim, conversation_id, "/messages"),
            json=detached("doomed"),
            headers=headers,
        ) as response:
            (first,) = await Reader(response).events(1)
            async with http.stream(
                "GET",
                url(replicas[0], conversation_id, "/stream"),
                headers={"Last-Event-ID": event_id(first)},
            ) as follower:
                victim.kill()
                told = await Reader(follower).rest()
        problem = last_problem(told)
        assert problem["type"] == "/problems/turn-lost"
        assert "nothing was stored" in problem["detail"]

        async def lease_gone() -> bool:
            return not await redis.exists(ref.key("lock"))

        await eventually(lease_gone, what="the dead replica's lease to expire")
        status = (await http.get(url(replicas[1], conversation_id))).json()
        assert status["message_count"] == 0
        assert status["turn"]["state"] == "lost"
        assert (await http.post(url(replicas[2], conversation_id, "/cancel"))).status_code == 409
        # Nothing was stored, so the same request (same key) runs again, once.
        await fresh.release()
        again = await http.post(
            url(replicas[1], conversation_id, "/messages"),
            json=detached("doomed"),
            headers=headers,
        )
        assert content_of(events_of(again.text)) == REPLY_PREFIX + "doomed"
        stored = await http.get(url(replicas[2], conversation_id, "/messages"))
        assert [m["content"] for m in stored.json()["messages"]] == ["doomed", "reply to: doomed"]
    assert len(await fresh.received()) == 2


async def test_cancel_from_another_replica_stores_nothing(
    replicas: list[Replica], fresh: GatewayControl, redis: Redis
) -> None:
    conversation_id = "cancelled"
    await fresh.configure(stream_gate=True)
    async with httpx.AsyncClient(headers=AUTH, timeout=CLIENT_TIMEOUT) as http:
        async with http.stream(
            "POST", url(replicas[0], conversation_id, "/messages"), json=detached("stop me")
        ) as response:
            reader = Reader(response)
            await reader.events(1)
            cancelled = await http.post(url(replicas[1], conversation_id, "/cancel"))
            assert cancelled.status_code == 200
            assert cancelled.json()["state"] == "cancelled"
            ended = await reader.rest()
        assert last_problem(ended)["type"] == "/problems/turn-cancelled"
        assert (await http.get(url(replicas[2], conversation_id, "/messages"))).status_code == 404
        # The same bytes for a reader on the third replica, ending in the same error.
        replay = await http.get(url(replicas[2], conversation_id, "/stream"))
        assert last_problem(replay.content)["type"] == "/problems/turn-cancelled"
    assert not await redis.exists(ConversationRef("acme", conversation_id).key("lock"))


async def test_the_journal_expires(
    fresh: GatewayControl, redis: Redis, spawn_replica: Callable[..., Replica]
) -> None:
    replica = spawn_replica(DETACHED_TTL_SECONDS="1")
    async with httpx.AsyncClient(headers=AUTH, timeout=CLIENT_TIMEOUT) as http:
        response = await http.post(url(replica, "short", "/messages"), json=detached("brief"))
        assert content_of(events_of(response.text)) == REPLY_PREFIX + "brief"
    assert [k async for k in redis.scan_iter(match="conv:{acme:short}:turn*")]

    async def expired() -> bool:
        return not [k async for k in redis.scan_iter(match="conv:{acme:short}:turn*")]

    await eventually(expired, what="the journal's keys to expire")
    assert await redis.llen("conv:{acme:short}:log") == 2  # the conversation stays
