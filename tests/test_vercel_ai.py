"""The Vercel AI SDK (`ai` with `@ai-sdk/openai-compatible`, run by Node.js) against
`/v1/chat/completions` (issue 12): one streamed conversation of two turns, each call sending
only the new message. `make test` installs tests/js with `npm ci` from its lock file."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import orjson
from redis.asyncio import Redis

from service.config import Settings
from tests.conftest import CLIENT_KEY
from tests.fake_gateway import FakeGateway
from tests.test_streaming import serving

JS = Path(__file__).resolve().parent / "js"


async def run_node(base_url: str, conversation_id: str, mode: str) -> dict[str, Any]:
    """tests/js/two_turns.mjs with the service's /v1 as its base URL; its JSON line."""
    process = await asyncio.create_subprocess_exec(
        "node",
        str(JS / "two_turns.mjs"),
        cwd=JS,
        env={
            **os.environ,
            "BASE_URL": f"{base_url}/v1",
            "API_KEY": CLIENT_KEY,
            "CONVERSATION_ID": conversation_id,
            "MODE": mode,
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode()
    result: dict[str, Any] = orjson.loads(out.splitlines()[-1])
    return result


async def test_a_streamed_two_turn_conversation_from_the_vercel_ai_sdk(
    settings: Settings, gateway: FakeGateway, redis: Redis
) -> None:
    async with serving(settings, gateway) as http:
        result = await run_node(str(http.base_url).rstrip("/"), "vercel-1", "newest")
        stored = (await http.get("/conversations/vercel-1/messages")).json()["messages"]
    first, second = result["turns"]
    assert result["errors"] == []
    assert first["reply"] == "reply to: Hello there"
    assert second["reply"] == "reply to: And a second question"
    assert first["deltas"] > 1  # streamed, chunk by chunk
    assert first["finishReason"] == second["finishReason"] == "stop"
    assert second["usage"]["inputTokens"] > first["usage"]["inputTokens"] > 0
    assert second["usage"]["outputTokens"] > 0
    assert first["headers"]["x-conversation-messages"] == "2"
    assert second["headers"]["x-conversation-messages"] == "4"
    # The second call sent one message; the stand-in received the whole conversation.
    assert [m["content"] for m in gateway.received[1]["messages"]] == [
        "Hello there",
        "reply to: Hello there",
        "And a second question",
    ]
    assert all(r["stream"] is True for r in gateway.received)
    assert [m["content"] for m in stored] == [
        "Hello there",
        "reply to: Hello there",
        "And a second question",
        "reply to: And a second question",
    ]


async def test_the_vercel_ai_sdk_sending_its_whole_history_gets_the_same_conversation(
    settings: Settings, gateway: FakeGateway, redis: Redis
) -> None:
    """As `useChat` does (issue 15.3): every call carries the whole conversation; the service
    appends only what is new, so the log and the forwarded arrays are those of the newest-only
    way."""
    async with serving(settings, gateway) as http:
        base_url = str(http.base_url).rstrip("/")
        newest = await run_node(base_url, "vercel-newest", "newest")
        full = await run_node(base_url, "vercel-full", "full")
        logs = [
            [
                (m["role"], m["content"])
                for m in (await http.get(f"/conversations/{cid}/messages")).json()["messages"]
            ]
            for cid in ("vercel-newest", "vercel-full")
        ]
    assert [t["reply"] for t in full["turns"]] == [t["reply"] for t in newest["turns"]]
    assert logs[0] == logs[1]
    assert len(logs[1]) == 4
    assert gateway.received[3]["messages"] == gateway.received[1]["messages"]
    assert full["turns"][1]["headers"]["x-conversation-messages"] == "4"
