"""Small pure pieces at the boundaries: settings, the gateway's wire shapes, SSE assembly."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from service.config import Settings
from service.errors import GatewayError, IdempotencyKeyReused
from service.gateway import parse_reply
from service.idempotency import Idempotency
from service.streaming import StreamAssembler, completion_as_sse
from service.upstream_errors import error_text
from tests.conftest import make_settings, serve
from tests.fake_gateway import FakeGateway


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"api_keys": "acme:k1"}, "API_KEYS needs GATEWAY_API_KEY"),
        ({"api_keys": "acme", "gateway_api_key": "g"}, "name:key pairs"),
        ({"api_keys": "bad name:k", "gateway_api_key": "g"}, "name:key pairs"),
        ({"redis_url": "http://localhost"}, "REDIS_URL must start with"),
        ({"log_level": "loud"}, "LOG_LEVEL"),
        ({"token_budget": 10}, "greater than or equal"),
    ],
)
def test_settings_refuse_bad_values(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings.model_validate(values)


def test_settings_parse_keys_and_origins() -> None:
    cfg = Settings.model_validate(
        {
            "api_keys": "acme:k1, beta:k2,",
            "gateway_api_key": "g",
            "cors_origins": "https://a.example, https://b.example",
            "redis_url": "",
        }
    )
    assert cfg.client_keys() == {"k1": "acme", "k2": "beta"}
    assert cfg.cors_origin_list() == ["https://a.example", "https://b.example"]
    assert cfg.redis_url is None
    assert "k1" not in repr(cfg)  # secrets stay masked
    assert Settings.model_validate({"api_keys": " "}).client_keys() == {}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            b'{"error": {"code": 400, "message": "invalid request body", '
            b'"metadata": {"errors": ["messages: required", {"field": "model"}]}}}',
            'invalid request body: messages: required; {"field":"model"}',
        ),
        (b'{"error": "model not found", "status": "error", "request_id": "r"}', "model not found"),
        (
            b'{"code": 422, "message": "bad", "metadata": {"errors": ["max_tokens too large"]}}',
            "bad: max_tokens too large",
        ),
        (b'{"detail": "nope"}', "nope"),
        (b"<html>Bad Gateway</html>", "no details"),  # never the raw body
        (b"", "no details"),
        (b"[1, 2]", "no details"),
        (b'{"error": 5}', "no details"),
    ],
)
def test_error_shapes(body: bytes, expected: str) -> None:
    assert error_text(body) == expected


@pytest.mark.parametrize(
    "completion",
    [
        [],
        {"choices": []},
        {"choices": ["x"]},
        {"choices": [{"message": "hi"}]},
        {"choices": [{"message": {"content": 5}}]},
        {"choices": [{"message": {"content": "a", "tool_calls": "x"}}]},
    ],
)
def test_invalid_completions_are_gateway_errors(completion: Any) -> None:
    with pytest.raises(GatewayError):
        parse_reply(completion)


def test_reply_reads_either_naming_and_null_content() -> None:
    reply = parse_reply(
        {
            "choices": [{"message": {"content": None}}],
            "usage": {"prompt_tokens": 9, "completion_tokens": True},
        }
    )
    assert reply.message == {"role": "assistant", "content": ""}
    assert (reply.input_tokens, reply.output_tokens) == (9, 0)


def test_assembler_builds_content_tool_calls_and_usage() -> None:
    assembler = StreamAssembler()
    chunks: list[dict[str, Any]] = [
        {"id": "x1", "model": "m", "choices": [{"index": 0, "delta": {"role": "assistant"}}]},
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "c1",
                                "type": "function",
                                "function": {"name": "get_", "arguments": '{"a"'},
                            }
                        ]
                    },
                }
            ]
        },
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {"index": 0, "function": {"name": "weather", "arguments": ": 1}"}}
                        ]
                    },
                }
            ]
        },
        {"choices": [{"index": 1, "delta": {"content": "other choice"}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}},
    ]
    for chunk in chunks:
        assembler.add(chunk)
    completion = assembler.completion()
    assert completion["id"] == "x1"
    choice = completion["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == [
        {
            "id": "c1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"a": 1}'},
        }
    ]
    assert completion["usage"] == {"prompt_tokens": 3, "completion_tokens": 4}
    with pytest.raises(ValueError, match="not a JSON object"):
        assembler.add([1])


def test_completion_replays_as_chunks_the_assembler_understands() -> None:
    calls = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    completion = {
        "request_id": "r",
        "choices": [
            {
                "message": {"role": "assistant", "content": None},
                "tool_calls": calls,
                "finish_reason": "tool_use",
            },
            "junk",
        ],
        "usage": {"input_tokens": 1},
    }
    assembler = StreamAssembler()
    for event in completion_as_sse(completion):
        assert event.startswith(b"data: ")
        assert event.endswith(b"\n\n")
        assembler.add(orjson.loads(event[6:]))
    rebuilt = assembler.completion()
    assert rebuilt["choices"][0]["message"]["tool_calls"] == calls
    assert rebuilt["choices"][0]["finish_reason"] == "tool_use"
    assert rebuilt["usage"] == {"input_tokens": 1}


async def test_cors_preflight_for_allowed_origins(redis_url: str, gateway: FakeGateway) -> None:
    async with serve(
        make_settings(redis_url, cors_origins="https://chat.example"), gateway, key=None
    ) as http:
        allowed = await http.options(
            "/conversations/c/messages",
            headers={
                "Origin": "https://chat.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, idempotency-key",
            },
        )
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://chat.example"
        other = await http.options(
            "/conversations/c/messages",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in other.headers


def test_a_running_turn_is_this_request_only_by_its_key_and_body() -> None:
    mine = Idempotency("key", "body")
    assert mine.is_running_as("key", "body")
    assert not mine.is_running_as("other key", "body")
    with pytest.raises(IdempotencyKeyReused):
        mine.is_running_as("key", "other body")
