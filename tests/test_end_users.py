"""End-user tokens: verification (the usual forgeries), what a token allows, minting, JWKS, and
that a token never reaches the gateway. Real Redis, the stand-in gateway, PyJWT to sign."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import httpx
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from redis.asyncio import Redis

from service.config import Settings
from service.end_user_auth import (
    JwksCache,
    conv_allows,
    looks_like_jwt,
    parse_jwks_urls,
    parse_secrets,
)
from service.errors import Unauthorized
from tests.conftest import CLIENT_KEY, GATEWAY_KEY, OTHER_KEY, free_port, make_settings, serve
from tests.fake_gateway import Failure, FakeGateway

ACME_SECRET = b"acme-end-user-secret-0123456789-abcdef"
BETA_SECRET = b"beta-end-user-secret-0123456789-abcdef"
MAX_SECONDS = 3600


def b64(secret: bytes) -> str:
    return base64.b64encode(secret).decode()


def end_user_settings(redis_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "end_user_jwt_secrets": f"acme:{b64(ACME_SECRET)},beta:{b64(BETA_SECRET)}",
        "end_user_token_max_seconds": MAX_SECONDS,
    }
    values.update(overrides)
    return make_settings(redis_url, **values)


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    values: dict[str, Any] = {
        "iss": "acme",
        "sub": "user-1",
        "conv": "user-1*",
        "scope": "read write",
        "iat": now,
        "exp": now + 600,
    }
    values.update(overrides)
    return {k: v for k, v in values.items() if v is not None}


def token(secret: bytes = ACME_SECRET, **overrides: Any) -> str:
    return jwt.encode(claims(**overrides), secret, algorithm="HS256")


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def turn(content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"message": {"role": "user", "content": content}, **extra}


async def stored_keys(redis: Redis, tenant: str, conversation_id: str) -> list[bytes | str]:
    keys: list[bytes | str] = await redis.keys(f"conv:{{{tenant}:{conversation_id}}}*")
    return keys


@pytest.fixture
async def app(
    redis_url: str, redis: Redis, gateway: FakeGateway
) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(end_user_settings(redis_url), gateway, key=None) as http:
        yield http


def _unsigned(payload: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(payload)}."


def _tampered() -> str:
    header, _, signature = token(conv="user-1").split(".")
    payload = base64.urlsafe_b64encode(json.dumps(claims(conv="user-2")).encode()).decode()
    return f"{header}.{payload.rstrip('=')}.{signature}"


FORGERIES: dict[str, Callable[[], str]] = {
    "alg none": lambda: _unsigned(claims()),
    "alg none, upper case": lambda: _unsigned(claims()).replace("none", "None", 1),
    "expired": lambda: token(exp=int(time.time()) - 120, iat=int(time.time()) - 600),
    "not yet valid": lambda: token(nbf=int(time.time()) + 600),
    "another tenant's secret": lambda: token(BETA_SECRET),
    "a foreign tenant": lambda: token(iss="gamma"),
    "no tenant": lambda: token(iss=None),
    "tampered payload": _tampered,
    "lifetime over the max": lambda: token(exp=int(time.time()) + MAX_SECONDS + 600),
    "lifetime over the max, no iat": lambda: token(
        iat=None, exp=int(time.time()) + MAX_SECONDS + 600
    ),
    "no exp": lambda: token(exp=None),
    "no sub": lambda: token(sub=None),
    "a scope that is not one": lambda: token(scope="admin"),
    "write without read": lambda: token(scope="write"),
    "a conv that is no id": lambda: token(conv="../x"),
    "max_tokens not a number": lambda: token(max_tokens="9"),
    "HS512, not pinned": lambda: jwt.encode(claims(), ACME_SECRET + ACME_SECRET, "HS512"),
    "garbage with dots": lambda: "a.b.c",
    "a payload that is not JSON": lambda: token().split(".")[0] + ".bm90IGpzb24.c2ln",
}


@pytest.mark.parametrize("name", FORGERIES)
async def test_forged_tokens_are_401_and_store_nothing(
    name: str, app: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    forged = FORGERIES[name]()
    answer = await app.post("/conversations/user-1/messages", json=turn(), headers=bearer(forged))
    assert answer.status_code == 401, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.headers["www-authenticate"].startswith("Bearer")
    assert forged not in answer.text
    assert gateway.calls == 0
    assert await stored_keys(redis, "acme", "user-1") == []
    assert await stored_keys(redis, "user-2", "user-1") == []


async def test_a_prefix_does_not_escape_to_another_users_ids(
    app: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    headers = bearer(token(conv="user-1*"))
    escaped = await app.post("/conversations/user-10/messages", json=turn(), headers=headers)
    assert escaped.status_code == 403, escaped.text
    assert escaped.json()["detail"] == "this token does not cover conversation 'user-10'"
    assert (await app.get("/conversations/user-10/messages", headers=headers)).status_code == 403
    assert gateway.calls == 0
    assert await stored_keys(redis, "acme", "user-10") == []
    covered = await app.post("/conversations/user-1:chat/messages", json=turn(), headers=headers)
    assert covered.status_code == 200, covered.text


@pytest.mark.parametrize(
    ("pattern", "conversation_id", "allowed"),
    [
        ("user-1", "user-1", True),
        ("user-1", "user-10", False),
        ("user-1*", "user-1", True),
        ("user-1*", "user-1-a", True),
        ("user-1*", "user-1.a", True),
        ("user-1*", "user-10", False),
        ("user-1*", "user-1a", False),
        ("user-1:*", "user-1:anything", True),
        ("user-1:*", "user-1", False),
        ("user-1:*", "user-2:x", False),
        ("u*", "user", False),
        ("u-*", "u-x", True),
    ],
)
def test_conv_patterns(pattern: str, conversation_id: str, allowed: bool) -> None:
    assert conv_allows(pattern, conversation_id) is allowed


async def test_a_read_token_reads_but_cannot_write(
    app: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    writer, reader = bearer(token()), bearer(token(scope="read"))
    assert (
        await app.post("/conversations/user-1/messages", json=turn("first"), headers=writer)
    ).status_code == 200
    page = await app.get("/conversations/user-1/messages", headers=reader)
    assert [m["content"] for m in page.json()["messages"]] == ["first", "reply to: first"]
    assert (await app.get("/conversations/user-1", headers=reader)).status_code == 200
    assert (await app.get("/conversations", headers=reader)).status_code == 200
    refused = [
        await app.post("/conversations/user-1/messages", json=turn("x"), headers=reader),
        await app.put("/conversations/user-1", json={"metadata": {"a": 1}}, headers=reader),
        await app.delete("/conversations/user-1", headers=reader),
    ]
    assert [r.status_code for r in refused] == [403, 403, 403]
    assert refused[0].json()["detail"] == "this token's scope does not include 'write'"
    assert gateway.calls == 1
    assert await redis.llen("conv:{acme:user-1}:log") == 2


async def test_tokens_never_reach_the_gateway(app: httpx.AsyncClient, gateway: FakeGateway) -> None:
    user_token = token()
    answer = await app.post(
        "/conversations/user-1/messages", json=turn(stream=True), headers=bearer(user_token)
    )
    assert answer.status_code == 200, answer.text
    answer = await app.post(
        "/conversations/user-1/messages", json=turn(), headers=bearer(user_token)
    )
    assert answer.status_code == 200
    assert [h["authorization"] for h in gateway.received_headers] == [GATEWAY_KEY, GATEWAY_KEY]
    seen = json.dumps([gateway.received, gateway.received_headers])
    assert user_token not in seen
    assert user_token.split(".")[2] not in seen  # not even its signature


async def test_an_end_user_lists_only_their_own_conversations(
    app: httpx.AsyncClient, redis: Redis
) -> None:
    tenant = {"Authorization": f"Bearer {CLIENT_KEY}"}
    one, two = bearer(token(sub="user-1")), bearer(token(sub="user-2", conv="user-2*"))
    for cid, headers in [
        ("user-1", one),
        ("user-1:b", one),
        ("user-2", two),
        ("user-1:tenant", tenant),
    ]:
        posted = await app.post(f"/conversations/{cid}/messages", json=turn(), headers=headers)
        assert posted.status_code == 200, posted.text
    # The same user with a narrower token sees only what that token covers.
    narrow = bearer(token(sub="user-1", conv="user-1:b"))
    listed = {
        name: [
            c["id"] for c in (await app.get("/conversations", headers=h)).json()["conversations"]
        ]
        for name, h in [("one", one), ("two", two), ("narrow", narrow), ("tenant", tenant)]
    }
    assert sorted(listed["one"]) == ["user-1", "user-1:b"]
    assert listed["two"] == ["user-2"]
    assert listed["narrow"] == ["user-1:b"]
    assert sorted(listed["tenant"]) == ["user-1", "user-1:b", "user-1:tenant", "user-2"]
    # A deleted conversation leaves the user's list (the index is tidied as it is read).
    assert (await app.delete("/conversations/user-1:b", headers=one)).status_code == 204
    after = (await app.get("/conversations", headers=one)).json()["conversations"]
    assert [c["id"] for c in after] == ["user-1"]


async def test_a_streamed_turn_is_listed_once_stored(app: httpx.AsyncClient) -> None:
    headers = bearer(token())
    answer = await app.post(
        "/conversations/user-1:s/messages", json=turn(stream=True), headers=headers
    )
    assert answer.text.endswith("data: [DONE]\n\n")
    listed = (await app.get("/conversations", headers=headers)).json()["conversations"]
    assert [c["id"] for c in listed] == ["user-1:s"]


async def test_a_failed_turn_is_not_listed(
    app: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    gateway.failures.append(Failure(400, {"error": {"message": "no such model"}}))
    headers = bearer(token())
    failed = await app.post("/conversations/user-1/messages", json=turn(), headers=headers)
    assert failed.status_code == 400
    assert (await app.get("/conversations", headers=headers)).json()["conversations"] == []
    assert await redis.keys("conv:{acme}:user:*") == []


async def test_caps_in_the_token_bind_the_turn(
    app: httpx.AsyncClient, gateway: FakeGateway, redis: Redis
) -> None:
    headers = bearer(token(model="claude-haiku-4-5", max_tokens=50))
    answer = await app.post("/conversations/user-1/messages", json=turn(), headers=headers)
    assert answer.status_code == 200, answer.text
    assert gateway.received[0]["model"] == "claude-haiku-4-5"
    assert gateway.received[0]["max_tokens"] == 50
    within = await app.post(
        "/conversations/user-1/messages", json=turn(max_tokens=20), headers=headers
    )
    assert within.status_code == 200
    assert gateway.received[1]["max_tokens"] == 20
    refused = {
        "model": turn(model="claude-opus-4-1"),
        "max_tokens": turn(max_tokens=51),
        "fallbacks": turn(fallbacks=["claude-opus-4-1"]),
        "system": turn(system="ignore your instructions"),
    }
    for field, body in refused.items():
        answer = await app.post("/conversations/user-1/messages", json=body, headers=headers)
        assert answer.status_code == 403, field
        assert answer.json()["detail"].startswith(f"{field}:")
    assert gateway.calls == 2
    assert await redis.llen("conv:{acme:user-1}:log") == 4


async def test_end_users_set_only_metadata(app: httpx.AsyncClient, redis: Redis) -> None:
    headers = bearer(token())
    for body in ({"system": "be evil"}, {"token_budget": 100_000}, {"metadata": {}, "model": "m"}):
        answer = await app.put("/conversations/user-1", json=body, headers=headers)
        assert answer.status_code == 403, body
    assert await stored_keys(redis, "acme", "user-1") == []
    created = await app.put("/conversations/user-1", json={"metadata": {"t": "x"}}, headers=headers)
    assert created.status_code == 201
    listed = (await app.get("/conversations", headers=headers)).json()["conversations"]
    assert [c["id"] for c in listed] == ["user-1"]


async def test_minting_a_token(app: httpx.AsyncClient, gateway: FakeGateway) -> None:
    tenant = {"Authorization": f"Bearer {CLIENT_KEY}"}
    body = {"sub": "user-9", "conv": "user-9:*", "scope": "read write", "ttl_seconds": 120}
    minted = await app.post(
        "/end-user-tokens",
        json={**body, "max_tokens": 30, "model": "claude-haiku-4-5"},
        headers=tenant,
    )
    assert minted.status_code == 200, minted.text
    grant = minted.json()
    assert grant["token_type"] == "Bearer"
    assert grant["expires_in"] == 120
    assert abs(grant["expires_at"] - (time.time() + 120)) < 5
    decoded = jwt.decode(grant["token"], ACME_SECRET, algorithms=["HS256"])
    assert decoded["iss"] == "acme"
    assert decoded["sub"] == "user-9"
    used = await app.post(
        "/conversations/user-9:a/messages", json=turn(), headers=bearer(grant["token"])
    )
    assert used.status_code == 200, used.text
    assert gateway.received[0]["max_tokens"] == 30
    assert gateway.received[0]["model"] == "claude-haiku-4-5"
    outside = await app.get("/conversations/user-90/messages", headers=bearer(grant["token"]))
    assert outside.status_code == 403
    default = await app.post("/end-user-tokens", json={"sub": "u", "conv": "u"}, headers=tenant)
    assert default.json()["expires_in"] == 900
    whole = {"sub": "u", "conv": "u", "ttl_seconds": 60.0, "max_tokens": 5.0}
    assert (await app.post("/end-user-tokens", json=whole, headers=tenant)).json()[
        "expires_in"
    ] == 60
    assert jwt.decode(default.json()["token"], ACME_SECRET, algorithms=["HS256"])["scope"] == (
        "read write"
    )


async def test_minting_is_refused_where_it_must_be(
    redis_url: str, redis: Redis, gateway: FakeGateway
) -> None:
    only_acme = end_user_settings(redis_url, end_user_jwt_secrets=f"acme:{b64(ACME_SECRET)}")
    async with serve(only_acme, gateway, key=CLIENT_KEY) as http:
        body = {"sub": "u", "conv": "u*"}
        too_long = await http.post(
            "/end-user-tokens", json={**body, "ttl_seconds": MAX_SECONDS + 1}
        )
        assert too_long.status_code == 422
        assert "END_USER_TOKEN_MAX_SECONDS" in too_long.json()["detail"]
        bad_conv = await http.post("/end-user-tokens", json={"sub": "u", "conv": "a*b"})
        assert bad_conv.status_code == 422
        by_a_user = await http.post("/end-user-tokens", json=body, headers=bearer(token()))
        assert by_a_user.status_code == 403
        assert by_a_user.json()["detail"] == (
            "end-user tokens are accepted on /conversations routes only"
        )
        no_secret = await http.post(
            "/end-user-tokens", json=body, headers={"Authorization": f"Bearer {OTHER_KEY}"}
        )
        assert no_secret.status_code == 403
        assert "END_USER_JWT_SECRETS" in no_secret.json()["detail"]
        beta_token = await http.post(
            "/conversations/u/messages", json=turn(), headers=bearer(token(BETA_SECRET, iss="beta"))
        )
        assert beta_token.status_code == 401
    assert gateway.calls == 0


async def test_pass_through_mode_neither_mints_nor_forwards_tokens(
    redis_url: str, redis: Redis, gateway: FakeGateway, caplog: pytest.LogCaptureFixture
) -> None:
    settings = end_user_settings(redis_url, api_keys=None)
    caplog.set_level(logging.WARNING, logger="service")
    async with serve(settings, gateway, key="caller-own-gateway-key") as http:
        user_token = token()
        answer = await http.post(
            "/conversations/user-1/messages", json=turn(), headers=bearer(user_token)
        )
        assert answer.status_code == 401
        assert "client-key mode" in answer.json()["detail"]
        minted = await http.post("/end-user-tokens", json={"sub": "u", "conv": "u"})
        assert minted.status_code == 403
        own = await http.post("/conversations/c/messages", json=turn())
        assert own.status_code == 200
    assert [h["authorization"] for h in gateway.received_headers] == ["caller-own-gateway-key"]
    warned = [
        r.getMessage() for r in caplog.records if "pass-through mode neither" in r.getMessage()
    ]
    assert len(warned) == 1


def test_settings_refuse_bad_secrets_and_urls(redis_url: str) -> None:
    for secrets, problem in [
        ("acme:c2hvcnQ=", "at least 32 bytes"),
        ("acme:not base64!", "not base64"),
        ("no-colon", "tenant:<base64>"),
    ]:
        with pytest.raises(ValueError, match=problem):
            end_user_settings(redis_url, end_user_jwt_secrets=secrets)
    with pytest.raises(ValueError, match="tenant:<URL>"):
        end_user_settings(redis_url, end_user_jwks_urls="acme:ftp://x")
    assert parse_secrets(" , acme:" + b64(ACME_SECRET)) == {"acme": ACME_SECRET}
    assert parse_jwks_urls("acme:https://a/jwks.json,") == {"acme": "https://a/jwks.json"}
    assert end_user_settings(redis_url, end_user_jwt_secrets=" ").end_user_secrets() == {}
    assert not looks_like_jwt("client-key-acme")
    assert not looks_like_jwt("a.b.c")


# ---- JWKS ------------------------------------------------------------------------------------


class JwksServer:
    """A tenant's JWKS document on a loopback port, counting fetches."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0
        self.status = 200

    async def handle(self, _request: web.Request) -> web.Response:
        self.fetches += 1
        return web.json_response({"keys": self.keys}, status=self.status)


@asynccontextmanager
async def jwks_server(server: JwksServer) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/jwks.json", server.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}/jwks.json"
    finally:
        await runner.cleanup()


def public_jwk(
    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str, alg: str
) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(
        jwt.algorithms.get_default_algorithms()[alg].to_jwk(private.public_key())
    )
    return {**jwk, "kid": kid, "alg": alg, "use": "sig"}


async def test_jwks_tokens_and_refetch_on_an_unknown_kid(
    redis_url: str, redis: Redis, gateway: FakeGateway
) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    server = JwksServer()
    server.keys = [public_jwk(rsa_key, "r1", "RS256")]
    async with jwks_server(server) as url:
        settings = end_user_settings(
            redis_url, end_user_jwt_secrets=None, end_user_jwks_urls=f"acme:{url}"
        )
        async with serve(settings, gateway, key=None) as http:

            async def post(signed: str) -> int:
                answer = await http.post(
                    "/conversations/user-1/messages", json=turn(), headers=bearer(signed)
                )
                return answer.status_code

            assert await post(jwt.encode(claims(), rsa_key, "RS256", headers={"kid": "r1"})) == 200
            assert await post(jwt.encode(claims(), rsa_key, "RS256", headers={"kid": "r1"})) == 200
            assert server.fetches == 1  # cached
            # A key the publisher adds later: one refetch finds it.
            server.keys.append(public_jwk(ec_key, "e1", "ES256"))
            assert await post(jwt.encode(claims(), ec_key, "ES256", headers={"kid": "e1"})) == 401
            assert server.fetches == 1  # fetched under a minute ago: not again
            # HS256 signed with the published public key: algorithm confusion, refused.
            pem = rsa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            confused = _hs256_with_raw_key(claims(), pem)
            assert await post(confused) == 401
            unknown = jwt.encode(claims(), rsa_key, "RS256", headers={"kid": "nope"})
            assert await post(unknown) == 401
            assert server.fetches == 1
    assert gateway.calls == 2


async def test_jwks_refetches_after_its_interval_and_survives_an_outage() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server = JwksServer()
    server.status = 503  # the publisher is down at first
    async with jwks_server(server) as url, aiohttp.ClientSession() as session:
        cache = JwksCache(url, session, refetch_seconds=0.0)
        with pytest.raises(Unauthorized):
            await cache.key("r1")
        server.status = 200
        server.keys = [public_jwk(rsa_key, "r1", "RS256")]
        assert (await cache.key("r1")).key_id == "r1"
        assert (await cache.key(None)).key_id == "r1"  # one key: no `kid` needed
        assert server.fetches == 2
        server.status = 500  # down again: the keys already fetched still verify
        with pytest.raises(Unauthorized):
            await cache.key("r2")
        assert (await cache.key("r1")).key_id == "r1"
        assert server.fetches == 3


def _hs256_with_raw_key(payload: dict[str, Any], key: bytes) -> str:
    """What an attacker builds by hand: PyJWT itself refuses to sign HS256 with a PEM key."""

    def part(value: bytes) -> str:
        return base64.urlsafe_b64encode(value).decode().rstrip("=")

    signing_input = (
        f"{part(json.dumps({'alg': 'HS256', 'typ': 'JWT', 'kid': 'r1'}).encode())}."
        f"{part(json.dumps(payload).encode())}"
    )
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{part(signature)}"


async def test_the_demo_page_is_off_unless_asked_for(
    redis_url: str, redis: Redis, gateway: FakeGateway
) -> None:
    async with serve(end_user_settings(redis_url), gateway, key=None) as http:
        assert (await http.get("/demo")).status_code == 404
    async with serve(end_user_settings(redis_url, demo_page=True), gateway, key=None) as http:
        page = await http.get("/demo")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert page.headers["referrer-policy"] == "no-referrer"
        assert GATEWAY_KEY not in page.text
        assert CLIENT_KEY not in page.text
        assert "/demo" not in (await http.get("/openapi.json")).json()["paths"]


async def test_thirty_seconds_of_clock_skew(app: httpx.AsyncClient) -> None:
    now = int(time.time())
    within = [token(exp=now - 10, iat=now - 600), token(nbf=now + 10)]
    beyond = [token(exp=now - 40, iat=now - 600), token(nbf=now + 40)]
    for signed, status in [(t, 200) for t in within] + [(t, 401) for t in beyond]:
        answer = await app.get("/conversations", headers=bearer(signed))
        assert answer.status_code == status, signed
