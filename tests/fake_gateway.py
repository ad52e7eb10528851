"""A stand-in for the LLM gateway that speaks its wire format (../shared/GATEWAY.md).

It counts tokens its own way (characters / 3 plus 7 per message), unlike the service's estimator,
so the token-correction logic is exercised for real. It is at least as strict as the gateways it
stands for: no key is 401; a tool result that answers no preceding `tool_calls`, or `tool_calls`
left unanswered, is 400 (as OpenAI-style gateways answer); `tools` count in the prompt's tokens;
a stream carries usage only when `stream_options.include_usage` asks for it.
Scripted through data, never by patching.
`serve_in_process` runs it on a loopback port inside the test's event loop (so tests can script
it with asyncio events); tests/gateway_server.py serves the same logic from its own process.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from service.summary_plan import NEW_MESSAGES_HEADER, PREVIOUS_HEADER, SUMMARY_INSTRUCTIONS


def _text_tokens(text: str, punctuation: bool) -> int:
    if not punctuation:
        return len(text) // 3
    # As tokenizers count runs of punctuation: about one token per symbol.
    symbols = sum(1 for c in text if not (c.isalnum() or c.isspace()))
    return (len(text) - symbols) // 3 + symbols


def gateway_tokens(
    messages: list[dict[str, Any]], tools: list[Any] | None = None, *, punctuation: bool = False
) -> int:
    """The stand-in's own count: deliberately not the service's estimate. Tool definitions count,
    as every real gateway counts them. With `punctuation`, each symbol is a token of its own."""
    total = len(orjson.dumps(tools)) // 3 if tools else 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        total += 7 + _text_tokens(content or "", punctuation)
        if message.get("tool_calls"):
            total += len(orjson.dumps(message["tool_calls"])) // 3
    return total


ROLES = frozenset({"system", "user", "assistant", "tool"})


def message_errors(messages: list[Any]) -> list[str]:
    """What an OpenAI-style gateway refuses with 400 in `messages`: an unknown role, a tool
    result that answers no `tool_calls` of the assistant message before it, or an assistant's
    `tool_calls` not each answered by the tool messages right after it."""
    errors: list[str] = []
    open_calls: set[Any] | None = None  # ids the latest tool-calling assistant still awaits
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            errors.append(f"messages[{index}].role: must be one of {sorted(ROLES)}")
            continue
        if role == "tool":
            call_id = message.get("tool_call_id")
            if open_calls is None or call_id not in open_calls:
                errors.append(
                    f"messages[{index}]: a message with role 'tool' must be a response to a "
                    f"preceding message with 'tool_calls' (tool_call_id {call_id!r})"
                )
            else:
                open_calls.discard(call_id)
            continue
        if open_calls:
            errors.append(
                f"messages[{index}]: an assistant message with 'tool_calls' must be followed by "
                f"tool messages responding to each 'tool_call_id' ({sorted(open_calls)})"
            )
        calls = message.get("tool_calls") if role == "assistant" else None
        open_calls = {c.get("id") for c in calls if isinstance(c, dict)} if calls else None
    if open_calls:
        errors.append(
            "an assistant message with 'tool_calls' must be followed by tool messages "
            f"responding to each 'tool_call_id' ({sorted(open_calls)})"
        )
    return errors


def _invalid(errors: list[str]) -> tuple[int, dict[str, str], bytes]:
    body = {
        "error": {"code": 400, "message": "invalid request body", "metadata": {"errors": errors}}
    }
    return 400, {"content-type": "application/json"}, orjson.dumps(body)


@dataclass
class Failure:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class FakeGateway:
    received: list[dict[str, Any]] = field(default_factory=list)
    received_headers: list[dict[str, str]] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)  # served first, one per call
    reply_prefix: str = "reply to: "
    tool_calls: list[dict[str, Any]] | None = None  # answer with these instead of text
    old_tool_calls_shape: bool = False  # put tool_calls at choices[0] (older spec)
    prompt_tokens_naming: bool = False  # usage as prompt_tokens / completion_tokens
    # Usage as a caching provider reports it: "anthropic" (input_tokens is the uncached part
    # only, beside cache_read_input_tokens / cache_creation_input_tokens) or "openai"
    # (prompt_tokens is all of it, prompt_tokens_details.cached_tokens inside it); the prompt's
    # first `cached_share` is a cache read, the next `written_share` a cache write.
    usage_shape: str = "plain"
    cached_share: float = 0.0
    written_share: float = 0.0
    punctuation_tokens: bool = False  # count each symbol as a token (see gateway_tokens)
    # GET /models: the catalog's entries, as the gateway lists them; None answers 503.
    catalog: list[dict[str, Any]] | None = field(default_factory=list)
    catalog_reads: int = 0
    ignore_stream: bool = False  # answer JSON even when asked to stream
    chunk_size: int = 4  # characters per streamed delta
    stream_gate: asyncio.Event | None = None  # streaming pauses after the first chunk until set
    stream_fail_after_first: bool = False  # cut the stream after the first chunk
    stream_end_after_first: bool = False  # end it cleanly after the first chunk, unfinished
    hold: asyncio.Event | None = None  # every call waits for this before answering
    auth_scheme: str | None = None  # "bearer": a raw key gets 500, as LiteLLM's proxy answers
    reject_stream_options: bool = False  # 400 naming stream_options, as some gateways answer
    sse_dialect: str = "lf"  # "crlf", "cr", or "rich" (multi-line data, comments, ids, events)
    oversize_line_bytes: int = 0  # after the first chunk, a data line this long
    stream_error_after_first: dict[str, Any] | None = None  # an error chunk, mid-stream
    stream_error_as_event: bool = False  # send that error as `event: error`
    usage_on_finish_chunk: bool = False  # usage on the finish_reason chunk, not a chunk of its own
    reply_headers: dict[str, str] = field(default_factory=dict)  # on every 200 JSON answer
    calls: int = 0
    # Summary calls (service/summary_plan.py's request) are answered apart: recorded here, not
    # in `received`, failed by `summary_failures`, held by `summary_hold`, and answered with a
    # digest of exactly what they were sent (see `summary_of`).
    summary_received: list[dict[str, Any]] = field(default_factory=list)
    summary_headers: list[dict[str, str]] = field(default_factory=list)
    summary_failures: list[Failure] = field(default_factory=list)
    summary_hold: asyncio.Event | None = None
    summary_content: Any = None  # answer this content instead (None: the digest)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The aiohttp handler for POST /v1/chat/completions."""
        status, headers, content = await self.respond(dict(request.headers), await request.json())
        return await send(request, status, headers, content)

    async def models(self, _: web.Request) -> web.Response:
        """GET /v1/models: the catalog (no key needed, as the gateway's)."""
        self.catalog_reads += 1
        if self.catalog is None:
            return web.json_response({"error": "unavailable"}, status=503)
        return web.json_response({"data": self.catalog})

    async def respond(
        self, headers: dict[str, str], body: dict[str, Any]
    ) -> tuple[int, dict[str, str], bytes | AsyncIterator[bytes]]:
        self.calls += 1
        if is_summary_request(body):
            self.summary_headers.append({k.lower(): v for k, v in headers.items()})
            return await self._summarize(body)
        self.received.append(body)
        self.received_headers.append({k.lower(): v for k, v in headers.items()})
        if self.hold is not None:
            await self.hold.wait()
        if self.auth_scheme == "bearer" and not self.received_headers[-1].get(
            "authorization", ""
        ).startswith("Bearer "):
            return 500, {"content-type": "application/json"}, b'{"error": "internal error"}'
        if self.failures:
            failure = self.failures.pop(0)
            return (
                failure.status,
                {"content-type": "application/json", **failure.headers},
                orjson.dumps(failure.body),
            )
        if not self.received_headers[-1].get("authorization"):
            return 401, {"content-type": "application/json"}, b'{"error": "missing API key"}'
        if not body.get("model") or not isinstance(body.get("messages"), list):
            return _invalid(["model is required"])
        if errors := message_errors(body["messages"]):
            return _invalid(errors)
        if self.reject_stream_options and "stream_options" in body:
            return (
                400,
                {"content-type": "application/json"},
                orjson.dumps(
                    {
                        "error": {
                            "message": "invalid request body",
                            "metadata": {"errors": ["stream_options: unsupported parameter"]},
                        }
                    }
                ),
            )
        completion = self.completion(body)
        if body.get("stream") and not self.ignore_stream:
            options = body.get("stream_options")
            with_usage = isinstance(options, dict) and options.get("include_usage") is True
            return (
                200,
                {"content-type": "text/event-stream"},
                self._framed(self._stream(completion, with_usage=with_usage)),
            )
        return (
            200,
            {"content-type": "application/json", **self.reply_headers},
            orjson.dumps(completion),
        )

    async def _summarize(self, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        self.summary_received.append(body)
        if self.summary_hold is not None:
            await self.summary_hold.wait()
        if self.summary_failures:
            failure = self.summary_failures.pop(0)
            return (
                failure.status,
                {"content-type": "application/json", **failure.headers},
                orjson.dumps(failure.body),
            )
        completion = self.completion(body)
        message = completion["choices"][0]["message"]
        message["content"] = (
            summary_of(body) if self.summary_content is None else self.summary_content
        )
        message.pop("tool_calls", None)
        return (
            200,
            {"content-type": "application/json", **self.reply_headers},
            orjson.dumps(completion),
        )

    def reply_text(self, body: dict[str, Any]) -> str:
        last = body["messages"][-1]
        content = last.get("content")
        if isinstance(content, list):
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        return f"{self.reply_prefix}{content}"

    def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.reply_text(body)}
        choice: dict[str, Any] = {"message": message, "finish_reason": "stop"}
        if self.tool_calls is not None:
            message["content"] = None
            choice["finish_reason"] = "tool_calls"
            if self.old_tool_calls_shape:
                choice["tool_calls"] = self.tool_calls
            else:
                message["tool_calls"] = self.tool_calls
        input_tokens = gateway_tokens(
            body["messages"], body.get("tools"), punctuation=self.punctuation_tokens
        )
        output_tokens = len(message["content"] or "") // 3 + 1
        usage = self.usage(input_tokens, output_tokens)
        return {
            "request_id": str(uuid.uuid4()),
            "choices": [choice],
            "request": {"model": body["model"]},
            "usage": usage,
            "model": body["model"],
        }

    def usage(self, prompt: int, output: int) -> dict[str, Any]:
        """`prompt` tokens in, `output` out, in this stand-in's usage shape."""
        read = int(prompt * self.cached_share)
        written = int(prompt * self.written_share)
        usage: dict[str, Any]
        if self.usage_shape == "anthropic":
            usage = {
                "input_tokens": prompt - read - written,
                "cache_read_input_tokens": read,
                "cache_creation_input_tokens": written,
                "output_tokens": output,
            }
        elif self.usage_shape == "openai" or self.prompt_tokens_naming:
            usage = {"prompt_tokens": prompt, "completion_tokens": output}
            if self.usage_shape == "openai":
                usage["prompt_tokens_details"] = {"cached_tokens": read}
        else:
            usage = {"input_tokens": prompt, "output_tokens": output}
        usage["total_tokens"] = prompt + output
        return usage

    async def _framed(self, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The events in this stand-in's SSE dialect; each arrives as `data: ...\n\n`."""
        async for event in events:
            if self.sse_dialect == "crlf":
                yield event.replace(b"\n", b"\r\n")
            elif self.sse_dialect == "cr":
                yield event.replace(b"\n", b"\r")
            elif self.sse_dialect == "rich" and event != b"data: [DONE]\n\n":
                data = event[6:-2]
                # Split the JSON after its first comma (that of the id, before any text: a
                # newline there is whitespace), and deliver the event in two writes.
                cut = data.find(b",") + 1
                yield b": keep-alive\nid: 7\nevent: message\ndata: " + data[:cut]
                yield b"\ndata:" + data[cut:] + b"\nretry: 1000\n\n"
            else:
                yield event

    async def _stream(
        self, completion: dict[str, Any], *, with_usage: bool
    ) -> AsyncIterator[bytes]:
        message = completion["choices"][0]["message"]
        text = message["content"] or ""
        base = {
            "id": completion["request_id"],
            "object": "chat.completion.chunk",
            "model": completion["model"],
        }
        pieces = [text[i : i + self.chunk_size] for i in range(0, len(text), self.chunk_size)]
        for index, piece in enumerate(pieces):
            delta: dict[str, Any] = {"content": piece}
            if index == 0:
                delta["role"] = "assistant"
            yield (
                b"data: "
                + orjson.dumps(
                    {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
                )
                + b"\n\n"
            )
            if index == 0:
                if self.oversize_line_bytes:
                    yield b"data: " + b"x" * self.oversize_line_bytes + b"\n\n"
                if self.stream_error_after_first is not None:
                    named = b"event: error\n" if self.stream_error_as_event else b""
                    yield named + b"data: " + orjson.dumps(self.stream_error_after_first) + b"\n\n"
                if self.stream_fail_after_first:
                    raise ConnectionResetError("the stand-in drops the connection mid-stream")
                if self.stream_end_after_first:
                    return
                if self.stream_gate is not None:
                    await self.stream_gate.wait()
        for i, call in enumerate(message.get("tool_calls") or []):
            arguments = call["function"]["arguments"]
            half = len(arguments) // 2
            for part_index, part in enumerate((arguments[:half], arguments[half:])):
                fn: dict[str, Any] = {"arguments": part}
                entry: dict[str, Any] = {"index": i, "function": fn}
                if part_index == 0:
                    entry |= {"id": call["id"], "type": "function"}
                    fn["name"] = call["function"]["name"]
                yield (
                    b"data: "
                    + orjson.dumps(
                        {
                            **base,
                            "choices": [
                                {
                                    "index": 0,
                                    "delta": {"tool_calls": [entry]},
                                    "finish_reason": None,
                                }
                            ],
                        }
                    )
                    + b"\n\n"
                )
        on_finish = with_usage and self.usage_on_finish_chunk
        yield (
            b"data: "
            + orjson.dumps(
                {
                    **base,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {},
                            "finish_reason": completion["choices"][0]["finish_reason"],
                        }
                    ],
                    **({"usage": completion["usage"]} if on_finish else {}),
                }
            )
            + b"\n\n"
        )
        if with_usage and not on_finish:  # as OpenAI-style gateways: usage only when asked for
            yield (
                b"data: "
                + orjson.dumps({**base, "choices": [], "usage": completion["usage"]})
                + b"\n\n"
            )
        yield b"data: [DONE]\n\n"


def is_summary_request(body: dict[str, Any]) -> bool:
    messages = body.get("messages")
    return (
        isinstance(messages, list)
        and bool(messages)
        and isinstance(messages[0], dict)
        and messages[0].get("content") == SUMMARY_INSTRUCTIONS
    )


def summary_parts(body: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """A summary request's previous summary and its new messages (each with its `seq`)."""
    text: str = body["messages"][1]["content"]
    head, _, lines = text.partition("\n\n" + NEW_MESSAGES_HEADER + "\n")
    previous = head.removeprefix(PREVIOUS_HEADER + "\n")
    return previous, [orjson.loads(line) for line in lines.split("\n") if line]


def summary_of(body: dict[str, Any]) -> str:
    """The stand-in's summary: the range it folded and a digest of what it was sent (previous
    summary and messages), so a test can tell exactly what a summary was made of."""
    _, messages = summary_parts(body)
    digest = hashlib.sha256(body["messages"][1]["content"].encode()).hexdigest()[:12]
    return f"[summary of {messages[0]['seq']}-{messages[-1]['seq']} #{digest}]"


async def send(
    request: web.Request,
    status: int,
    headers: dict[str, str],
    content: bytes | AsyncIterator[bytes],
) -> web.StreamResponse:
    """Write a FakeGateway answer: a whole body, or chunks as the iterator yields them."""
    if isinstance(content, bytes):
        return web.Response(status=status, headers=headers, body=content)
    response = web.StreamResponse(status=status, headers=headers)
    await response.prepare(request)
    try:
        async for chunk in content:
            await response.write(chunk)
    except ConnectionResetError:
        assert request.transport is not None
        request.transport.close()  # abort: the client sees the stream break off
        return response
    await response.write_eof()
    return response


@asynccontextmanager
async def serve_in_process(gateway: FakeGateway) -> AsyncIterator[str]:
    """Serve `gateway` on a free loopback port; yields its base URL (…/v1)."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", gateway.handle)
    app.router.add_get("/v1/models", gateway.models)
    # Short shutdown: a call a test left held (an event never set) is cancelled, not awaited.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}/v1"
    finally:
        await runner.cleanup()
