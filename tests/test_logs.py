"""Structured logs: every line is JSON, the access line carries its fields, and no secret or
message content ever reaches a log line (or a secret a response)."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from service.config import Settings
from service.logs import FIELDS, JsonFormatter, configure_logging
from service.middleware import tenant_hash
from tests.conftest import GATEWAY_KEY, make_settings, serve
from tests.fake_gateway import Failure, FakeGateway

CANARY_CLIENT_KEY = "ck-canary-secret-1111"
CANARY_CONTENT = "CANARY-CONTENT-7f3a"
WRONG_KEY = "ck-canary-wrong-2222"
SECRETS = (GATEWAY_KEY, CANARY_CLIENT_KEY, WRONG_KEY)
TURN_ROUTE = "/conversations/{conversation_id}/messages"


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """The service's own logging set-up (JSON lines on stderr), its stream swapped for a buffer
    so that every line is seen; undone after the test."""
    root = logging.getLogger()
    saved_root = (root.handlers[:], root.level)
    names = ("uvicorn", "uvicorn.error", "uvicorn.access", "httpx")
    saved = {
        name: (
            logging.getLogger(name).handlers[:],
            logging.getLogger(name).propagate,
            logging.getLogger(name).level,
            logging.getLogger(name).disabled,
        )
        for name in names
    }
    configure_logging("info")
    (handler,) = root.handlers
    assert isinstance(handler, logging.StreamHandler)
    assert isinstance(handler.formatter, JsonFormatter)
    buffer = io.StringIO()
    handler.setStream(buffer)
    yield buffer
    root.handlers, root.level = saved_root[0], saved_root[1]
    for name, (handlers, propagate, level, disabled) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers, logger.propagate, logger.level = handlers, propagate, level
        logger.disabled = disabled


@pytest.fixture
def log_settings(redis_url: str, redis: object) -> Settings:
    return make_settings(
        redis_url,
        api_keys=f"acme:{CANARY_CLIENT_KEY}",
        gateway_max_retries=0,
    )


def parse_lines(buffer: io.StringIO) -> tuple[str, list[dict[str, Any]]]:
    text = buffer.getvalue()
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, "the service wrote no log line"
    entries = []
    for line in lines:
        entry = orjson.loads(line)  # every line is one JSON object
        assert isinstance(entry, dict), line
        assert {"ts", "level", "logger", "msg"} <= entry.keys(), line
        entries.append(entry)
    return text, entries


def access_lines(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if e["logger"] == "service.access" and e["msg"] == "request"]


def assert_no_leak(text: str, *, content_too: bool = True) -> None:
    for secret in SECRETS:
        assert secret not in text
    if content_too:
        assert CANARY_CONTENT not in text


def response_text(response: httpx.Response) -> str:
    headers = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
    return headers + "\n" + response.text


def user(content: str) -> dict[str, Any]:
    return {"message": {"role": "user", "content": content}}


async def test_turn_access_line(
    json_logs: io.StringIO, log_settings: Settings, gateway: FakeGateway
) -> None:
    async with serve(log_settings, gateway, key=CANARY_CLIENT_KEY) as client:
        first = await client.post(
            "/conversations/logged/messages",
            json=user(f"first {CANARY_CONTENT}"),
            headers={"X-Request-ID": "req-log-1"},
        )
        second = await client.post(
            "/conversations/logged/messages", json=user(f"second {CANARY_CONTENT}")
        )
        listing = await client.get("/conversations")
    for response in (first, second, listing):
        assert response.status_code == 200, response.text
        assert_no_leak(response_text(response), content_too=False)
    assert first.headers["x-request-id"] == "req-log-1"
    assert gateway.received_headers[0]["x-request-id"] == "req-log-1"
    assert gateway.received_headers[0]["authorization"] == GATEWAY_KEY

    text, entries = parse_lines(json_logs)
    assert_no_leak(text)
    messages = [e["msg"] for e in entries]
    assert "started" in messages
    assert messages[-1] == "stopping"
    assert "/chat/completions" not in text  # upstream URLs stay out
    started = entries[messages.index("started")]
    assert (started["mode"], started["cluster"]) == ("client-keys", False)

    turns = [e for e in access_lines(entries) if e["route"] == TURN_ROUTE]
    assert len(turns) == 2
    line = turns[0]
    assert line["request_id"] == "req-log-1"
    assert (line["method"], line["status"], line["level"]) == ("POST", 200, "info")
    assert line["conversation_id"] == "logged"
    assert line["tenant"] == tenant_hash("acme") != "acme"
    assert isinstance(line["duration_ms"], float | int)
    assert line["duration_ms"] >= 0
    assert isinstance(line["upstream_ms"], float | int)
    assert line["upstream_ms"] >= 0
    assert line["input_tokens"] > 0
    assert line["output_tokens"] > 0
    assert line["dropped_messages"] == 0
    assert turns[1]["request_id"] not in ("", "req-log-1")
    assert turns[1]["input_tokens"] > line["input_tokens"]

    (listed,) = [e for e in access_lines(entries) if e["route"] == "/conversations"]
    assert (listed["status"], listed["tenant"]) == (200, tenant_hash("acme"))
    assert "conversation_id" not in listed


async def test_failed_turns_log_without_secrets(
    json_logs: io.StringIO, log_settings: Settings, gateway: FakeGateway
) -> None:
    gateway.failures = [Failure(500, {"error": {"code": 500, "message": "upstream exploded"}})]
    async with serve(log_settings, gateway, key=CANARY_CLIENT_KEY) as client:
        failed = await client.post(
            "/conversations/broken/messages",
            json=user(CANARY_CONTENT),
            headers={"X-Request-ID": "req-log-502"},
        )
        unauthorized = await client.post(
            "/conversations/broken/messages",
            json=user(CANARY_CONTENT),
            headers={"Authorization": f"Bearer {WRONG_KEY}", "X-Request-ID": "req-log-401"},
        )
        missing = await client.get("/conversations/broken")
    assert failed.status_code == 502, failed.text
    assert unauthorized.status_code == 401, unauthorized.text
    assert missing.status_code == 404, missing.text  # the failed turn stored nothing
    for response in (failed, unauthorized, missing):
        assert response.headers["content-type"].startswith("application/problem+json")
        assert_no_leak(response_text(response))

    text, entries = parse_lines(json_logs)
    assert_no_leak(text)
    by_id = {e["request_id"]: e for e in access_lines(entries)}

    bad_gateway = by_id["req-log-502"]
    assert (bad_gateway["status"], bad_gateway["route"]) == (502, TURN_ROUTE)
    assert bad_gateway["tenant"] == tenant_hash("acme")
    assert bad_gateway["conversation_id"] == "broken"
    assert bad_gateway["upstream_ms"] >= 0
    assert "input_tokens" not in bad_gateway
    assert any(e["msg"] == "gateway error" and e["upstream_status"] == 500 for e in entries)

    rejected = by_id["req-log-401"]
    assert (rejected["status"], rejected["route"]) == (401, TURN_ROUTE)
    assert "tenant" not in rejected
    assert rejected["duration_ms"] >= 0


async def test_streamed_turn_access_line(
    json_logs: io.StringIO, log_settings: Settings, gateway: FakeGateway
) -> None:
    async with serve(log_settings, gateway, key=CANARY_CLIENT_KEY) as client:
        streamed = await client.post(
            "/conversations/streamed/messages",
            json={**user(CANARY_CONTENT), "stream": True},
            headers={"X-Request-ID": "req-log-sse"},
        )
    assert streamed.status_code == 200, streamed.text
    assert streamed.text.rstrip().endswith("data: [DONE]")
    assert_no_leak(response_text(streamed), content_too=False)

    text, entries = parse_lines(json_logs)
    assert_no_leak(text)
    (line,) = [e for e in access_lines(entries) if e["request_id"] == "req-log-sse"]
    assert (line["status"], line["route"], line["conversation_id"]) == (200, TURN_ROUTE, "streamed")
    assert line["input_tokens"] > 0
    assert line["output_tokens"] > 0
    assert line["dropped_messages"] == 0
    assert "stream_completed" not in line


async def test_openai_route_access_line_names_the_conversation(
    json_logs: io.StringIO, log_settings: Settings, gateway: FakeGateway
) -> None:
    async with serve(log_settings, gateway, key=CANARY_CLIENT_KEY) as http:
        response = await http.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": CANARY_CONTENT}]},
            headers={"X-Conversation-Id": "via-v1"},
        )
        assert response.status_code == 200
    text, entries = parse_lines(json_logs)
    assert_no_leak(text)
    (line,) = [e for e in access_lines(entries) if e["route"] == "/v1/chat/completions"]
    assert (line["status"], line["conversation_id"]) == (200, "via-v1")
    assert line["tenant"] == tenant_hash("acme")


def test_timestamps_across_seconds() -> None:
    """The formatter keeps the last second's text: each line still has its own second."""
    formatter = JsonFormatter()
    stamps = []
    for created in (59.999, 60.0, 60.5, 59.25, 86400 * 365.25 * 30 + 0.001):
        record = logging.LogRecord("t", logging.INFO, "", 0, "m", (), None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        stamps.append(orjson.loads(formatter.format(record))["ts"])
    assert stamps == [
        "1970-01-01T00:00:59.999Z",
        "1970-01-01T00:01:00.000Z",
        "1970-01-01T00:01:00.500Z",
        "1970-01-01T00:00:59.250Z",
        "2000-01-01T12:00:00.001Z",
    ]


def test_fields_given_as_one_mapping_print_as_extras() -> None:
    """The access line passes its fields as one `extra` entry (FIELDS); each is printed at the
    top level, in order, exactly as the same fields given one by one."""
    fields = {"request_id": "r1", "status": 200, "duration_ms": 1.5, "tenant": "t", "n": None}
    logger = logging.getLogger("test.fields")
    formatter = JsonFormatter()
    lines = []
    for extra in ({FIELDS: dict(fields)}, dict(fields)):
        record = logger.makeRecord(
            logger.name, logging.INFO, "", 0, "request", (), None, extra=extra
        )
        record.created, record.msecs = 1.0, 0.0
        lines.append(orjson.loads(formatter.format(record)))
    one, each = lines
    assert one == each
    assert list(one) == ["ts", "level", "logger", "msg", *fields]
