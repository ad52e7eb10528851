"""Streamed turns over a real HTTP server (ASGI test transports buffer whole responses)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from redis.asyncio import Redis

from service.app import create_app
from service.config import Settings
from service.errors import GatewayTimeout
from service.relay import PING, paced
from service.sse import EventTooLarge, ServerSentEvent, SSEDecoder
from tests.conftest import CLIENT_KEY, GATEWAY_KEY, free_port, with_gateway
from tests.fake_gateway import Failure, FakeGateway, serve_in_process
from tests.polling import eventually

QUESTION = "Tell me a story about a lighthouse keeper"


def streamed(text: str = QUESTION, **extra: Any) -> dict[str, Any]:
    return {"message": {"role": "user", "content": text}, "stream": True, **extra}


@asynccontextmanager
async def serving(
    settings: Settings, gateway: FakeGateway, **overrides: object
) -> AsyncIterator[httpx.AsyncClient]:
    """The service on a real loopback port with `overrides` to its settings."""
    async with serve_in_process(gateway) as gateway_url:
        changed = Settings.model_validate({**settings.model_dump(), **overrides})
        app = create_app(with_gateway(changed, gateway_url))
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
        task = asyncio.create_task(server.serve())
        await eventually(lambda: server.started, what="the server to start")
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {CLIENT_KEY}"},
            timeout=10,
        ) as http:
            yield http
        server.should_exit = True
        await task


@pytest.fixture
async def live(settings: Settings, gateway: FakeGateway) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(settings, gateway) as http:
        yield http


def events_of(text: str) -> list[tuple[str | None, str]]:
    """(event name, data) of each event; data lines joined as the spec says, comments skipped."""
    out = []
    for block in text.strip().split("\n\n"):
        event = None
        data = []
        for line in block.splitlines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            out.append((event, "\n".join(data)))
    return out


def content_of(events: list[tuple[str | None, str]]) -> str:
    pieces = []
    for event, data in events:
        if event is None and data != "[DONE]":
            for choice in orjson.loads(data)["choices"]:
                pieces.append(choice["delta"].get("content") or "")
    return "".join(pieces)


async def test_chunks_are_relayed_as_they_come_and_the_turn_is_stored(
    live: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    gateway.stream_gate = asyncio.Event()
    async with live.stream("POST", "/conversations/s/messages", json=streamed()) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.aiter_lines()
        first = await anext(lines)
        # The gateway is still holding the rest of its stream: this chunk was not buffered.
        assert not gateway.stream_gate.is_set()
        assert orjson.loads(first[6:])["choices"][0]["delta"]["content"] == "repl"
        gateway.stream_gate.set()
        rest = "\n".join([line async for line in lines])
    events = events_of(first + "\n\n" + rest)
    assert events[-1] == (None, "[DONE]")
    name, data = events[-2]
    assert name == "conversation"
    conversation = orjson.loads(data)["conversation"]
    assert conversation["message_count"] == 2
    assert conversation["context"]["messages"] == 1
    answer = content_of(events)
    assert answer == f"reply to: {QUESTION}"
    stored = (await live.get("/conversations/s/messages")).json()["messages"]
    assert [m["content"] for m in stored] == [QUESTION, answer]
    usage = (await live.get("/conversations/s")).json()["usage"]
    assert usage["input_tokens"] > 0
    assert usage["output_tokens"] > 0
    gateway.stream_gate = None
    follow = await live.post(
        "/conversations/s/messages", json={"message": {"role": "user", "content": "and then?"}}
    )
    assert follow.status_code == 200
    assert gateway.received[-1]["messages"][1] == {"role": "assistant", "content": answer}
    assert gateway.received[0]["stream"] is True


async def test_client_that_leaves_stores_nothing_and_frees_the_conversation(
    live: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    gateway.stream_gate = asyncio.Event()
    async with live.stream("POST", "/conversations/gone/messages", json=streamed()) as response:
        await anext(response.aiter_lines())

    # The client closed its connection mid-stream: the lease goes at once, not after its TTL.
    async def released() -> bool:
        return not await redis.exists("conv:{acme:gone}:lock")

    await eventually(released, what="the lease to be released")
    assert await redis.llen("conv:{acme:gone}:log") == 0
    gateway.stream_gate = None
    again = await live.post(
        "/conversations/gone/messages", json={"message": {"role": "user", "content": "hello?"}}
    )
    assert again.status_code == 200
    assert again.json()["conversation"]["message_count"] == 2


async def test_a_model_that_ignores_stream_still_gets_sse(
    live: httpx.AsyncClient, gateway: FakeGateway
) -> None:
    gateway.ignore_stream = True
    response = await live.post("/conversations/j/messages", json=streamed())
    assert response.headers["content-type"].startswith("text/event-stream")
    events = events_of(response.text)
    assert events[-1] == (None, "[DONE]")
    assert events[-2][0] == "conversation"
    assert content_of(events) == f"reply to: {QUESTION}"
    stored = (await live.get("/conversations/j/messages")).json()["messages"]
    assert len(stored) == 2


async def test_mid_stream_failure_sends_an_error_event_and_stores_nothing(
    live: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    gateway.stream_fail_after_first = True
    response = await live.post("/conversations/broken/messages", json=streamed())
    assert response.status_code == 200
    events = events_of(response.text)
    name, data = events[-1]
    assert name == "error"
    assert orjson.loads(data)["error"]["status"] == 502
    assert all(event != "conversation" for event, _ in events)
    assert await redis.llen("conv:{acme:broken}:log") == 0
    assert not await redis.exists("conv:{acme:broken}:lock")


async def test_errors_before_the_first_byte_keep_their_status(
    live: httpx.AsyncClient, gateway: FakeGateway
) -> None:
    gateway.failures = [
        Failure(
            400, {"error": {"message": "unknown model", "metadata": {"errors": ["model: nope"]}}}
        )
    ]
    response = await live.post("/conversations/e/messages", json=streamed(model="nope"))
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert "model: nope" in response.json()["detail"]


async def test_streamed_tool_calls_are_assembled(
    live: httpx.AsyncClient, gateway: FakeGateway
) -> None:
    calls = [
        {
            "id": "call_a",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
        },
        {
            "id": "call_b",
            "type": "function",
            "function": {"name": "get_time", "arguments": '{"tz": "CET"}'},
        },
    ]
    gateway.tool_calls = calls
    response = await live.post("/conversations/tools/messages", json=streamed("weather?"))
    assert events_of(response.text)[-1] == (None, "[DONE]")
    stored = (await live.get("/conversations/tools/messages")).json()["messages"]
    assert stored[1]["tool_calls"] == calls


async def test_idempotent_retry_of_a_streamed_turn_replays_it(
    live: httpx.AsyncClient, gateway: FakeGateway
) -> None:
    headers = {"Idempotency-Key": "stream-1"}
    first = await live.post("/conversations/r/messages", json=streamed(), headers=headers)
    replay = await live.post("/conversations/r/messages", json=streamed(), headers=headers)
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.headers["content-type"].startswith("text/event-stream")
    assert content_of(events_of(replay.text)) == content_of(events_of(first.text))
    assert events_of(replay.text)[-2][0] == "conversation"
    as_json = await live.post(
        "/conversations/r/messages",
        json={"message": {"role": "user", "content": QUESTION}},
        headers=headers,
    )
    assert as_json.headers["idempotent-replayed"] == "true"
    assert as_json.json()["choices"][0]["message"]["content"] == f"reply to: {QUESTION}"
    assert gateway.calls == 1


async def test_a_stream_that_ends_before_the_answer_stores_nothing(
    live: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    gateway.stream_end_after_first = True  # no finish_reason, no [DONE]: an answer cut short
    response = await live.post("/conversations/cut/messages", json=streamed())
    events = events_of(response.text)
    assert events[-1][0] == "error"
    assert orjson.loads(events[-1][1])["error"]["status"] == 502
    assert await redis.llen("conv:{acme:cut}:log") == 0


@pytest.mark.parametrize("dialect", ["crlf", "cr", "rich"])
async def test_upstream_sse_is_read_to_the_spec(
    live: httpx.AsyncClient, gateway: FakeGateway, dialect: str
) -> None:
    gateway.sse_dialect = dialect
    response = await live.post("/conversations/d/messages", json=streamed())
    events = events_of(response.text)
    assert events[-1] == (None, "[DONE]")
    assert events[-2][0] == "conversation"
    assert content_of(events) == f"reply to: {QUESTION}"
    stored = (await live.get("/conversations/d/messages")).json()["messages"]
    assert stored[1]["content"] == f"reply to: {QUESTION}"
    usage = (await live.get("/conversations/d")).json()["usage"]
    assert usage["input_tokens"] > 0


async def test_a_line_over_the_limit_is_a_clean_error_event(
    live: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    gateway.oversize_line_bytes = 1024 * 1024 + 1
    response = await live.post("/conversations/big/messages", json=streamed())
    name, data = events_of(response.text)[-1]
    assert name == "error"
    error = orjson.loads(data)["error"]
    assert (error["status"], error["type"]) == (502, "/problems/bad-gateway")
    assert "over 1048576 bytes" in error["detail"]
    assert await redis.llen("conv:{acme:big}:log") == 0
    assert not await redis.exists("conv:{acme:big}:lock")


async def test_a_silent_upstream_gets_pings_and_the_turn_still_commits(
    settings: Settings, gateway: FakeGateway
) -> None:
    gateway.stream_gate = asyncio.Event()
    async with (
        serving(settings, gateway, sse_ping_seconds=0.05) as http,
        http.stream("POST", "/conversations/p/messages", json=streamed()) as response,
    ):
        lines = response.aiter_lines()
        seen = [await anext(lines)]
        while seen[-1] != ": ping":  # the upstream holds its stream: only pings can come
            seen.append(await anext(lines))
        gateway.stream_gate.set()
        rest = "\n".join([line async for line in lines])
        events = events_of("\n".join(seen) + "\n" + rest)
        assert events[-2][0] == "conversation"
        assert content_of(events) == f"reply to: {QUESTION}"


async def test_the_turn_has_one_deadline_from_its_start(
    settings: Settings, gateway: FakeGateway, redis: Redis
) -> None:
    """Headers late, then a stream that stalls until after the deadline: the turn ends at
    GATEWAY_TIMEOUT_SECONDS from its start, even though, counted from the headers or from the last
    chunk, the stream would have had time to finish."""
    gateway.hold = asyncio.Event()
    gateway.stream_gate = asyncio.Event()
    async with serving(settings, gateway, gateway_timeout_seconds=2.0) as http:
        request = asyncio.create_task(http.post("/conversations/t/messages", json=streamed()))
        await eventually(lambda: gateway.calls == 1, what="the gateway call")
        called = time.monotonic()  # the turn's deadline started before this: at most +2.0 s
        # Time passing is what this test is about: the gateway answers late in the turn, and the
        # rest of its stream comes after the turn's deadline but long before one counted from
        # the headers (+1.2 +2.0 s).
        await eventually(lambda: time.monotonic() - called > 1.2, what="most of the deadline")
        gateway.hold.set()
        await eventually(lambda: time.monotonic() - called > 2.4, what="the deadline to pass")
        gateway.stream_gate.set()
        response = await request
    name, data = events_of(response.text)[-1]
    assert name == "error"
    error = orjson.loads(data)["error"]
    assert error["status"] == 504
    assert "ran past GATEWAY_TIMEOUT_SECONDS (2 s)" in error["detail"]
    assert await redis.llen("conv:{acme:t}:log") == 0


async def test_a_turn_held_past_its_lease_keeps_it_and_commits(
    settings: Settings, gateway: FakeGateway, redis: Redis
) -> None:
    gateway.stream_gate = asyncio.Event()
    async with (
        serving(settings, gateway, lock_ttl_seconds=1.5) as http,
        http.stream("POST", "/conversations/long/messages", json=streamed()) as response,
    ):
        lines = response.aiter_lines()
        first = await anext(lines)
        held = time.monotonic()

        async def held_past_two_leases() -> bool:
            assert await redis.exists("conv:{acme:long}:lock"), "the lease was lost"
            return time.monotonic() - held > 3.2  # over two leases

        await eventually(held_past_two_leases, what="the turn to outlive its lease")
        gateway.stream_gate.set()
        rest = "\n".join([line async for line in lines])
    events = events_of(first + "\n\n" + rest)
    assert events[-2][0] == "conversation", events[-1]
    assert await redis.llen("conv:{acme:long}:log") == 2


async def test_a_gateway_that_refuses_stream_options_still_streams(
    live: httpx.AsyncClient, gateway: FakeGateway
) -> None:
    gateway.reject_stream_options = True
    for text in ("one", "two"):
        response = await live.post("/conversations/o/messages", json=streamed(text))
        assert events_of(response.text)[-2][0] == "conversation"
    assert ["stream_options" in body for body in gateway.received] == [True, False, False]
    assert gateway.received[0]["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("as_event", [False, True])
async def test_an_error_inside_the_stream_is_passed_on_redacted(
    live: httpx.AsyncClient, gateway: FakeGateway, redis: Redis, as_event: bool
) -> None:
    gateway.stream_error_as_event = as_event
    gateway.stream_error_after_first = {
        "error": {"message": f"provider failed for key {GATEWAY_KEY.upper()}"}
    }
    response = await live.post("/conversations/x/messages", json=streamed())
    name, data = events_of(response.text)[-1]
    assert name == "error"
    detail = orjson.loads(data)["error"]["detail"]
    assert "provider failed for key [redacted]" in detail
    assert "canary" not in response.text.lower()
    assert await redis.llen("conv:{acme:x}:log") == 0


# ---- the SSE decoder and the pacing, without a network ------------------------------------


def decode_in_pieces(raw: bytes, size: int) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    events = []
    for i in range(0, len(raw), size):
        events += decoder.feed(raw[i : i + size])
    return events


@pytest.mark.parametrize("size", [1, 2, 3, 1000])
def test_the_decoder_follows_the_spec_whatever_the_pieces(size: int) -> None:
    raw = (
        b"\xef\xbb\xbf: a comment\r\n"
        b"data: one\r\ndata:two\r\n\r\n"  # CRLF; a value without its optional space
        b"event: update\rid: 9\rdata: three\r\r"  # CR alone
        b"data\n\n"  # a field with no colon: empty data
        b"id: 10\nretry: 5\nfoo: bar\n\n"  # no data: nothing dispatched
        b"data: caf\xc3\xa9\n\n"
        b"data: incomplete"  # never ended: discarded
    )
    assert decode_in_pieces(raw, size) == [
        ServerSentEvent(data="one\ntwo"),
        ServerSentEvent(data="three", event="update", id="9"),
        ServerSentEvent(data="", id="9"),
        ServerSentEvent(data="café", id="10"),
    ]


def test_the_decoder_bounds_lines_and_events() -> None:
    with pytest.raises(EventTooLarge):
        SSEDecoder(max_bytes=10).feed(b"data: " + b"x" * 20)  # a line never ended
    with pytest.raises(EventTooLarge):
        SSEDecoder(max_bytes=10).feed(b"data: " + b"x" * 20 + b"\n")
    decoder = SSEDecoder(max_bytes=12)
    with pytest.raises(EventTooLarge, match="an event"):
        decoder.feed(b"data: 1234\ndata: 1234\ndata: 1234\n")  # lines fit, the event does not


async def test_pacing_pings_a_silent_source_and_ends_it_at_the_deadline() -> None:
    never = asyncio.Event()

    async def silent() -> AsyncIterator[str]:
        yield "first"
        await never.wait()
        yield "never"

    loop = asyncio.get_running_loop()
    items: list[object] = []

    async def collect() -> None:
        deadline = loop.time() + 0.5
        async for item in paced(silent(), deadline=deadline, ping_seconds=0.1, limit_seconds=0.5):
            items.append(item)

    with pytest.raises(GatewayTimeout, match=r"\(0.5 s\)"):
        await collect()
    assert items[0] == "first"
    assert PING in items
    assert "never" not in items


async def test_the_stand_in_is_as_strict_as_real_gateways() -> None:
    """Usage streamed only when asked for; tool definitions counted as input; no key is 401; tool
    results must answer the `tool_calls` right before them, and every call must be answered."""
    fake = FakeGateway()
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    key = {"Authorization": "k"}

    async def streamed_usage(**extra: Any) -> bool:
        _, _, content = await fake.respond(key, {**body, "stream": True, **extra})
        assert not isinstance(content, bytes)
        return any([b'"usage"' in piece async for piece in content])

    assert not await streamed_usage()
    assert await streamed_usage(stream_options={"include_usage": True})
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    plain = fake.completion(body)["usage"]["input_tokens"]
    with_tools = fake.completion({**body, "tools": tools})["usage"]["input_tokens"]
    assert with_tools > plain
    assert (await fake.respond({}, body))[0] == 401

    def call(call_id: str) -> dict[str, Any]:
        function = {"name": "get_weather", "arguments": "{}"}
        return {"id": call_id, "type": "function", "function": function}

    asked = {"role": "assistant", "content": None, "tool_calls": [call("a"), call("b")]}
    question = {"role": "user", "content": "weather?"}
    answers = [{"role": "tool", "tool_call_id": i, "content": "sunny"} for i in ("a", "b")]
    cases: list[tuple[int, list[dict[str, Any]]]] = [
        (200, [question, asked, *answers]),
        (400, [question, answers[0]]),  # a result whose call was trimmed away
        (400, [question, asked, answers[0]]),  # a call left unanswered
        (400, [question, asked, answers[0], question, answers[1]]),
        (400, [question, {"role": "robot", "content": "beep"}]),
    ]
    for status, messages in cases:
        answered, _, content = await fake.respond(key, {"model": "m", "messages": messages})
        assert answered == status, (messages, content)
