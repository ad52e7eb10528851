"""Apps that send their whole history (issue 15, part 3): on /v1 with a conversation id, a request
whose messages begin with the stored log appends only what follows; one that contradicts it is
refused (409 history_diverged) and stores nothing. Real SDK, real Redis, the stand-in gateway."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam
from redis.asyncio import Redis

from service.config import Settings
from service.history import HistoryDiverged, message_hash, new_part
from tests.fake_gateway import FakeGateway
from tests.test_openai import Stack, stack_for, stored, user

QUESTIONS = ["Hello", "What is 2+2?", "And 3+3?"]


@pytest.fixture
async def stack(settings: Settings, gateway: FakeGateway) -> AsyncIterator[Stack]:
    async with stack_for(settings, gateway) as built:
        yield built


SYSTEM: ChatCompletionMessageParam = {"role": "system", "content": "Be terse."}


async def three_turns(stack: Stack, conversation_id: str, *, full: bool, **extra: Any) -> None:
    history: list[ChatCompletionMessageParam] = [SYSTEM]
    for question in QUESTIONS:
        history.append(user(question))
        answer = await stack.sdk.chat.completions.create(
            model="m",
            messages=history if full else [SYSTEM, history[-1]],
            extra_headers={"X-Conversation-Id": conversation_id},
            **extra,
        )
        content = answer.choices[0].message.content
        history.append({"role": "assistant", "content": content})


@pytest.mark.parametrize("stream", [False, True])
async def test_full_history_and_newest_only_store_and_forward_the_same(
    stack: Stack, gateway: FakeGateway, redis: Redis, stream: bool
) -> None:
    if stream:
        for conversation_id, whole in (("newest", False), ("full", True)):
            history: list[ChatCompletionMessageParam] = [SYSTEM]
            for question in QUESTIONS:
                history.append(user(question))
                chunks = await stack.sdk.chat.completions.create(
                    model="m",
                    messages=history if whole else [SYSTEM, history[-1]],
                    stream=True,
                    extra_headers={"X-Conversation-Id": conversation_id},
                )
                text = "".join(
                    [c.choices[0].delta.content or "" async for c in chunks if c.choices]
                )
                history.append({"role": "assistant", "content": text})
    else:
        await three_turns(stack, "newest", full=False)
        await three_turns(stack, "full", full=True)
    assert await stored(stack, "full") == await stored(stack, "newest")
    assert len(await stored(stack, "full")) == 6
    newest_only, resent = gateway.received[:3], gateway.received[3:]
    assert [r["messages"] for r in resent] == [r["messages"] for r in newest_only]
    assert resent[-1]["messages"][0] == {"role": "system", "content": "Be terse."}
    assert len(resent[-1]["messages"]) == 6
    # The hash list stays beside the log, one hash per message.
    hashes = await redis.lrange("conv:{acme:full}:hash", 0, -1)
    assert len(hashes) == 6
    assert all(len(h) == 16 for h in hashes)


async def test_a_divergent_history_is_refused_and_stores_nothing(
    stack: Stack, gateway: FakeGateway, redis: Redis
) -> None:
    await three_turns(stack, "d", full=True)
    before = await stored(stack, "d")
    calls = len(gateway.received)
    edited: list[ChatCompletionMessageParam] = [
        user("Hello"),
        {"role": "assistant", "content": "reply to: Hello"},
        user("What is 2+3?"),  # the stored log says 2+2
        {"role": "assistant", "content": "reply to: What is 2+2?"},
        user("And 3+3?"),
        {"role": "assistant", "content": "reply to: And 3+3?"},
        user("next"),
    ]
    with pytest.raises(openai.ConflictError) as caught:
        await stack.sdk.chat.completions.create(
            model="m", messages=edited, extra_headers={"X-Conversation-Id": "d"}
        )
    assert caught.value.code == "history_diverged"
    assert "message 3" in caught.value.message
    shorter: list[ChatCompletionMessageParam] = [
        user("Hello"),
        {"role": "assistant", "content": "reply to: Hello"},
    ]
    with pytest.raises(openai.ConflictError):
        await stack.sdk.chat.completions.create(
            model="m",
            messages=[*shorter, user("What is 2+2?")],  # stops within the stored log
            extra_headers={"X-Conversation-Id": "d"},
        )
    assert await stored(stack, "d") == before
    assert len(gateway.received) == calls
    assert not await redis.exists("conv:{acme:d}:lock")  # the lease was released
    # The conversation goes on: the newest-only way still works.
    await stack.sdk.chat.completions.create(
        model="m", messages=[user("next")], extra_headers={"X-Conversation-Id": "d"}
    )
    assert len(await stored(stack, "d")) == 8


async def test_messages_stored_before_hashes_are_hashed_when_needed(
    stack: Stack, gateway: FakeGateway, redis: Redis
) -> None:
    await three_turns(stack, "old", full=False)
    hashes = await redis.lrange("conv:{acme:old}:hash", 0, -1)
    await redis.delete("conv:{acme:old}:hash")  # as if stored before hashes existed
    history: list[ChatCompletionMessageParam] = []
    for message in await stored(stack, "old"):
        history.append({"role": message["role"], "content": message["content"]})
    await stack.sdk.chat.completions.create(
        model="m",
        messages=[*history, user("4+4?")],
        extra_headers={"X-Conversation-Id": "old"},
    )
    assert len(await stored(stack, "old")) == 8
    assert [m["content"] for m in gateway.received[-1]["messages"]][-2:] == [
        "reply to: And 3+3?",
        "4+4?",
    ]
    rebuilt = await redis.lrange("conv:{acme:old}:hash", 0, -1)
    assert rebuilt[:6] == hashes  # computed from the records, written back by the commit
    assert len(rebuilt) == 8
    assert b"" not in rebuilt


async def test_a_resent_history_replays_with_its_idempotency_key(
    stack: Stack, gateway: FakeGateway
) -> None:
    await three_turns(stack, "i", full=False)
    history: list[ChatCompletionMessageParam] = [
        {"role": m["role"], "content": m["content"]} for m in await stored(stack, "i")
    ]
    headers = {"X-Conversation-Id": "i", "Idempotency-Key": "resend-1"}
    for _ in range(2):
        answer = await stack.sdk.chat.completions.create(
            model="m", messages=[*history, user("once")], extra_headers=headers
        )
        assert answer.choices[0].message.content == "reply to: once"
    assert len(await stored(stack, "i")) == 8
    assert len(gateway.received) == 4


async def test_deleting_a_conversation_deletes_its_hashes(stack: Stack, redis: Redis) -> None:
    await three_turns(stack, "gone", full=True)
    assert await redis.exists("conv:{acme:gone}:hash")
    assert (await stack.http.delete("/conversations/gone")).status_code == 204
    assert await redis.keys("conv:{acme:gone}*") == []


def test_hashes_see_what_a_client_resends() -> None:
    plain = {"role": "assistant", "content": "hi"}
    assert message_hash(plain) == message_hash(
        {"role": "assistant", "content": [{"type": "text", "text": "hi"}]}
    )
    assert message_hash(plain) == message_hash({**plain, "cache_control": {"type": "ephemeral"}})
    assert message_hash({"role": "assistant", "content": None}) == message_hash(
        {"role": "assistant", "content": ""}
    )
    assert message_hash(plain) != message_hash({"role": "user", "content": "hi"})
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    with_call = {"role": "assistant", "content": None, "tool_calls": [call]}
    assert message_hash(with_call) == message_hash(
        {"role": "assistant", "tool_calls": [{**call, "index": 0}]}
    )
    assert message_hash(with_call) != message_hash(
        {"role": "assistant", "tool_calls": [{**call, "id": "d"}]}
    )
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    assert message_hash(image) != message_hash({"role": "user", "content": ""})
    assert len(message_hash({"role": "user", "tool_calls": ["odd"], "content": "x"})) == 16


def test_which_part_is_new() -> None:
    log = ["a", "b", "c", "d"]
    assert new_part(["x"], log).first_new == 0  # one message: the newest-only way
    assert new_part(["a"], log).first_new == 0  # even when it repeats the first
    assert new_part(["x", "y"], log).first_new == 0  # not the log's beginning: all new
    assert new_part(["a", "b"], []).first_new == 0
    assert new_part(["a", "b", "c", "d", "e", "f"], log).first_new == 4
    with pytest.raises(HistoryDiverged, match="message 3"):
        new_part(["a", "b", "x", "d", "e"], log)
    with pytest.raises(HistoryDiverged, match="nothing new"):
        new_part(["a", "b", "c"], log)
    with pytest.raises(HistoryDiverged, match="nothing new"):
        new_part(["a", "b", "c", "d"], log)


async def test_what_is_new_is_held_to_the_turn_limit(stack: Stack, redis: Redis) -> None:
    many: list[ChatCompletionMessageParam] = [user(f"m{i}") for i in range(300)]
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        await stack.sdk.chat.completions.create(
            model="m", messages=many, extra_headers={"X-Conversation-Id": "many"}
        )
    assert "at most 256 new messages" in caught.value.message
    assert await redis.keys("conv:{acme:many}:log") == []


async def test_hashes_written_before_a_rewrite_of_the_log_are_not_trusted(
    stack: Stack, gateway: FakeGateway, redis: Redis
) -> None:
    """A script that rewrites the log in place (an edit) moves meta's `generation` on; one that
    leaves the hash list as it was (same length, stale hashes) must not make a resent history
    look diverged."""
    await three_turns(stack, "edited", full=True)
    log = "conv:{acme:edited}:log"
    raw = await redis.lindex(log, 2)
    assert raw is not None
    record = orjson.loads(raw)
    record["content"] = "What is 2+5?"
    await redis.lset(log, 2, orjson.dumps(record).decode())
    await redis.hincrby("conv:{acme:edited}:meta", "generation", 1)
    history: list[ChatCompletionMessageParam] = [
        {"role": m["role"], "content": m["content"]} for m in await stored(stack, "edited")
    ]
    assert history[2] == user("What is 2+5?")
    await stack.sdk.chat.completions.create(
        model="m", messages=[*history, user("next")], extra_headers={"X-Conversation-Id": "edited"}
    )
    assert len(await stored(stack, "edited")) == 8
    hashes = await redis.lrange("conv:{acme:edited}:hash", 0, -1)
    assert hashes[2] == message_hash({"role": "user", "content": "What is 2+5?"}).encode()
    assert await redis.hget("conv:{acme:edited}:meta", "hash_generation") == b"1"
