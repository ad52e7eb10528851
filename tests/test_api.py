"""The HTTP API end to end over ASGI: real Redis, stand-in gateway."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from redis.asyncio import Redis

from service.app import create_app
from service.config import Settings
from tests.conftest import (
    CLIENT_KEY,
    GATEWAY_KEY,
    OTHER_KEY,
    free_port,
    make_settings,
    serve,
    with_gateway,
)
from tests.fake_gateway import Failure, FakeGateway, serve_in_process

PROBLEM = "application/problem+json"


def user(text: str) -> dict[str, Any]:
    return {"message": {"role": "user", "content": text}}


async def stored_keys(redis: Redis) -> list[bytes]:
    keys: list[Any] = await redis.keys("*")
    return [k for k in keys if not k.startswith(b"conv:calibration")]


async def test_two_turn_flow_sends_the_whole_history(
    client: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    first = await client.post(
        "/conversations/trip-1/messages",
        json=user("What is the capital of France?"),
        headers={"X-Request-ID": "req-123"},
    )
    assert first.status_code == 200
    assert first.headers["x-request-id"] == "req-123"
    second = await client.post(
        "/conversations/trip-1/messages", json=user("What's the population?")
    )
    assert second.status_code == 200
    body = second.json()
    assert body["choices"][0]["message"]["content"] == "reply to: What's the population?"
    assert body["conversation"]["id"] == "trip-1"
    assert body["conversation"]["message_count"] == 4
    assert body["conversation"]["context"]["messages"] == 3
    assert body["conversation"]["context"]["dropped_messages"] == 0
    assert body["conversation"]["context"]["token_budget"] == 4000
    sent = gateway.received[1]["messages"]
    assert sent == [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "reply to: What is the capital of France?"},
        {"role": "user", "content": "What's the population?"},
    ]
    assert gateway.received[1]["model"] == "claude-sonnet-4-6"
    assert gateway.received_headers[0]["authorization"] == GATEWAY_KEY  # raw key, no Bearer
    assert gateway.received_headers[0]["x-request-id"] == "req-123"
    assert GATEWAY_KEY not in first.text + second.text
    log: list[Any] = await redis.lrange("conv:{acme:trip-1}:log", 0, -1)
    assert [m.count(b'"seq"') for m in log] == [1, 1, 1, 1]
    page = (await client.get("/conversations/trip-1/messages")).json()
    assert [(m["seq"], m["role"]) for m in page["messages"]] == [
        (1, "user"),
        (2, "assistant"),
        (3, "user"),
        (4, "assistant"),
    ]
    assert page["has_more"] is False
    assert "tool_calls" not in page["messages"][0]
    assert (
        page["messages"][0]["created_at"].endswith("Z")
        or "+00:00" in page["messages"][0]["created_at"]
    )


BAD_INPUTS: list[tuple[str, str, bytes | None, dict[str, Any] | None, int]] = [
    ("malformed json", "/conversations/c/messages", b'{"message": ', None, 400),
    ("not an object", "/conversations/c/messages", None, [], 422),  # type: ignore[list-item]
    ("neither message nor messages", "/conversations/c/messages", None, {"model": "x"}, 422),
    (
        "both",
        "/conversations/c/messages",
        None,
        {
            "message": {"role": "user", "content": "a"},
            "messages": [{"role": "user", "content": "b"}],
        },
        422,
    ),
    ("empty messages", "/conversations/c/messages", None, {"messages": []}, 422),
    (
        "unknown role",
        "/conversations/c/messages",
        None,
        {"message": {"role": "wizard", "content": "a"}},
        422,
    ),
    (
        "system role as a message",
        "/conversations/c/messages",
        None,
        {"message": {"role": "system", "content": "a"}},
        422,
    ),
    (
        "content of the wrong type",
        "/conversations/c/messages",
        None,
        {"message": {"role": "user", "content": 42}},
        422,
    ),
    ("user without content", "/conversations/c/messages", None, {"message": {"role": "user"}}, 422),
    (
        "tool without tool_call_id",
        "/conversations/c/messages",
        None,
        {"message": {"role": "tool", "content": "42"}},
        422,
    ),
    (
        "last message from the assistant",
        "/conversations/c/messages",
        None,
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        422,
    ),
    (
        "unknown message field",
        "/conversations/c/messages",
        None,
        {"message": {"role": "user", "content": "a", "colour": "red"}},
        422,
    ),
    (
        "max_tokens as a string",
        "/conversations/c/messages",
        None,
        {**user("a"), "max_tokens": "100"},
        422,
    ),
    (
        "temperature as a string",
        "/conversations/c/messages",
        None,
        {**user("a"), "temperature": "hot"},
        422,
    ),
    ("stream as a string", "/conversations/c/messages", None, {**user("a"), "stream": "yes"}, 422),
    ("stop as a number", "/conversations/c/messages", None, {**user("a"), "stop": 3}, 422),
    ("tools not a list", "/conversations/c/messages", None, {**user("a"), "tools": "all"}, 422),
    ("model empty", "/conversations/c/messages", None, {**user("a"), "model": ""}, 422),
    (
        "text part without text",
        "/conversations/c/messages",
        None,
        {"message": {"role": "user", "content": [{"type": "text"}]}},
        422,
    ),
    (
        "tool_call_id on a user message",
        "/conversations/c/messages",
        None,
        {"message": {"role": "user", "content": "a", "tool_call_id": "x"}},
        422,
    ),
    (
        "tool_calls on a user message",
        "/conversations/c/messages",
        None,
        {"message": {"role": "user", "content": "a", "tool_calls": []}},
        422,
    ),
    (
        "assistant with neither content nor tool_calls",
        "/conversations/c/messages",
        None,
        {"messages": [{"role": "assistant"}, {"role": "user", "content": "a"}]},
        422,
    ),
    (
        "tool call without a function",
        "/conversations/c/messages",
        None,
        {
            "messages": [
                {"role": "assistant", "tool_calls": [{"id": "c1"}]},
                {"role": "tool", "tool_call_id": "c1", "content": "x"},
            ]
        },
        422,
    ),
    (
        "a lone surrogate in the content",
        "/conversations/c/messages",
        b'{"message": {"role": "user", "content": "\\ud800"}}',
        None,
        422,
    ),
    (
        "a lone surrogate in an extra parameter",
        "/conversations/c/messages",
        b'{"message": {"role": "user", "content": "a"}, "user": "\\udfff"}',
        None,
        422,
    ),
    (
        "a lone surrogate in a regenerate's system prompt",
        "/conversations/c/regenerate",
        b'{"system": "\\ud800"}',
        None,
        422,
    ),
    ("body that is not UTF-8", "/conversations/c/messages", b"\xff\xfe{", None, 400),
    ("bad id character", "/conversations/bad!id/messages", None, user("a"), 422),
    ("id starting with a dot", "/conversations/.hidden/messages", None, user("a"), 422),
    ("id too long", "/conversations/" + "a" * 129 + "/messages", None, user("a"), 422),
    (
        "oversized body",
        "/conversations/c/messages",
        b'{"message": {"role": "user", "content": "' + b"x" * (1024 * 1024) + b'"}}',
        None,
        413,
    ),
]


@pytest.mark.parametrize(
    ("path", "raw", "payload", "status"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
async def test_bad_input_is_a_problem_and_changes_nothing(
    client: httpx.AsyncClient,
    gateway: FakeGateway,
    redis: Redis,
    path: str,
    raw: bytes | None,
    payload: Any,
    status: int,
) -> None:
    if raw is not None:
        response = await client.post(
            path, content=raw, headers={"Content-Type": "application/json"}
        )
    else:
        response = await client.post(path, json=payload)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["status"] == status
    assert {"type", "title", "status", "detail"} <= problem.keys()
    assert "Traceback" not in response.text
    assert "x-request-id" in response.headers
    assert gateway.calls == 0
    assert await stored_keys(redis) == []


async def test_chunked_body_over_the_limit_is_413(client: httpx.AsyncClient, redis: Redis) -> None:
    async def body() -> Any:
        for _ in range(20):
            yield b"x" * 100_000

    response = await client.post("/conversations/c/messages", content=body())
    assert response.status_code == 413
    assert response.headers["content-type"] == PROBLEM
    assert await stored_keys(redis) == []


async def test_unknown_routes_and_methods_are_problems(client: httpx.AsyncClient) -> None:
    missing = await client.get("/nope")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == PROBLEM
    wrong = await client.patch("/conversations/c")
    assert wrong.status_code == 405
    assert wrong.headers["content-type"] == PROBLEM


async def test_auth(client: httpx.AsyncClient, gateway: FakeGateway, redis: Redis) -> None:
    none = await client.post(
        "/conversations/c/messages", json=user("a"), headers={"Authorization": ""}
    )
    assert none.status_code == 401
    assert none.headers["content-type"] == PROBLEM
    wrong = await client.get("/conversations", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    raw = await client.post(
        "/conversations/c/messages", json=user("a"), headers={"Authorization": CLIENT_KEY}
    )
    assert raw.status_code == 200
    assert gateway.calls == 1
    assert await redis.exists("conv:{acme:c}:log")


async def test_tenants_are_isolated(client: httpx.AsyncClient, gateway: FakeGateway) -> None:
    other = {"Authorization": f"Bearer {OTHER_KEY}"}
    assert (
        await client.post("/conversations/shared/messages", json=user("acme's"))
    ).status_code == 200
    assert (await client.get("/conversations/shared", headers=other)).status_code == 404
    assert (await client.get("/conversations/shared/messages", headers=other)).status_code == 404
    assert (await client.delete("/conversations/shared", headers=other)).status_code == 404
    assert (await client.get("/conversations", headers=other)).json()["conversations"] == []
    reply = await client.post("/conversations/shared/messages", json=user("beta's"), headers=other)
    assert reply.json()["conversation"]["message_count"] == 2
    assert [m["content"] for m in gateway.received[1]["messages"]] == ["beta's"]
    assert (await client.get("/conversations/shared")).json()["message_count"] == 2


async def test_a_cookie_the_gateway_sets_never_rides_on_a_later_call(settings: Settings) -> None:
    """The gateway's session serves every tenant: a cookie it (or its balancer) sets on one
    tenant's call must not be sent back on another's. (Named by host: aiohttp's jar keeps no
    cookies of an IP address, so the loopback address would hide the leak.)"""
    gateway = FakeGateway(reply_headers={"Set-Cookie": "AWSALB=acme-sticky; Path=/"})
    async with serve_in_process(gateway) as url:
        app = create_app(with_gateway(settings, url.replace("127.0.0.1", "localhost")))
        async with (
            LifespanManager(app) as manager,
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=manager.app), base_url="http://test"
            ) as http,
        ):
            for key, conversation in ((CLIENT_KEY, "a"), (OTHER_KEY, "b"), (CLIENT_KEY, "a")):
                answer = await http.post(
                    f"/conversations/{conversation}/messages",
                    json=user(conversation),
                    headers={"Authorization": f"Bearer {key}"},
                )
                assert answer.status_code == 200
                assert "acme-sticky" not in answer.text
    assert len(gateway.received_headers) == 3
    assert [h.get("cookie") for h in gateway.received_headers] == [None, None, None]


async def test_pass_through_mode_forwards_the_callers_key(
    redis_url: str, redis: Redis, gateway: FakeGateway
) -> None:
    async with serve(
        make_settings(redis_url, api_keys=None, gateway_api_key=None), gateway, key=None
    ) as http:
        mine = await http.post(
            "/conversations/p/messages",
            json=user("hi"),
            headers={"Authorization": "Bearer user-own-gateway-key"},
        )
        assert mine.status_code == 200
        assert gateway.received_headers[0]["authorization"] == "user-own-gateway-key"
        theirs = await http.get("/conversations/p", headers={"Authorization": "other-key"})
        assert theirs.status_code == 404
        assert (
            await http.get("/conversations/p", headers={"Authorization": ""})
        ).status_code == 401
    keys = await stored_keys(redis)
    assert keys
    assert all(b"user-own-gateway-key" not in k for k in keys)


async def test_conversation_settings_lifecycle(
    client: httpx.AsyncClient, gateway: FakeGateway
) -> None:
    created = await client.put(
        "/conversations/s1",
        json={
            "system": "Be brief.",
            "model": "gpt-4.1",
            "token_budget": 3000,
            "ttl_seconds": 60,
            "metadata": {"user": "u1"},
        },
    )
    assert created.status_code == 201
    assert created.json()["message_count"] == 0
    updated = await client.put("/conversations/s1", json={"metadata": {"user": "u2"}})
    assert updated.status_code == 200
    got = (await client.get("/conversations/s1")).json()
    assert got["system"] == "Be brief."
    assert got["model"] == "gpt-4.1"
    assert got["token_budget"] == 3000
    assert got["ttl_seconds"] == 60
    assert got["metadata"] == {"user": "u2"}
    turn = await client.post("/conversations/s1/messages", json=user("hi"))
    assert turn.status_code == 200
    assert turn.json()["conversation"]["context"]["token_budget"] == 3000
    assert gateway.received[0]["model"] == "gpt-4.1"
    assert gateway.received[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    usage = (await client.get("/conversations/s1")).json()["usage"]
    assert usage["input_tokens"] > 0
    assert usage["output_tokens"] > 0
    cleared = await client.put("/conversations/s1", json={"system": None})
    assert cleared.json()["system"] is None
    bad = await client.put("/conversations/s1", json={"token_budget": "big"})
    assert bad.status_code == 422
    assert (await client.delete("/conversations/s1")).status_code == 204
    assert (await client.get("/conversations/s1")).status_code == 404
    assert (await client.get("/conversations/s1/messages")).status_code == 404
    assert (await client.delete("/conversations/s1")).status_code == 404
    again = await client.post("/conversations/s1/messages", json=user("fresh"))
    assert again.json()["conversation"]["message_count"] == 2
    assert gateway.received[-1]["messages"] == [{"role": "user", "content": "fresh"}]


async def test_ttl_is_set_and_slides(client: httpx.AsyncClient, redis: Redis) -> None:
    await client.post("/conversations/t1/messages", json=user("a"))
    assert 0 < await redis.ttl("conv:{acme:t1}:log") <= 30 * 24 * 3600
    await client.put("/conversations/t1", json={"ttl_seconds": 120})
    await client.post("/conversations/t1/messages", json=user("b"))
    assert 0 < await redis.ttl("conv:{acme:t1}:log") <= 120
    assert 0 < await redis.ttl("conv:{acme:t1}:meta") <= 120


async def test_message_pagination(client: httpx.AsyncClient) -> None:
    for i in range(5):
        await client.post("/conversations/p1/messages", json=user(f"q{i}"))
    newest = (await client.get("/conversations/p1/messages?limit=4")).json()
    assert [m["seq"] for m in newest["messages"]] == [7, 8, 9, 10]
    assert newest["has_more"] is True
    older = (await client.get("/conversations/p1/messages?limit=4&before=7")).json()
    assert [m["seq"] for m in older["messages"]] == [3, 4, 5, 6]
    oldest = (await client.get("/conversations/p1/messages?limit=4&before=3")).json()
    assert [m["seq"] for m in oldest["messages"]] == [1, 2]
    assert oldest["has_more"] is False
    assert (await client.get("/conversations/p1/messages?limit=0")).status_code == 422
    assert (await client.get("/conversations/missing/messages")).status_code == 404


async def test_listing_newest_activity_first(client: httpx.AsyncClient) -> None:
    for name in ("a", "b", "c", "d", "e"):
        await client.post(f"/conversations/{name}/messages", json=user(name))
    await client.post("/conversations/b/messages", json=user("again"))
    first = (await client.get("/conversations?limit=2")).json()
    assert [c["id"] for c in first["conversations"]] == ["b", "e"]
    assert first["conversations"][0]["message_count"] == 4
    second = (await client.get(f"/conversations?limit=2&cursor={first['next_cursor']}")).json()
    assert [c["id"] for c in second["conversations"]] == ["d", "c"]
    third = (await client.get(f"/conversations?limit=2&cursor={second['next_cursor']}")).json()
    assert [c["id"] for c in third["conversations"]] == ["a"]
    assert third["next_cursor"] is None
    await client.delete("/conversations/e")
    listed = (await client.get("/conversations")).json()
    assert [c["id"] for c in listed["conversations"]] == ["b", "d", "c", "a"]
    assert (await client.get("/conversations?cursor=!!!")).status_code == 422


async def test_operations_routes(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).status_code == 200
    await client.post("/conversations/m/messages", json=user("x"))
    metrics = (await client.get("/metrics")).text
    assert (
        'convproxy_requests_total{method="POST",route="/conversations/{conversation_id}/messages",status="200"}'
        in metrics
    )
    assert "convproxy_upstream_request_duration_seconds_bucket" in metrics
    assert 'convproxy_tokens_total{direction="input"}' in metrics
    assert "convproxy_dropped_messages_total" in metrics
    assert (await client.get("/openapi.json")).json()["info"]["title"] == "conversation-proxy"
    assert (await client.get("/docs")).status_code == 200


async def test_readyz_fails_without_redis(redis_url: str, gateway: FakeGateway) -> None:
    async with serve(
        make_settings(f"redis://127.0.0.1:{free_port()}/0", redis_pool_timeout_seconds=1), gateway
    ) as http:
        ready = await http.get("/readyz")
        assert ready.status_code == 503
        assert ready.headers["content-type"] == PROBLEM
        turn = await http.post("/conversations/x/messages", json=user("a"))
        assert turn.status_code == 503
        assert "retry-after" in turn.headers
        assert gateway.calls == 0


@pytest.mark.parametrize(
    ("failure", "status", "detail_has"),
    [
        (
            Failure(
                400,
                {
                    "error": {
                        "code": 400,
                        "message": "invalid request body",
                        "metadata": {"errors": ["model 'nope' is not supported"]},
                    }
                },
            ),
            400,
            "model 'nope' is not supported",
        ),
        (
            Failure(404, {"error": "model not found", "status": "error", "request_id": "r"}),
            422,  # not 404: that is "no such conversation" here
            "model not found",
        ),
        (
            Failure(
                422, {"code": 422, "message": "bad field", "metadata": {"errors": ["max_tokens"]}}
            ),
            422,
            "max_tokens",
        ),
        (Failure(401, {"error": {"message": "bad key"}}), 502, "rejected the service's key"),
    ],
)
async def test_gateway_client_errors_keep_their_status(
    client: httpx.AsyncClient,
    gateway: FakeGateway,
    redis: Redis,
    failure: Failure,
    status: int,
    detail_has: str,
) -> None:
    gateway.failures = [failure]
    response = await client.post("/conversations/g/messages", json=user("a"))
    assert response.status_code == status
    assert response.headers["content-type"] == PROBLEM
    assert detail_has in response.json()["detail"]
    assert gateway.calls == 1  # never retried
    assert await stored_keys(redis) == []
    assert GATEWAY_KEY not in response.text


async def test_gateway_5xx_is_retried_then_502(
    client: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    gateway.failures = [Failure(503, {"error": "busy"}, {"retry-after": "0"})] * 3
    response = await client.post("/conversations/g/messages", json=user("a"))
    assert response.status_code == 502
    assert gateway.calls == 3  # one try and GATEWAY_MAX_RETRIES=2 retries
    assert await stored_keys(redis) == []
    retried = await client.post("/conversations/g/messages", json=user("a"))
    assert retried.status_code == 200  # the lock was released, the turn can simply be retried


async def test_gateway_recovers_within_retries(
    client: httpx.AsyncClient, gateway: FakeGateway
) -> None:
    gateway.failures = [
        Failure(503, {"error": "oops"}, {"retry-after": "0"}),
        Failure(429, {"error": "slow down"}, {"retry-after": "0"}),
    ]
    response = await client.post("/conversations/g/messages", json=user("a"))
    assert response.status_code == 200
    assert gateway.calls == 3


async def test_rate_limit_passes_retry_after(
    client: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    gateway.failures = [
        Failure(
            429,
            {"error": "rate limited"},
            {"retry-after": "42", "X-RateLimit-Remaining": "0", "X-RateLimit-Limit": "30"},
        )
    ]
    response = await client.post("/conversations/g/messages", json=user("a"))
    assert response.status_code == 429
    assert response.headers["retry-after"] == "42"  # over the cap: not waited for, passed on
    assert response.headers["x-ratelimit-limit"] == "30"
    assert gateway.calls == 1
    assert await stored_keys(redis) == []


async def test_invalid_completion_is_502(
    client: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    gateway.failures = [Failure(200, {"choices": []})]
    response = await client.post("/conversations/g/messages", json=user("a"))
    assert response.status_code == 502
    assert await stored_keys(redis) == []


async def test_tool_calls_and_usage_naming_variants(
    client: httpx.AsyncClient, gateway: FakeGateway
) -> None:
    calls = [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        },
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]
    gateway.tool_calls = calls
    gateway.old_tool_calls_shape = True
    gateway.prompt_tokens_naming = True
    first = await client.post("/conversations/tools/messages", json=user("Weather and time?"))
    assert first.status_code == 200
    gateway.tool_calls = None
    results = {
        "messages": [
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
        ]
    }
    second = await client.post("/conversations/tools/messages", json=results)
    assert second.status_code == 200
    sent = gateway.received[1]["messages"]
    assert sent[1] == {"role": "assistant", "content": None, "tool_calls": calls}
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "tool"]
    stored = (await client.get("/conversations/tools/messages")).json()["messages"]
    assert stored[1]["tool_calls"] == calls
    assert stored[2]["tool_call_id"] == "call_1"
    usage = (await client.get("/conversations/tools")).json()["usage"]
    assert usage["input_tokens"] > 0


async def test_new_messages_over_budget_are_413(
    client: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    response = await client.post("/conversations/big/messages", json=user("word " * 5000))
    assert response.status_code == 413
    assert response.headers["content-type"] == PROBLEM
    assert gateway.calls == 0
    assert await stored_keys(redis) == []
    assert (await client.post("/conversations/big/messages", json=user("small"))).status_code == 200


async def test_forwarded_parameters(client: httpx.AsyncClient, gateway: FakeGateway) -> None:
    response = await client.post(
        "/conversations/p/messages",
        json={
            **user("a"),
            "model": "gpt-5",
            "max_tokens": 50,
            "temperature": 0.2,
            "top_p": 1,
            "stop": ["\n"],
            "response_format": {"type": "json_schema"},
            "fallbacks": ["x"],
            "system": "You are terse.",
        },
    )
    assert response.status_code == 200
    sent = gateway.received[0]
    assert sent["model"] == "gpt-5"
    assert sent["max_tokens"] == 50
    assert sent["temperature"] == 0.2
    assert sent["top_p"] == 1
    assert sent["stop"] == ["\n"]
    assert sent["fallbacks"] == ["x"]
    assert sent["response_format"] == {"type": "json_schema"}
    assert sent["messages"][0] == {"role": "system", "content": "You are terse."}
    assert "system" not in sent
    assert "stream" not in sent
    meta = (await client.get("/conversations/p")).json()
    assert meta["system"] == "You are terse."
    assert meta["model"] == "gpt-5"


async def test_metadata_over_the_limit_is_422(client: httpx.AsyncClient, redis: Redis) -> None:
    response = await client.put("/conversations/m", json={"metadata": {"blob": "x" * 20_000}})
    assert response.status_code == 422
    assert await stored_keys(redis) == []


async def test_corrupt_stored_data_is_a_500_problem(
    client: httpx.AsyncClient, redis: Redis
) -> None:
    await redis.hset("conv:{acme:bad}:meta", mapping={"created_at": "1", "metadata": "{not json"})
    response = await client.get("/conversations/bad", headers={"X-Request-ID": "corrupt-1"})
    assert response.status_code == 500
    assert response.headers["content-type"] == PROBLEM
    assert response.headers["x-request-id"] == "corrupt-1"
    assert "Traceback" not in response.text


async def test_an_idempotency_key_too_long_is_422(client: httpx.AsyncClient, redis: Redis) -> None:
    response = await client.post(
        "/conversations/c/messages", json=user("a"), headers={"Idempotency-Key": "k" * 300}
    )
    assert response.status_code == 422
    assert response.headers["content-type"] == PROBLEM
    assert await stored_keys(redis) == []


async def test_surrogates_in_settings_are_422(client: httpx.AsyncClient, redis: Redis) -> None:
    for body in (b'{"system": "\\ud800"}', b'{"metadata": {"a": "\\ud800"}}'):
        response = await client.put(
            "/conversations/s", content=body, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 422
        assert response.headers["content-type"] == PROBLEM
    assert await stored_keys(redis) == []


async def test_a_body_that_is_not_json_is_415(client: httpx.AsyncClient, redis: Redis) -> None:
    response = await client.post(
        "/conversations/c/messages",
        content=b'{"message": {"role": "user", "content": "a"}}',
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 415
    assert response.headers["content-type"] == PROBLEM
    assert "x-request-id" in response.headers
    assert await stored_keys(redis) == []
    untyped = await client.post(
        "/conversations/c/messages", content=b'{"message": {"role": "user", "content": "a"}}'
    )
    assert untyped.status_code == 200  # no Content-Type at all is read as JSON


async def test_405_lists_every_method_of_the_path(client: httpx.AsyncClient) -> None:
    response = await client.patch("/conversations/x")
    assert response.status_code == 405
    assert set(response.headers["allow"].split(", ")) == {"GET", "PUT", "DELETE"}
    messages = await client.patch("/conversations/x/messages")
    assert set(messages.headers["allow"].split(", ")) == {"GET", "POST", "DELETE"}


async def test_a_forged_cursor_is_422(client: httpx.AsyncClient) -> None:
    for cursor in ("nan~a", "inf~a", "x", "1.5~", "1.5~.hidden", "1e9~a"):
        response = await client.get("/conversations", params={"cursor": cursor})
        assert response.status_code == 422, cursor


async def test_client_request_ids_are_kept(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz", headers={"X-Request-ID": "trace/7f;span=2"})
    assert response.headers["x-request-id"] == "trace/7f;span=2"


async def test_cache_control_is_kept_for_later_turns(
    client: httpx.AsyncClient, gateway: FakeGateway
) -> None:
    marked = {"role": "user", "content": "long document", "cache_control": {"type": "ephemeral"}}
    await client.post("/conversations/cc/messages", json={"message": marked})
    await client.post("/conversations/cc/messages", json=user("and?"))
    assert gateway.received[1]["messages"][0] == marked


async def test_dead_pooled_connections_are_replaced_without_a_503(
    client: httpx.AsyncClient, redis: Redis
) -> None:
    assert (await client.post("/conversations/r/messages", json=user("a"))).status_code == 200
    await redis.client_kill_filter(_type="normal", skipme=True)  # as a Redis restart would
    after = await client.post("/conversations/r/messages", json=user("b"))
    assert after.status_code == 200
    assert after.json()["conversation"]["message_count"] == 4
