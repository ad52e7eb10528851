"""TENANT_RATE and END_USER_RATE: token buckets in the real Redis, shared across app instances,
exact under concurrency, refilling, and a refused request that stores and calls nothing."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import httpx
import pytest
from redis.asyncio import Redis

from service.rate_limits import Rate, RateTable, parse_rates
from tests.conftest import CLIENT_KEY, OTHER_KEY, serve
from tests.fake_gateway import FakeGateway
from tests.polling import eventually
from tests.test_end_users import bearer, end_user_settings, token, turn

TENANT = {"Authorization": f"Bearer {CLIENT_KEY}"}


async def statuses(http: httpx.AsyncClient, n: int, headers: dict[str, str]) -> list[int]:
    answers = await asyncio.gather(*(http.get("/conversations", headers=headers) for _ in range(n)))
    return sorted(a.status_code for a in answers)


async def test_twenty_parallel_calls_against_ten(
    redis_url: str, redis: Redis, gateway: FakeGateway
) -> None:
    settings = end_user_settings(redis_url, end_user_rate="10/minute")
    async with serve(settings, gateway, key=None) as http:
        assert await statuses(http, 20, bearer(token())) == [200] * 10 + [429] * 10
        refused = await http.get("/conversations", headers=bearer(token()))
        assert refused.status_code == 429
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["detail"] == "over END_USER_RATE (10 per 60 s); retry later"
        assert 1 <= int(refused.headers["retry-after"]) <= 6  # one token: a tenth of a minute
        assert refused.headers["ratelimit-limit"] == "10"
        assert refused.headers["ratelimit-remaining"] == "0"
        assert refused.headers["ratelimit-reset"] == refused.headers["retry-after"]
        assert refused.headers["ratelimit-policy"] == "10;w=60"
        # Another end user has a bucket of their own; the tenant's key is not an end user.
        other = bearer(token(sub="user-2", conv="user-2*"))
        assert await statuses(http, 3, other) == [200] * 3
        assert await statuses(http, 12, TENANT) == [200] * 12


async def test_buckets_refill(redis_url: str, redis: Redis, gateway: FakeGateway) -> None:
    settings = end_user_settings(redis_url, tenant_rate="2/second")
    async with serve(settings, gateway) as http:
        assert await statuses(http, 3, TENANT) == [200, 200, 429]

        async def allowed() -> bool:
            return (await http.get("/conversations")).status_code == 200

        await eventually(allowed, what="the tenant's bucket to refill", timeout=5.0)


async def test_a_refused_request_stores_and_calls_nothing(
    redis_url: str, redis: Redis, gateway: FakeGateway
) -> None:
    settings = end_user_settings(redis_url, end_user_rate="1/hour")
    async with serve(settings, gateway, key=None) as http:
        headers = bearer(token())
        assert (await http.get("/conversations", headers=headers)).status_code == 200
        for body in (turn(), turn(stream=True)):
            answer = await http.post("/conversations/user-1/messages", json=body, headers=headers)
            assert answer.status_code == 429
        put = await http.put("/conversations/user-1", json={"metadata": {}}, headers=headers)
        assert put.status_code == 429
    assert gateway.calls == 0
    assert await redis.keys("conv:{acme:user-1}*") == []


async def test_a_refusal_takes_nothing_from_the_other_bucket(
    redis_url: str, redis: Redis, gateway: FakeGateway
) -> None:
    settings = end_user_settings(redis_url, end_user_rate="2/minute", tenant_rate="5/minute")
    async with serve(settings, gateway, key=None) as http:
        assert await statuses(http, 4, bearer(token())) == [200, 200, 429, 429]
        # user-1's refusals left the tenant 3 requests, which user-2 may take.
        user_2 = bearer(token(sub="user-2", conv="user-2*"))
        assert await statuses(http, 2, user_2) == [200, 200]
        assert await statuses(http, 2, TENANT) == [200, 429]
        refused = await http.get("/conversations", headers=TENANT)
        assert refused.json()["detail"].startswith("over TENANT_RATE (5 per 60 s)")


async def test_limits_are_shared_by_replicas_and_set_per_tenant(
    redis_url: str, redis: Redis, gateway: FakeGateway
) -> None:
    settings = end_user_settings(redis_url, tenant_rate="10/minute,beta:3/minute")
    async with AsyncExitStack() as stack:
        one = await stack.enter_async_context(serve(settings, gateway))
        two = await stack.enter_async_context(serve(settings, gateway))
        both = await asyncio.gather(statuses(one, 6, TENANT), statuses(two, 6, TENANT))
        assert sorted(both[0] + both[1]) == [200] * 10 + [429] * 2
        beta = {"Authorization": f"Bearer {OTHER_KEY}"}
        assert await statuses(one, 4, beta) == [200, 200, 200, 429]


async def test_refusals_are_readable_from_another_origin(
    redis_url: str, redis: Redis, gateway: FakeGateway
) -> None:
    origin = "https://app.example"
    settings = end_user_settings(redis_url, end_user_rate="1/hour", cors_origins=origin)
    async with serve(settings, gateway, key=None) as http:
        headers = {**bearer(token()), "Origin": origin}
        await http.get("/conversations", headers=headers)
        refused = await http.get("/conversations", headers=headers)
        assert refused.status_code == 429
        assert refused.headers["access-control-allow-origin"] == origin
        exposed = refused.headers["access-control-expose-headers"]
        for name in ("Retry-After", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"):
            assert name in exposed


def test_rate_settings() -> None:
    table = parse_rates("20/minute, acme:100/hours,beta:1/second", "TENANT_RATE")
    assert table.for_tenant("acme") == Rate(100, 3600)
    assert table.for_tenant("beta") == Rate(1, 1)
    assert table.for_tenant("other") == Rate(20, 60)
    assert parse_rates("acme:5/day", "X").for_tenant("other") is None
    assert not RateTable().enabled
    for raw in ("20", "0/minute", "20/fortnight", "bad tenant!:1/second", "1/minute/2"):
        with pytest.raises(ValueError, match="TENANT_RATE"):
            parse_rates(raw, "TENANT_RATE")


def test_bad_rates_fail_at_start_up(redis_url: str) -> None:
    with pytest.raises(ValueError, match="END_USER_RATE"):
        end_user_settings(redis_url, end_user_rate="lots")
