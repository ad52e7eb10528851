"""The pure translations between OpenAI's wire shapes and the service's own
(service/openai_compat.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from service.openai_compat import (
    ChatCompletionCreate,
    ChatMessage,
    ChunkTranslator,
    Identity,
    completion,
    conversation_headers,
    error_body,
    finish_reason,
    openai_usage,
)


def body(**fields: Any) -> ChatCompletionCreate:
    return ChatCompletionCreate.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("stop", "stop"),
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("tool_use", "tool_calls"),
        ("max_tokens", "length"),
        ("length", "length"),
        ("content_filter", "content_filter"),
        ("something_new", "stop"),
        (None, None),
    ],
)
def test_finish_reasons_in_openais_words(raw: str | None, expected: str | None) -> None:
    assert finish_reason(raw) == expected


def test_usage_names_filled_from_each_shape() -> None:
    assert openai_usage({"input_tokens": 10, "output_tokens": 4}) == {
        "input_tokens": 10,
        "output_tokens": 4,
        "prompt_tokens": 10,
        "completion_tokens": 4,
        "total_tokens": 14,
    }
    # Anthropic-style: input_tokens is the uncached part; OpenAI's prompt is all of it.
    anthropic = openai_usage(
        {
            "input_tokens": 10,
            "cache_read_input_tokens": 100,
            "cache_creation_input_tokens": 5,
            "output_tokens": 3,
        }
    )
    assert anthropic is not None
    assert anthropic["prompt_tokens"] == 115
    assert anthropic["prompt_tokens_details"] == {"cached_tokens": 100}
    assert anthropic["total_tokens"] == 118
    openai_style = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    assert openai_usage(openai_style) == openai_style
    assert openai_usage(None) is None


def test_a_completion_in_openais_shape() -> None:
    identity = Identity("req-1", "asked-model")
    upstream = {
        "request_id": "gw-7",
        "choices": [
            {
                "message": {"role": "assistant", "content": None},
                "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "{}"}}],
                "finish_reason": "tool_use",
            },
            "not a choice",
        ],
        "request": {"model": "asked-model"},
        "model": "fallback-model",
        "created": 123,
        "conversation": {"id": "x"},
    }
    answer = completion(upstream, identity)
    assert answer["id"] == "chatcmpl-gw-7"
    assert answer["object"] == "chat.completion"
    assert answer["created"] == 123
    assert answer["model"] == "fallback-model"  # the model that answered
    assert "conversation" not in answer
    assert "request" not in answer
    assert "usage" not in answer
    (choice,) = answer["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"] == [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    ]


def test_chunks_keep_one_identity_and_usage_only_when_asked() -> None:
    identity = Identity("req-2", "m")
    quiet = ChunkTranslator(identity, include_usage=False)
    first = quiet.chunk(
        {
            "id": "up-1",
            "choices": [{"delta": {"tool_calls": [{"id": "c", "function": {"name": "f"}}]}}],
        }
    )
    assert first is not None
    assert first["id"] == "up-1"
    assert first["choices"][0]["delta"]["tool_calls"][0]["index"] == 0
    assert "usage" not in first
    later = quiet.chunk({"id": "up-other", "choices": [{"delta": {}, "finish_reason": "end_turn"}]})
    assert later is not None
    assert later["id"] == "up-1"
    assert later["choices"][0]["finish_reason"] == "stop"
    assert quiet.chunk({"choices": [], "usage": {"input_tokens": 1, "output_tokens": 1}}) is None
    assert quiet.chunk("not an object") is None
    assert quiet.chunk({"choices": ["junk"]}) is None
    loud = ChunkTranslator(Identity("req-3", "m"), include_usage=True)
    text = loud.chunk({"choices": [{"delta": {"content": "a"}}]})
    assert text is not None
    assert text["usage"] is None
    usage = loud.chunk({"choices": [], "usage": {"input_tokens": 1, "output_tokens": 2}})
    assert usage is not None
    assert usage["usage"]["total_tokens"] == 3


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (409, "invalid_request_error"),
        (429, "rate_limit_error"),
        (502, "api_error"),
    ],
)
def test_problem_as_openai_error(status: int, kind: str) -> None:
    problem = {"type": "/problems/some-thing", "title": "T", "status": status, "detail": "d"}
    assert error_body(problem) == {
        "error": {"message": "d", "type": kind, "code": "some_thing", "param": None}
    }


def test_error_param_and_blank_problems() -> None:
    invalid = {"type": "/problems/invalid-request", "status": 422, "detail": "messages.0: bad"}
    assert error_body(invalid)["error"]["param"] == "messages.0"
    plain = {"type": "about:blank", "title": "Not found", "status": 404, "detail": ""}
    assert error_body(plain)["error"] == {
        "message": "Not found",
        "type": "not_found_error",
        "code": None,
        "param": None,
    }
    assert error_body("garbage")["error"]["type"] == "api_error"


def test_conversation_headers() -> None:
    assert conversation_headers(None) == {}
    assert conversation_headers(
        {
            "id": "c",
            "message_count": 4,
            "context": {"messages": 3, "estimated_tokens": 40, "dropped_messages": 0},
        }
    ) == {
        "X-Conversation-Id": "c",
        "X-Conversation-Messages": "4",
        "X-Context-Messages": "3",
        "X-Context-Tokens": "40",
        "X-Context-Dropped": "0",
    }


def test_system_prompt_from_leading_messages() -> None:
    request = body(
        messages=[
            {"role": "system", "content": "One."},
            {"role": "developer", "content": [{"type": "text", "text": "Two."}]},
            {"role": "user", "content": "hi"},
        ]
    )
    system, rest = request.split()
    assert system == "One.\n\nTwo."
    assert [m.role for m in rest] == ["user"]
    payload = request.stateless_payload({"max_tokens": 5})
    assert [m["role"] for m in payload["messages"]] == ["system", "system", "user"]
    assert payload["max_tokens"] == 5


@pytest.mark.parametrize(
    ("messages", "said"),
    [
        ([{"role": "system"}], "a system message needs 'content'"),
        (
            [{"role": "developer", "content": "x", "tool_call_id": "t"}],
            "cannot carry 'tool_call_id'",
        ),
        ([{"role": "user", "content": "x", "refusal": "no"}], "only an assistant message"),
    ],
)
def test_message_shapes_refused(messages: list[dict[str, Any]], said: str) -> None:
    with pytest.raises(ValidationError, match=said):
        body(messages=messages)


def test_metadata_limits_and_conversation_id() -> None:
    with pytest.raises(ValidationError, match="values up to 512"):
        body(metadata={"k": "v" * 513})
    named = body(metadata={"conversation_id": "from-body"})
    assert named.conversation_id(None) == "from-body"
    assert named.conversation_id("from-header") == "from-header"
    with pytest.raises(ValueError, match="conversation id"):
        named.conversation_id("-bad")


def test_a_dropped_field_is_never_encoded_but_a_forwarded_one_is() -> None:
    """`user` is accepted and dropped: text no upstream accepts (a lone surrogate) does not
    matter there; in the messages, which the turn forwards, it is refused."""
    lone = json.loads('"\\ud800"')
    request = body(user=lone)
    assert request.turn(None, request.messages, stream=False).new_messages()
    with pytest.raises(ValidationError, match="valid Unicode"):
        request.turn(
            None, [ChatMessage.model_validate({"role": "user", "content": lone})], stream=False
        )


def test_params_map_max_completion_tokens_and_drop_the_meaningless() -> None:
    request = body(max_completion_tokens=9, user="u", store=False, temperature=0.5)
    assert request.params() == {"max_tokens": 9, "temperature": 0.5}
    both = body(max_completion_tokens=9, max_tokens=3)
    assert both.params()["max_tokens"] == 3
