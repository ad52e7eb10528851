"""Wire models: what clients send and what they get back."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

import orjson
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
from service.models import ConversationMeta, ConversationSummary, JSONObject, Message
from service.summary_plan import summaries_enabled, summary_state

if TYPE_CHECKING:  # config imports the end-user rules, which import these schemas
    from service.config import Settings

CONVERSATION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
MAX_METADATA_BYTES = limits.MAX_METADATA_BYTES
# What the gateway documents (GATEWAY.md), plus `top_p` and `stop`, the common OpenAI ones; any
# other field is refused unless the operator lists it in GATEWAY_EXTRA_PARAMS.
GATEWAY_PARAMS = (
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "stream_options",
    "tools",
    "tool_choice",
    "response_format",
    "fallbacks",
    "fallback_config",
    "post_processing_steps",
    "transcript_id",
    "model_region",
)


def _encodable(value: Any) -> bytes:
    """JSON allows lone surrogates (`"\\ud800"`) and integers of any size; no UTF-8 store or
    upstream accepts the first, and the gateway client's encoder stops at 64 bits."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError as exc:
        raise ValueError(
            "text must be valid Unicode (no lone surrogates) and integers within 64 bits"
        ) from exc


def integral(value: object) -> object:
    """JSON has one number type: `5.0` is the integer 5 to a JSON Schema, so to us too."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def timestamp(epoch_seconds: float) -> datetime:
    return datetime.fromtimestamp(epoch_seconds, tz=UTC)


class ContentPart(BaseModel):
    """One part of a message's content; parts other than text are forwarded as given."""

    model_config = ConfigDict(extra="allow", strict=True)

    type: StrictStr = Field(max_length=limits.MAX_TEXT_CHARS)
    text: StrictStr | None = None

    @model_validator(mode="after")
    def _text_part_has_text(self) -> ContentPart:
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs 'text'")
        return self


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    name: StrictStr
    arguments: StrictStr = ""


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    id: StrictStr
    type: StrictStr = "function"
    function: ToolCallFunction


# The fields of a message that is only a role and its text (anything else set goes the long way).
_TEXT_ONLY = frozenset({"role", "content"})


class MessageCreate(BaseModel):
    """A new message from the client. Only user, assistant and tool roles may be sent."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["user", "assistant", "tool"]
    content: (
        StrictStr | Annotated[list[ContentPart], Field(max_length=limits.MAX_CONTENT_PARTS)] | None
    ) = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=limits.MAX_TOOL_CALLS)] | None = None
    tool_call_id: StrictStr | None = Field(default=None, max_length=limits.MAX_TEXT_CHARS)
    name: StrictStr | None = Field(default=None, max_length=limits.MAX_TEXT_CHARS)
    cache_control: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _shape_fits_role(self) -> MessageCreate:
        # Fields of other roles are refused even when null: one shape per role (see openapi.py).
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs 'tool_call_id'")
        if self.role != "tool" and "tool_call_id" in self.model_fields_set:
            raise ValueError("only a tool message may carry 'tool_call_id'")
        if self.role != "assistant" and "tool_calls" in self.model_fields_set:
            raise ValueError("only an assistant message may carry 'tool_calls'")
        if self.role == "assistant":
            if self.content is None and not self.tool_calls:
                raise ValueError("an assistant message needs 'content' or 'tool_calls'")
        elif self.content is None:
            raise ValueError(f"a {self.role} message needs 'content'")
        return self

    def to_wire(self) -> JSONObject:
        content = self.content
        if type(content) is str and self.model_fields_set <= _TEXT_ONLY:
            # The usual message, role and text: the dump below without its cost (issue 10).
            return {"role": self.role, "content": content}
        return self.model_dump(mode="json", exclude_none=True) | {"content": self._content()}

    def _content(self) -> Any:
        if isinstance(self.content, list):
            return [part.model_dump(mode="json", exclude_none=True) for part in self.content]
        return self.content


def refuse_early(value: Any, lists: dict[str, int], *, encodable: bool = False) -> Any:
    """Shape checks on the raw body, before any model is built: list lengths (cheapest), then
    depth; with `encodable`, that the body encodes (`_encodable`: the raw body holds every field
    the model keeps, and encoding it is a fraction of dumping the built model first)."""
    if not isinstance(value, dict):
        return value
    for field, limit in lists.items():
        problem = limits.count_problem(field, value.get(field), limit)
        if problem is not None:
            raise ValueError(problem)
    if limits.json_depth_exceeds(value):
        raise ValueError(limits.depth_problem())
    if encodable:
        _encodable(value)
    return value


# Fields of a turn's body that are not gateway parameters (the messages go on their own).
_NOT_FORWARDED = frozenset(
    {"message", "messages", "model", "system", "stream", "detach", "replace_from"}
)


class TurnParams(BaseModel):
    """What every call that asks the gateway for a completion may carry: model, system prompt,
    `stream`, and the gateway parameters. A turn adds its new message(s) (TurnCreate); a
    regenerate carries only these (RegenerateCreate).

    Only the parameters the gateway documents are accepted, and those the operator adds with
    GATEWAY_EXTRA_PARAMS; any other field is 422 naming it.
    """

    model_config = ConfigDict(
        extra="allow",  # kept, then checked against GATEWAY_EXTRA_PARAMS (see limits.py's callers)
        strict=True,
    )

    model: StrictStr | None = Field(default=None, min_length=1, max_length=200)
    system: StrictStr | None = Field(default=None, max_length=limits.MAX_SYSTEM_CHARS)
    stream: StrictBool = False
    max_tokens: Annotated[int, Field(gt=0, strict=True)] | None = None
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: (
        StrictStr | Annotated[list[StrictStr], Field(max_length=limits.MAX_STOP_SEQUENCES)] | None
    ) = None
    stream_options: dict[str, Any] | None = None
    tools: Annotated[list[dict[str, Any]], Field(max_length=limits.MAX_TOOLS)] | None = None
    tool_choice: StrictStr | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    fallbacks: (
        Annotated[list[StrictStr | dict[str, Any]], Field(max_length=limits.MAX_FALLBACKS)] | None
    ) = None
    fallback_config: dict[str, Any] | None = None
    post_processing_steps: list[dict[str, Any]] | None = None
    transcript_id: StrictStr | None = Field(default=None, max_length=limits.MAX_TEXT_CHARS)
    model_region: StrictStr | None = Field(default=None, max_length=limits.MAX_TEXT_CHARS)

    @model_validator(mode="before")
    @classmethod
    def _bounded(cls, value: Any) -> Any:
        return refuse_early(
            value,
            {
                "messages": limits.MAX_NEW_MESSAGES,
                "tools": limits.MAX_TOOLS,
                "fallbacks": limits.MAX_FALLBACKS,
            },
            encodable=True,
        )

    _whole_max_tokens = field_validator("max_tokens", mode="before")(integral)

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _number(cls, value: object) -> object:
        if isinstance(value, bool) or not (value is None or isinstance(value, int | float)):
            raise ValueError("must be a number")
        return value

    def new_messages(self) -> list[MessageCreate]:
        """The message(s) this call stores before the reply; none for a regenerate."""
        return []

    def unknown_fields(self, allowed_extra: frozenset[str]) -> list[str]:
        """Fields that are neither ours, nor the gateway's, nor on the operator's allow-list."""
        return sorted(set(self.model_extra or {}) - allowed_extra)

    def gateway_params(self) -> JSONObject:
        """Everything forwarded besides model and messages."""
        if self.model_fields_set <= _NOT_FORWARDED and not self.model_extra:
            return {}  # the usual turn sends no parameters: no dump (issue 10)
        params = self.model_dump(
            mode="json",
            exclude_none=True,
            exclude=set(_NOT_FORWARDED),
        )
        params.update(self.model_extra or {})
        for reserved in ("messages", "model", "stream"):
            params.pop(reserved, None)
        return params


class TurnCreate(TurnParams):
    """`POST /conversations/{id}/messages`: exactly one of `message` (the newest message) or
    `messages` (several new ones), plus gateway parameters; with `replace_from` (a stored user
    message's seq), the new message(s) and the reply replace the log from that seq on.

    Only the parameters the gateway documents are accepted, and those the operator adds with
    GATEWAY_EXTRA_PARAMS; any other field is 422 naming it.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [{"required": ["message"]}, {"required": ["messages"]}],
            "additionalProperties": False,
            "examples": [
                {"message": {"role": "user", "content": "What is the capital of France?"}},
                {
                    "messages": [
                        {
                            "role": "assistant",
                            "content": None,
                            "tool_calls": [
                                {
                                    "id": "call-1",
                                    "type": "function",
                                    "function": {"name": "weather", "arguments": "{}"},
                                }
                            ],
                        },
                        {"role": "tool", "tool_call_id": "call-1", "content": "sunny"},
                    ],
                    "model": "claude-sonnet-4-6",
                    "max_tokens": 200,
                },
            ],
        },
    )

    message: MessageCreate | None = None
    messages: (
        Annotated[list[MessageCreate], Field(min_length=1, max_length=limits.MAX_NEW_MESSAGES)]
        | None
    ) = None
    # Run to the end whatever the client does; resumable and cancellable (service/detached.py).
    detach: StrictBool = False
    # Edit and resend (service/editing.py): the stored messages from this seq on (a user
    # message) are replaced by the new message(s) and the reply.
    replace_from: Annotated[int, Field(ge=1, le=2**53, strict=True)] | None = None

    @model_validator(mode="after")
    def _one_of_message_or_messages(self) -> TurnCreate:
        explicit_null = {"message", "messages"} & self.model_fields_set
        if (self.message is None) == (self.messages is None) or any(
            getattr(self, field) is None for field in explicit_null
        ):
            raise ValueError("send exactly one of 'message' or 'messages'")
        new = self.new_messages()
        if not new:
            raise ValueError("'messages' must not be empty")
        if new[-1].role not in ("user", "tool"):
            raise ValueError("the last new message must be a user or tool message")
        if self.replace_from is not None and new[0].role != "user":
            raise ValueError("with 'replace_from' the first new message must be a user message")
        if self.detach and not self.stream:
            raise ValueError("'detach' needs 'stream': true (a detached turn is read as a stream)")
        return self

    _whole_replace_from = field_validator("replace_from", mode="before")(integral)

    def new_messages(self) -> list[MessageCreate]:
        return [self.message] if self.message is not None else list(self.messages or [])


class RegenerateCreate(TurnParams):
    """`POST /conversations/{id}/regenerate`: a new completion for the history up to the last
    user message, replacing what follows it; gateway parameters and `stream` as for a turn."""

    model_config = ConfigDict(
        json_schema_extra={
            "additionalProperties": False,
            "examples": [{}, {"max_tokens": 200, "temperature": 1.0}],
        },
    )


class SummarySettings(BaseModel):
    """`summary` in `PUT /conversations/{id}`: rolling summaries of what falls out of the
    window. Fields sent are set, null clears (back to SUMMARY / SUMMARY_MODEL), absent stay."""

    model_config = ConfigDict(extra="forbid", strict=True)

    enabled: StrictBool | None = None
    model: StrictStr | None = Field(default=None, min_length=1, max_length=200)

    def meta_changes(self) -> tuple[dict[str, str], list[str]]:
        """(fields to set, fields to clear) of the conversation's metadata hash."""
        sent = self.model_dump(exclude_unset=True)
        set_fields: dict[str, str] = {}
        clear: list[str] = []
        for name, value in sent.items():
            field = f"summary_{name}"
            if value is None:
                clear.append(field)
            else:
                set_fields[field] = ("1" if value else "0") if name == "enabled" else value
        return set_fields, clear


class ConversationUpdate(BaseModel):
    """`PUT /conversations/{id}`: fields sent are set, null clears, absent stays as it was."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"system": "You are terse.", "ttl_seconds": 3600, "metadata": {"user": "u-1"}}
            ]
        },
    )

    system: StrictStr | None = Field(default=None, max_length=limits.MAX_SYSTEM_CHARS)
    model: StrictStr | None = Field(default=None, min_length=1, max_length=200)
    token_budget: Annotated[int, Field(ge=64, le=10_000_000, strict=True)] | None = None
    ttl_seconds: Annotated[int, Field(ge=0, le=10 * 365 * 24 * 3600, strict=True)] | None = None
    metadata: dict[str, Any] | None = None
    summary: SummarySettings | None = None
    # The share of the budget a window jumps back to when it overflows (service/trim.py).
    trim_low_water: Annotated[float, Field(gt=0, le=1, strict=True)] | None = None

    _whole_numbers = field_validator("token_budget", "ttl_seconds", mode="before")(integral)

    def meta_changes(self) -> tuple[dict[str, str], list[str]]:
        """(fields to set, fields to clear) of the conversation's metadata hash."""
        sent = self.model_dump(exclude_unset=True, exclude={"summary"})
        set_fields = {
            k: (orjson.dumps(v).decode() if k == "metadata" else str(v))
            for k, v in sent.items()
            if v is not None
        }
        clear_fields = [k for k, v in sent.items() if v is None]
        if "summary" in self.model_fields_set:
            if self.summary is None:
                clear_fields += ["summary_enabled", "summary_model"]
            else:
                more, less = self.summary.meta_changes()
                set_fields.update(more)
                clear_fields += less
        return set_fields, clear_fields

    @model_validator(mode="before")
    @classmethod
    def _bounded(cls, value: Any) -> Any:
        return refuse_early(value, {})

    @field_validator("metadata")
    @classmethod
    def _small(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and len(_encodable(value)) > MAX_METADATA_BYTES:
            raise ValueError(f"metadata must serialise to at most {MAX_METADATA_BYTES} bytes")
        return value

    @field_validator("system", "model")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        if value is not None:
            _encodable(value)
        return value


class MessagePublic(BaseModel):
    seq: int
    role: str
    content: str | list[JSONObject] | None
    tool_calls: list[JSONObject] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    created_at: datetime

    @classmethod
    def from_record(cls, message: Message) -> MessagePublic:
        """Optional fields are set only where present, so `exclude_unset` leaves out the rest."""
        optional = {
            field: value
            for field in ("tool_calls", "tool_call_id", "name")
            if (value := getattr(message, field)) is not None
        }
        return cls(
            seq=message.seq,
            role=message.role.value,
            content=message.content,
            created_at=timestamp(message.created_at),
            **optional,
        )


class MessagePage(BaseModel):
    messages: list[MessagePublic]
    has_more: bool
    # Bumped by every rewrite of the log (truncate, regenerate, edit and resend): a client paging
    # with `before=` sends it back as `generation=`, and a page of a rewritten log is 409.
    generation: int


class ForkCreate(BaseModel):
    """`POST /conversations/{id}/fork`: a new conversation `new_id` whose history is this one's
    first `through_seq` messages (all of them when absent)."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"new_id": "chat-42-branch", "through_seq": 4}]},
    )

    new_id: StrictStr = Field(min_length=1, max_length=128, pattern=CONVERSATION_ID.pattern)
    through_seq: Annotated[int, Field(ge=1, le=2**53, strict=True)] | None = None

    _whole_through_seq = field_validator("through_seq", mode="before")(integral)


class EditResult(BaseModel):
    """What a truncate, fork or import left: the conversation's id, its stored messages and its
    log generation."""

    id: str
    message_count: int
    generation: int


class Usage(BaseModel):
    """The turns' totals as the gateway reported them. `input_tokens` is the prompts' full size;
    the three parts below split it by how the provider's prompt cache served it."""

    input_tokens: int
    output_tokens: int
    uncached_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0


class SummaryUsage(BaseModel):
    input_tokens: int
    output_tokens: int


class SummaryPublic(BaseModel):
    """The conversation's rolling summary: its settings, the newest summary and its job."""

    enabled: bool
    model: str | None  # the summariser's model; null: the conversation's own
    text: str | None
    covers_through: int  # the last seq the summary covers; 0: none yet
    version: int
    created_at: datetime | None
    written_by: str | None  # the model that wrote it
    usage: SummaryUsage  # every summary call's tokens, kept apart from the turns' usage
    failures: int  # consecutive failed jobs
    retry_after: datetime | None  # no job before this, after failures

    @classmethod
    def from_meta(
        cls, meta: ConversationMeta, *, default_enabled: bool, default_model: str | None
    ) -> SummaryPublic:
        state = summary_state(meta)
        newest = state.newest
        return cls(
            enabled=summaries_enabled(meta, default=default_enabled),
            model=meta.summary_model or default_model,
            text=newest.text if newest else None,
            covers_through=newest.covers_through if newest else 0,
            version=newest.version if newest else 0,
            created_at=(
                timestamp(newest.created_at) if newest and newest.created_at is not None else None
            ),
            written_by=newest.model if newest else None,
            usage=SummaryUsage(input_tokens=state.input_tokens, output_tokens=state.output_tokens),
            failures=state.failures,
            retry_after=timestamp(state.retry_at) if state.retry_at else None,
        )


class ConversationPublic(BaseModel):
    id: str
    created_at: datetime
    updated_at: datetime
    message_count: int
    model: str | None
    system: str | None
    token_budget: int
    usage: Usage
    metadata: JSONObject | None
    ttl_seconds: int
    summary: SummaryPublic
    trim_low_water: float  # its own, or TRIM_LOW_WATER
    window_start: int  # the seq the forwarded history begins at (1: the beginning)
    turn: TurnStatus | None = None  # the running turn, else the latest detached one

    @classmethod
    def from_summary(cls, summary: ConversationSummary, settings: Settings) -> ConversationPublic:
        """The stored record, with the settings' defaults where the conversation sets none."""
        meta = summary.meta
        return cls(
            id=summary.id,
            created_at=timestamp(meta.created_at),
            updated_at=timestamp(meta.updated_at),
            message_count=summary.message_count,
            model=meta.model,
            system=meta.system,
            token_budget=meta.token_budget or settings.token_budget,
            usage=Usage(
                input_tokens=meta.input_tokens,
                output_tokens=meta.output_tokens,
                uncached_input_tokens=meta.uncached_input_tokens,
                cache_read_input_tokens=meta.cache_read_input_tokens,
                cache_creation_input_tokens=meta.cache_creation_input_tokens,
            ),
            metadata=meta.metadata,
            ttl_seconds=(
                meta.ttl_seconds
                if meta.ttl_seconds is not None
                else settings.conversation_ttl_seconds
            ),
            summary=SummaryPublic.from_meta(
                meta,
                default_enabled=settings.summary == "on",
                default_model=settings.summary_model,
            ),
            trim_low_water=meta.trim_low_water or settings.trim_low_water,
            window_start=meta.window_start or 1,
        )


class ConversationListItem(BaseModel):
    id: str
    created_at: datetime
    updated_at: datetime
    message_count: int
    model: str | None
    metadata: JSONObject | None

    @classmethod
    def from_summary(cls, summary: ConversationSummary) -> ConversationListItem:
        meta = summary.meta
        return cls(
            id=summary.id,
            created_at=timestamp(meta.created_at),
            updated_at=timestamp(meta.updated_at),
            message_count=summary.message_count,
            model=meta.model,
            metadata=meta.metadata,
        )


class ConversationList(BaseModel):
    conversations: list[ConversationListItem]
    next_cursor: str | None


class TurnSummary(BaseModel):
    version: int
    covers_through: int


class ExportSummary(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    text: StrictStr = Field(min_length=1, max_length=limits.MAX_SYSTEM_CHARS)
    covers_through: Annotated[int, Field(ge=1, le=2**53, strict=True)]


class ExportHeader(BaseModel):
    """The first line of an export (and of an import): the conversation and its settings.
    `settings` takes what `PUT /conversations/{id}` takes; the rest is informative on import,
    besides `summary` (kept when it covers no more than the imported messages)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["conversation"]
    format: Literal[1]
    id: StrictStr | None = Field(default=None, max_length=128)
    created_at: datetime | None = None
    updated_at: datetime | None = None
    message_count: Annotated[int, Field(ge=0, strict=True)] | None = None
    generation: Annotated[int, Field(ge=0, strict=True)] | None = None
    window_start: Annotated[int, Field(ge=1, le=2**53, strict=True)] | None = None
    settings: ConversationUpdate
    summary: ExportSummary | None = None


class ExportMessage(MessageCreate):
    """One message line of an export (and of an import): a stored message, `seq` its position."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["message"]
    seq: Annotated[int, Field(ge=1, le=2**53, strict=True)]
    created_at: datetime | None = None

    def to_wire(self) -> JSONObject:
        wire = super().to_wire()
        for field in ("type", "seq", "created_at"):
            wire.pop(field, None)
        return wire


class TurnContext(BaseModel):
    messages: int
    estimated_tokens: int
    dropped_messages: int
    token_budget: int
    summary: TurnSummary | None = None  # the summary forwarded; null: none
    summary_lag: int | None = None  # left-out messages no summary covers yet; null: summaries off


class TurnConversation(BaseModel):
    id: str
    message_count: int
    context: TurnContext


class TurnPublic(BaseModel):
    """A turn's answer: the gateway's completion as it came (other fields pass through), plus
    `conversation`, describing what was stored and what was forwarded."""

    model_config = ConfigDict(extra="allow")

    request_id: str | None = None
    choices: list[JSONObject]
    usage: JSONObject | None = None
    conversation: TurnConversation


class Problem(BaseModel):
    """Every error (RFC 9457, `application/problem+json`)."""

    type: str
    title: str
    status: int
    detail: str


class TurnStatus(BaseModel):
    """A conversation's running turn, or its latest detached one (issue 16)."""

    id: str | None = Field(
        description="the detached turn's id (its events' ids start with it); null for a turn "
        "that is not detached"
    )
    state: Literal["running", "done", "failed", "cancelled", "lost"]
    detached: bool


class ContextPreview(BaseModel):
    """`POST /conversations/{id}/context`: what a turn with this body would forward now."""

    request: JSONObject  # the gateway request body: model, messages, parameters
    messages: list[JSONObject]  # the forwarded array, cache breakpoints included
    estimated_tokens: list[int]  # each message, in the gateway's units (the learned correction)
    estimated_total: int  # the whole array, as trimming counted it against the budget
    breakpoints: list[int]  # indexes of the messages the service gave a cache breakpoint
    window_start: int  # the seq the forwarded history begins at
    window_jumped: bool  # this turn would move the window start
    dropped_messages: int
    summary: TurnSummary | None
    summary_lag: int | None
    token_budget: int
    budget_source: Literal["conversation", "token_budget_setting", "model_context_length"]
