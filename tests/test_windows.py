"""Long conversations (issue 11): cache-stable windows, automatic cache breakpoints, the context
preview, and budgets from the gateway's model catalog."""

from __future__ import annotations

import itertools
from typing import Any

import httpx
import orjson
import pytest
from redis.asyncio import Redis

from service.cache_breakpoints import (
    EPHEMERAL,
    client_marks,
    needs_breakpoints,
    place_breakpoints,
    stored_marks,
)
from service.catalog import ModelLimits, catalog_budget, parse_catalog
from service.models import Message, Role
from service.trim import choose_window, jump_start
from tests.conftest import make_settings, serve
from tests.fake_gateway import FakeGateway
from tests.polling import eventually


def user(text: str, **extra: Any) -> dict[str, Any]:
    return {"message": {"role": "user", "content": text}, **extra}


def words(i: int) -> str:
    return f"turn {i}: " + "lorem ipsum dolor sit amet " * 4


def without_breakpoints(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in m.items() if k != "cache_control"} for m in messages]


# ---- the window start: pure --------------------------------------------------------------------


def msg(seq: int, role: Role, tokens: int = 10) -> Message:
    return Message(tokens=tokens, seq=seq, role=role, content="x", created_at=0.0)


def conversation(turns: int) -> list[Message]:
    return [msg(i + 1, Role.USER if i % 2 == 0 else Role.ASSISTANT) for i in range(2 * turns)]


def test_the_start_holds_while_it_fits_then_jumps_to_the_low_water_mark() -> None:
    history = conversation(8)  # 16 messages of 10
    kept = choose_window(
        history=history[4:],
        stored_count=16,
        system_tokens=0,
        new_tokens=10,
        continues_turn=False,
        budget=160,
        factor=1.0,
        start=5,
        low_water=0.5,
    )
    assert (kept.start, kept.jumped, kept.history[0].seq) == (5, False, 5)
    assert kept.jump_dropped == range(0)
    # Four messages more: 16 from seq 5 plus the new one no longer fit 160.
    grown = [*history, *conversation(10)[16:]]
    jumped = choose_window(
        history=grown[4:],
        stored_count=20,
        system_tokens=0,
        new_tokens=10,
        continues_turn=False,
        budget=160,
        factor=1.0,
        start=5,
        low_water=0.5,
    )
    assert jumped.jumped
    assert jumped.history[0].role is Role.USER  # a turn boundary
    assert 3 + sum(m.tokens for m in jumped.history) <= 80  # the low-water share
    assert jumped.jump_dropped == range(5, jumped.start)
    # The cut was predictable before the jump, from the stored history alone.
    assert jump_start(grown[4:], prefix_tokens=0, budget=160, factor=1.0, low_water=0.5) == (
        jumped.start
    )
    # Low water 1 is the sliding window: the newest turns that fit, moving every turn.
    sliding = choose_window(
        history=grown[4:],
        stored_count=20,
        system_tokens=0,
        new_tokens=10,
        continues_turn=False,
        budget=160,
        factor=1.0,
        start=5,
        low_water=1.0,
    )
    assert 3 + 10 + sum(m.tokens for m in sliding.history) > 160 - 20
    assert sliding.start == 7


def test_a_start_past_the_log_begins_again() -> None:
    window = choose_window(
        history=conversation(2),
        stored_count=4,
        system_tokens=0,
        new_tokens=5,
        continues_turn=False,
        budget=1000,
        factor=1.0,
        start=40,  # the log was cut back since
    )
    assert (window.start, len(window.history)) == (1, 4)


# ---- breakpoints: pure -------------------------------------------------------------------------


def test_breakpoints_close_the_stable_prefix_and_the_system_block() -> None:
    messages = [{"role": "system", "content": "s"}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": str(i)} for i in range(5)
    ]
    sizes = {"pinned": 1, "stable": 5, "pinned_tokens": 600, "stable_tokens": 1400, "marks": 0}
    out, placed = place_breakpoints(messages, min_tokens=1024, **sizes)
    assert placed == [4]  # the system block alone (600) is under the minimum
    assert out[4]["cache_control"] == EPHEMERAL
    assert "cache_control" not in messages[4]  # the caller's copy is untouched
    out, placed = place_breakpoints(messages, min_tokens=500, **sizes)
    assert placed == [0, 4]
    assert [i for i, m in enumerate(out) if "cache_control" in m] == [0, 4]
    # Exactly the minimum closes a prefix; nothing reaching it, no breakpoint at all.
    assert place_breakpoints(messages, min_tokens=1400, **sizes)[1] == [4]
    assert place_breakpoints(messages, min_tokens=1401, **sizes)[1] == []
    assert place_breakpoints(messages, min_tokens=5000, **sizes)[1] == []


def test_client_marks_are_counted_only_where_a_marker_is_a_key_with_an_object() -> None:
    own = {"type": "ephemeral"}
    assert client_marks([{"role": "user", "content": 'say "cache_control": {"type": 1}'}]) == 0
    assert client_marks([{"role": "user", "content": "x", "cache_control": None}]) == 0
    assert client_marks([{"role": "user", "content": "cache_control"}]) == 0  # found, then walked
    parts = [{"type": "text", "text": "a", "cache_control": own}, {"type": "text", "text": "b"}]
    assert client_marks([{"role": "user", "content": parts, "cache_control": own}]) == 2
    # Past what orjson writes (an integer over 64 bits): the walk alone.
    assert client_marks([{"role": "user", "content": "x", "n": 2**70, "cache_control": own}]) == 1
    assert client_marks(None) == 0


def test_stored_marks_are_found_wherever_a_message_can_carry_one() -> None:
    own = {"type": "ephemeral"}

    def stored(**fields: Any) -> Message:
        return Message(tokens=1, seq=1, role=Role.ASSISTANT, created_at=1.0, **fields)

    plain = stored(content='say "cache_control": {"type": 1}')
    assert stored_marks([plain, stored(content="x")]) == 0
    assert stored_marks([plain, stored(content="x", cache_control=own)]) == 1
    parts = [{"type": "text", "text": "a", "cache_control": own}]
    assert stored_marks([stored(content=parts)]) == 1
    calls = [{"id": "c", "type": "function", "function": {"name": "f"}, "cache_control": own}]
    assert stored_marks([stored(tool_calls=calls), stored(content=[{"type": "text"}])]) == 1


def test_never_more_than_four_breakpoints_counting_the_clients_own() -> None:
    own = {"type": "ephemeral"}
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "text", "text": "a", "cache_control": own}]},
        {"role": "assistant", "content": "b", "cache_control": own},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
        {"role": "user", "content": "e"},
    ]
    tools = [{"type": "function", "function": {"name": "f"}, "cache_control": own}]
    sizes = {"pinned": 1, "stable": 5, "pinned_tokens": 2000, "stable_tokens": 10_000}
    theirs = client_marks(messages) + client_marks(tools)
    out, placed = place_breakpoints(messages, min_tokens=1024, marks=theirs, **sizes)
    assert placed == [4]  # three of the client's own leave room for one: the stable prefix's
    total = sum(orjson.dumps(m).count(b"cache_control") for m in out) + 1
    assert total == 4
    again = [*messages[:4], {**messages[4], "cache_control": own}, messages[5]]
    theirs = client_marks(again) + client_marks(tools)
    out, placed = place_breakpoints(again, min_tokens=1024, marks=theirs, **sizes)
    assert placed == []  # four already
    # What is placed follows the count given.
    assert place_breakpoints(messages, min_tokens=1024, marks=3, **sizes)[1] == [4]
    assert place_breakpoints(messages, min_tokens=1024, marks=0, **sizes)[1] == [0, 4]
    assert needs_breakpoints("claude-sonnet-4-6", ("claude-*",))
    assert not needs_breakpoints("gpt-5", ("claude-*",))


# ---- the catalog: pure -------------------------------------------------------------------------


def test_catalog_budgets() -> None:
    limits = parse_catalog(
        {
            "data": [
                {
                    "id": "small",
                    "context_length": 8192,
                    "top_provider": {"max_completion_tokens": 2048},
                },
                {"id": "big", "context_length": 200_000},
                {"id": "broken", "context_length": "lots"},
                "nonsense",
            ]
        }
    )
    assert limits == {"small": ModelLimits(8192, 2048), "big": ModelLimits(200_000, None)}
    assert catalog_budget(16_000, limits["small"], 1000) == (7192, "model_context_length")
    assert catalog_budget(16_000, limits["small"], None) == (6144, "model_context_length")
    assert catalog_budget(16_000, limits["big"], 4096) == (16_000, "token_budget_setting")
    assert catalog_budget(16_000, None, 4096) == (16_000, "token_budget_setting")
    assert parse_catalog([]) == {}


# ---- through the service ------------------------------------------------------------------------


async def test_the_forwarded_prefix_is_byte_stable_until_the_window_jumps(
    client: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    """Between jumps each turn forwards the previous turn's array byte for byte (breakpoints
    aside), with its reply and the new message after it; the start jumps only on overflow, to a
    turn boundary, and never splits a tool call from its result."""
    await client.put("/conversations/w", json={"token_budget": 900, "system": "Be brief."})
    previous: list[dict[str, Any]] = []
    starts = []
    jumps = stable = 0
    for i in range(40):
        if i % 7 == 3:  # now and then a tool call and its result
            gateway.tool_calls = [
                {"id": f"c{i}", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ]
            first = await client.post("/conversations/w/messages", json=user(words(i)))
            assert first.status_code == 200
            gateway.tool_calls = None
            result = {"role": "tool", "tool_call_id": f"c{i}", "content": "ok " * 20}
            answer = await client.post("/conversations/w/messages", json={"message": result})
        else:
            answer = await client.post("/conversations/w/messages", json=user(words(i)))
        assert answer.status_code == 200, answer.text
        context = answer.json()["conversation"]["context"]
        forwarded = without_breakpoints(gateway.received[-1]["messages"])
        history = forwarded[1:]
        assert history[0]["role"] == "user"  # never an orphan, never a split tool pair
        starts.append(context["window_start"])
        if len(starts) > 1 and starts[-1] != starts[-2]:
            jumps += 1
            assert starts[-1] > starts[-2]
            assert context["estimated_tokens"] <= 0.6 * 900 + 200  # back near the low water
        elif previous:
            # The previous request's whole array, byte for byte, begins this one.
            stable += 1
            assert orjson.dumps(forwarded[: len(previous)]) == orjson.dumps(previous), i
        previous = [*forwarded]
        # What follows next turn: this array's last exchanges (a tool round's first call
        # included), so keep only what this request sent.
        previous.append(answer.json()["choices"][0]["message"] | {})
        previous[-1] = {"role": "assistant", "content": previous[-1]["content"]}
    assert jumps >= 2
    assert stable >= 30
    stored_start = int(await redis.hget("conv:{acme:w}:meta", "window_start") or 0)
    assert stored_start == starts[-1]
    # Stored messages never carry the forwarded copy's breakpoints.
    for raw in await redis.lrange("conv:{acme:w}:log", 0, -1):
        assert b"cache_control" not in raw


async def test_a_claude_turn_gets_breakpoints_on_the_forwarded_copy_only(
    client: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    long = "a long standing instruction. " * 200  # well over 1,024 tokens
    await client.put("/conversations/b", json={"system": long})
    for i in range(3):
        assert (
            await client.post("/conversations/b/messages", json=user(words(i)))
        ).status_code == 200
    forwarded = gateway.received[-1]["messages"]
    marked = [i for i, m in enumerate(forwarded) if "cache_control" in m]
    assert marked == [0, len(forwarded) - 2]  # the system block; the end of stored history
    assert all(forwarded[i]["cache_control"] == {"type": "ephemeral"} for i in marked)
    other = await client.post("/conversations/b/messages", json=user("hi", model="gpt-5"))
    assert other.status_code == 200
    assert not any("cache_control" in m for m in gateway.received[-1]["messages"])
    for raw in await redis.lrange("conv:{acme:b}:log", 0, -1):
        assert b"cache_control" not in raw


async def test_the_clients_own_stored_markers_count_towards_the_four(
    client: httpx.AsyncClient, gateway: FakeGateway
) -> None:
    """Markers a client sent in earlier turns are stored and forwarded again: with three of
    them in the history, a turn adds one breakpoint (the stable prefix's), not the system's."""
    own = {"type": "ephemeral", "ttl": "1h"}  # told apart from ours
    await client.put("/conversations/m", json={"system": "a long standing instruction. " * 200})
    parts = [{"type": "text", "text": words(0), "cache_control": own}] * 2
    sent = [
        {"role": "user", "content": parts},
        {"role": "user", "content": words(1), "cache_control": own},
        {"role": "user", "content": words(2)},
    ]
    for message in sent:
        answer = await client.post("/conversations/m/messages", json={"message": message})
        assert answer.status_code == 200, answer.text
    forwarded = gateway.received[-1]["messages"]
    assert orjson.dumps(forwarded).count(b'"cache_control"') == 4
    ours = [i for i, m in enumerate(forwarded) if m.get("cache_control") == EPHEMERAL]
    assert ours == [len(forwarded) - 2]  # the end of stored history; the system block left out
    assert "cache_control" not in forwarded[0]


async def test_the_preview_is_what_the_next_turn_forwards_and_stores_nothing(
    client: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    await client.put("/conversations/p", json={"token_budget": 700, "system": "s " * 500})
    for i in range(12):
        assert (
            await client.post("/conversations/p/messages", json=user(words(i)))
        ).status_code == 200
    keys: list[Any] = sorted(await redis.keys("*"))
    snapshot = {k: await redis.dump(k) for k in keys if not k.endswith(b":calibration")}
    calls = gateway.calls
    body = user("what next?", temperature=0.5)
    preview = await client.post("/conversations/p/context", json=body)
    assert preview.status_code == 200, preview.text
    shown = preview.json()
    assert gateway.calls == calls
    assert {k: await redis.dump(k) for k in snapshot} == snapshot
    assert sorted(await redis.keys("*")) == keys
    assert len(shown["estimated_tokens"]) == len(shown["messages"])
    assert shown["token_budget"] == 700
    assert shown["budget_source"] == "conversation"
    assert shown["dropped_messages"] > 0
    assert shown["window_start"] == shown["dropped_messages"] + 1
    turn = await client.post("/conversations/p/messages", json=body)
    assert turn.status_code == 200
    assert gateway.received[-1] == shown["request"]
    context = turn.json()["conversation"]["context"]
    assert context["window_start"] == shown["window_start"]
    # Bad input is answered as for a turn, and an unknown conversation previews empty.
    bad = await client.post("/conversations/p/context", json={"message": {"role": "system"}})
    assert bad.status_code == 422
    assert bad.headers["content-type"] == "application/problem+json"
    fresh = await client.post("/conversations/new/context", json=user("hello"))
    assert fresh.status_code == 200
    assert [m["role"] for m in fresh.json()["messages"]] == ["user"]
    assert not await redis.exists("conv:{acme:new}:meta")


async def test_a_conversation_may_choose_its_low_water_mark(client: httpx.AsyncClient) -> None:
    assert (await client.put("/conversations/lw", json={"trim_low_water": 1})).status_code == 201
    assert (await client.get("/conversations/lw")).json()["trim_low_water"] == 1
    for value in (0, 1.5, "half"):
        bad = await client.put("/conversations/lw", json={"trim_low_water": value})
        assert bad.status_code == 422
    await client.put("/conversations/lw", json={"token_budget": 400})
    starts = []
    for i in range(12):
        answer = await client.post("/conversations/lw/messages", json=user(words(i)))
        starts.append(answer.json()["conversation"]["context"]["window_start"])
    # Sliding: once full, the start moves every turn, one turn at a time.
    moving = [b - a for a, b in itertools.pairwise(starts) if b != a]
    assert len(moving) >= 4
    assert set(moving[-3:]) == {2}


async def test_budgets_come_from_the_model_catalog(redis_url: str, gateway: FakeGateway) -> None:
    gateway.catalog = [
        {
            "id": "tiny-model",
            "context_length": 1200,
            "top_provider": {"max_completion_tokens": 200},
        },
        {"id": "claude-sonnet-4-6", "context_length": 200_000},
    ]
    async with serve(make_settings(redis_url, token_budget=4000), gateway) as http:

        async def loaded() -> bool:
            return gateway.catalog_reads > 0

        await eventually(loaded, what="the catalog read")

        async def source(body: dict[str, Any]) -> dict[str, Any]:
            shown: dict[str, Any] = (
                await http.post("/conversations/cat/context", json=body)
            ).json()
            return shown

        async def tiny_known() -> bool:
            budget: int = (await source(user("hi", model="tiny-model")))["token_budget"]
            return budget == 1000

        await eventually(tiny_known, what="the catalog to apply")
        shown = await source(user("hi", model="tiny-model", max_tokens=500))
        assert (shown["token_budget"], shown["budget_source"]) == (700, "model_context_length")
        shown = await source(user("hi"))
        assert (shown["token_budget"], shown["budget_source"]) == (4000, "token_budget_setting")
        # A conversation's own budget wins; a turn too long for the small model is refused here.
        too_long = await http.post(
            "/conversations/cat/messages", json=user("x " * 2000, model="tiny-model")
        )
        assert too_long.status_code == 413
        await http.put("/conversations/cat", json={"token_budget": 3000})
        shown = await source(user("hi", model="tiny-model"))
        assert (shown["token_budget"], shown["budget_source"]) == (3000, "conversation")


@pytest.mark.parametrize("catalog", [None, [{"id": "m"}]])
async def test_a_catalog_that_fails_keeps_the_setting(
    redis_url: str, gateway: FakeGateway, catalog: list[dict[str, Any]] | None
) -> None:
    gateway.catalog = catalog
    async with serve(make_settings(redis_url, token_budget=4000), gateway) as http:
        await eventually(lambda: gateway.catalog_reads > 0, what="the catalog read")
        shown = (await http.post("/conversations/f/context", json=user("hi", model="m"))).json()
    assert (shown["token_budget"], shown["budget_source"]) == (4000, "token_budget_setting")
