"""OpenAI Chat Completions on the wire (issue 12): the request body, and pure translations of
requests, answers, stream chunks and errors between OpenAI's shapes and the service's own; a
resent history resolved to what is new in it (issue 15.3).

No I/O here: service/openai_routes.py does the calls, through ChatService like any turn.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    field_validator,
    model_validator,
)

from service import limits
from service.errors import InvalidRequest
from service.history import message_hash, new_part
from service.models import JSONObject
from service.schemas import (
    CONVERSATION_ID,
    ContentPart,
    MessageCreate,
    ToolCall,
    TurnCreate,
    integral,
    refuse_early,
)
from service.store import Started

# OpenAI's fields that the service reads itself and never forwards as they are.
OWN_FIELDS = frozenset(
    {"model", "messages", "stream", "stream_options", "metadata", "max_completion_tokens", "n"}
)
# OpenAI's fields an SDK may send that mean nothing to an LLM gateway: accepted and dropped.
DROPPED_FIELDS = frozenset({"user", "store", "service_tier", "parallel_tool_calls"})
# Our own route's fields, which are not OpenAI's: passed on, they would reach our turn model and
# act (a system prompt, an edit of the log) by a way OpenAI's request does not have.
OWN_ROUTE_FIELDS = frozenset({"message", "system", "detach", "replace_from"})
# The provider's own finish reasons (GATEWAY.md), as OpenAI names them.
FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "tool_use": "tool_calls",
    "max_tokens": "length",
    "model_length": "length",
}
OPENAI_FINISH = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})
# RFC 9457 problem slugs are kebab-case; OpenAI error codes are snake_case.
_FIELD_PATH = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*): ")


class ChatMessage(BaseModel):
    """One message of an OpenAI request: `system` and `developer` (the newer name) set the
    conversation's system prompt; the other roles are as on our own route."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: (
        StrictStr | Annotated[list[ContentPart], Field(max_length=limits.MAX_CONTENT_PARTS)] | None
    ) = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=limits.MAX_TOOL_CALLS)] | None = None
    tool_call_id: StrictStr | None = Field(default=None, max_length=limits.MAX_TEXT_CHARS)
    name: StrictStr | None = Field(default=None, max_length=limits.MAX_TEXT_CHARS)
    # What an SDK echoes back of an assistant message it received: read, never forwarded.
    refusal: StrictStr | None = None

    @model_validator(mode="after")
    def _system_shape(self) -> ChatMessage:
        # The other roles' shapes are checked by our own turn model (MessageCreate).
        if self.role in ("system", "developer"):
            if self.content is None:
                raise ValueError(f"a {self.role} message needs 'content'")
            extra = {"tool_calls", "tool_call_id"} & self.model_fields_set
            if extra:
                raise ValueError(f"a {self.role} message cannot carry '{sorted(extra)[0]}'")
        if self.role != "assistant" and "refusal" in self.model_fields_set:
            raise ValueError("only an assistant message may carry 'refusal'")
        return self

    def as_new(self) -> JSONObject:
        """The message as our own route's `MessageCreate` takes it (unset fields left out)."""
        return self.model_dump(
            mode="json", exclude_unset=True, exclude={"refusal"}, exclude_none=False
        )

    def text(self) -> str:
        """A system message's text: its string, or its text parts joined."""
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content if part.type == "text")
        return self.content or ""


class HistoryTurnCreate(TurnCreate):
    """A `/v1` turn whose messages may resend the whole history: up to MAX_REQUEST_MESSAGES
    here; what turns out to be new is held to MAX_NEW_MESSAGES (service/history.py)."""

    messages: (
        Annotated[list[MessageCreate], Field(min_length=1, max_length=limits.MAX_REQUEST_MESSAGES)]
        | None
    ) = None

    @model_validator(mode="before")
    @classmethod
    def _bounded(cls, value: Any) -> Any:
        return refuse_early(
            value,
            {"messages": limits.MAX_REQUEST_MESSAGES, "tools": limits.MAX_TOOLS},
            encodable=True,
        )


def resolve_history(request: TurnCreate, begun: Started) -> TurnCreate:
    """The turn of what is new in `request`'s messages, given the stored log (ChatService calls
    it under the lease): a resent history's suffix, or all of them (see history.new_part).
    HistoryDiverged when they contradict the log."""
    stored = list(begun.hashes or [])
    for index, message in (begun.unhashed or {}).items():
        if index < len(stored):
            stored[index] = message_hash(message.to_wire())
    sent = request.new_messages()
    first = new_part([message_hash(m.to_wire()) for m in sent], stored).first_new
    new = sent[first:]
    if len(new) > limits.MAX_NEW_MESSAGES:
        raise InvalidRequest(
            f"messages: at most {limits.MAX_NEW_MESSAGES} new messages in one turn (got "
            f"{len(new)}; {first} matched the stored history)"
        )
    return request.model_copy(update={"messages": new, "message": None})


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    include_usage: StrictBool = False


class ChatCompletionCreate(BaseModel):
    """`POST /v1/chat/completions`: OpenAI's request body. The parameters our own route
    forwards are forwarded; `max_completion_tokens` is the gateway's `max_tokens`; `metadata`
    may carry `conversation_id`; `user`, `store`, `service_tier` and `parallel_tool_calls` are
    accepted and dropped; any other field is 422 unless the operator allows it with
    GATEWAY_EXTRA_PARAMS."""

    model_config = ConfigDict(
        extra="allow",
        strict=True,
        json_schema_extra={
            "additionalProperties": False,
            "examples": [
                {
                    "model": "claude-sonnet-4-6",
                    "messages": [{"role": "user", "content": "What is the capital of France?"}],
                }
            ],
        },
    )

    model: StrictStr = Field(min_length=1, max_length=200)
    messages: Annotated[
        list[ChatMessage], Field(min_length=1, max_length=limits.MAX_REQUEST_MESSAGES)
    ]
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    metadata: dict[str, StrictStr] | None = Field(default=None, max_length=16)
    max_completion_tokens: Annotated[int, Field(gt=0, strict=True)] | None = None
    n: Literal[1] | None = None  # one choice: a conversation stores one reply

    # JSON has one number type: 5.0 is the integer 5 to a JSON Schema (and to schemathesis).
    _whole_max_completion_tokens = field_validator("max_completion_tokens", mode="before")(integral)

    @model_validator(mode="before")
    @classmethod
    def _bounded(cls, value: Any) -> Any:
        return refuse_early(
            value, {"messages": limits.MAX_REQUEST_MESSAGES, "tools": limits.MAX_TOOLS}
        )

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for key, text in (value or {}).items():
            if len(key) > 64 or len(text) > 512:
                raise ValueError("metadata: keys up to 64 characters, values up to 512")
        return value

    def conversation_id(self, header: str | None) -> str | None:
        """The conversation named by `X-Conversation-Id`, else by `metadata.conversation_id`."""
        named = header if header is not None else (self.metadata or {}).get("conversation_id")
        if named is not None and not CONVERSATION_ID.match(named):
            raise ValueError(
                "conversation id: 1-128 characters of A-Z a-z 0-9 . _ : -, starting with a "
                "letter or digit"
            )
        return named

    def params(self) -> JSONObject:
        """The parameters besides model, messages and stream, as our own route takes them."""
        for key in sorted(OWN_ROUTE_FIELDS.intersection(self.model_extra or {})):
            raise ValueError(
                f"{key}: not a parameter of OpenAI's Chat Completions request (system prompt: "
                "a leading system message; detached: the X-Detach header)"
            )
        params = {
            key: value
            for key, value in (self.model_extra or {}).items()
            if key not in DROPPED_FIELDS
        }
        if self.max_completion_tokens is not None and "max_tokens" not in params:
            params["max_tokens"] = self.max_completion_tokens
        return params

    def split(self) -> tuple[str | None, list[ChatMessage]]:
        """(system prompt, the other messages): leading system or developer messages are the
        system prompt (joined by blank lines); one anywhere else is refused."""
        system: list[str] = []
        rest = list(self.messages)
        while rest and rest[0].role in ("system", "developer"):
            system.append(rest.pop(0).text())
        for index, message in enumerate(rest, start=len(system)):
            if message.role in ("system", "developer"):
                raise ValueError(
                    f"messages.{index}.role: a {message.role} message may only open the "
                    "conversation (it sets the system prompt)"
                )
        return ("\n\n".join(system) if system else None), rest

    def turn(
        self,
        system: str | None,
        new: list[ChatMessage],
        *,
        stream: bool,
        detach: bool = False,
        model: type[TurnCreate] = TurnCreate,
    ) -> TurnCreate:
        """Our own route's turn body for these new messages: the same validation applies.
        `stream_options` is not passed on: the service always asks for usage, and tells the
        client only when it asked."""
        body: JSONObject = {
            **self.params(),
            "model": self.model,
            "messages": [m.as_new() for m in new],
            "stream": stream,
            "detach": detach,
        }
        if system is not None:
            body["system"] = system
        return model.model_validate(body)

    def stateless_payload(self, params: JSONObject) -> JSONObject:
        """The gateway request of a turn with no conversation: `params` (checked by our own turn
        model), the messages as sent, `developer` sent as `system` (the role the gateway
        documents)."""
        messages = []
        for message in self.messages:
            wire = message.as_new()
            if wire["role"] == "developer":
                wire["role"] = "system"
            messages.append(wire)
        return {**params, "model": self.model, "messages": messages}


def finish_reason(raw: Any) -> str | None:
    if raw is None:
        return None
    text = str(raw)
    mapped = FINISH_REASONS.get(text, text)
    return mapped if mapped in OPENAI_FINISH else "stop"


def openai_usage(usage: Any) -> JSONObject | None:
    """Usage with OpenAI's names filled from the gateway's (`input_tokens` / `output_tokens`),
    the gateway's own fields kept beside them."""
    if not isinstance(usage, dict):
        return None
    out = dict(usage)
    cached = usage.get("cache_read_input_tokens")
    written = usage.get("cache_creation_input_tokens")
    if "prompt_tokens" not in out:
        prompt = usage.get("input_tokens", 0)
        # Anthropic-style: input_tokens is the uncached part only; OpenAI's prompt is all of it.
        for part in (cached, written):
            if isinstance(part, int):
                prompt += part
        out["prompt_tokens"] = prompt
        if isinstance(cached, int) and "prompt_tokens_details" not in out:
            out["prompt_tokens_details"] = {"cached_tokens": cached}
    out.setdefault("completion_tokens", usage.get("output_tokens", 0))
    out.setdefault("total_tokens", out["prompt_tokens"] + out["completion_tokens"])
    return out


def _message(choice: JSONObject) -> JSONObject:
    message = dict(choice.get("message") or {})
    message.setdefault("role", "assistant")
    message.setdefault("content", None)
    calls = message.get("tool_calls") or choice.get("tool_calls")  # the older spec's place
    if calls:
        message["tool_calls"] = [
            {**call, "type": call.get("type") or "function"} if isinstance(call, dict) else call
            for call in calls
        ]
    return message


class Identity:
    """The id, creation time and model an answer (or every chunk of one stream) carries."""

    def __init__(self, request_id: str, model: str) -> None:
        self.id = f"chatcmpl-{request_id}"
        self.created = int(time.time())
        self.model = model

    def adopt(self, upstream: JSONObject) -> None:
        """The gateway's own id and model, when it sent them (the model may be a fallback)."""
        if isinstance(upstream.get("id"), str) and upstream["id"]:
            self.id = upstream["id"]
        elif isinstance(upstream.get("request_id"), str) and upstream["request_id"]:
            self.id = f"chatcmpl-{upstream['request_id']}"
        if isinstance(upstream.get("created"), int):
            self.created = upstream["created"]
        if isinstance(upstream.get("model"), str) and upstream["model"]:
            self.model = upstream["model"]


def completion(upstream: JSONObject, identity: Identity) -> JSONObject:
    """The gateway's completion as OpenAI's `chat.completion` (our `conversation` object, if
    there, is removed: it goes in headers)."""
    identity.adopt(upstream)
    body = {k: v for k, v in upstream.items() if k not in ("conversation", "request")}
    body.update(
        {
            "id": identity.id,
            "object": "chat.completion",
            "created": identity.created,
            "model": identity.model,
            "choices": [
                {
                    "index": choice.get("index", i),
                    "message": _message(choice),
                    "finish_reason": finish_reason(choice.get("finish_reason")) or "stop",
                    "logprobs": choice.get("logprobs"),
                }
                for i, choice in enumerate(upstream.get("choices") or [])
                if isinstance(choice, dict)
            ],
        }
    )
    usage = openai_usage(upstream.get("usage"))
    if usage is not None:
        body["usage"] = usage
    return body


class ChunkTranslator:
    """The gateway's `chat.completion.chunk`s as OpenAI's: one id, creation time and model for
    the whole stream, finish reasons in OpenAI's words, usage named as OpenAI names it and
    sent only to a client that asked for it."""

    def __init__(self, identity: Identity, *, include_usage: bool) -> None:
        self._identity = identity
        self._include_usage = include_usage
        self._adopted = False
        self._late_usage: JSONObject | None = None

    def chunk(self, upstream: Any) -> JSONObject | None:
        """The chunk to send, or None when it is not for this client."""
        if not isinstance(upstream, dict):
            return None
        if not self._adopted:
            self._identity.adopt(upstream)
            self._adopted = True
        choices = []
        for i, choice in enumerate(upstream.get("choices") or []):
            if not isinstance(choice, dict):
                continue
            delta = dict(choice.get("delta") or choice.get("message") or {})
            if delta.get("tool_calls"):
                delta["tool_calls"] = [
                    {"index": n, **call} if isinstance(call, dict) else call
                    for n, call in enumerate(delta["tool_calls"])
                ]
            choices.append(
                {
                    "index": choice.get("index", i),
                    "delta": delta,
                    "finish_reason": finish_reason(choice.get("finish_reason")),
                    "logprobs": choice.get("logprobs"),
                }
            )
        usage = openai_usage(upstream.get("usage"))
        if choices and usage is not None and self._include_usage:
            # Usage on a chunk with choices (some gateways put it on the finishing one): OpenAI
            # sends it in a chunk of its own, with no choices, which is where the SDKs read it.
            self._late_usage = {
                "id": self._identity.id,
                "object": "chat.completion.chunk",
                "created": self._identity.created,
                "model": self._identity.model,
                "choices": [],
                "usage": usage,
            }
        if not choices and (usage is None or not self._include_usage):
            return None
        chunk: JSONObject = {
            "id": self._identity.id,
            "object": "chat.completion.chunk",
            "created": self._identity.created,
            "model": self._identity.model,
            "choices": choices,
        }
        if self._include_usage:
            # OpenAI: with include_usage every chunk carries `usage`, null but on the last one.
            chunk["usage"] = usage if not choices else None
        return chunk

    def late_usage(self) -> JSONObject | None:
        """The usage chunk owed for usage that came on a chunk with choices, once."""
        late, self._late_usage = self._late_usage, None
        return late


def error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "api_error"
    return "invalid_request_error"


def error_body(problem: Any) -> JSONObject:
    """An RFC 9457 problem (our errors everywhere else) as OpenAI's error object."""
    if not isinstance(problem, dict):
        problem = {}
    status = problem.get("status")
    status = status if isinstance(status, int) else 500
    detail = str(problem.get("detail") or problem.get("title") or "error")
    kind = str(problem.get("type") or "")
    code = kind.rsplit("/", 1)[-1].replace("-", "_") if kind.startswith("/problems/") else None
    param = None
    if code == "invalid_request":
        found = _FIELD_PATH.match(detail)
        param = found.group(1) if found else None
    return {"error": {"message": detail, "type": error_type(status), "code": code, "param": param}}


def conversation_headers(conversation: Any) -> dict[str, str]:
    """Our `conversation` object as response headers (the body stays OpenAI's)."""
    if not isinstance(conversation, dict):
        return {}
    context = conversation.get("context") or {}
    headers = {
        "X-Conversation-Id": conversation.get("id"),
        "X-Conversation-Messages": conversation.get("message_count"),
        "X-Context-Messages": context.get("messages"),
        "X-Context-Tokens": context.get("estimated_tokens"),
        "X-Context-Dropped": context.get("dropped_messages"),
    }
    return {name: str(value) for name, value in headers.items() if value is not None}
