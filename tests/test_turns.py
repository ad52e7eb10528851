"""Turn semantics: serialization, idempotency, fencing, token correction, O(window) reads."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import httpx
import orjson
import pytest
from redis.asyncio import Connection, ConnectionPool, Redis

from service.auth import Caller
from service.chat import ChatService, TurnPolicy
from service.config import Settings
from service.gateway import GatewayClient
from service.schemas import TurnCreate
from service.store import ConversationRef
from service.trim import COLD_FETCH_FACTOR, FETCH_MARGIN
from tests.conftest import OpenStore, make_settings, metric, serve
from tests.fake_gateway import FakeGateway, gateway_tokens, serve_in_process
from tests.polling import eventually


def user(text: str, **extra: Any) -> dict[str, Any]:
    return {"message": {"role": "user", "content": text}, **extra}


async def test_concurrent_turns_are_serialized(
    client: httpx.AsyncClient, gateway: FakeGateway
) -> None:
    texts = [f"q{i}" for i in range(8)]
    responses = await asyncio.gather(
        *(client.post("/conversations/busy/messages", json=user(t)) for t in texts)
    )
    assert all(r.status_code == 200 for r in responses)
    log = (await client.get("/conversations/busy/messages")).json()["messages"]
    assert len(log) == 16
    for user_msg, reply in zip(log[::2], log[1::2], strict=True):
        assert reply["content"] == f"reply to: {user_msg['content']}"
    assert sorted(m["content"] for m in log[::2]) == texts
    # Each call saw exactly the log before its own message.
    for sent in gateway.received:
        position = next(
            i for i, m in enumerate(log) if m["content"] == sent["messages"][-1]["content"]
        )
        assert [m["content"] for m in sent["messages"][:-1]] == [
            m["content"] for m in log[:position]
        ]


async def test_waiting_turn_times_out_with_409(
    redis_url: str, redis: Redis, gateway: FakeGateway
) -> None:
    gateway.hold = asyncio.Event()
    async with serve(make_settings(redis_url, lock_wait_seconds=0.2), gateway) as http:
        first = asyncio.create_task(http.post("/conversations/l/messages", json=user("first")))
        await eventually(lambda: gateway.calls == 1, what="the call to reach the gateway")
        second = await http.post("/conversations/l/messages", json=user("second"))
        assert second.status_code == 409
        assert second.headers["retry-after"] == "1"
        assert second.headers["content-type"] == "application/problem+json"
        gateway.hold.set()
        assert (await first).status_code == 200
    assert await redis.llen("conv:{acme:l}:log") == 2


async def test_idempotent_retry_replays_and_stores_nothing_more(
    client: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    headers = {"Idempotency-Key": "k-1"}
    first = await client.post("/conversations/i/messages", json=user("once"), headers=headers)
    again = await client.post("/conversations/i/messages", json=user("once"), headers=headers)
    assert first.status_code == again.status_code == 200
    assert "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert gateway.calls == 1
    assert await redis.llen("conv:{acme:i}:log") == 2
    other = await client.post("/conversations/i/messages", json=user("different"), headers=headers)
    assert other.status_code == 422
    assert other.headers["content-type"] == "application/problem+json"
    assert await redis.llen("conv:{acme:i}:log") == 2
    # Scoped by tenant: the same key from another tenant is another request.
    beta = await client.post(
        "/conversations/i/messages",
        json=user("once"),
        headers={**headers, "Authorization": "client-key-beta"},
    )
    assert beta.status_code == 200
    assert "idempotent-replayed" not in beta.headers


async def test_concurrent_duplicates_make_one_call(
    client: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    gateway.hold = asyncio.Event()
    headers = {"Idempotency-Key": "dup"}
    tasks = [
        asyncio.create_task(
            client.post("/conversations/d/messages", json=user("x"), headers=headers)
        )
        for _ in range(10)
    ]
    await eventually(lambda: gateway.calls == 1, what="the call to reach the gateway")
    gateway.hold.set()
    responses = await asyncio.gather(*tasks)
    assert gateway.calls == 1
    assert sorted(r.status_code for r in responses) == [200] * 10
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == 9
    assert await redis.llen("conv:{acme:d}:log") == 2


def turns_by(outcome: str) -> float:
    return metric("convproxy_turns_total", outcome=outcome)


async def test_while_a_keyed_turn_runs_its_duplicates_are_told_apart(
    redis_url: str, redis: Redis, gateway: FakeGateway
) -> None:
    """While the first request with a key runs (its lease carries the key and body): the same
    key with another body is 422 at once; the same request waits for it and, past
    LOCK_WAIT_SECONDS, is 409 "still running"; an unkeyed turn is 409 "busy"."""
    gateway.hold = asyncio.Event()
    busy, in_flight = turns_by("busy"), turns_by("idempotent_in_flight")
    async with serve(make_settings(redis_url, lock_wait_seconds=0.3), gateway) as http:
        url, key = "/conversations/dup/messages", {"Idempotency-Key": "k-1"}
        first = asyncio.create_task(http.post(url, json=user("one"), headers=key))
        await eventually(lambda: gateway.calls == 1, what="the first call")
        other_body = await http.post(url, json=user("two"), headers=key)
        same = await http.post(url, json=user("one"), headers=key)
        unkeyed = await http.post(url, json=user("three"))
        gateway.hold.set()
        assert (await first).status_code == 200
    assert other_body.status_code == 422
    assert other_body.json()["detail"] == "this Idempotency-Key was used with another request body"
    assert same.status_code == 409
    assert same.json()["type"] == "/problems/idempotency-in-flight"
    assert same.json()["detail"] == "the first request with this Idempotency-Key is still running"
    assert unkeyed.status_code == 409
    assert unkeyed.json()["type"] == "/problems/conversation-busy"
    assert unkeyed.json()["detail"] == "another turn of this conversation ran past 0.3 s"
    assert same.headers["retry-after"] == unkeyed.headers["retry-after"] == "1"
    assert (turns_by("busy"), turns_by("idempotent_in_flight")) == (busy + 1, in_flight + 1)
    assert gateway.calls == 1
    assert await redis.llen("conv:{acme:dup}:log") == 2


async def test_a_key_is_its_own_and_the_body_is_compared_as_sent(
    client: httpx.AsyncClient, gateway: FakeGateway
) -> None:
    """Two keys in one conversation keep two answers; a retry whose JSON objects list their
    keys in another order is the same body (replayed); one that adds a field, even a null one,
    is another (422)."""
    url = "/conversations/keys/messages"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    reordered = [{"function": {"parameters": {"type": "object"}, "name": "f"}, "type": "function"}]
    first = await client.post(url, json=user("one", tools=tools), headers={"Idempotency-Key": "a"})
    second = await client.post(url, json=user("two"), headers={"Idempotency-Key": "b"})
    assert first.status_code == second.status_code == 200
    again = await client.post(
        url, json=user("one", tools=reordered), headers={"Idempotency-Key": "a"}
    )
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    replay = await client.post(url, json=user("two"), headers={"Idempotency-Key": "b"})
    assert replay.json() == second.json()
    with_null = await client.post(
        url, json={**user("two"), "model": None}, headers={"Idempotency-Key": "b"}
    )
    assert with_null.status_code == 422
    assert with_null.json()["type"] == "/problems/idempotency-key-reused"
    assert gateway.calls == 2


async def test_failed_idempotent_turn_releases_the_key(
    client: httpx.AsyncClient, gateway: FakeGateway
) -> None:
    from tests.fake_gateway import Failure

    gateway.failures = [Failure(400, {"error": {"message": "nope"}})]
    headers = {"Idempotency-Key": "retry-me"}
    assert (
        await client.post("/conversations/f/messages", json=user("a"), headers=headers)
    ).status_code == 400
    retried = await client.post("/conversations/f/messages", json=user("a"), headers=headers)
    assert retried.status_code == 200
    assert "idempotent-replayed" not in retried.headers


async def test_delete_removes_idempotency_records(client: httpx.AsyncClient, redis: Redis) -> None:
    headers = {"Idempotency-Key": "gone"}
    await client.post("/conversations/del/messages", json=user("a"), headers=headers)
    assert (await client.delete("/conversations/del")).status_code == 204
    assert list(await redis.keys("conv:{acme:del}*")) == []
    fresh = await client.post("/conversations/del/messages", json=user("a"), headers=headers)
    assert "idempotent-replayed" not in fresh.headers


async def test_a_turn_whose_lease_expired_cannot_write(
    redis_url: str, redis: Redis, gateway: FakeGateway
) -> None:
    """Fencing: once the lease is gone (a stalled replica), the commit is refused."""
    gateway.hold = asyncio.Event()
    async with serve(make_settings(redis_url), gateway) as http:
        turn = asyncio.create_task(http.post("/conversations/fence/messages", json=user("late")))
        await eventually(lambda: gateway.calls == 1, what="the call to reach the gateway")
        await redis.delete("conv:{acme:fence}:lock")  # the lease ran out; another turn may take it
        gateway.hold.set()
        response = await turn
        assert response.status_code == 409
    assert await redis.llen("conv:{acme:fence}:log") == 0


async def test_gateway_timeout_is_504_and_frees_the_conversation(
    redis_url: str, redis: Redis, gateway: FakeGateway
) -> None:
    gateway.hold = asyncio.Event()
    async with serve(make_settings(redis_url, gateway_timeout_seconds=0.2), gateway) as http:
        response = await http.post("/conversations/slow/messages", json=user("a"))
        assert response.status_code == 504
        assert response.headers["content-type"] == "application/problem+json"
        assert not await redis.exists("conv:{acme:slow}:lock")
        gateway.hold.set()
    assert await redis.llen("conv:{acme:slow}:log") == 0


@pytest.mark.parametrize("low_water", [0.6, 1.0])
async def test_the_budget_is_a_cap_as_the_gateway_counts_from_the_first_turn(
    redis_url: str, redis: Redis, gateway: FakeGateway, low_water: float
) -> None:
    """The README calls the budget a cap: every forwarded array, the first turn's included, is
    within it as the stand-in counts (~1 token per 3 characters, +7 per message, where the
    service estimates ~1 per 4, +4), tool definitions included, plain and streamed turns alike,
    and the budget is still used, not wasted."""
    budget = 600
    settings = make_settings(redis_url, token_budget=budget, trim_low_water=low_water)
    tools = [{"type": "function", "function": {"name": "lookup", "description": "find " * 20}}]
    async with serve(settings, gateway) as http:
        for i in range(30):
            body = user(f"turn {i}: " + "lorem ipsum dolor " * 8)
            if i % 3 == 1:
                body["tools"] = tools
            if i % 3 == 2:
                body["stream"] = True
            response = await http.post("/conversations/cal/messages", json=body)
            assert response.status_code == 200
        counts = [gateway_tokens(b["messages"], b.get("tools")) for b in gateway.received]
        assert len(counts) == 30
        assert max(counts) <= budget, counts
        assert max(counts) > budget * 0.85, counts
        if low_water == 1.0:  # sliding: every full window is within a turn of the budget
            turn = gateway_tokens(gateway.received[-1]["messages"][-1:]) * 2
            assert min(counts[10:]) > budget - turn - gateway_tokens([], tools), counts
    factor = float(await redis.hget("conv:{acme}:calibration", "claude-sonnet-4-6") or 0)
    assert factor > 1.0  # shared through Redis for every replica


async def test_a_long_history_is_read_only_as_far_as_the_window(
    client: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    ref = ConversationRef("acme", "long")
    content = "history message " * 12
    records = [
        orjson.dumps(
            {
                "tokens": 52,
                "seq": i + 1,
                "role": "user" if i % 2 == 0 else "assistant",
                "content": f"{i} {content}",
                "created_at": 1.0,
            }
        )
        for i in range(10_000)
    ]
    await redis.rpush(ref.key("log"), *records)
    await redis.hset(ref.key("meta"), mapping={"created_at": "1", "updated_at": "1"})
    stored_bytes = sum(len(r) for r in records)
    before = int((await redis.info("stats"))["total_net_output_bytes"])
    response = await client.post("/conversations/long/messages", json=user("and now?"))
    after = int((await redis.info("stats"))["total_net_output_bytes"])
    assert response.status_code == 200
    forwarded = len(gateway.received[0]["messages"])
    assert 10 < forwarded < 200
    assert response.json()["conversation"]["context"]["dropped_messages"] == 10_000 - forwarded + 1
    # Redis sent one fetch of the window (a replica's first turn reads budget / (FETCH_MARGIN x
    # COLD_FETCH_FACTOR) estimated tokens of messages) and this test's INFO: not the 2 MB history.
    fetched = 4000 / (FETCH_MARGIN * COLD_FETCH_FACTOR) / 52  # messages of 52 estimated tokens
    assert after - before < fetched * (len(records[0]) + 30) + 20_000 < stored_bytes / 10


class CountingConnection(Connection):
    """Counts writes to Redis: one per round trip (a pipeline is one write)."""

    writes = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.writes += 1
        await super().send_packed_command(command, check_health)


async def test_an_uncontended_turn_costs_two_round_trips(
    redis_url: str, redis: Redis, gateway: FakeGateway, settings: Settings, open_store: OpenStore
) -> None:
    pool = ConnectionPool.from_url(redis_url, connection_class=CountingConnection)
    counted = Redis.from_pool(pool)
    store = open_store(counted)
    await store.load_scripts()
    # The store keeps one connection for its scripts: the pool's next one is opened (a handshake
    # of four commands) before counting, as any replica's is after its first requests.
    await counted.ping()
    async with serve_in_process(gateway) as gateway_url, aiohttp.ClientSession() as session:
        chat = ChatService(
            store,
            GatewayClient(
                session,
                base_url=gateway_url,
                api_key=settings.gateway_api_key,
                timeout_seconds=5,
                max_retries=0,
                retry_after_cap_seconds=1,
            ),
            TurnPolicy(default_model="m", token_budget=4000, lock_wait_seconds=1, lease_seconds=10),
        )
        caller = Caller(tenant="acme", upstream_key=None)
        ref = ConversationRef("acme", "rt")
        for i, key in enumerate((None, "idem-1")):
            CountingConnection.writes = 0
            result = await chat.turn(
                ref,
                TurnCreate.model_validate(user(f"q{i}")),
                caller=caller,
                request_id="r",
                idempotency_key=key,
            )
            assert not result.replayed
            assert CountingConnection.writes == 2
    await counted.aclose()
    assert await redis.llen(ref.key("log")) == 4


@pytest.mark.parametrize("stored_roles", [["user", "assistant"], []])
async def test_tool_results_continue_the_open_turn(
    client: httpx.AsyncClient, gateway: FakeGateway, stored_roles: list[str]
) -> None:
    for role in stored_roles:
        assert role in ("user", "assistant")
    if stored_roles:
        await client.post("/conversations/tc/messages", json=user("earlier"))
    gateway.tool_calls = [
        {"id": "c9", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
    ]
    await client.post("/conversations/tc/messages", json=user("look it up"))
    gateway.tool_calls = None
    response = await client.post(
        "/conversations/tc/messages",
        json={"message": {"role": "tool", "tool_call_id": "c9", "content": "found"}},
    )
    assert response.status_code == 200
    roles = [m["role"] for m in gateway.received[-1]["messages"]]
    assert roles[-3:] == ["user", "assistant", "tool"]


async def test_tool_results_pin_their_open_turn_under_a_tight_budget(
    redis_url: str, redis: Redis, gateway: FakeGateway
) -> None:
    """The tool result overflows the window, so its start jumps; the open turn (a long question
    and the assistant's tool call) is over the low-water share on its own, so a jump that did
    not pin it to its results would leave them orphaned at the front (the gateway refuses that
    with 400): it is forwarded whole, with them, within the budget, and the older turns left."""
    budget = 1000
    settings = make_settings(redis_url, token_budget=budget, trim_low_water=0.3)
    question = "where is it? " + "context of the question " * 55  # ~450 tokens as counted
    async with serve(settings, gateway) as http:
        for i in range(3):
            response = await http.post("/conversations/pin/messages", json=user(f"{i} " * 75))
            assert response.status_code == 200
        gateway.tool_calls = [
            {"id": "c1", "type": "function", "function": {"name": "find", "arguments": "{}"}}
        ]
        response = await http.post("/conversations/pin/messages", json=user(question))
        assert response.status_code == 200
        gateway.tool_calls = None
        assert response.json()["conversation"]["context"]["dropped_messages"] == 0
        result = {"role": "tool", "tool_call_id": "c1", "content": "found it: " + "x " * 370}
        response = await http.post("/conversations/pin/messages", json={"message": result})
        assert response.status_code == 200, response.text
    forwarded = gateway.received[-1]["messages"]
    assert [m["role"] for m in forwarded] == ["user", "assistant", "tool"]
    assert forwarded[0]["content"] == question
    assert forwarded[1]["tool_calls"][0]["id"] == "c1"
    assert gateway_tokens(forwarded) <= budget
    assert response.json()["conversation"]["context"]["dropped_messages"] == 6
    assert await redis.llen("conv:{acme:pin}:log") == 10
