"""Server-sent events: encoding, reassembling a streamed completion, and replaying one as SSE.

Pure functions and a small accumulator; no I/O.
"""

from __future__ import annotations

from typing import Any

import orjson

from service.models import JSONObject

DONE = b"data: [DONE]\n\n"
PING_COMMENT = b": ping\n\n"  # a comment line: clients ignore it, proxies see traffic


def sse_data(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def sse_relayed(event: str, data: str) -> bytes:
    """An upstream event passed on as it came: its name unless the default, each data line."""
    named = b"" if event == "message" else b"event: " + event.encode() + b"\n"
    return named + b"".join(b"data: " + line.encode() + b"\n" for line in data.split("\n")) + b"\n"


def sse_event(event: str, payload: Any) -> bytes:
    return b"event: " + event.encode() + b"\n" + sse_data(payload)


class StreamAssembler:
    """Folds `chat.completion.chunk` objects into one completion: content, tool calls assembled
    from their deltas by index, finish reason, usage (either naming scheme) and ids."""

    def __init__(self) -> None:
        self._content: list[str] = []
        self._tool_calls: dict[int, JSONObject] = {}
        self._finish_reason: str | None = None
        self._usage: JSONObject = {}
        self._meta: JSONObject = {}

    def add(self, chunk: Any) -> None:
        if not isinstance(chunk, dict):
            raise ValueError("a stream chunk is not a JSON object")
        for field in ("request_id", "id", "model", "created"):
            if field in chunk and field not in self._meta:
                self._meta[field] = chunk[field]
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            if choice.get("finish_reason"):
                self._finish_reason = choice["finish_reason"]
            delta = choice.get("delta") or choice.get("message") or {}
            if isinstance(delta.get("content"), str):
                self._content.append(delta["content"])
            for call in delta.get("tool_calls") or choice.get("tool_calls") or []:
                self._add_tool_call(call)

    def _add_tool_call(self, call: Any) -> None:
        if not isinstance(call, dict):
            return
        index = call.get("index", len(self._tool_calls))
        current = self._tool_calls.setdefault(
            index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
        )
        if call.get("id"):
            current["id"] = call["id"]
        if call.get("type"):
            current["type"] = call["type"]
        function = call.get("function") or {}
        if function.get("name"):
            current["function"]["name"] += function["name"]
        if isinstance(function.get("arguments"), str):
            current["function"]["arguments"] += function["arguments"]

    @property
    def finished(self) -> bool:
        """A finish_reason arrived: the answer is whole even if `[DONE]` never comes."""
        return self._finish_reason is not None

    def completion(self) -> JSONObject:
        """The stream as the completion a non-streamed call would have returned."""
        message: JSONObject = {"role": "assistant", "content": "".join(self._content)}
        if self._tool_calls:
            message["tool_calls"] = [self._tool_calls[i] for i in sorted(self._tool_calls)]
            if not self._content:
                message["content"] = None
        return {
            **self._meta,
            "choices": [
                {"index": 0, "message": message, "finish_reason": self._finish_reason or "stop"}
            ],
            "usage": self._usage,
        }


def completion_as_sse(completion: JSONObject) -> list[bytes]:
    """A whole completion as stream chunks: the message as one delta, then the usage chunk."""
    ids = {k: completion[k] for k in ("request_id", "id", "model", "created") if k in completion}
    events = []
    for index, choice in enumerate(completion.get("choices") or []):
        if not isinstance(choice, dict):
            continue
        message = dict(choice.get("message") or {})
        if "tool_calls" not in message and choice.get("tool_calls"):
            message["tool_calls"] = choice["tool_calls"]
        if message.get("tool_calls"):
            message["tool_calls"] = [
                {"index": i, **call} for i, call in enumerate(message["tool_calls"])
            ]
        events.append(
            sse_data(
                {
                    **ids,
                    "object": "chat.completion.chunk",
                    "choices": [
                        {
                            "index": choice.get("index", index),
                            "delta": message,
                            "finish_reason": choice.get("finish_reason"),
                        }
                    ],
                }
            )
        )
    events.append(
        sse_data(
            {
                **ids,
                "object": "chat.completion.chunk",
                "choices": [],
                "usage": completion.get("usage") or {},
            }
        )
    )
    return events
