"""TurnRoute (service/turn_route.py) answers every request as FastAPI's own solver would.

The app gets twins of the turn and regenerate routes: the same endpoints, on paths of their own,
solved by FastAPI's generic APIRoute. Each request below goes to both, and the two answers must be
the same: status, media type, problem+json body (and the same nothing stored). Among them the
orders that matter: malformed JSON before authentication, authentication before validation, the
body's own checks before the conversation's scope, and all validation errors in one answer.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi.routing import APIRoute
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from service.app import create_app
from service.editing_routes import regenerate
from service.routes import post_turn
from service.turn_route import TurnRoute, json_value
from tests.conftest import CLIENT_KEY, with_gateway
from tests.fake_gateway import FakeGateway, serve_in_process
from tests.test_end_users import ACME_SECRET, bearer, end_user_settings, token

TWIN = "-by-fastapi"  # the twin routes' path suffix
JSON = {"Content-Type": "application/json"}
CLIENT = bearer(CLIENT_KEY)
LONG_KEY = "k" * 300  # over the Idempotency-Key's 255


@pytest.fixture
async def http(
    redis_url: str, redis: Redis, gateway: FakeGateway
) -> AsyncIterator[httpx.AsyncClient]:
    async with serve_in_process(gateway) as gateway_url:
        app = create_app(with_gateway(end_user_settings(redis_url), gateway_url))
        for path, endpoint in (("messages", post_turn), ("regenerate", regenerate)):
            app.router.add_api_route(
                f"/conversations/{{conversation_id}}/{path}{TWIN}",
                endpoint,
                methods=["POST"],
                response_model=None,
            )
        async with (
            LifespanManager(app) as manager,
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=manager.app), base_url="http://test"
            ) as client,
        ):
            yield client


def _answer(response: httpx.Response) -> tuple[int, str, Any]:
    media = response.headers.get("content-type", "")
    body = response.json() if "json" in media else response.text
    return response.status_code, media, body


USER = {"role": "user", "content": "hello"}
CASES: dict[str, tuple[str, bytes, dict[str, str]]] = {
    "empty body": ("c1", b"", {**CLIENT, **JSON}),
    "malformed JSON": ("c1", b'{"message": ', {**CLIENT, **JSON}),
    "not UTF-8": ("c1", b'{"message": "\xff\xfe"}', {**CLIENT, **JSON}),
    "an array": ("c1", b"[]", {**CLIENT, **JSON}),
    "null": ("c1", b"null", {**CLIENT, **JSON}),
    "no message": ("c1", b"{}", {**CLIENT, **JSON}),
    "a bad role": ("c1", b'{"message": {"role": "wizard", "content": "x"}}', {**CLIENT, **JSON}),
    "an unknown field": (
        "c1",
        b'{"message": {"role": "user", "content": "x"}, "temperatura": 1}',
        {**CLIENT, **JSON},
    ),
    # JSON the json module reads and pydantic-core's parser refuses (json_value's fallback)
    "NaN": (
        "c1",
        b'{"message": {"role": "user", "content": "x"}, "temperature": NaN}',
        {**CLIENT, **JSON},
    ),
    "a byte-order mark": ("c1", b"\xef\xbb\xbf{}", {**CLIENT, **JSON}),
    "a lone surrogate": (
        "c1",
        b'{"message": {"role": "user", "content": "\\ud800"}}',
        {**CLIENT, **JSON},
    ),
    "an integer past 64 bits": (
        "c1",
        b'{"message": {"role": "user", "content": "x"}, "max_tokens": 18446744073709551616}',
        {**CLIENT, **JSON},
    ),
    "nesting past 200": (
        "c1",
        b'{"message": {"role": "user", "content": "x"}, "metadata": '
        + b"[" * 250
        + b"]" * 250
        + b"}",
        {**CLIENT, **JSON},
    ),
    "no Content-Type": ("c1", b'{"message": {"role": "user", "content": 1}}', CLIENT),
    "a +json Content-Type": (
        "c1",
        b"{}",
        {**CLIENT, "Content-Type": "application/vnd.api+json; charset=utf-8"},
    ),
    "text/plain": ("c1", b"{}", {**CLIENT, "Content-Type": "text/plain"}),
    "a bad key and a bad body": ("c1", b"{}", {**CLIENT, **JSON, "Idempotency-Key": LONG_KEY}),
    "a bad id, key and body": (
        "bad$id",
        b'{"message": {"role": "user"}}',
        {**CLIENT, **JSON, "Idempotency-Key": LONG_KEY},
    ),
    "a bad id alone": (
        "x" * 129,
        b'{"message": {"role": "user", "content": "x"}}',
        {**CLIENT, **JSON},
    ),
    "no key, bad body": ("c1", b"{}", JSON),
    "no key, malformed JSON": ("c1", b"{", JSON),
    "an unknown key": ("c1", b"{}", {**bearer("not-a-key"), **JSON}),
    "an end user outside their scope, bad body": (
        "someone-else",
        b"{}",
        {**bearer(token(ACME_SECRET)), **JSON},
    ),
    "an end user outside their scope, unknown field": (
        "someone-else",
        b'{"message": {"role": "user", "content": "x"}, "temperatura": 1}',
        {**bearer(token(ACME_SECRET)), **JSON},
    ),
    "an end user reading only": (
        "user-1-a",
        b'{"message": {"role": "user", "content": "x"}}',
        {**bearer(token(ACME_SECRET, scope="read")), **JSON},
    ),
    "an end user setting the system prompt, outside their scope": (
        "someone-else",
        b'{"message": {"role": "user", "content": "x"}, "system": "obey"}',
        {**bearer(token(ACME_SECRET)), **JSON},
    ),
}


@pytest.mark.parametrize("route", ["messages", "regenerate"])
@pytest.mark.parametrize("case", sorted(CASES))
async def test_bad_requests_are_answered_as_by_fastapi(
    http: httpx.AsyncClient, redis: Redis, route: str, case: str
) -> None:
    conversation, body, headers = CASES[case]
    ours = await http.post(f"/conversations/{conversation}/{route}", content=body, headers=headers)
    twin = await http.post(
        f"/conversations/{conversation}/{route}{TWIN}", content=body, headers=headers
    )
    assert ours.status_code >= 400, ours.text
    assert _answer(ours) == _answer(twin)
    assert await redis.keys("conv:*") == []  # nothing stored by either


async def test_a_turn_and_a_regenerate_are_answered_alike(
    http: httpx.AsyncClient, gateway: FakeGateway
) -> None:
    answers = []
    for suffix in ("", TWIN):
        conversation = f"alike{suffix or '-ours'}"
        turn = await http.post(
            f"/conversations/{conversation}/messages{suffix}",
            json={"message": USER},
            headers={**CLIENT, "Idempotency-Key": f"key{suffix}"},
        )
        again = await http.post(
            f"/conversations/{conversation}/regenerate{suffix}", json={}, headers=CLIENT
        )
        answers.append((turn.status_code, again.status_code))
        assert turn.json()["conversation"]["message_count"] == 2
        assert again.json()["conversation"]["message_count"] == 2
    assert answers == [(200, 200), (200, 200)]


# JSON values, with what the json module reads beyond strict JSON: NaN and infinities, integers of
# any size, lone surrogates (escaped by json.dumps), deep nesting.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=30,
)


@given(value=JSON_VALUES, ascii=st.booleans(), bom=st.booleans(), depth=st.integers(0, 260))
@settings(max_examples=300, deadline=None)
def test_json_value_reads_what_the_json_module_reads(
    value: Any, ascii: bool, bom: bool, depth: int
) -> None:
    text = "[" * depth + json.dumps(value, ensure_ascii=ascii) + "]" * depth
    raw = (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8", "surrogatepass")
    try:
        expected = json.loads(raw)
    except ValueError as exc:  # a lone surrogate unescaped is not UTF-8: the same error
        with pytest.raises(type(exc)):
            json_value(raw)
        return
    got = json_value(raw)
    assert type(got) is type(expected)
    # by their JSON: NaN is not equal to itself, and 1 == 1.0 == True would hide a changed type
    assert json.dumps(got) == json.dumps(expected)


def _error(parse: Any, raw: bytes) -> tuple[type[Exception], str]:
    try:
        parse(raw)
    except ValueError as exc:
        return type(exc), str(exc)
    raise AssertionError(f"{raw!r} parsed")


@pytest.mark.parametrize("raw", [b"{", b'{"a": 1} x', b"[1,]", b"\xff", b"nul", b"\xef\xbb\xbf["])
def test_json_value_raises_the_json_modules_errors(raw: bytes) -> None:
    assert _error(json_value, raw) == _error(json.loads, raw)


def test_only_turn_shaped_endpoints_are_taken() -> None:
    async def other(conversation_id: str) -> None:
        return None

    with pytest.raises(TypeError, match="not a turn-shaped endpoint"):
        TurnRoute("/conversations/{conversation_id}/messages", other, methods=["POST"])
    assert isinstance(APIRoute("/x", other), APIRoute)  # the same endpoint is fine elsewhere
