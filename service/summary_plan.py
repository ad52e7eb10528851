"""Rolling summaries, the pure part: a conversation's summary state, what to fold next, the
summarisation request, and the system message that forwards a summary. No I/O here.

A summary covers a prefix of the stored log (`covers_through`: seq 1 to N) that the forwarded
window no longer shows. The stored log is never altered: a summary only stands in for messages
that trimming leaves out anyway.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from service.models import USER, ConversationMeta, JSONObject, Message
from service.tokens import corrected, message_tokens

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
# Once the forwarded array passes this share of the budget, the job for the next jump starts, so
# that the summary is ready when the window moves (issue 15: one cache miss per cycle, not two).
PREFETCH_SHARE = 0.85


@dataclass(frozen=True, slots=True)
class SummaryRecord:
    """One stored summary: it covers seq 1 to `covers_through`."""

    text: str
    covers_through: int
    version: int
    model: str | None  # the model that wrote it
    created_at: float | None


@dataclass(frozen=True, slots=True)
class SummaryState:
    """A conversation's summaries and the health of its job (from the metadata hash).

    Two records, so a summary made ahead of the window's next jump (`next`) never replaces the
    one forwarded until then (`current`): the forwarded prefix changes only when the window start
    moves. A turn that forwards `next` makes it `current` in its commit."""

    current: SummaryRecord | None
    next: SummaryRecord | None
    input_tokens: int  # totals of every summary call, apart from the turns' usage
    output_tokens: int
    failures: int  # consecutive failed jobs; 0 after a success
    retry_at: float  # epoch seconds: no job before this (back-off)

    @property
    def newest(self) -> SummaryRecord | None:
        current, upcoming = self.current, self.next
        if current is None or upcoming is None:  # asked every turn: most have one or none
            return upcoming if current is None else current
        return max(current, upcoming, key=lambda r: (r.covers_through, r.version))

    @property
    def covers_through(self) -> int:
        """How far the newest summary reaches; 0: none."""
        newest = self.newest
        return newest.covers_through if newest is not None else 0

    def usable(self, start: int) -> SummaryRecord | None:
        """The newest summary that covers nothing at or after seq `start` (a window's first)."""
        records = [r for r in (self.current, self.next) if r and r.covers_through < start]
        return max(records, key=lambda r: (r.covers_through, r.version), default=None)


@dataclass(frozen=True, slots=True)
class SummaryUse:
    """What a turn forwards of its conversation's summary, and how the summary is made. Only
    with summaries on: a turn with them off has none (SummaryService.for_turn)."""

    state: SummaryState
    record: SummaryRecord | None  # the summary forwarded; None: none
    message: JSONObject | None  # the system message after the pinned prompt
    tokens: int  # its local estimate
    model: str  # the summariser's model

    @property
    def covers_through(self) -> int:
        return self.record.covers_through if self.record is not None else 0

    def without(self) -> SummaryUse:
        """The same, forwarding no summary."""
        return dataclasses.replace(self, record=None, message=None, tokens=0)

    def ahead(self) -> SummaryUse | None:
        """The same, forwarding the summary a job made ahead of the window's move (`next`), if
        there is one reaching further than the one forwarded now."""
        upcoming = self.state.next
        if upcoming is None or upcoming.covers_through <= self.covers_through:
            return None
        message = _summary_wire(upcoming)
        return dataclasses.replace(
            self, record=upcoming, message=message, tokens=message_tokens(message)
        )


def _record(
    text: str | None, through: int, version: int, model: str | None, at: float | None
) -> SummaryRecord | None:
    if not text or through <= 0:
        return None
    return SummaryRecord(text, through, version, model, at)


def summary_state(meta: ConversationMeta | None, stored: int | None = None) -> SummaryState:
    """The summaries in `meta`; with `stored` (the log's length), a summary covering more than the
    log holds (the log was cut back by an edit that did not forget it) is left out."""
    if meta is None:
        return SummaryState(None, None, 0, 0, 0, 0.0)
    state = SummaryState(
        current=_record(
            meta.summary_text,
            meta.summary_through,
            meta.summary_version,
            meta.summary_by,
            meta.summary_at,
        ),
        next=_record(
            meta.summary_next_text,
            meta.summary_next_through,
            meta.summary_next_version,
            meta.summary_next_by,
            meta.summary_next_at,
        ),
        input_tokens=meta.summary_input_tokens,
        output_tokens=meta.summary_output_tokens,
        failures=meta.summary_failures,
        retry_at=meta.summary_retry_at,
    )
    current, upcoming = state.current, state.next
    if stored is None or (
        (current is None or current.covers_through <= stored)
        and (upcoming is None or upcoming.covers_through <= stored)
    ):
        return state
    return dataclasses.replace(
        state,
        current=state.current if state.current and state.current.covers_through <= stored else None,
        next=state.next if state.next and state.next.covers_through <= stored else None,
    )


_RECORD_FIELDS = ("text", "through", "version", "by", "at")


def fields_to_forget(meta: ConversationMeta | None, from_seq: int) -> list[str]:
    """The metadata fields an operation that rewrites the log from seq `from_seq` on (an edit, a
    delete of messages) must clear in the same script: the summaries that cover any rewritten
    message. `next` is built on `current`, so it goes whenever `current` goes."""
    state = summary_state(meta)
    forget: list[str] = []
    if state.current is not None and state.current.covers_through >= from_seq:
        forget += [f"summary_{name}" for name in _RECORD_FIELDS]
    if forget or (state.next is not None and state.next.covers_through >= from_seq):
        forget += [f"summary_next_{name}" for name in _RECORD_FIELDS]
    return forget


def promotion(use: SummaryUse | None) -> dict[str, str]:
    """Metadata a turn's commit writes when it forwarded the `next` summary: it becomes
    `current`, so a later job may store another `next` without touching what is forwarded."""
    if use is None or use.record is None or use.record == use.state.current:
        return {}
    record = use.record
    return {
        "summary_text": record.text,
        "summary_through": str(record.covers_through),
        "summary_version": str(record.version),
        "summary_by": record.model or "",
        "summary_at": repr(record.created_at or 0.0),
    }


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


def summary_message(record: SummaryRecord | None) -> JSONObject | None:
    """The system message forwarded right after the pinned system prompt. Its bytes depend only
    on the stored summary, so they change only when another summary is forwarded."""
    return _summary_wire(record) if record is not None else None


def _summary_wire(record: SummaryRecord) -> JSONObject:
    return {
        "role": "system",
        "content": (
            f"Summary of the earlier conversation (messages 1 to {record.covers_through}, "
            f"no longer shown):\n{record.text}"
        ),
    }


def _turns(messages: Sequence[Message]) -> list[list[Message]]:
    """Consecutive groups, each starting at a user message (a leading group may not)."""
    groups: list[list[Message]] = []
    for message in messages:
        if message.role is USER or not groups:
            groups.append([message])
        else:
            groups[-1].append(message)
    return groups


def ahead_cut(history: Sequence[Message], *, budget: int, factor: float, low_water: float) -> int:
    """The last seq the window's next move should leave out, 0 for none: the oldest whole turns of
    `history` (what the next turn would forward, oldest first) worth `1 - low_water` of `budget`
    (the gateway's units, through `factor`) plus one more turn like the newest. When the history
    grows back to the budget and the window moves there, the rest then uses at most about
    `low_water` of it. The newest turn always stays: it may be an open one."""
    turns = _turns(history)
    if len(turns) < 2:
        return 0
    need = (1 - low_water) * budget + corrected(sum(m.tokens for m in turns[-1]), factor)
    dropped = 0
    cut = 0
    for turn in turns[:-1]:
        if corrected(dropped, factor) >= need:
            break
        dropped += sum(m.tokens for m in turn)
        cut = turn[-1].seq
    return cut


def prefetch_through(
    history: Sequence[Message],
    *,
    fixed_tokens: int,
    budget: int,
    factor: float,
    low_water: float,
    history_tokens: int,
) -> int:
    """How far the next summary should reach, decided after a turn: the next move's cut once the
    forwarded array passes PREFETCH_SHARE of the budget, else 0 (not yet). `history_tokens`: the
    history's estimates summed (a turn has the sum: trimming made it)."""
    used = corrected(fixed_tokens + history_tokens, factor)
    if used < PREFETCH_SHARE * budget:
        return 0
    return ahead_cut(history, budget=budget, factor=factor, low_water=low_water)


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
    """Stored messages before the window that no stored summary covers yet."""
    return max(0, first_forwarded_seq - 1 - state.covers_through)


def turn_context(use: SummaryUse | None, first_forwarded_seq: int) -> JSONObject:
    """The summary a turn forwarded, and how many left-out messages it does not cover
    (`summary_lag`); both null with summaries off."""
    if use is None:
        return {"summary": None, "summary_lag": None}
    record = use.record
    return {
        "summary": (
            {"version": record.version, "covers_through": record.covers_through}
            if record is not None
            else None
        ),
        "summary_lag": max(0, first_forwarded_seq - 1 - use.covers_through),
    }
