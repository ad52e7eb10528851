"""Detached turns (issue 16) on one replica over a real loopback server: disconnect, resume,
cancel, idempotent attach, bounds and expiry. Several replicas: tests/test_e2e_detached.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from redis.asyncio import Redis

from service.config import Settings
from service.embedded_redis import EmbeddedRedis
from service.store import ConversationRef
from service.turn_journal import TurnJournal
from tests.conftest import free_port, make_settings, metric
from tests.fake_gateway import FakeGateway
from tests.polling import eventually
from tests.test_streaming import content_of, events_of, serving

QUESTION = "Tell me a story about a lighthouse keeper"
CONV = "conv:{acme:d}"


def detached(text: str = QUESTION, **extra: Any) -> dict[str, Any]:
    return {"message": {"role": "user", "content": text}, "stream": True, "detach": True, **extra}


@pytest.fixture
async def live(settings: Settings, gateway: FakeGateway) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(settings, gateway) as http:
        yield http


def blocks(raw: bytes) -> list[bytes]:
    """Whole SSE events (each ending in a blank line) without keep-alive comments."""
    return [b + b"\n\n" for b in raw.split(b"\n\n") if b and not b.startswith(b":")]


def event_id(block: bytes) -> str:
    first = block.split(b"\n", 1)[0]
    assert first.startswith(b"id: ")
    return first[4:].decode()


class Reader:
    """A live SSE response read event by event (pings skipped), then to its end."""

    def __init__(self, response: httpx.Response) -> None:
        self._pieces = response.aiter_raw()
        self._buffer = b""

    async def events(self, count: int) -> list[bytes]:
        while self._buffer.count(b"\n\n") < count or len(self._whole()) < count:
            try:
                self._buffer += await anext(self._pieces)
            except StopAsyncIteration:
                raise AssertionError(f"the stream ended early: {self._buffer!r}") from None
        whole = self._whole()[:count]
        consumed = 0
        for _ in range(len(whole)):  # drop what was returned (and pings before it)
            consumed = self._buffer.index(b"\n\n", consumed) + 2
            while self._buffer[consumed:].startswith(b":"):
                consumed = self._buffer.index(b"\n\n", consumed) + 2
        self._buffer = self._buffer[consumed:]
        return whole

    def _whole(self) -> list[bytes]:
        return blocks(self._buffer[: self._buffer.rfind(b"\n\n") + 2])

    async def rest(self) -> bytes:
        rest = self._buffer + b"".join([piece async for piece in self._pieces])
        self._buffer = b""
        return rest


async def read_events(response: httpx.Response, count: int) -> list[bytes]:
    return await Reader(response).events(count)


async def state_of(live: httpx.AsyncClient, conversation: str = "d") -> Any:
    response = await live.get(f"/conversations/{conversation}")
    return response.json()["turn"] if response.status_code == 200 else None


async def test_a_detached_turn_streams_with_ids_and_replays_byte_for_byte(
    live: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    response = await live.post("/conversations/d/messages", json=detached())
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = blocks(response.content)
    ids = [event_id(b) for b in events]
    turn = ids[0].split("-")[0]
    assert ids == [f"{turn}-{n}" for n in range(1, len(events) + 1)]  # no gap, no repeat
    assert events[-1].endswith(b"data: [DONE]\n\n")
    parsed = events_of(b"".join(events).decode())
    assert content_of(parsed) == f"reply to: {QUESTION}"
    assert parsed[-2][0] == "conversation"
    # Replayed from the start, and from any point, by id or by number: the same bytes.
    again = await live.get("/conversations/d/stream")
    assert blocks(again.content) == events
    for cut in (1, 3, len(events) - 1):
        by_id = await live.get("/conversations/d/stream", headers={"Last-Event-ID": ids[cut - 1]})
        assert blocks(by_id.content) == events[cut:]
        by_number = await live.get("/conversations/d/stream", params={"after": str(cut)})
        assert blocks(by_number.content) == events[cut:]
    status = await state_of(live)
    assert status == {"id": turn, "state": "done", "detached": True}
    stored = (await live.get("/conversations/d/messages")).json()["messages"]
    assert [m["content"] for m in stored] == [QUESTION, f"reply to: {QUESTION}"]
    assert len(gateway.received) == 1
    assert "detach" not in gateway.received[0]
    # Every key of the turn expires, within DETACHED_TTL_SECONDS of its end.
    keys = [k async for k in redis.scan_iter(match=f"{CONV}:turn*")]
    assert keys
    for key in keys:
        assert 0 < await redis.ttl(key) <= 3600


async def test_a_client_that_leaves_does_not_stop_the_turn_and_resumes_where_it_left(
    live: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    await live.put("/conversations/d", json={})  # so GET /conversations/d answers mid-turn
    gateway.stream_gate = asyncio.Event()
    async with live.stream("POST", "/conversations/d/messages", json=detached()) as response:
        (first,) = await read_events(response, 1)
    # The client is gone; the turn goes on.
    assert (await state_of(live))["state"] == "running"
    gateway.stream_gate.set()

    async def finished() -> bool:
        return bool((await state_of(live))["state"] == "done")

    await eventually(finished, what="the detached turn to finish")
    stored = (await live.get("/conversations/d/messages")).json()["messages"]
    assert [m["content"] for m in stored] == [QUESTION, f"reply to: {QUESTION}"]
    rest = await live.get("/conversations/d/stream", headers={"Last-Event-ID": event_id(first)})
    whole = (await live.get("/conversations/d/stream")).content
    assert first + b"".join(blocks(rest.content)) == b"".join(blocks(whole))
    assert len(gateway.received) == 1
    assert not await redis.exists(f"{CONV}:lock")


async def test_a_follower_waits_live_for_the_rest(
    live: httpx.AsyncClient, gateway: FakeGateway
) -> None:
    gateway.stream_gate = asyncio.Event()
    async with live.stream("POST", "/conversations/d/messages", json=detached()) as response:
        reader = Reader(response)
        (first,) = await reader.events(1)
        async with live.stream(
            "GET", "/conversations/d/stream", headers={"Last-Event-ID": event_id(first)}
        ) as follower:
            gateway.stream_gate.set()
            rest = await Reader(follower).rest()
        original = await reader.rest()
    assert blocks(rest) == blocks(original)
    assert content_of(events_of((first + rest).decode())) == f"reply to: {QUESTION}"


async def test_cancel_stops_the_turn_and_stores_nothing(
    live: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    gateway.stream_gate = asyncio.Event()
    async with live.stream("POST", "/conversations/d/messages", json=detached()) as response:
        reader = Reader(response)
        (first,) = await reader.events(1)
        cancelled = await live.post("/conversations/d/cancel")
        assert cancelled.status_code == 200
        turn = event_id(first).split("-")[0]
        assert cancelled.json() == {"id": turn, "state": "cancelled", "detached": True}
        rest = blocks(await reader.rest())
    name, data = events_of(rest[-1].decode())[-1]
    assert name == "error"
    problem = orjson.loads(data)["error"]
    assert problem["type"] == "/problems/turn-cancelled"
    assert "nothing was stored" in problem["detail"]
    assert (await live.get("/conversations/d/messages")).status_code == 404
    assert not await redis.exists(f"{CONV}:lock")
    assert (await state_of(live, "d")) is None  # no conversation: nothing was stored
    exposed = (await live.get("/metrics")).text
    assert 'convproxy_detached_turns_total{outcome="cancelled"}' in exposed
    assert "convproxy_detached_readers 0.0" in exposed
    # The conversation is free at once: the next turn needs no wait for a lease to expire.
    gateway.stream_gate = None
    again = await live.post(
        "/conversations/d/messages", json={"message": {"role": "user", "content": "hi"}}
    )
    assert again.json()["conversation"]["message_count"] == 2
    # Nothing is left to cancel now.
    late = await live.post("/conversations/d/cancel")
    assert late.status_code == 409
    assert late.headers["content-type"] == "application/problem+json"


async def test_a_retry_with_the_same_idempotency_key_attaches_to_the_running_turn(
    live: httpx.AsyncClient, gateway: FakeGateway
) -> None:
    gateway.stream_gate = asyncio.Event()
    headers = {"Idempotency-Key": "k-1"}
    async with live.stream(
        "POST", "/conversations/d/messages", json=detached(), headers=headers
    ) as response:
        reader = Reader(response)
        await reader.events(1)
        other = await live.post(
            "/conversations/d/messages", json=detached("something else"), headers=headers
        )
        assert other.status_code == 422
        async with live.stream(
            "POST", "/conversations/d/messages", json=detached(), headers=headers
        ) as retry:
            assert retry.headers["idempotent-replayed"] == "true"
            gateway.stream_gate.set()
            retried = await Reader(retry).rest()
        original = await reader.rest()
    assert content_of(events_of(retried.decode())) == f"reply to: {QUESTION}"
    assert blocks(retried)[1:] == blocks(original)
    assert len(gateway.received) == 1
    # Once it ended, the same key replays it as any idempotent turn, in the form asked for.
    replay = await live.post("/conversations/d/messages", json=detached(), headers=headers)
    assert replay.headers["idempotent-replayed"] == "true"
    assert content_of(events_of(replay.text)) == f"reply to: {QUESTION}"
    plain = await live.post(
        "/conversations/d/messages",
        json={"message": {"role": "user", "content": QUESTION}},
        headers=headers,
    )
    assert plain.headers["idempotent-replayed"] == "true"
    assert plain.json()["choices"][0]["message"]["content"] == f"reply to: {QUESTION}"
    assert len(gateway.received) == 1


async def test_bad_requests_are_refused_and_unknown_turns_are_404(
    live: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    unstreamed = await live.post("/conversations/d/messages", json={**detached(), "stream": False})
    assert unstreamed.status_code == 422
    assert "detach" in unstreamed.json()["detail"]
    assert (await live.get("/conversations/d/stream")).status_code == 404
    assert (await live.post("/conversations/d/cancel")).status_code == 409
    bad = await live.get("/conversations/d/stream", headers={"Last-Event-ID": "nonsense"})
    assert bad.status_code == 422
    unknown = await live.get(
        "/conversations/d/stream", headers={"Last-Event-ID": "0123456789abcdef-3"}
    )
    assert unknown.status_code == 404
    assert unknown.headers["content-type"] == "application/problem+json"
    assert gateway.received == []
    assert [k async for k in redis.scan_iter(match=f"{CONV}:*")] == []


async def test_a_turn_that_is_not_detached_shows_as_running(
    live: httpx.AsyncClient, gateway: FakeGateway
) -> None:
    await live.put("/conversations/d", json={})
    gateway.stream_gate = asyncio.Event()
    async with live.stream(
        "POST",
        "/conversations/d/messages",
        json={"message": {"role": "user", "content": "hi"}, "stream": True},
    ) as response:
        reader = Reader(response)
        await reader.events(1)
        assert await state_of(live) == {"id": None, "state": "running", "detached": False}
        gateway.stream_gate.set()
        assert (await reader.rest()).endswith(b"data: [DONE]\n\n")
    assert await state_of(live) is None


async def test_a_failed_turn_ends_its_stream_with_the_error(
    live: httpx.AsyncClient, gateway: FakeGateway
) -> None:
    gateway.stream_fail_after_first = True
    response = await live.post("/conversations/d/messages", json=detached())
    name, data = events_of(response.text)[-1]
    assert name == "error"
    assert orjson.loads(data)["error"]["status"] == 502
    again = await live.get("/conversations/d/stream")
    assert blocks(again.content) == blocks(response.content)
    assert (await live.get("/conversations/d/messages")).status_code == 404


async def test_events_past_the_bound_are_trimmed_and_a_reader_is_told(
    settings: Settings, gateway: FakeGateway
) -> None:
    gateway.chunk_size = 1
    async with serving(settings, gateway, detached_max_events=100) as live:
        response = await live.post("/conversations/d/messages", json=detached("x" * 150))
        events = blocks(response.content)
        assert len(events) > 150  # the turn's own client got every event, live
        late = await live.get("/conversations/d/stream", params={"after": "1"})
        name, data = events_of(late.text)[-1]
        assert name == "error"
        assert orjson.loads(data)["error"]["status"] == 410
        tail = await live.get(
            "/conversations/d/stream", headers={"Last-Event-ID": event_id(events[-50])}
        )
        assert blocks(tail.content) == events[-49:]
        stored = (await live.get("/conversations/d/messages")).json()["messages"]
        assert stored[-1]["content"] == "reply to: " + "x" * 150


async def test_a_stopping_replica_cancels_what_it_still_runs(
    settings: Settings, gateway: FakeGateway, redis: Redis
) -> None:
    gateway.stream_gate = asyncio.Event()
    async with serving(settings, gateway, shutdown_timeout_seconds=0) as live:
        async with live.stream("POST", "/conversations/d/messages", json=detached()) as response:
            (first,) = await read_events(response, 1)
        turn = event_id(first).split("-")[0]
    # The server stopped with the turn still running: it was cancelled, and stored nothing.
    assert await redis.get(f"{CONV}:turn:{turn}:state") == b"cancelled"
    assert await redis.llen(f"{CONV}:log") == 0
    assert not await redis.exists(f"{CONV}:lock")


async def test_a_turn_whose_replica_went_away_is_told_lost_and_cannot_be_cancelled(
    settings: Settings, gateway: FakeGateway, redis: Redis
) -> None:
    """What a replica that died mid-turn leaves (written here through TurnJournal, on the same
    Redis): the turn is running, one event is out, its `alive` key is expiring."""
    journal = TurnJournal(redis, ttl_seconds=60, max_events=100, turn_seconds=10)
    ref = ConversationRef("acme", "d")
    turn = "00000000000000aa"
    await journal.begin(ref, turn, idem="", fingerprint="", lease_ms=1500)
    await journal.append(ref, turn, 1, b'data: {"choices": []}\n\n')
    async with serving(settings, gateway, lock_wait_seconds=0.05) as live:
        # Nobody runs the turn to see the cancel: after LOCK_WAIT_SECONDS it is still running.
        asked = await live.post("/conversations/d/cancel")
        assert asked.json() == {"id": turn, "state": "running", "detached": True}
        told = await live.get("/conversations/d/stream", params={"after": "1"})
        problem = orjson.loads(events_of(told.text)[-1][1])["error"]
        assert problem["type"] == "/problems/turn-lost"
        assert (await live.post("/conversations/d/cancel")).status_code == 409


def unjournaled() -> float:
    """Detached turns whose events could not be journaled (Redis gone), in this process."""
    return metric("convproxy_detached_turns_total", outcome="unjournaled")


async def test_redis_lost_mid_turn_ends_the_stream_with_503_and_stores_nothing(
    gateway: FakeGateway, tmp_path: Path
) -> None:
    """Redis goes away while a detached turn runs (SIGTERM, its AOF flushed) and comes back."""
    server = EmbeddedRedis(tmp_path, port=free_port())
    url = server.start()
    try:
        gateway.stream_gate = asyncio.Event()
        async with serving(make_settings(url), gateway) as live:
            await live.put("/conversations/d", json={})
            async with live.stream(
                "POST", "/conversations/d/messages", json=detached()
            ) as response:
                reader = Reader(response)
                await reader.events(1)
                before = unjournaled()
                server.stop()
                gateway.stream_gate.set()
                ended = await reader.rest()
            name, data = events_of(ended.decode())[-1]
            assert name == "error"
            assert orjson.loads(data)["error"]["status"] == 503
            # The reader's 503 says nothing of the turn, which runs on: Redis comes back only once
            # the turn has failed to journal (else, on a slow machine, it could finish and store).
            await eventually(lambda: unjournaled() > before, what="the turn to fail")
            server.start()
            # Once the dead turn's lease expired, the conversation is as before the turn.
            client = Redis.from_url(url)
            try:

                async def lease_gone() -> bool:
                    return not await client.exists(f"{CONV}:lock")

                await eventually(lease_gone, what="the lease to expire")
                assert await client.llen(f"{CONV}:log") == 0
            finally:
                await client.aclose()
            status = (await live.get("/conversations/d")).json()
            assert status["message_count"] == 0
    finally:
        server.stop()
