"""Rolling summaries: the pure plan, the job against real Redis and the stand-in gateway, and the
turn flow through the API (issue 11 section 3, issue 15 section 2)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import httpx
import orjson
import pytest
from prometheus_client import REGISTRY
from pydantic import SecretStr, ValidationError
from redis.asyncio import Redis

from service.config import Settings
from service.gateway import GatewayClient
from service.models import ConversationMeta, Message, Role
from service.schemas import ConversationUpdate, SummarySettings
from service.store import ConversationRef
from service.summaries import SummaryPolicy, SummaryService
from service.summary_plan import (
    NO_PREVIOUS,
    SUMMARY_INSTRUCTIONS,
    SummaryRecord,
    SummaryState,
    SummaryUse,
    ahead_cut,
    fields_to_forget,
    next_cut,
    prefetch_through,
    promotion,
    summaries_enabled,
    summary_message,
    summary_model,
    summary_request,
    summary_state,
    summary_text,
    turn_context,
    uncovered,
)
from service.summary_store import SummaryStore
from tests.conftest import GATEWAY_KEY, OpenStore, make_settings, metric, serve
from tests.fake_gateway import Failure, FakeGateway, serve_in_process, summary_of, summary_parts
from tests.polling import eventually

REF = ConversationRef("acme", "c")  # the tenant of tests.conftest.CLIENT_KEY


def user(text: str) -> dict[str, Any]:
    return {"message": {"role": "user", "content": text}}


def msg(seq: int, role: Role, content: Any = "x", **extra: Any) -> Message:
    return Message(tokens=10, seq=seq, role=role, content=content, created_at=0.0, **extra)


def record(through: int, version: int, text: str = "facts") -> SummaryRecord:
    return SummaryRecord(text, through, version, "m", 1.0)


def state(
    current: SummaryRecord | None = None, upcoming: SummaryRecord | None = None
) -> SummaryState:
    return SummaryState(current, upcoming, 0, 0, 0, 0.0)


def jobs(outcome: str) -> float:
    return metric("convproxy_summary_jobs_total", outcome=outcome)


# ---- the pure plan -------------------------------------------------------------------------


def test_a_cut_takes_whole_turns_up_to_through() -> None:
    log = [
        msg(1, Role.USER),
        msg(2, Role.ASSISTANT, None, tool_calls=[{"id": "t", "function": {"name": "f"}}]),
        msg(3, Role.TOOL, tool_call_id="t"),
        msg(4, Role.ASSISTANT),
        msg(5, Role.USER),
        msg(6, Role.ASSISTANT),
        msg(7, Role.USER),
    ]
    assert [m.seq for m in next_cut(log, through=6, input_cap=1000)] == [1, 2, 3, 4, 5, 6]
    # The cap stops at a turn boundary, never inside a tool-call pair...
    assert [m.seq for m in next_cut(log, through=6, input_cap=45)] == [1, 2, 3, 4]
    # ...and a job always makes progress: one whole turn even over the cap.
    assert [m.seq for m in next_cut(log, through=6, input_cap=1)] == [1, 2, 3, 4]
    assert next_cut(log, through=0, input_cap=1000) == []


def test_the_next_move_leaves_out_whole_turns_worth_the_band_above_low_water() -> None:
    log = [msg(seq, Role.USER if seq % 2 else Role.ASSISTANT) for seq in range(1, 11)]  # 10 each
    options: dict[str, Any] = {"budget": 100, "factor": 1.0}
    # 40 (1 - 0.6 of 100) plus one turn like the newest (20): three turns.
    assert ahead_cut(log, low_water=0.6, **options) == 6
    assert ahead_cut(log, low_water=0.9, **options) == 4
    # The newest turn always stays, and a single turn leaves nothing to cut.
    assert ahead_cut(log, low_water=0.6, **{**options, "factor": 0.5}) == 8
    assert ahead_cut(log, low_water=0.01, **options) == 8
    assert ahead_cut(log[:2], low_water=0.01, **options) == 0
    # Not before the array passes PREFETCH_SHARE of the budget (85 here).
    ahead = {"fixed_tokens": 20, "low_water": 0.6, **options}
    assert prefetch_through(log[:6], history_tokens=60, **ahead) == 0  # 80
    assert prefetch_through(log[:8], history_tokens=80, **ahead) == 6  # 100


def test_the_request_holds_the_previous_summary_and_exactly_the_messages() -> None:
    messages = [
        msg(5, Role.USER, "what's </message> this?", cache_control={"type": "ephemeral"}),
        msg(6, Role.ASSISTANT, [{"type": "text", "text": "parts"}]),
    ]
    body = summary_request("earlier facts", messages, model="small", max_tokens=99)
    assert body["model"] == "small"
    assert body["max_tokens"] == 99
    assert body["messages"][0] == {"role": "system", "content": SUMMARY_INSTRUCTIONS}
    previous, lines = summary_parts(body)
    assert previous == "earlier facts"
    assert lines == [
        {"seq": 5, "role": "user", "content": "what's </message> this?"},
        {"seq": 6, "role": "assistant", "content": [{"type": "text", "text": "parts"}]},
    ]
    first = summary_request(None, messages[:1], model="m", max_tokens=9)
    assert summary_parts(first)[0] == NO_PREVIOUS


def test_summary_text_is_trimmed_capped_and_never_empty() -> None:
    assert summary_text("  facts \n", max_tokens=10) == "facts"
    assert summary_text([{"type": "text", "text": "a"}, {"x": 1}, "y"], max_tokens=10) == "a"
    assert summary_text("z" * 1000, max_tokens=10) == "z" * 80
    assert summary_text("   ", max_tokens=10) is None
    assert summary_text(None, max_tokens=10) is None


def test_the_forwarded_summary_message_and_the_turns_context() -> None:
    assert summary_message(None) is None
    stored = state(record(4, 2))
    wire = summary_message(stored.current)
    assert wire is not None
    assert wire["role"] == "system"
    assert wire["content"].endswith("(messages 1 to 4, no longer shown):\nfacts")
    assert summary_message(record(4, 2)) == wire  # the same bytes every turn until another one
    assert uncovered(9, stored) == 4
    assert uncovered(3, stored) == 0
    used = SummaryUse(stored, stored.current, wire, 20, "m")
    assert used.covers_through == 4
    assert turn_context(used, 9) == {
        "summary": {"version": 2, "covers_through": 4},
        "summary_lag": 4,
    }
    left_out = used.without()
    assert left_out.covers_through == 0
    assert left_out.message is None
    assert turn_context(left_out, 9) == {"summary": None, "summary_lag": 8}
    assert turn_context(None, 9) == {"summary": None, "summary_lag": None}


def test_a_summary_made_ahead_waits_until_the_window_passes_it() -> None:
    both = state(record(4, 2, "old"), record(10, 3, "new"))
    assert both.newest == record(10, 3, "new")
    assert both.covers_through == 10
    assert both.usable(8) == record(4, 2, "old")  # the window still shows 5..10
    assert both.usable(11) == record(10, 3, "new")
    assert both.usable(4) is None
    assert state().newest is None
    assert state().covers_through == 0
    # A turn that forwards the newer one makes it `current` in its commit...
    forwarding_next = SummaryUse(both, both.next, None, 0, "m")
    assert promotion(forwarding_next) == {
        "summary_text": "new",
        "summary_through": "10",
        "summary_version": "3",
        "summary_by": "m",
        "summary_at": "1.0",
    }
    # ...and one that forwards `current`, or nothing, writes nothing.
    assert promotion(SummaryUse(both, both.current, None, 0, "m")) == {}
    assert promotion(SummaryUse(both, None, None, 0, "m")) == {}
    assert promotion(None) == {}


def test_settings_of_a_conversation_override_the_defaults() -> None:
    meta = ConversationMeta(created_at=1, updated_at=1)
    assert summaries_enabled(None, default=True)
    assert not summaries_enabled(meta, default=False)
    chosen = dataclasses.replace(meta, summary_enabled=False, summary_model="tiny")
    assert not summaries_enabled(chosen, default=True)
    assert summary_model(chosen, default="cheap", turn_model="big") == "tiny"
    assert summary_model(meta, default="cheap", turn_model="big") == "cheap"
    assert summary_model(None, default=None, turn_model="big") == "big"
    assert summary_state(None).covers_through == 0
    # A summary without text covers nothing.
    assert summary_state(dataclasses.replace(meta, summary_through=5)).covers_through == 0


def test_summaries_past_a_cut_back_log_are_ignored_and_edits_know_what_to_forget() -> None:
    meta = ConversationMeta(
        created_at=1,
        updated_at=1,
        summary_text="old",
        summary_through=4,
        summary_version=1,
        summary_next_text="new",
        summary_next_through=10,
        summary_next_version=2,
    )
    assert summary_state(meta).covers_through == 10
    cut_back = summary_state(meta, stored=6)
    assert cut_back.current == SummaryRecord("old", 4, 1, None, None)
    assert cut_back.next is None
    assert summary_state(meta, stored=3).newest is None
    current = ["summary_text", "summary_through", "summary_version", "summary_by", "summary_at"]
    upcoming = [f.replace("summary_", "summary_next_") for f in current]
    assert fields_to_forget(meta, 11) == []
    assert fields_to_forget(meta, 10) == upcoming
    assert fields_to_forget(meta, 5) == upcoming
    assert fields_to_forget(meta, 4) == current + upcoming
    assert fields_to_forget(None, 1) == []


def test_put_summary_maps_to_metadata_fields() -> None:
    update = ConversationUpdate.model_validate(
        {"summary": {"enabled": True, "model": "tiny"}, "token_budget": 500}
    )
    assert update.meta_changes() == (
        {"token_budget": "500", "summary_enabled": "1", "summary_model": "tiny"},
        [],
    )
    assert ConversationUpdate.model_validate(
        {"summary": {"enabled": False, "model": None}}
    ).meta_changes() == ({"summary_enabled": "0"}, ["summary_model"])
    assert ConversationUpdate.model_validate({"summary": None}).meta_changes() == (
        {},
        ["summary_enabled", "summary_model"],
    )
    assert ConversationUpdate.model_validate({"summary": {}}).meta_changes() == ({}, [])
    with pytest.raises(ValidationError):
        SummarySettings.model_validate({"enabled": "yes"})


def test_summary_settings_are_read_from_the_environment(redis_url: str) -> None:
    settings = make_settings(redis_url, summary="on", summary_model="  ", summary_max_tokens=64)
    assert settings.summary == "on"
    assert settings.summary_model is None
    assert make_settings(redis_url, summary_model=" tiny ").summary_model == "tiny"
    with pytest.raises(ValidationError):
        make_settings(redis_url, summary="maybe")


# ---- the job, against real Redis and the stand-in ------------------------------------------


@asynccontextmanager
async def summarizer(
    redis: Redis | Any, gateway: FakeGateway, **policy: Any
) -> AsyncIterator[SummaryService]:
    """A replica's SummaryService on its own gateway connection; same Redis as the app."""
    values: dict[str, Any] = {
        "enabled": True,
        "model": None,
        "max_tokens": 256,
        "retry_seconds": 60.0,
        "lease_seconds": 2.0,
        "timeout_seconds": 5.0,
    }
    values.update(policy)
    async with serve_in_process(gateway) as url, aiohttp.ClientSession() as session:
        client = GatewayClient(
            session,
            base_url=url,
            api_key=SecretStr(GATEWAY_KEY),
            timeout_seconds=5,
            max_retries=0,
            retry_after_cap_seconds=1,
        )
        service = SummaryService(SummaryStore(redis), client, SummaryPolicy(**values))
        try:
            yield service
        finally:
            await service.aclose()


async def fill(client: httpx.AsyncClient, turns: int, cid: str = REF.id) -> None:
    for i in range(turns):
        answer = await client.post(f"/conversations/{cid}/messages", json=user(f"q{i}"))
        assert answer.status_code == 200


async def run(service: SummaryService, through: int, **options: Any) -> str:
    values: dict[str, Any] = {
        "through": through,
        "model": "summarizer",
        "input_cap": 10_000,
        "client_key": None,
        "request_id": "r",
    }
    values.update(options)
    return await service.run(REF, **values)


async def meta(redis: Redis) -> dict[str, str]:
    raw = await redis.hgetall(REF.key("meta"))
    return {_str(k): _str(v) for k, v in raw.items()}


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def test_a_job_folds_exactly_the_given_messages_incrementally(
    client: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    await fill(client, 6)
    log_before = await redis.lrange(REF.key("log"), 0, -1)
    async with summarizer(redis, gateway) as service:
        assert await run(service, 4) == "stored"
        first = await meta(redis)
        assert first["summary_next_version"] == "1"
        assert first["summary_next_through"] == "4"
        assert first["summary_next_by"] == "summarizer"
        assert first["summary_next_text"] == summary_of(gateway.summary_received[0])
        previous, messages = summary_parts(gateway.summary_received[0])
        assert previous == NO_PREVIOUS
        assert [m["seq"] for m in messages] == [1, 2, 3, 4]
        assert [m["content"] for m in messages] == ["q0", "reply to: q0", "q1", "reply to: q1"]
        assert await run(service, 4) == "covered"  # nothing new: no call
        assert len(gateway.summary_received) == 1

        assert await run(service, 8) == "stored"
        second = await meta(redis)
        previous, messages = summary_parts(gateway.summary_received[1])
        assert previous == first["summary_next_text"]
        assert [m["seq"] for m in messages] == [5, 6, 7, 8]
        assert second["summary_next_version"] == "2"
        assert second["summary_next_through"] == "8"
        assert gateway.summary_headers[0]["authorization"] == GATEWAY_KEY
    # Usage of summary calls is kept apart from the turns' usage.
    body = (await client.get(f"/conversations/{REF.id}")).json()
    reported = [gateway.completion(r)["usage"] for r in gateway.summary_received]
    assert body["summary"]["usage"]["input_tokens"] == sum(u["input_tokens"] for u in reported)
    assert body["summary"]["version"] == 2
    assert body["summary"]["covers_through"] == 8
    assert body["summary"]["text"] == second["summary_next_text"]
    assert body["usage"]["input_tokens"] == sum(
        gateway.completion(r)["usage"]["input_tokens"] for r in gateway.received
    )
    assert await redis.lrange(REF.key("log"), 0, -1) == log_before  # the log is never altered


async def test_a_large_backlog_is_folded_in_rounds(
    client: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    await fill(client, 6)
    async with summarizer(redis, gateway, max_rounds=3) as service:
        assert await run(service, 12, input_cap=1) == "stored"
    assert [[m["seq"] for m in summary_parts(r)[1]] for r in gateway.summary_received] == [
        [1, 2],
        [3, 4],
        [5, 6],
    ]
    assert (await meta(redis))["summary_next_version"] == "3"


async def test_racing_replicas_store_one_version_per_cut(
    client: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    await fill(client, 3)
    gateway.summary_hold = asyncio.Event()
    async with summarizer(redis, gateway) as one, summarizer(redis, gateway) as two:
        first = asyncio.ensure_future(run(one, 4))
        await eventually(lambda: len(gateway.summary_received) == 1, what="the first call")
        busy = jobs("busy")
        assert await run(two, 4) == "busy"  # the other replica's lease: no second call
        assert jobs("busy") == busy + 1
        gateway.summary_hold.set()
        assert await first == "stored"
    assert len(gateway.summary_received) == 1
    assert (await meta(redis))["summary_next_version"] == "1"


async def test_a_job_that_lost_the_race_stores_nothing(
    client: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    await fill(client, 3)
    held = asyncio.Event()
    gateway.summary_hold = held
    async with summarizer(redis, gateway) as slow, summarizer(redis, gateway) as fast:
        late = asyncio.ensure_future(run(slow, 4))
        await eventually(lambda: len(gateway.summary_received) == 1, what="the slow call")
        await redis.delete(REF.key("sumlock"))  # its lease lapsed (a replica paused too long)
        gateway.summary_hold = None
        assert await run(fast, 4) == "stored"
        stored = await meta(redis)
        held.set()
        assert await late == "stale"
    after = await meta(redis)
    assert after["summary_next_version"] == "1"
    assert after["summary_next_text"] == stored["summary_next_text"]
    # Both calls were spent: both count in the summary usage.
    assert int(after["summary_output_tokens"]) == 2 * int(stored["summary_output_tokens"])


async def test_a_killed_job_leaves_the_old_summary_and_blocks_only_until_its_lease_ends(
    client: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    await fill(client, 5)
    # A long lease, so that no stall of a loaded machine lets it lapse before the test looks;
    # its lapse is then brought forward.
    async with summarizer(redis, gateway, lease_seconds=60.0) as service:
        assert await run(service, 4) == "stored"
        first = await meta(redis)
        gateway.summary_hold = asyncio.Event()
        task = service.schedule(
            REF, through=8, model="m", input_cap=10_000, client_key=None, request_id="r"
        )
        assert task is not None
        await eventually(lambda: len(gateway.summary_received) == 2, what="the second call")
        task.cancel()  # the replica dies mid-job
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await meta(redis) == first
        gateway.summary_hold = None
        assert await run(service, 8) == "busy"  # its lease still stands...
        assert 0 < await redis.pttl(REF.key("sumlock")) <= 60_000  # it lapses by itself
        assert await redis.pexpire(REF.key("sumlock"), 1)
        await eventually(lambda: _gone(redis, REF.key("sumlock")), what="the lease to lapse")
        assert await run(service, 8) == "stored"  # ...and nothing is wedged after it
    assert (await meta(redis))["summary_next_version"] == "2"


async def _gone(redis: Redis, key: str) -> bool:
    return not await redis.exists(key)


async def test_a_failed_job_is_counted_and_backs_off(
    client: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    await fill(client, 3)
    gateway.summary_failures = [Failure(500, {"error": "boom"}), Failure(400, {"error": "no"})]
    failed = jobs("failed")
    async with summarizer(redis, gateway, retry_seconds=600) as service:
        before = time.time()
        assert await run(service, 4) == "failed"
        assert jobs("failed") == failed + 1
        stored = await meta(redis)
        assert "summary_text" not in stored
        assert stored["summary_failures"] == "1"
        assert before + 600 <= float(stored["summary_retry_at"]) <= time.time() + 600
        assert await run(service, 4) == "backoff"
        assert len(gateway.summary_received) == 1
        await redis.hdel(REF.key("meta"), "summary_retry_at")  # as if the back-off had passed
        before = time.time()
        assert await run(service, 4) == "failed"
        retry_at = float((await meta(redis))["summary_retry_at"])
        assert before + 1200 <= retry_at <= time.time() + 1200  # doubled
    body = (await client.get(f"/conversations/{REF.id}")).json()
    assert body["summary"]["failures"] == 2
    assert body["summary"]["retry_after"] is not None
    assert body["summary"]["version"] == 0


async def test_failures_count_up_until_a_success_clears_them(
    client: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    await fill(client, 3)
    gateway.summary_failures = [Failure(503, {"error": "busy"}), Failure(502, {"error": "bad"})]
    gateway.summary_content = "   "  # then an answer without text: a failure too
    async with summarizer(redis, gateway, retry_seconds=0.0) as service:
        assert await run(service, 4) == "failed"
        assert await run(service, 4) == "failed"
        assert await run(service, 4) == "failed"
        assert (await meta(redis))["summary_failures"] == "3"
        gateway.summary_content = None
        assert await run(service, 4) == "stored"
    stored = await meta(redis)
    assert "summary_failures" not in stored
    assert "summary_retry_at" not in stored


async def test_a_conversation_deleted_mid_job_gets_nothing_back(
    client: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    await fill(client, 3)
    gateway.summary_hold = asyncio.Event()
    async with summarizer(redis, gateway) as service:
        job = asyncio.ensure_future(run(service, 4))
        await eventually(lambda: len(gateway.summary_received) == 1, what="the call")
        assert (await client.delete(f"/conversations/{REF.id}")).status_code == 204
        gateway.summary_hold.set()
        assert await job == "gone"
        assert not await redis.exists(REF.key("meta"))
        assert await run(service, 4) == "gone"
        gateway.summary_failures = [Failure(500, {"error": "boom"})]
        await fill(client, 3)  # a new conversation under the same id...
        gateway.summary_hold = asyncio.Event()
        job = asyncio.ensure_future(run(service, 4))
        await eventually(lambda: len(gateway.summary_received) == 2, what="the failing call")
        await client.delete(f"/conversations/{REF.id}")
        await fill(client, 1)  # ...deleted and written afresh while the job failed
        gateway.summary_hold.set()
        assert await job == "failed"
    assert "summary_failures" not in await meta(redis)  # the new one is not charged for it


async def test_jobs_are_single_flight_and_bounded_in_one_process(
    client: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    await fill(client, 3)
    await fill(client, 3, cid="other")
    gateway.summary_hold = asyncio.Event()
    async with summarizer(redis, gateway, max_jobs=1) as service:
        options: dict[str, Any] = {
            "through": 4,
            "model": "m",
            "input_cap": 10_000,
            "client_key": None,
            "request_id": "r",
        }
        task = service.schedule(REF, **options)
        assert task is not None
        assert service.schedule(REF, **options) is None
        assert service.schedule(ConversationRef("acme", "other"), **options) is None
        gateway.summary_hold.set()
        assert await task == "stored"
        assert service.schedule(ConversationRef("acme", "other"), **options) is not None


async def test_redis_unreachable_fails_the_job_not_the_caller(gateway: FakeGateway) -> None:
    unreachable = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    failed = jobs("failed")
    async with summarizer(unreachable, gateway) as service:
        assert await run(service, 4) == "failed"
    await unreachable.aclose()
    assert jobs("failed") == failed + 1
    assert gateway.summary_received == []


# ---- through the API -----------------------------------------------------------------------


@pytest.fixture
def summary_settings(redis_url: str, redis: Redis) -> Settings:
    return make_settings(redis_url, summary="on", summary_retry_seconds=0.0)


async def until_dropped(http: httpx.AsyncClient, cid: str, start: int = 0) -> dict[str, Any]:
    for i in range(start, start + 40):
        answer = await http.post(
            f"/conversations/{cid}/messages", json=user(f"question number {i}, " * 3)
        )
        assert answer.status_code == 200
        body: dict[str, Any] = answer.json()
        if body["conversation"]["context"]["dropped_messages"] > 0:
            return body
    raise AssertionError("the window never dropped anything")


async def summary_version(http: httpx.AsyncClient, cid: str) -> int:
    version: int = (await http.get(f"/conversations/{cid}")).json()["summary"]["version"]
    return version


async def summarized(http: httpx.AsyncClient, cid: str) -> bool:
    return await summary_version(http, cid) > 0


async def settled() -> bool:
    """No summary job runs in this process (the app's jobs run in the test's event loop)."""
    return REGISTRY.get_sample_value("convproxy_summary_jobs_running") == 0


async def test_summaries_land_with_the_window_jump_and_the_prefix_holds_between(
    summary_settings: Settings, gateway: FakeGateway, redis: Redis
) -> None:
    """Near the budget, a job folds what the next jump will leave out; the next turn forwards
    the new summary and jumps to it at once. Every other turn forwards the previous turn's array
    unchanged, with its reply and a new message after it."""
    async with serve(summary_settings, gateway) as http:
        await http.put("/conversations/s", json={"token_budget": 300, "system": "Be brief."})
        previous: list[Any] = []
        jumps = landed = 0
        dropped = 0
        for i in range(40):
            answer = await http.post(
                "/conversations/s/messages", json=user(f"question number {i}, " * 3)
            )
            assert answer.status_code == 200
            context = answer.json()["conversation"]["context"]
            forwarded = gateway.received[-1]["messages"]
            reply = {
                "role": "assistant",
                "content": answer.json()["choices"][0]["message"]["content"],
            }
            if context["dropped_messages"] != dropped:  # the window moved
                jumps += 1
                assert context["dropped_messages"] > dropped
                summary = context["summary"]
                assert forwarded[0] == {"role": "system", "content": "Be brief."}
                assert forwarded[1]["content"].startswith("Summary of the earlier conversation")
                if summary is not None and summary["covers_through"] == context["dropped_messages"]:
                    landed += 1
                    assert context["summary_lag"] == 0
                dropped = context["dropped_messages"]
            else:
                assert orjson.dumps(forwarded[: len(previous)]) == orjson.dumps(previous)
            previous = [*forwarded, reply]
            await eventually(settled, what="the summary job to finish")
        assert jumps >= 3
        assert landed == jumps
        # Each summary folded the previous one and exactly what its jump left out.
        folded = [summary_parts(body) for body in gateway.summary_received]
        assert folded[0][0] == NO_PREVIOUS
        reached = 0
        for _, messages in folded:
            assert [m["seq"] for m in messages] == list(range(reached + 1, messages[-1]["seq"] + 1))
            reached = messages[-1]["seq"]
        # Up to the last jump, or further: a summary made ahead for the next one, kept as `next`.
        assert reached >= dropped
        if reached > dropped:
            ahead = await redis.hget("conv:{acme:s}:meta", "summary_next_through")
            assert int(ahead or 0) == reached
        # The turn that forwarded the newest summary made it the current one.
        through = await redis.hget("conv:{acme:s}:meta", "summary_through")
        assert int(through or 0) == dropped
        if reached == dropped:
            summary = (await http.get("/conversations/s")).json()["summary"]
            current = await redis.hmget("conv:{acme:s}:meta", ["summary_text", "summary_version"])
            assert current == [summary["text"].encode(), str(summary["version"]).encode()]


async def test_a_late_summary_leaves_plain_trimming_and_says_so(
    summary_settings: Settings, gateway: FakeGateway
) -> None:
    held = gateway.summary_hold = asyncio.Event()
    try:
        async with serve(summary_settings, gateway) as http:
            await http.put("/conversations/late", json={"token_budget": 300})
            context = (await until_dropped(http, "late"))["conversation"]["context"]
            assert context["summary"] is None
            assert context["summary_lag"] == context["dropped_messages"] > 0
            await eventually(lambda: bool(gateway.summary_received), what="a (held) job")
            held.set()
            await eventually(settled, what="the held job")
            following = await http.post("/conversations/late/messages", json=user("and then"))
            context = following.json()["conversation"]["context"]
            # The summary reached past what trimming left out: the window moves to it.
            assert context["summary"] is not None
            assert context["summary_lag"] == 0
            assert context["dropped_messages"] == context["summary"]["covers_through"]
    finally:
        held.set()


async def test_summaries_off_never_call_the_gateway_for_one(
    settings: Settings, gateway: FakeGateway
) -> None:
    async with serve(settings, gateway) as http:
        await http.put("/conversations/off", json={"token_budget": 200})
        body = await until_dropped(http, "off")
        await until_dropped(http, "off", start=50)
        assert body["conversation"]["context"]["summary"] is None
        assert body["conversation"]["context"]["summary_lag"] is None
        assert gateway.summary_received == []
        assert gateway.calls == len(gateway.received)
        assert (await http.get("/conversations/off")).json()["summary"]["enabled"] is False


async def test_put_summary_settings_and_get_them_back(
    settings: Settings, gateway: FakeGateway
) -> None:
    async with serve(settings, gateway) as http:
        bad = await http.put("/conversations/p", json={"summary": {"enabled": "yes"}})
        assert bad.status_code == 422
        assert bad.headers["content-type"] == "application/problem+json"
        assert (
            await http.put("/conversations/p", json={"summary": {"model": "m", "x": 1}})
        ).status_code == 422
        assert (await http.get("/conversations/p")).status_code == 404  # nothing stored
        created = await http.put(
            "/conversations/p", json={"summary": {"enabled": True, "model": "tiny"}}
        )
        assert created.status_code == 201
        assert created.json()["summary"] == {
            "enabled": True,
            "model": "tiny",
            "text": None,
            "covers_through": 0,
            "version": 0,
            "created_at": None,
            "written_by": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
            "failures": 0,
            "retry_after": None,
        }
        kept = await http.put("/conversations/p", json={"summary": {"model": None}})
        assert kept.json()["summary"]["enabled"] is True
        assert kept.json()["summary"]["model"] is None
        cleared = await http.put("/conversations/p", json={"summary": None})
        assert cleared.json()["summary"]["enabled"] is False  # back to SUMMARY=off


async def test_a_conversation_may_opt_in_and_name_the_summary_model(
    settings: Settings, gateway: FakeGateway, redis: Redis
) -> None:
    async with serve(settings, gateway) as http:
        await http.put(
            "/conversations/o",
            json={"token_budget": 300, "summary": {"enabled": True, "model": "tiny"}},
        )
        await until_dropped(http, "o")
        await eventually(lambda: summarized(http, "o"), what="a summary")
        assert gateway.summary_received[0]["model"] == "tiny"
        assert (await http.delete("/conversations/o")).status_code == 204
        assert not await redis.keys("*:o}:meta")
        again = await http.post("/conversations/o/messages", json=user("hello again"))
        assert again.json()["conversation"]["context"]["summary_lag"] is None  # defaults: off


async def test_pass_through_summaries_use_the_callers_key(
    redis_url: str, redis: Redis, gateway: FakeGateway
) -> None:
    settings = make_settings(
        redis_url, api_keys=None, gateway_api_key=None, summary="on", token_budget=300
    )
    async with serve(settings, gateway, key="callers-own-key") as http:
        await until_dropped(http, "pt")
        await eventually(lambda: summarized(http, "pt"), what="a summary")
    assert gateway.summary_headers[0]["authorization"] == "callers-own-key"
    assert all(b"callers-own-key" not in k for k in await redis.keys("*"))


async def test_streamed_turns_start_summaries_too(
    summary_settings: Settings, gateway: FakeGateway
) -> None:
    async with serve(summary_settings, gateway) as http:
        await http.put("/conversations/st", json={"token_budget": 300})
        await until_dropped(http, "st")
        await eventually(lambda: summarized(http, "st"), what="a summary")
        version = await summary_version(http, "st")
        for i in range(6):
            async with http.stream(
                "POST",
                "/conversations/st/messages",
                json={**user(f"streamed question {i}, " * 3), "stream": True},
            ) as stream:
                events = [line async for line in stream.aiter_lines() if line]
            assert events[-1] == "data: [DONE]"
        await eventually(lambda: _newer(http, "st", version), what="a summary after streamed turns")


async def _newer(http: httpx.AsyncClient, cid: str, version: int) -> bool:
    return await summary_version(http, cid) > version


async def test_a_summary_too_big_for_the_budget_is_left_out(
    summary_settings: Settings, gateway: FakeGateway
) -> None:
    gateway.summary_content = "a long summary " * 150
    async with serve(summary_settings, gateway) as http:
        await http.put("/conversations/big", json={"token_budget": 300})
        await until_dropped(http, "big")
        await eventually(lambda: summarized(http, "big"), what="a summary")
        after = await http.post("/conversations/big/messages", json=user("next"))
        assert after.status_code == 200
        context = after.json()["conversation"]["context"]
        assert context["summary"] is None
        assert context["summary_lag"] == context["dropped_messages"]
        assert all(
            not m["content"].startswith("Summary of")
            for m in gateway.received[-1]["messages"]
            if isinstance(m["content"], str)
        )


async def test_a_summary_job_at_shutdown_is_cancelled_cleanly(
    summary_settings: Settings, gateway: FakeGateway, redis: Redis
) -> None:
    gateway.summary_hold = asyncio.Event()
    # A lease longer than any stall of a loaded machine: it must still stand after the stop.
    settings = Settings.model_validate({**summary_settings.model_dump(), "lock_ttl_seconds": 60})
    async with serve(settings, gateway) as http:
        await http.put("/conversations/sd", json={"token_budget": 300})
        await until_dropped(http, "sd")
        await eventually(lambda: len(gateway.summary_received) == 1, what="a summary call")
    # The app stopped with the call held: nothing was stored, and its lease will expire.
    raw = await redis.hgetall("conv:{acme:sd}:meta")
    assert b"summary_text" not in raw
    assert 0 < await redis.pttl("conv:{acme:sd}:sumlock") <= 60_000


async def test_a_long_job_keeps_its_lease_and_a_lost_lease_stops_the_renewal(
    client: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    await fill(client, 3)
    gateway.summary_hold = asyncio.Event()
    lease = REF.key("sumlock")
    # Renewed every third of a lease: 1.5 s leaves a stalled loop a second before it lapses.
    async with summarizer(redis, gateway, lease_seconds=1.5) as service:
        job = asyncio.ensure_future(run(service, 4))
        await eventually(lambda: len(gateway.summary_received) == 1, what="the call")
        seen = [await redis.pttl(lease)]

        async def renewed() -> bool:
            now = await redis.pttl(lease)
            seen.append(now)
            return now > seen[-2]  # the time left went up: renewed

        await eventually(renewed, what="a renewal")
        await eventually(renewed, what="another renewal")
        await redis.set(lease, "another job's")  # lost: renewals stop, nothing is overwritten
        gateway.summary_hold.set()
        assert await job == "stored"  # compare and set still holds: nothing newer was stored
    assert await redis.get(lease) == b"another job's"  # never renewed nor released by us


async def test_unreadable_records_are_left_out_of_a_summary(
    client: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    await fill(client, 3)
    await redis.lset(REF.key("log"), 0, "not json")
    await redis.lset(REF.key("log"), 1, "{}")
    unreadable = metric("convproxy_unreadable_records_total")
    async with summarizer(redis, gateway) as service:
        assert await run(service, 2) == "covered"  # nothing readable: no call
        assert not await redis.exists(REF.key("sumlock"))
        assert gateway.summary_received == []
        assert await run(service, 4) == "stored"
    _, folded = summary_parts(gateway.summary_received[0])
    assert [m["seq"] for m in folded] == [3, 4]
    assert metric("convproxy_unreadable_records_total") >= unreadable + 4


async def test_turns_do_not_start_jobs_while_backing_off(
    redis_url: str, redis: Redis, gateway: FakeGateway
) -> None:
    gateway.summary_failures = [Failure(500, {"error": "boom"})]
    settings = make_settings(redis_url, summary="on", summary_retry_seconds=600)
    async with serve(settings, gateway) as http:
        await http.put("/conversations/b", json={"token_budget": 300})
        await until_dropped(http, "b")
        await eventually(lambda: _failures(http, "b"), what="the failed job to be recorded")
        # A job a later turn of until_dropped started may still be finding the backoff: its
        # count must land before the snapshot, not between it and the turn below.
        await eventually(
            lambda: metric("convproxy_summary_jobs_running") == 0, what="no job running"
        )
        backoff = jobs("backoff")
        after = await http.post("/conversations/b/messages", json=user("more"))
        assert after.status_code == 200  # the turn is untouched
        assert after.json()["conversation"]["context"]["summary"] is None
        assert jobs("backoff") == backoff + 1
        assert len(gateway.summary_received) == 1


async def _failures(http: httpx.AsyncClient, cid: str) -> bool:
    failures: int = (await http.get(f"/conversations/{cid}")).json()["summary"]["failures"]
    return failures > 0


async def test_a_turn_that_moves_to_a_new_summary_still_costs_two_round_trips(
    client: httpx.AsyncClient,
    gateway: FakeGateway,
    redis: Redis,
    redis_url: str,
    open_store: OpenStore,
) -> None:
    from redis.asyncio import ConnectionPool

    from service.auth import Caller
    from service.chat import ChatService, TurnPolicy
    from service.schemas import TurnCreate
    from tests.test_turns import CountingConnection

    for i in range(6):  # 12 messages of about 55 estimated tokens each
        await client.post(f"/conversations/{REF.id}/messages", json=user(f"{i} " + "x" * 200))
    await client.put(f"/conversations/{REF.id}", json={"token_budget": 500})
    async with summarizer(redis, gateway) as service:  # on its own, uncounted, connections
        assert await run(service, 8) == "stored"  # `next`, through 8
        pool = ConnectionPool.from_url(redis_url, connection_class=CountingConnection)
        counted = Redis.from_pool(pool)
        store = open_store(counted)
        await store.load_scripts()
        await counted.ping()  # the pool's second connection opened (the store keeps the first)
        async with serve_in_process(gateway) as url, aiohttp.ClientSession() as session:
            chat = ChatService(
                store,
                GatewayClient(
                    session,
                    base_url=url,
                    api_key=SecretStr(GATEWAY_KEY),
                    timeout_seconds=5,
                    max_retries=0,
                    retry_after_cap_seconds=1,
                ),
                TurnPolicy(
                    default_model="m", token_budget=500, lock_wait_seconds=1, lease_seconds=10
                ),
                summaries=service,
            )
            CountingConnection.writes = 0
            result = await chat.turn(
                REF,
                TurnCreate.model_validate(user("next")),
                caller=Caller(tenant="acme", upstream_key=None),
                request_id="r",
                idempotency_key=None,
            )
            writes = CountingConnection.writes
        await counted.aclose()
    context = orjson.loads(result.body)["conversation"]["context"]
    assert context["summary"] == {"version": 1, "covers_through": 8}, context  # moved with it...
    assert context["summary_lag"] == 0
    assert writes == 2  # ...and the turn still took two round trips, the promotion included
    assert (await meta(redis))["summary_version"] == "1"
