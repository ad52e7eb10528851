"""Apps that send their whole history (issue 15, part 3): on /v1 with a conversation id, a request
whose messages begin with the stored log appends only what follows; one that contradicts it is
refused (409 history_diverged) and stores nothing. Real SDK, real Redis, the stand-in gateway."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam
from redis.asyncio import Redis

from service.config import Settings
from service.history import HistoryDiverged, fork_id, fork_point, message_hash, new_part
from service.schemas import CONVERSATION_ID
from tests.fake_gateway import Failure, FakeGateway
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


# ---- X-Conversation-Divergence: fork ----------------------------------------------------------

FORK = {"X-Conversation-Divergence": "fork"}
# The three turns' log as a client keeps it, with its second question edited (the log says 2+2).
EDITED: list[ChatCompletionMessageParam] = [
    SYSTEM,
    user("Hello"),
    {"role": "assistant", "content": "reply to: Hello"},
    user("What is 2+3?"),
]
PREFIX = [user("Hello"), {"role": "assistant", "content": "reply to: Hello"}]


async def forks(redis: Redis, conversation_id: str) -> list[Any]:
    return sorted(await redis.keys(f"conv:{{acme:{conversation_id}.fork-*}}:meta"))


@pytest.mark.parametrize("stream", [False, True])
async def test_a_diverged_history_forks_with_the_header(
    stack: Stack, gateway: FakeGateway, redis: Redis, stream: bool
) -> None:
    await three_turns(stack, "d", full=True)
    before = await stored(stack, "d")
    with pytest.raises(openai.ConflictError):  # without the header: refused, nothing forked
        await stack.sdk.chat.completions.create(
            model="m", messages=EDITED, extra_headers={"X-Conversation-Id": "d"}
        )
    assert await forks(redis, "d") == []
    calls = len(gateway.received)
    async with stack.sdk.chat.completions.with_streaming_response.create(
        model="m", messages=EDITED, stream=stream, extra_headers={"X-Conversation-Id": "d", **FORK}
    ) as raw:
        assert raw.status_code == 200
        new_id = raw.headers["X-Conversation-Id"]
        parsed = await raw.parse()
        if isinstance(parsed, openai.AsyncStream):
            text = "".join([c.choices[0].delta.content or "" async for c in parsed if c.choices])
        else:
            text = str(parsed.choices[0].message.content)
    assert text == "reply to: What is 2+3?"
    assert new_id.startswith("d.fork-")
    assert raw.headers["X-Conversation-Messages"] == "4"
    # The fork: the log's first whole turn, the request's new question, the reply.
    assert await stored(stack, new_id) == [
        *PREFIX,
        user("What is 2+3?"),
        {"role": "assistant", "content": "reply to: What is 2+3?"},
    ]
    assert await stored(stack, "d") == before  # the old conversation as it was
    assert len(gateway.received) == calls + 1
    assert gateway.received[-1]["messages"] == [SYSTEM, *PREFIX, user("What is 2+3?")]
    assert await forks(redis, "d") == [f"conv:{{acme:{new_id}}}:meta".encode()]
    # The fork is a conversation like any other: it goes on, and keeps the settings.
    meta = (await stack.http.get(f"/conversations/{new_id}")).json()
    assert meta["system"] == "Be terse."
    await stack.sdk.chat.completions.create(
        model="m", messages=[user("more")], extra_headers={"X-Conversation-Id": new_id}
    )
    assert len(await stored(stack, new_id)) == 6


async def test_a_retried_fork_with_its_idempotency_key_forks_once(
    stack: Stack, gateway: FakeGateway, redis: Redis
) -> None:
    await three_turns(stack, "r", full=True)
    calls = len(gateway.received)
    headers = {"X-Conversation-Id": "r", "Idempotency-Key": "edit-1", **FORK}
    answers = [
        await stack.sdk.chat.completions.with_raw_response.create(
            model="m", messages=EDITED, extra_headers=headers
        )
        for _ in range(2)
    ]
    new_id = fork_id("r", "edit-1")
    assert [a.headers["X-Conversation-Id"] for a in answers] == [new_id, new_id]
    assert "Idempotent-Replayed" not in answers[0].headers
    assert answers[1].headers["Idempotent-Replayed"] == "true"
    assert answers[1].parse().choices[0].message.content == "reply to: What is 2+3?"
    assert len(gateway.received) == calls + 1
    assert await forks(redis, "r") == [f"conv:{{acme:{new_id}}}:meta".encode()]
    assert len(await stored(stack, new_id)) == 4
    # The same key with another request is refused, as for any turn.
    with pytest.raises(openai.UnprocessableEntityError):
        await stack.sdk.chat.completions.create(
            model="m", messages=[*EDITED[:-1], user("What is 2+4?")], extra_headers=headers
        )
    assert len(await stored(stack, new_id)) == 4


async def test_a_fork_whose_turn_fails_is_not_kept(
    stack: Stack, gateway: FakeGateway, redis: Redis
) -> None:
    await three_turns(stack, "f", full=True)
    before = await stored(stack, "f")
    gateway.failures = [Failure(400, {"error": {"message": "unknown model"}})]
    headers = {"X-Conversation-Id": "f", "Idempotency-Key": "edit-2", **FORK}
    with pytest.raises(openai.BadRequestError):
        await stack.sdk.chat.completions.create(model="m", messages=EDITED, extra_headers=headers)
    assert await forks(redis, "f") == []
    assert await redis.keys(f"conv:{{acme:{fork_id('f', 'edit-2')}}}*") == []
    assert await stored(stack, "f") == before
    # Its retry forks afresh.
    answer = await stack.sdk.chat.completions.create(
        model="m", messages=EDITED, extra_headers=headers
    )
    assert answer.choices[0].message.content == "reply to: What is 2+3?"
    assert len(await stored(stack, fork_id("f", "edit-2"))) == 4


async def test_the_divergence_header_is_checked(stack: Stack, redis: Redis) -> None:
    await three_turns(stack, "h", full=False)
    keys = sorted(await redis.keys("*"))
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        await stack.sdk.chat.completions.create(
            model="m",
            messages=EDITED,
            extra_headers={"X-Conversation-Id": "h", "X-Conversation-Divergence": "merge"},
        )
    assert "X-Conversation-Divergence" in caught.value.message
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["type"] == "invalid_request_error"
    # `reject` says the default out loud; a fork whose new part is too long is refused first.
    with pytest.raises(openai.ConflictError):
        await stack.sdk.chat.completions.create(
            model="m",
            messages=EDITED,
            extra_headers={"X-Conversation-Id": "h", "X-Conversation-Divergence": "reject"},
        )
    many: list[ChatCompletionMessageParam] = [user("Hello"), *(user(f"m{i}") for i in range(300))]
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        await stack.sdk.chat.completions.create(
            model="m", messages=many, extra_headers={"X-Conversation-Id": "h", **FORK}
        )
    assert "at most 256 new messages" in caught.value.message
    assert sorted(await redis.keys("*")) == keys


def test_where_a_diverged_history_forks() -> None:
    u, a = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
    calls = {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f"}}]}
    result = {"role": "tool", "tool_call_id": "c", "content": "r"}
    assert fork_point([u, a, u, a, u], 3) == 2  # after the last whole turn shared
    assert fork_point([u, a, u, a, u], 4) == 4
    assert fork_point([u, a, u], 3) == 2  # stops within the log: the last message is new
    assert fork_point([u, a], 2) == 0  # never an empty turn
    assert fork_point([u, calls, result, a, u], 2) == 0  # a tool call keeps its results
    assert fork_point([u, calls, result, a, u, a, u], 3) == 0
    assert fork_point([u, calls, result, a, u, a, u], 5) == 4
    assert fork_point([u, u, u], 2) == 0


def test_fork_ids() -> None:
    assert fork_id("c", "k") == fork_id("c", "k")  # a retry forks onto the same id
    assert fork_id("c", "k") != fork_id("c", "k2") != fork_id("d", "k")
    assert fork_id("c", None) != fork_id("c", None)
    assert re.fullmatch(r"c\.fork-[0-9a-f]{16}", fork_id("c", None))
    assert fork_id(fork_id("c", "k"), "k2").count(".fork-") == 1  # a fork of a fork
    long = "x" * 128
    for made in (fork_id(long, "k"), fork_id(long, None), fork_id("c", "k")):
        assert len(made) <= 128
        assert CONVERSATION_ID.fullmatch(made)
