"""Domain records as stored in Redis: messages of a conversation and its settings."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

import orjson
from pydantic import BaseModel, Field, TypeAdapter
from pydantic.dataclasses import dataclass

JSONObject = dict[str, Any]
# A stored message's content. Its three shapes never overlap, so the first that validates is the
# one "smart" union mode would pick, found without its ranking of every member (issue 10).
Content = Annotated[str | list[JSONObject] | None, Field(union_mode="left_to_right")]


class Role(StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


# The user role as a plain global for loops over a window: under CPython 3.11 `Role.USER` is a
# lookup on a class whose metaclass defines `__getattr__`, about 13 times a global's cost, and a
# 200-message window made it 200 times a turn (issue 10).
USER = Role.USER


@dataclass(frozen=True, kw_only=True)
class Message:
    """One stored message; `tokens` is its local estimate, also kept in the conversation's
    token list beside the log (service/store.py), which is what the window read uses.

    A pydantic dataclass, not a BaseModel: validated alike, built and dumped by the same core, but
    without a model's per-instance fields-set and private slots, and read through plain attribute
    lookups (a model class defines `__getattr__`, which sends every read of every field through
    CPython's slower hook). A turn reads its whole window: with 200 messages the model cost a
    tenth more instructions per turn than this (7.54M against 6.77M; issue 10, callgrind)."""

    tokens: int
    seq: int
    role: Role
    content: Content = None
    tool_calls: list[JSONObject] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    cache_control: JSONObject | None = None  # prompt caching: kept, so every later turn sends it
    created_at: float

    @staticmethod
    def from_json(raw: bytes | str) -> Message:
        """One stored record; ValidationError if it does not read back."""
        return MESSAGE.validate_json(raw)

    @staticmethod
    def stored(wire: JSONObject, *, tokens: int, seq: int, created_at: float) -> Message:
        """A new message to store, from its wire form (a client's message or the gateway's reply),
        validated as its record is when read back: what would not read back is not stored.
        (From a dict, not keyword arguments: a pydantic dataclass's __init__ costs half again.)"""
        return MESSAGE.validate_python(
            {"tokens": tokens, "seq": seq, **wire, "created_at": created_at}
        )

    def to_json(self) -> bytes:
        """The stored record (absent fields left out): the bytes the adapter's dump writes
        (tests/test_models.py), by orjson at a third of its cost; the adapter itself for what
        orjson refuses (an integer beyond 64 bits)."""
        record: JSONObject = {
            "tokens": self.tokens,
            "seq": self.seq,
            **self.to_wire(),  # role, content and the optional fields set, in field order
            "created_at": self.created_at,
        }
        if self.content is None:  # the wire keeps a null content; the record leaves it out
            del record["content"]
        try:
            return orjson.dumps(record)
        except orjson.JSONEncodeError:
            return MESSAGE.dump_json(self, exclude_none=True)

    def to_wire(self) -> JSONObject:
        """The message as the gateway expects it (no seq, tokens or timestamps)."""
        # `_value_`, not `.value`: the enum property is a Python-level descriptor call, and this
        # runs once per forwarded message (a 200-message window: 200 times a turn).
        wire: JSONObject = {"role": self.role._value_, "content": self.content}
        if self.tool_calls is not None:
            wire["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            wire["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            wire["name"] = self.name
        if self.cache_control is not None:
            wire["cache_control"] = self.cache_control
        return wire


MESSAGE: TypeAdapter[Message] = TypeAdapter(Message)


@dataclass(frozen=True, kw_only=True)
class ConversationMeta:
    """The metadata hash of one conversation, parsed (`META.validate_python`). A pydantic
    dataclass like Message, for the same reason: a turn reads a dozen of its fields, each of
    them through CPython's slow attribute hook on a model."""

    created_at: float
    updated_at: float
    system: str | None = None
    model: str | None = None
    token_budget: int | None = None
    ttl_seconds: int | None = None
    metadata: JSONObject | None = None
    input_tokens: int = 0  # the prompts' full size, cached parts included
    output_tokens: int = 0
    uncached_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    window_start: int | None = None  # the seq the forwarded history begins at (service/trim.py)
    generation: int = 0  # bumped by every rewrite of the log (service/editing.py)
    trim_low_water: float | None = None  # the conversation's own TRIM_LOW_WATER
    # Rolling summaries (service/summary_plan.py): the settings `PUT summary` sets...
    summary_enabled: bool | None = None
    summary_model: str | None = None
    # ...and the stored summary with its job's state, written by service/summary_store.py.
    summary_text: str | None = None
    summary_through: int = 0
    summary_version: int = 0
    summary_by: str | None = None
    summary_at: float | None = None
    summary_next_text: str | None = None  # a newer one, forwarded once the window passes it
    summary_next_through: int = 0
    summary_next_version: int = 0
    summary_next_by: str | None = None
    summary_next_at: float | None = None
    summary_input_tokens: int = 0
    summary_output_tokens: int = 0
    summary_failures: int = 0
    summary_retry_at: float = 0.0


META: TypeAdapter[ConversationMeta] = TypeAdapter(ConversationMeta)


class ConversationSummary(BaseModel):
    id: str
    meta: ConversationMeta
    message_count: int
