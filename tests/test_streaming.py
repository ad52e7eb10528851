"""Streamed turns over a real HTTP server (ASGI test transports buffer whole responses)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from redis.asyncio import Redis

from service.app import create_app
from service.config import Settings
from tests.conftest import CLIENT_KEY, free_port, with_gateway
from tests.fake_gateway import Failure, FakeGateway, serve_in_process
from tests.polling import eventually

QUESTION = "Tell me a story about a lighthouse keeper"


def streamed(text: str = QUESTION, **extra: Any) -> dict[str, Any]:
    return {"message": {"role": "user", "content": text}, "stream": True, **extra}


@pytest.fixture
async def live(settings: Settings, gateway: FakeGateway) -> AsyncIterator[httpx.AsyncClient]:
    async with serve_in_process(gateway) as gateway_url:
        app = create_app(with_gateway(settings, gateway_url))
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


def events_of(text: str) -> list[tuple[str | None, str]]:
    out = []
    for block in text.strip().split("\n\n"):
        event = None
        data = ""
        for line in block.splitlines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data = line[5:].strip()
        out.append((event, data))
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
