"""Order and exactly-once across replicas: real `python -m service` processes on one Redis,
in front of the stand-in gateway process (tests/gateway_server.py)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from service.store import ConversationRef
from tests.polling import eventually
from tests.processes import (
    E2E_CLIENT_KEY,
    GatewayControl,
    Replica,
    accepts_connections,
)

AUTH = {"Authorization": f"Bearer {E2E_CLIENT_KEY}"}
TENANT = "acme"
REPLY_PREFIX = "reply to: "
CLIENT_TIMEOUT = httpx.Timeout(30.0)
WAIT_SECONDS = 15.0
LONG_LEASE_SECONDS = 60

Json = dict[str, Any]


def turn(content: str) -> Json:
    return {"message": {"role": "user", "content": content}}


def turn_url(replica: Replica, conversation_id: str) -> str:
    return f"{replica.url}/conversations/{conversation_id}/messages"


def pairs(messages: list[Json]) -> list[tuple[str, Any]]:
    return [(m["role"], m["content"]) for m in messages]


def last_content(body: Json) -> Any:
    return body["messages"][-1]["content"]


async def stored_messages(
    http: httpx.AsyncClient, replica: Replica, conversation_id: str
) -> list[Json]:
    """Every stored message of a conversation, oldest first, following the pages back."""
    messages: list[Json] = []
    params: dict[str, int] = {"limit": 1000}
    while True:
        response = await http.get(turn_url(replica, conversation_id), params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        messages = page["messages"] + messages
        if not page["has_more"]:
            return messages
        params["before"] = page["messages"][0]["seq"]


def assert_turns_adjacent(messages: list[Json]) -> None:
    """user, assistant, user, assistant, ...: each reply right after the message it answers."""
    assert len(messages) % 2 == 0
    assert [m["seq"] for m in messages] == list(range(1, len(messages) + 1))
    for user, assistant in zip(messages[::2], messages[1::2], strict=True):
        assert user["role"] == "user"
        assert assistant["role"] == "assistant"
        assert assistant["content"] == REPLY_PREFIX + user["content"]


@pytest.fixture
async def fresh(redis: Redis, gateway_control: GatewayControl) -> GatewayControl:
    """An empty Redis (the `redis` fixture flushes it) and a reset stand-in gateway."""
    return gateway_control


async def test_concurrent_clients_store_every_turn_once_on_full_history(
    replicas: list[Replica], fresh: GatewayControl
) -> None:
    conversations = [f"order-{i}" for i in range(4)]
    clients, turns = 16, 10
    counts: dict[str, int] = {}  # user content -> message_count answered for its turn
    conflicts = 0

    async def client(index: int) -> None:
        nonlocal conflicts
        async with httpx.AsyncClient(headers=AUTH, timeout=CLIENT_TIMEOUT) as http:
            for number in range(turns):
                for position, conversation_id in enumerate(conversations):
                    replica = replicas[(index + number * len(conversations) + position) % 3]
                    content = f"client {index} turn {number} in {conversation_id}"
                    for _attempt in range(5):  # a 409 stores nothing: retrying is safe
                        response = await http.post(
                            turn_url(replica, conversation_id), json=turn(content)
                        )
                        if response.status_code != 409:
                            break
                        conflicts += 1
                    assert response.status_code == 200, response.text
                    answer = response.json()
                    assert answer["choices"][0]["message"]["content"] == REPLY_PREFIX + content
                    counts[content] = answer["conversation"]["message_count"]

    async with asyncio.TaskGroup() as group:
        for index in range(clients):
            group.create_task(client(index))

    per_conversation = clients * turns
    stored: dict[str, list[Json]] = {}
    async with httpx.AsyncClient(headers=AUTH, timeout=CLIENT_TIMEOUT) as http:
        for i, conversation_id in enumerate(conversations):
            stored[conversation_id] = await stored_messages(http, replicas[i % 3], conversation_id)
    for conversation_id, messages in stored.items():
        assert len(messages) == 2 * per_conversation
        assert_turns_adjacent(messages)
        users = Counter(m["content"] for m in messages if m["role"] == "user")
        expected = {
            f"client {c} turn {n} in {conversation_id}"
            for c in range(clients)
            for n in range(turns)
        }
        assert set(users) == expected
        assert set(users.values()) == {1}
        for index, message in enumerate(messages[::2]):
            assert counts[message["content"]] == 2 * index + 2

    received = await fresh.received()
    assert len(received) == len(conversations) * per_conversation, f"{conflicts} conflicts"
    assert len({last_content(body) for body in received}) == len(received)  # one call a turn
    for body in received:
        content = last_content(body)
        messages = stored[content.rsplit(" in ", 1)[1]]
        position = next(i for i, m in enumerate(messages) if m["content"] == content)
        assert pairs(body["messages"]) == pairs(messages[: position + 1])


async def test_turns_into_one_conversation_are_serialized_behind_a_slow_gateway(
    replicas: list[Replica], fresh: GatewayControl
) -> None:
    await fresh.configure(delay_seconds=0.3)
    conversation_id = "slow-one"
    started = time.monotonic()
    async with httpx.AsyncClient(headers=AUTH, timeout=CLIENT_TIMEOUT) as http:
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(
                    http.post(turn_url(replicas[i % 3], conversation_id), json=turn(f"turn {i}"))
                )
                for i in range(8)
            ]
        elapsed = time.monotonic() - started
        responses = [task.result() for task in tasks]
        stored = await stored_messages(http, replicas[0], conversation_id)

    assert [r.status_code for r in responses] == [200] * 8, [r.text for r in responses]
    assert sorted(r.json()["conversation"]["message_count"] for r in responses) == list(
        range(2, 17, 2)
    )
    assert elapsed >= 8 * 0.3  # one gateway call at a time
    assert len(stored) == 16
    assert_turns_adjacent(stored)
    received = await fresh.received()
    assert len(received) == 8
    for k, body in enumerate(received):  # the gateway saw the stored order, each on all before
        assert pairs(body["messages"]) == pairs(stored[: 2 * k + 1])


async def test_one_idempotency_key_across_replicas_calls_the_gateway_once(
    replicas: list[Replica], fresh: GatewayControl
) -> None:
    await fresh.configure(delay_seconds=0.3)  # the first is still running when the rest come
    conversation_id = "idem-storm"
    headers = {**AUTH, "Idempotency-Key": "storm-key-1"}
    async with httpx.AsyncClient(headers=headers, timeout=CLIENT_TIMEOUT) as http:
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(
                    http.post(
                        turn_url(replicas[i % 3], conversation_id), json=turn("only once, please")
                    )
                )
                for i in range(50)
            ]
        responses = [task.result() for task in tasks]
        stored = await stored_messages(http, replicas[1], conversation_id)

    assert {r.status_code for r in responses} <= {200, 409}, [r.text for r in responses]
    ok = [r for r in responses if r.status_code == 200]
    assert ok
    originals = [r for r in ok if r.headers.get("Idempotent-Replayed") != "true"]
    assert len(originals) == 1
    assert all(r.headers["Idempotent-Replayed"] == "true" for r in ok if r not in originals)
    first = originals[0].json()
    for response in ok:
        assert response.json()["choices"] == first["choices"]
        assert response.json()["request_id"] == first["request_id"]
    for response in responses:
        if response.status_code == 409:
            assert response.headers["content-type"].startswith("application/problem+json")
            assert "Retry-After" in response.headers
    assert len(await fresh.received()) == 1
    assert pairs(stored) == [
        ("user", "only once, please"),
        ("assistant", REPLY_PREFIX + "only once, please"),
    ]


async def test_a_replica_killed_mid_turn_holds_nothing_past_its_lease(
    replicas: list[Replica],
    fresh: GatewayControl,
    redis: Redis,
    spawn_replica: Callable[..., Replica],
) -> None:
    victim = spawn_replica(LOCK_TTL_SECONDS=str(LONG_LEASE_SECONDS))  # see the summary test
    conversation_id = "crash-mid-turn"
    lock_key = ConversationRef(TENANT, conversation_id).key("lock")
    await fresh.configure(hold=True)
    async with httpx.AsyncClient(headers=AUTH, timeout=CLIENT_TIMEOUT) as http:
        doomed = asyncio.create_task(
            http.post(turn_url(victim, conversation_id), json=turn("the doomed turn"))
        )

        async def arrived() -> bool:
            return any(last_content(b) == "the doomed turn" for b in await fresh.received())

        await eventually(arrived, what="the doomed turn to reach the gateway")
        assert await redis.pttl(lock_key) > 0  # the victim holds the lease

        victim.kill()
        with pytest.raises(httpx.TransportError):
            await doomed
        survivor = asyncio.create_task(
            http.post(turn_url(replicas[1], conversation_id), json=turn("after the crash"))
        )
        await fresh.release()
        # Nobody renews a dead turn's lease: it lapses by itself within a lease, and the
        # survivor's turn waits for that (LOCK_WAIT_SECONDS). The lapse is brought forward.
        assert 0 < await redis.pttl(lock_key) <= LONG_LEASE_SECONDS * 1000
        assert not survivor.done()  # it waits while the dead turn's lease stands
        assert await redis.pexpire(lock_key, 1)
        response = await survivor
        stored = await stored_messages(http, replicas[2], conversation_id)

    assert response.status_code == 200, response.text  # after the lease, within the wait
    assert response.json()["conversation"]["message_count"] == 2
    assert pairs(stored) == [
        ("user", "after the crash"),
        ("assistant", REPLY_PREFIX + "after the crash"),
    ]
    received = await fresh.received()
    assert [pairs(b["messages"]) for b in received] == [
        [("user", "the doomed turn")],
        [("user", "after the crash")],
    ]
    assert await redis.exists(lock_key) == 0


async def test_sigterm_drains_turns_in_flight_then_exits_cleanly(
    fresh: GatewayControl, spawn_replica: Callable[..., Replica], replicas: list[Replica]
) -> None:
    victim = spawn_replica()
    conversations = [f"drain-{i}" for i in range(5)]
    # Held at the gateway, the turns are surely in flight when the signal comes.
    await fresh.configure(hold=True)
    async with httpx.AsyncClient(headers=AUTH, timeout=CLIENT_TIMEOUT) as http:
        tasks = [
            asyncio.create_task(http.post(turn_url(victim, cid), json=turn(f"draining {cid}")))
            for cid in conversations
        ]

        async def all_arrived() -> bool:
            return len(await fresh.received()) == len(conversations)

        await eventually(all_arrived, what="all five turns to reach the gateway")
        victim.terminate()

        async def stopped_listening() -> bool:
            return not await asyncio.to_thread(accepts_connections, victim.port)

        await eventually(stopped_listening, what="the replica to close its listener")
        assert victim.alive()  # draining: the turns are still running
        await fresh.release()
        responses = await asyncio.gather(*tasks)
        stored = {cid: await stored_messages(http, replicas[0], cid) for cid in conversations}

    assert [r.status_code for r in responses] == [200] * 5, [r.text for r in responses]
    for cid, messages in stored.items():
        assert pairs(messages) == [
            ("user", f"draining {cid}"),
            ("assistant", f"{REPLY_PREFIX}draining {cid}"),
        ]
    returncode = await asyncio.to_thread(victim.wait)
    # uvicorn re-raises the stop signal once drained, as process managers expect (143 / -15).
    assert returncode in (0, -signal.SIGTERM), victim.log_tail()


async def test_a_replica_killed_mid_summary_leaves_the_old_one_and_another_carries_on(
    fresh: GatewayControl, redis: Redis, spawn_replica: Callable[..., Replica]
) -> None:
    on = {"SUMMARY": "on", "SUMMARY_RETRY_SECONDS": "0", "TOKEN_BUDGET": "300"}
    # The victim's lease is long: a loaded machine may stall a process for longer than the
    # usual 3 s lease, and a stalled job rightly loses its lease (the test would then kill a
    # replica that no longer held it). Its expiry after the kill is fast-forwarded below.
    victim = spawn_replica(**on, LOCK_TTL_SECONDS=str(LONG_LEASE_SECONDS))
    survivor = spawn_replica(**on)
    conversation_id = "crash-mid-summary"
    ref = ConversationRef(TENANT, conversation_id)
    url = f"{survivor.url}/conversations/{conversation_id}"

    async with httpx.AsyncClient(headers=AUTH, timeout=CLIENT_TIMEOUT) as http:

        async def summary() -> Json:
            body: Json = (await http.get(url)).json()["summary"]
            return body

        async def ask(replica: Replica, i: int) -> Json:
            response = await http.post(
                turn_url(replica, conversation_id), json=turn(f"question number {i}, " * 3)
            )
            assert response.status_code == 200, response.text
            body: Json = response.json()["conversation"]["context"]
            return body

        i = 0
        while (await ask(victim, i))["dropped_messages"] == 0:
            i += 1
        await eventually(
            lambda: _has_version(summary, 1), what="the first summary", timeout=WAIT_SECONDS
        )

        async def idle() -> bool:  # no summary job runs in the victim (none runs elsewhere)
            metrics = (await http.get(f"{victim.url}/metrics")).text
            return "\nconvproxy_summary_jobs_running 0.0\n" in metrics

        await eventually(idle, what="the victim's jobs to finish", timeout=WAIT_SECONDS)
        first = await summary()
        await fresh.configure(summary_hold=True)
        calls = len(await fresh.summary_received())
        while len(await fresh.summary_received()) == calls:  # turns until a job is under way
            i += 1
            await ask(victim, i)
        lease = ref.key("sumlock")
        assert await redis.pttl(lease) > 0  # the victim's job holds its lease
        victim.kill()
        assert await summary() == first  # the old summary is intact
        await fresh.release()
        # Nobody renews a dead job's lease: it lapses by itself within a lease. Time passing is
        # not what this test is about, so the lapse is brought forward.
        assert 0 < await redis.pttl(lease) <= LONG_LEASE_SECONDS * 1000
        assert await redis.pexpire(lease, 1)

        async def lease_gone() -> bool:
            return not await redis.exists(lease)

        await eventually(lease_gone, what="the dead job's lease to lapse", timeout=WAIT_SECONDS)
        i += 1
        context = await ask(survivor, i)  # a later turn, on another replica, starts it again
        assert context["summary"] is not None
        assert context["summary"]["version"] <= first["version"]
        await eventually(
            lambda: _has_version(summary, first["version"] + 1),
            what="the next summary",
            timeout=WAIT_SECONDS,
        )
    received = await fresh.summary_received()
    assert len(received) >= calls + 2  # the killed job's call, then the survivor's
    assert received[calls + 1]["messages"][1]["content"].startswith(
        "Previous summary:\n" + first["text"] + "\n"
    )


async def _has_version(summary: Callable[[], Any], version: int) -> bool:
    current: Json = await summary()
    return bool(current["version"] >= version)
