"""Rolling summaries, the pure part: a conversation's summary state, what to fold next, the
summarisation request, and the system message that forwards a summary. No I/O here.

A summary covers a prefix of the stored log (`covers_through`: seq 1 to N) that the forwarded
window no longer shows. The stored log is never altered: a summary only stands in for messages
that trimming leaves out anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from service.models import ConversationMeta, JSONObject, Message, Role
from service.tokens import message_tokens

# The summariser's instructions: the first message of every summary request (the stand-in gateway
# recognises summary calls by it).
SUMMARY_INSTRUCTIONS = (
    "You keep the running summary of a conversation between a user and an assistant whose "
    "older messages no longer fit the assistant's context window. Fold the new messages into the "
    "previous summary and answer with the updated summary only, without a preamble. Keep what "
    "later turns may need: facts, names, numbers, dates, decisions, preferences and instructions "
    "the user gave, tool results that matter, open questions and commitments. Drop small talk "
    "and repetition. Be concise and write in the third person."
)
# Messages arrive as JSON lines, so no message content can blur the boundaries between them.
NEW_MESSAGES_HEADER = "New messages, one JSON object per line, oldest first:"
PREVIOUS_HEADER = "Previous summary:"
NO_PREVIOUS = "(none yet)"
# A summary longer than this many characters per allowed token is cut: a model that ignores
# max_tokens must not blow the window's budget.
MAX_CHARS_PER_TOKEN = 8


@dataclass(frozen=True, slots=True)
class SummaryState:
    """A conversation's stored summary and the health of its job (from the metadata hash)."""

    text: str | None
    covers_through: int  # the last seq the summary covers; 0: no summary
    version: int
    model: str | None  # the model that wrote it
    created_at: float | None
    input_tokens: int  # totals of every summary call, apart from the turns' usage
    output_tokens: int
    failures: int  # consecutive failed jobs; 0 after a success
    retry_at: float  # epoch seconds: no job before this (back-off)


@dataclass(frozen=True, slots=True)
class SummaryUse:
    """What a turn forwards of its conversation's summary, and how the summary is made."""

    enabled: bool
    state: SummaryState
    message: JSONObject | None  # the system message after the pinned prompt; None: none forwarded
    tokens: int  # its local estimate
    model: str  # the summariser's model

    @property
    def covers_through(self) -> int:
        return self.state.covers_through if self.message is not None else 0


def summary_state(meta: ConversationMeta | None) -> SummaryState:
    if meta is None:
        return SummaryState(None, 0, 0, None, None, 0, 0, 0, 0.0)
    return SummaryState(
        text=meta.summary_text,
        covers_through=meta.summary_through if meta.summary_text else 0,
        version=meta.summary_version,
        model=meta.summary_by,
        created_at=meta.summary_at,
        input_tokens=meta.summary_input_tokens,
        output_tokens=meta.summary_output_tokens,
        failures=meta.summary_failures,
        retry_at=meta.summary_retry_at,
    )


def summaries_enabled(meta: ConversationMeta | None, *, default: bool) -> bool:
    """The conversation's own choice (`PUT summary.enabled`), else the SUMMARY setting."""
    if meta is not None and meta.summary_enabled is not None:
        return meta.summary_enabled
    return default


def summary_model(meta: ConversationMeta | None, *, default: str | None, turn_model: str) -> str:
    """The conversation's `summary.model`, else SUMMARY_MODEL, else the turn's own model."""
    if meta is not None and meta.summary_model:
        return meta.summary_model
    return default or turn_model


def summary_message(state: SummaryState) -> JSONObject | None:
    """The system message forwarded right after the pinned system prompt. Its bytes depend only
    on the stored summary, so it changes only when a new summary is stored."""
    if not state.text or state.covers_through <= 0:
        return None
    return {
        "role": "system",
        "content": (
            f"Summary of the earlier conversation (messages 1 to {state.covers_through}, "
            f"no longer shown):\n{state.text}"
        ),
    }


def summary_message_tokens(state: SummaryState) -> int:
    wire = summary_message(state)
    return message_tokens(wire) if wire is not None else 0


def _turns(messages: Sequence[Message]) -> list[list[Message]]:
    """Consecutive groups, each starting at a user message (a leading group may not)."""
    groups: list[list[Message]] = []
    for message in messages:
        if message.role is Role.USER or not groups:
            groups.append([message])
        else:
            groups[-1].append(message)
    return groups


def next_cut(messages: Sequence[Message], *, through: int, input_cap: int) -> list[Message]:
    """What the next job folds into the summary: the oldest of `messages` (the uncovered ones,
    oldest first) in whole turns, none after seq `through`, about `input_cap` estimated tokens at
    most but always at least one turn, so a job always makes progress. `through` must end a turn
    (the message after it starts one): the window begins at a turn, and so does every cut."""
    eligible = [m for m in messages if m.seq <= through]
    chosen: list[Message] = []
    used = 0
    for turn in _turns(eligible):
        cost = sum(m.tokens for m in turn)
        if chosen and used + cost > input_cap:
            break
        chosen.extend(turn)
        used += cost
    return chosen


def _line(message: Message) -> str:
    wire: JSONObject = {"seq": message.seq, **message.to_wire()}
    wire.pop("cache_control", None)  # a caching hint, not conversation
    return orjson.dumps(wire).decode()


def summary_request(
    previous: str | None, messages: Sequence[Message], *, model: str, max_tokens: int
) -> JSONObject:
    """The gateway request that folds `messages` into `previous`: one system message with the
    instructions, one user message with the previous summary and the new messages."""
    body = "\n".join(
        [
            PREVIOUS_HEADER,
            previous or NO_PREVIOUS,
            "",
            NEW_MESSAGES_HEADER,
            *(_line(m) for m in messages),
        ]
    )
    return {
        "model": model,
        "max_tokens": max_tokens,
        "messages": [
            {"role": "system", "content": SUMMARY_INSTRUCTIONS},
            {"role": "user", "content": body},
        ],
    }


def summary_text(reply_content: object, *, max_tokens: int) -> str | None:
    """The summary from the gateway's reply content; None when there is none to store."""
    if isinstance(reply_content, list):
        reply_content = "".join(
            part["text"]
            for part in reply_content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    if not isinstance(reply_content, str):
        return None
    text = reply_content.strip()[: max_tokens * MAX_CHARS_PER_TOKEN]
    return text or None


def uncovered(first_forwarded_seq: int, state: SummaryState) -> int:
    """Stored messages before the window that no summary covers (the summary's lag)."""
    return max(0, first_forwarded_seq - 1 - state.covers_through)


def turn_context(use: SummaryUse | None, first_forwarded_seq: int) -> JSONObject:
    """The summary a turn forwarded, and how many left-out messages no forwarded summary covers
    (`summary_lag`); both null with summaries off."""
    if use is None or not use.enabled:
        return {"summary": None, "summary_lag": None}
    if use.message is None:
        return {"summary": None, "summary_lag": max(0, first_forwarded_seq - 1)}
    return {
        "summary": {"version": use.state.version, "covers_through": use.state.covers_through},
        "summary_lag": uncovered(first_forwarded_seq, use.state),
    }
