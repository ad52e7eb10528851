"""What a hostile or unlucky week would break (issues 9 and 17): limits at the door, records that
do not read back, the tenant index as a derived view, CORS on every answer."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from service import limits
from service.config import Settings
from service.middleware import cors_headers
from service.models import Message, Role
from service.store import ConversationRef
from service.usage import Usage, read_usage
from tests.conftest import OpenStore, make_settings, metric, serve
from tests.fake_gateway import FakeGateway
from tests.polling import eventually

PROBLEM = "application/problem+json"


def user(text: str) -> dict[str, Any]:
    return {"message": {"role": "user", "content": text}}


def nested(depth: int) -> Any:
    return json.loads("[" * depth + "]" * depth)


async def stored_keys(redis: Redis) -> list[bytes]:
    keys: list[Any] = await redis.keys("*")
    return [k for k in keys if not k.startswith(b"conv:calibration")]


async def assert_refused(response: httpx.Response, status: int, *needles: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    for needle in needles:
        assert needle in response.json()["detail"]


# ---- 9.1: nesting ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"message": {"role": "user", "content": "a", "cache_control": {"x": nested(40)}}},
        {"message": {"role": "user", "content": [{"type": "image", "extra": nested(40)}]}},
        {**user("a"), "tools": [{"type": "function", "function": nested(40)}]},
        {**user("a"), "response_format": {"a": nested(300)}},
    ],
    ids=["cache_control", "content part", "tool", "past pydantic's own limit"],
)
async def test_deep_nesting_is_422_with_the_limit(
    client: httpx.AsyncClient, gateway: FakeGateway, redis: Redis, body: dict[str, Any]
) -> None:
    response = await client.post("/conversations/deep/messages", json=body)
    await assert_refused(response, 422, str(limits.MAX_JSON_DEPTH), "MAX_JSON_DEPTH")
    assert gateway.calls == 0
    assert await stored_keys(redis) == []


async def test_deep_metadata_is_422(client: httpx.AsyncClient, redis: Redis) -> None:
    response = await client.put("/conversations/deep", json={"metadata": {"a": nested(40)}})
    await assert_refused(response, 422, "MAX_JSON_DEPTH")
    assert await stored_keys(redis) == []


async def test_nesting_within_the_limit_is_stored_and_reads_back(
    client: httpx.AsyncClient, gateway: FakeGateway
) -> None:
    marked = {"role": "user", "content": "a", "cache_control": {"x": nested(20)}}
    assert (await client.post("/conversations/ok/messages", json={"message": marked})).is_success
    assert (await client.post("/conversations/ok/messages", json=user("b"))).is_success
    assert gateway.received[1]["messages"][0] == marked


async def test_an_unreadable_record_does_not_wedge_its_conversation(
    client: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    """A record stored before the limit existed (pydantic refuses JSON past 200 levels)."""
    assert (await client.post("/conversations/w/messages", json=user("first"))).is_success
    deep = {"type": "text", "text": "x", "extra": nested(250)}
    bad = Message(tokens=3, seq=3, role=Role.USER, content=[deep], created_at=time.time())
    await redis.rpush("conv:{acme:w}:log", bad.to_json())
    await redis.rpush("conv:{acme:w}:log", b"not json at all")
    before = metric("convproxy_unreadable_records_total")

    page = await client.get("/conversations/w/messages")
    assert page.status_code == 200, page.text
    assert [m["seq"] for m in page.json()["messages"]] == [1, 2]

    turn = await client.post("/conversations/w/messages", json=user("again"))
    assert turn.status_code == 200, turn.text
    # The window stops at the newest unreadable record: what is forwarded stays coherent.
    assert gateway.received[-1]["messages"] == [{"role": "user", "content": "again"}]
    assert turn.json()["conversation"]["message_count"] == 6
    assert metric("convproxy_unreadable_records_total") >= before + 3


# ---- 9.6 and 9.7: counts, sizes, budgets ---------------------------------------------------


async def test_too_many_new_messages_is_422_before_the_gateway(
    client: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    messages = [{"role": "user", "content": "x"}] * (limits.MAX_NEW_MESSAGES + 1)
    response = await client.post("/conversations/many/messages", json={"messages": messages})
    await assert_refused(response, 422, "messages", str(limits.MAX_NEW_MESSAGES))
    assert gateway.calls == 0
    assert await stored_keys(redis) == []


async def test_the_most_new_messages_allowed_are_stored(
    client: httpx.AsyncClient, gateway: FakeGateway
) -> None:
    messages = [{"role": "user", "content": f"m{i}"} for i in range(limits.MAX_NEW_MESSAGES)]
    response = await client.post("/conversations/most/messages", json={"messages": messages})
    assert response.status_code == 200, response.text
    assert response.json()["conversation"]["message_count"] == limits.MAX_NEW_MESSAGES + 1


async def test_commit_script_takes_thousands_of_messages(
    redis: Redis, open_store: OpenStore
) -> None:
    """No `unpack` of every ARGV at once: Lua's C stack holds about 8,000."""
    store = open_store(redis, ttl_seconds=60)
    ref = ConversationRef("t", "big")
    started = await store.begin_turn(
        ref,
        lock_value="lock",
        lease_ms=10_000,
        default_budget=1000,
        budget_scale=1.0,
        max_messages=10,
        idempotency=None,
    )
    assert not isinstance(started, type(None))
    now = time.time()
    messages = [
        Message(tokens=1, seq=i + 1, role=Role.USER, content="x", created_at=now)
        for i in range(9000)
    ]
    outcome = await store.commit_turn(
        ref,
        lock_value="lock",
        expected_length=0,
        messages=messages,
        meta_updates={},
        usage=Usage(1, 0, 0, 1),
        record=None,
        model="m",
        factor=None,
    )
    assert outcome == "ok"
    assert await redis.llen(ref.key("log")) == 9000


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"system": "s" * (limits.MAX_SYSTEM_CHARS + 1)}, "system"),
        ({"token_budget": 200_001}, "MAX_TOKEN_BUDGET"),
        ({"ttl_seconds": 0}, "MAX_CONVERSATION_TTL_SECONDS"),
        ({"ttl_seconds": 90 * 24 * 3600 + 1}, "MAX_CONVERSATION_TTL_SECONDS"),
    ],
    ids=["system", "budget", "never expire", "ttl over the cap"],
)
async def test_settings_over_the_caps_are_422(
    client: httpx.AsyncClient, redis: Redis, body: dict[str, Any], needle: str
) -> None:
    response = await client.put("/conversations/caps", json=body)
    await assert_refused(response, 422, needle)
    assert await stored_keys(redis) == []


async def test_a_long_system_prompt_in_a_turn_is_422(
    client: httpx.AsyncClient, gateway: FakeGateway
) -> None:
    body = {**user("a"), "system": "s" * (limits.MAX_SYSTEM_CHARS + 1)}
    await assert_refused(await client.post("/conversations/c/messages", json=body), 422, "system")
    assert gateway.calls == 0


async def test_never_expiring_conversations_need_the_operator(
    redis_url: str, redis: Redis, gateway: FakeGateway
) -> None:
    settings = make_settings(redis_url, max_conversation_ttl_seconds=0)
    async with serve(settings, gateway) as client:
        assert (await client.put("/conversations/keep", json={"ttl_seconds": 0})).is_success
        await client.post("/conversations/keep/messages", json=user("a"))
    assert await redis.ttl("conv:{acme:keep}:log") == -1
    assert await redis.ttl("conv:{acme}:index") == -1


def test_default_settings_must_fit_their_caps(redis_url: str) -> None:
    with pytest.raises(ValueError, match="TOKEN_BUDGET"):
        make_settings(redis_url, token_budget=300_000)
    with pytest.raises(ValueError, match="CONVERSATION_TTL_SECONDS"):
        make_settings(redis_url, conversation_ttl_seconds=0, max_conversation_ttl_seconds=86_400)
    with pytest.raises(ValueError, match="CONVERSATION_TTL_SECONDS"):
        make_settings(
            redis_url, conversation_ttl_seconds=86_401, max_conversation_ttl_seconds=86_400
        )
    assert make_settings(redis_url, conversation_ttl_seconds=0, max_conversation_ttl_seconds=0)


@pytest.mark.parametrize(
    ("ttl", "cap"), [(0, 0), (365 * 24 * 3600, 365 * 24 * 3600), (3600, 90 * 24 * 3600)]
)
def test_the_default_cap_follows_conversation_ttl_seconds(
    monkeypatch: pytest.MonkeyPatch, ttl: int, cap: int
) -> None:
    """The contract's CONVERSATION_TTL_SECONDS alone (0 = never, or longer than the default cap)
    starts the service: an unset MAX_CONVERSATION_TTL_SECONDS takes it; a shorter one leaves the
    default cap."""
    monkeypatch.setenv("CONVERSATION_TTL_SECONDS", str(ttl))
    settings = Settings(_env_file=None)
    assert (settings.conversation_ttl_seconds, settings.max_conversation_ttl_seconds) == (ttl, cap)


async def test_conversation_ttl_zero_alone_keeps_conversations(
    redis_url: str, redis: Redis, gateway: FakeGateway
) -> None:
    async with serve(make_settings(redis_url, conversation_ttl_seconds=0), gateway) as client:
        assert (await client.post("/conversations/keep/messages", json=user("a"))).is_success
        assert (await client.put("/conversations/keep", json={"ttl_seconds": 0})).is_success
    assert await redis.ttl("conv:{acme:keep}:log") == -1
    assert await redis.ttl("conv:{acme}:index") == -1


# ---- 9.8: only documented gateway parameters ------------------------------------------------


@pytest.mark.parametrize("field", ["api_base", "base_url", "api_key", "extra_headers", "user"])
async def test_unknown_fields_are_422_naming_them(
    client: httpx.AsyncClient, gateway: FakeGateway, redis: Redis, field: str
) -> None:
    response = await client.post("/conversations/c/messages", json={**user("a"), field: "x"})
    await assert_refused(response, 422, field, "GATEWAY_EXTRA_PARAMS")
    assert gateway.calls == 0
    assert await stored_keys(redis) == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("transcript_id", 7),
        ("model_region", ["global"]),
        ("fallback_config", "retry"),
        ("post_processing_steps", "x"),
        ("stream_options", True),
        ("fallbacks", [1]),
    ],
)
async def test_documented_parameters_are_type_checked(
    client: httpx.AsyncClient, gateway: FakeGateway, field: str, value: Any
) -> None:
    response = await client.post("/conversations/c/messages", json={**user("a"), field: value})
    await assert_refused(response, 422, field)
    assert gateway.calls == 0


async def test_documented_and_operator_allowed_parameters_are_forwarded(
    redis_url: str, redis: Redis, gateway: FakeGateway
) -> None:
    settings = make_settings(redis_url, gateway_extra_params="seed, user")
    documented = {
        "transcript_id": "t-1",
        "model_region": "global",
        "fallbacks": [{"model": "gpt-5"}],
        "fallback_config": {"retry": False},
        "post_processing_steps": [{"type": "x"}],
        "stream_options": {"include_usage": True},
    }
    async with serve(settings, gateway) as client:
        body = {**user("a"), **documented, "seed": 7, "user": "u-1"}
        response = await client.post("/conversations/p/messages", json=body)
        assert response.status_code == 200, response.text
        refused = await client.post("/conversations/p/messages", json={**user("b"), "api_key": 1})
        await assert_refused(refused, 422, "api_key")
    sent = gateway.received[0]
    assert {k: sent[k] for k in documented} == documented
    assert (sent["seed"], sent["user"]) == (7, "u-1")


# ---- 9.10: CORS on every answer -------------------------------------------------------------


async def test_middleware_answers_carry_cors_headers(
    redis_url: str, redis: Redis, gateway: FakeGateway
) -> None:
    origin = "https://app.example"
    settings = make_settings(redis_url, cors_origins=origin)
    async with serve(settings, gateway) as client:
        too_large = await client.post(
            "/conversations/c/messages",
            content=b"x" * (1024 * 1024 + 1),
            headers={"Origin": origin, "Content-Type": "application/json"},
        )
        not_json = await client.post(
            "/conversations/c/messages",
            content=b"a=b",
            headers={"Origin": origin, "Content-Type": "application/x-www-form-urlencoded"},
        )
        await redis.hset("conv:{acme:bad}:meta", mapping={"created_at": "1", "metadata": "{"})
        failed = await client.get("/conversations/bad", headers={"Origin": origin})
        other = await client.post(
            "/conversations/c/messages", content=b"a=b", headers={"Origin": "https://evil.example"}
        )
    for response, status in ((too_large, 413), (not_json, 415), (failed, 500)):
        assert response.status_code == status
        assert response.headers["access-control-allow-origin"] == origin
        assert "X-Request-ID" in response.headers["access-control-expose-headers"]
    assert "access-control-allow-origin" not in other.headers


# ---- 17.1 and 17.2: the tenant index --------------------------------------------------------


async def test_a_failed_index_write_does_not_fail_a_committed_turn(
    client: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    await redis.set("conv:{acme}:index", "not a sorted set")  # every index write now fails
    response = await client.post("/conversations/i/messages", json=user("a"))
    assert response.status_code == 200, response.text
    assert await redis.llen("conv:{acme:i}:log") == 2
    assert (await client.put("/conversations/j", json={"system": "s"})).status_code == 201
    assert (await client.delete("/conversations/j")).status_code == 204


async def test_on_a_cluster_a_failed_index_write_is_counted_not_raised(
    redis: Redis, open_store: OpenStore
) -> None:
    """The Cluster path writes the index beside the script; here it meets a key of another type."""
    store = open_store(redis, cluster=True, ttl_seconds=60)
    ref = ConversationRef("t", "c")
    await redis.set(ref.index_key, "not a sorted set")
    before = metric("convproxy_index_write_failures_total")
    assert await store.upsert(ref, set_fields={"system": "s"}, clear_fields=[])
    await store.begin_turn(
        ref,
        lock_value="lock",
        lease_ms=10_000,
        default_budget=1000,
        budget_scale=1.0,
        max_messages=10,
        idempotency=None,
    )
    message = Message(tokens=1, seq=1, role=Role.USER, content="x", created_at=time.time())
    outcome = await store.commit_turn(
        ref,
        lock_value="lock",
        expected_length=0,
        messages=[message],
        meta_updates={},
        usage=Usage(1, 0, 0, 1),
        record=None,
        model="m",
        factor=None,
    )
    assert outcome == "ok"
    assert metric("convproxy_index_write_failures_total") == before + 2
    assert await store.delete(ref) is True


async def test_listing_skips_no_live_conversation_after_dropping_stale_entries(
    client: httpx.AsyncClient, redis: Redis
) -> None:
    for i in range(20):
        assert (await client.put(f"/conversations/live-{i:02}", json={})).status_code == 201
    now = time.time()
    # Ten entries newer than every live one whose conversations expired or vanished.
    await redis.zadd("conv:{acme}:index", {f"gone-{i}": now + 100 + i for i in range(10)})
    listed = (await client.get("/conversations?limit=20")).json()
    assert len(listed["conversations"]) == 20
    assert listed["next_cursor"] is None
    assert await redis.zcard("conv:{acme}:index") == 20


async def test_the_index_expires_and_forgets_what_outlived_every_ttl(
    client: httpx.AsyncClient, redis: Redis
) -> None:
    ancient = time.time() - 91 * 24 * 3600
    await redis.zadd("conv:{acme}:index", {"ancient": ancient})
    await client.post("/conversations/fresh/messages", json=user("a"))
    assert 0 < await redis.ttl("conv:{acme}:index") <= 90 * 24 * 3600
    assert await redis.zrange("conv:{acme}:index", 0, -1) == [b"fresh"]


async def test_a_turn_on_a_listed_conversation_moves_its_entry_and_slides_the_index(
    client: httpx.AsyncClient, redis: Redis
) -> None:
    """Stale entries are pruned when a conversation joins the index; every write still moves
    its entry and the index's expiry."""
    assert (await client.post("/conversations/old/messages", json=user("a"))).status_code == 200
    await redis.zadd("conv:{acme}:index", {"old": 1.0})
    await redis.expire("conv:{acme}:index", 5)
    before = time.time()
    assert (await client.post("/conversations/old/messages", json=user("b"))).status_code == 200
    assert await redis.ttl("conv:{acme}:index") > 5
    score = await redis.zscore("conv:{acme}:index", "old")
    assert score is not None
    assert score >= before


async def test_usage_totals_add_to_what_is_stored_and_created_at_stays(
    client: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    gateway.usage_shape = "anthropic"
    gateway.cached_share, gateway.written_share = 0.5, 0.25
    first = await client.post("/conversations/u/messages", json=user("one"))
    created = (await client.get("/conversations/u")).json()["created_at"]
    meta = ConversationRef("acme", "u").key("meta")
    await redis.hincrby(meta, "output_tokens", 1000)  # a total the turns below add to
    replies = [first] + [
        await client.post("/conversations/u/messages", json=user(f"q{i}")) for i in range(2)
    ]
    assert all(r.status_code == 200 for r in replies)
    sent = [read_usage(r.json()["usage"]) for r in replies]
    got = (await client.get("/conversations/u")).json()
    assert got["created_at"] == created
    assert got["usage"]["input_tokens"] == sum(u.prompt for u in sent)
    assert got["usage"]["output_tokens"] == 1000 + sum(u.output for u in sent)
    assert got["usage"]["uncached_input_tokens"] == sum(u.uncached for u in sent)
    assert got["usage"]["cache_read_input_tokens"] == sum(u.cache_read for u in sent) > 0
    assert got["usage"]["cache_creation_input_tokens"] == sum(u.cache_write for u in sent) > 0


# ---- 17 operations: what the metrics cover ---------------------------------------------------


async def test_a_failed_stream_is_timed_upstream(
    client: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    gateway.stream_fail_after_first = True
    before = metric("convproxy_upstream_request_duration_seconds_count")
    response = await client.post("/conversations/s/messages", json={**user("a"), "stream": True})
    assert "event: error" in response.text
    assert metric("convproxy_upstream_request_duration_seconds_count") == before + 1
    assert await redis.llen("conv:{acme:s}:log") == 0


async def test_a_lock_wait_that_times_out_is_observed(
    redis_url: str, redis: Redis, gateway: FakeGateway
) -> None:
    gateway.hold = asyncio.Event()
    settings = make_settings(redis_url, lock_wait_seconds=0.2)
    async with serve(settings, gateway) as client:
        first = asyncio.create_task(client.post("/conversations/l/messages", json=user("a")))
        await eventually(lambda: gateway.calls == 1, what="the first turn upstream")
        before = metric("convproxy_lock_wait_duration_seconds_count")
        second = await client.post("/conversations/l/messages", json=user("b"))
        assert second.status_code == 409
        assert metric("convproxy_lock_wait_duration_seconds_count") == before + 1
        assert metric("convproxy_lock_wait_duration_seconds_sum") > 0
        gateway.hold.set()
        assert (await first).status_code == 200


def test_cors_headers_for_middleware_answers() -> None:
    anyone = cors_headers(frozenset({"*"}), b"https://a.example")
    assert (b"access-control-allow-origin", b"*") in anyone
    assert cors_headers(frozenset({"https://a.example"}), None) == []
    assert cors_headers(frozenset(), b"https://a.example") == []


# ---- 9.14: the OpenAPI document --------------------------------------------------------------


async def test_openapi_describes_auth_answers_and_errors(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    assert document["components"]["securitySchemes"]["clientKey"]["scheme"] == "bearer"
    turn = document["paths"]["/conversations/{conversation_id}/messages"]["post"]
    assert turn["security"] == [{"clientKey": []}, {"endUserToken": []}]
    answer = turn["responses"]["200"]["content"]
    assert answer["application/json"]["schema"] == {"$ref": "#/components/schemas/TurnPublic"}
    assert "text/event-stream" in answer
    for status in ("400", "401", "408", "409", "413", "415", "422", "429", "502", "503", "504"):
        problem = turn["responses"][status]["content"]["application/problem+json"]
        assert problem["schema"] == {"$ref": "#/components/schemas/Problem"}
    body = document["components"]["schemas"]["TurnCreate"]
    assert body["oneOf"] == [{"required": ["message"]}, {"required": ["messages"]}]
    assert body["additionalProperties"] is False
    roles = [s["properties"]["role"]["const"] for s in body["properties"]["message"]["oneOf"]]
    assert roles == ["user", "tool"]
    assert "HTTPValidationError" not in document["components"]["schemas"]
    health = document["paths"]["/healthz"]["get"]
    assert "security" not in health
    put = document["paths"]["/conversations/{conversation_id}"]["put"]
    assert "get_conversation" in put["responses"]["201"]["links"]
    update = document["components"]["schemas"]["ConversationUpdate"]["properties"]
    assert update["token_budget"]["anyOf"][0]["maximum"] == 200_000
