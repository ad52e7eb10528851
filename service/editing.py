"""EditingService: what chat front ends do to a conversation besides appending to it. Truncate,
fork, export and import live here; regenerate and edit-and-resend are turns (ChatService, with
`RegenerateCreate` or `replace_from`), so they share its lease, fencing, idempotency, streaming
and atomic commit.

Seqs are positions: a message's seq is its place in the log, so a rewrite (truncate, regenerate,
edit and resend) gives the messages that replace the tail the seqs of those they replace. Each
rewrite moves the log's `generation` on; a page read with an older generation is refused (409),
so a client paging backwards never gets a page of another log than the one it started on.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal, cast

import orjson
from pydantic import ValidationError

from service import limits
from service.errors import (
    ConversationExists,
    ConversationNotFound,
    InvalidRequest,
    LogRewritten,
    SeqBeyondLog,
    ServiceError,
    StoreUnavailable,
)
from service.idempotency import Idempotency, IdempotentRecord, key_hash, reused
from service.ids import random_id
from service.lease import wait_for_lease
from service.log_edits import PAGE_SIZE, Created, LogEditStore, Outcome, Slice
from service.models import META, ConversationMeta, JSONObject, Message, Role
from service.schemas import (
    ConversationUpdate,
    ExportHeader,
    ExportMessage,
    ExportSummary,
    timestamp,
)
from service.store import ConversationRef, Waiting
from service.tokens import message_tokens

# What a fork carries over of the source's metadata: its settings. Usage totals, the summary
# job's state and the log generation start afresh; summaries and the window start are carried
# when they still apply to the copied prefix (`_carried`).
SETTINGS_FIELDS = (
    "system",
    "model",
    "token_budget",
    "ttl_seconds",
    "metadata",
    "trim_low_water",
    "summary_enabled",
    "summary_model",
)
_SUMMARY_RECORD = ("text", "through", "version", "by", "at")
EXPORT_FORMAT: Literal[1] = 1


@dataclass(frozen=True, slots=True)
class EditPolicy:
    lock_wait_seconds: float  # LOCK_WAIT_SECONDS: how long a truncate waits for a turn


def idempotency(key: str | None, *request: Any) -> Idempotency | None:
    """The stored form of an Idempotency-Key for an editing request: its hash, and the request's
    canonical fingerprint (the operation and its arguments)."""
    if key is None:
        return None
    return Idempotency(
        key_hash=key_hash(key),
        fingerprint=hashlib.sha256(orjson.dumps(list(request))).hexdigest(),
    )


def _fail(ref: ConversationRef, outcome: Outcome, *, seq: int | None = None) -> ServiceError:
    if outcome == "gone":
        return ConversationNotFound(f"no conversation {ref.id!r}")
    if outcome == "beyond":
        return SeqBeyondLog(f"conversation {ref.id!r} has no message {seq}")
    if outcome == "rewritten":
        return LogRewritten(
            f"conversation {ref.id!r} was rewritten meanwhile (regenerate, edit or truncate); "
            "start again"
        )
    if outcome == "exists":
        return ConversationExists(f"conversation {ref.id!r} exists already")
    if outcome == "mismatch":
        return reused()
    return StoreUnavailable("the copy expired before it was complete; retry")


def _carried(meta: ConversationMeta | None, through: int) -> dict[str, str]:
    """The metadata fields a copy of the first `through` messages keeps: the settings, the
    summaries covering no more than it, and the window start when it falls inside it."""
    if meta is None:
        return {}
    dumped = META.dump_python(meta, exclude_none=True)
    fields: dict[str, str] = {}
    for name in SETTINGS_FIELDS:
        if name in dumped:
            value = dumped[name]
            if name == "metadata":
                fields[name] = orjson.dumps(value).decode()
            elif isinstance(value, bool):
                fields[name] = "1" if value else "0"
            else:
                fields[name] = str(value)
    for prefix, text, covers in (
        ("summary_", meta.summary_text, meta.summary_through),
        ("summary_next_", meta.summary_next_text, meta.summary_next_through),
    ):
        if text and 0 < covers <= through:
            for part in _SUMMARY_RECORD:
                value = dumped.get(f"{prefix}{part}")
                if value is not None:
                    fields[f"{prefix}{part}"] = value if isinstance(value, str) else repr(value)
    if "summary_text" not in fields:  # `next` is built on `current`: never one without it
        fields = {k: v for k, v in fields.items() if not k.startswith("summary_next_")}
    if meta.window_start is not None and meta.window_start <= through:
        fields["window_start"] = str(meta.window_start)
    return fields


def _export_message(record: bytes) -> bytes | None:
    """One message line of an export; None for a record that does not read back."""
    try:
        message = Message.from_json(record)
    except ValidationError:
        return None
    line: JSONObject = {"type": "message", "seq": message.seq, **message.to_wire()}
    line["created_at"] = timestamp(message.created_at).isoformat()
    return orjson.dumps(line) + b"\n"


def _header(ref: ConversationRef, meta: ConversationMeta, first: Slice) -> bytes:
    settings = ConversationUpdate.model_validate(
        {
            "system": meta.system,
            "model": meta.model,
            "token_budget": meta.token_budget,
            "ttl_seconds": meta.ttl_seconds,
            "metadata": meta.metadata,
            "trim_low_water": meta.trim_low_water,
            "summary": {"enabled": meta.summary_enabled, "model": meta.summary_model},
        },
        strict=False,
    )
    summary = (
        ExportSummary(text=meta.summary_text, covers_through=meta.summary_through)
        if meta.summary_text and meta.summary_through > 0
        else None
    )
    header = ExportHeader(
        type="conversation",
        format=EXPORT_FORMAT,
        id=ref.id,
        created_at=timestamp(meta.created_at),
        updated_at=timestamp(meta.updated_at),
        message_count=first.length,
        generation=first.generation,
        window_start=meta.window_start,
        settings=settings,
        summary=summary,
    )
    return header.model_dump_json(exclude_none=True).encode() + b"\n"


class EditingService:
    def __init__(self, edits: LogEditStore, policy: EditPolicy) -> None:
        self._edits = edits
        self._policy = policy

    async def truncate(
        self, ref: ConversationRef, from_seq: int, idempotency_key: str | None
    ) -> Created:
        """Remove message `from_seq` and every later one, once no turn holds the conversation."""
        idem = idempotency(idempotency_key, "truncate", from_seq)

        async def attempt() -> Waiting | Created | Outcome:
            return await self._edits.cut(ref, from_seq, idem)

        # mypy solves `Waiting | R` against a wider union as object; it never returns Waiting.
        done = cast(
            Created | Outcome,
            await wait_for_lease(attempt, wait_seconds=self._policy.lock_wait_seconds),
        )
        if isinstance(done, Created):
            return done
        raise _fail(ref, done, seq=from_seq)

    async def _pages(
        self, ref: ConversationRef, first: Slice, through: int
    ) -> AsyncIterator[Slice]:
        """The first `through` records, a page at a time, all of the generation `first` read."""
        done = 0
        current = first
        while True:
            take = min(len(current.records), through - done)
            yield Slice(
                current.generation,
                current.length,
                None,
                current.records[:take],
                current.tokens[:take],
            )
            done += take
            if done >= through:
                return
            nxt = await self._edits.read(
                ref, done, min(done + PAGE_SIZE, through) - 1, generation=first.generation
            )
            if not isinstance(nxt, Slice):
                raise _fail(ref, nxt)
            current = nxt

    async def fork(
        self,
        ref: ConversationRef,
        new: ConversationRef,
        through_seq: int | None,
        idempotency_key: str | None,
    ) -> Created:
        """Copy the first `through_seq` messages (all when None) into a new conversation, with
        the settings; 409 if `new` exists. Reads the source page by page without its lease:
        appends leave the copied prefix as it is, and a rewrite meanwhile is seen (409)."""
        idem = idempotency(idempotency_key, "fork", ref.id, new.id, through_seq)
        if idem is None:
            return await self._fork(ref, new, through_seq, None)
        # The key is scoped by the route's conversation, the source; the answer is kept with the
        # new conversation (another slot on a Cluster, so not one script). Claim the key on the
        # source first: another fork (or turn) under it is 422 there. A claim left by a call
        # that died is this request's: its retry goes on and creates or replays.
        record = IdempotentRecord(
            idem, orjson.dumps({"fork": new.id, "claim": random_id()})
        ).encoded()
        claim = await self._edits.claim(ref, idem, record)
        if claim == "gone":
            raise ConversationNotFound(f"no conversation {ref.id!r}")
        if claim == "mismatch":
            raise reused()
        try:
            return await self._fork(ref, new, through_seq, idem)
        except StoreUnavailable:
            raise  # the copy may have been made: keep the claim, a retry replays it
        except ServiceError:
            # Nothing was created (409, 404, 422): a failed request holds no key, so give back
            # the claim this call made, unless it has expired and been taken meanwhile.
            if claim == "claimed":
                with contextlib.suppress(StoreUnavailable):  # it expires by itself
                    await self._edits.release(ref, idem, record)
            raise

    async def _fork(
        self,
        ref: ConversationRef,
        new: ConversationRef,
        through_seq: int | None,
        idem: Idempotency | None,
    ) -> Created:
        first = await self._edits.read(ref, 0, PAGE_SIZE - 1, generation=None)
        if not isinstance(first, Slice):
            raise _fail(ref, first)
        through = first.length if through_seq is None else through_seq
        if through > first.length:
            raise SeqBeyondLog(f"through_seq: conversation {ref.id!r} has no message {through}")
        body = orjson.dumps({"id": new.id, "message_count": through, "generation": 0})
        pages = ((page.records, page.tokens) async for page in self._pages(ref, first, through))
        created = await self._edits.create(
            new,
            pages=pages if through else _no_pages(),
            fields=_carried(first.meta, through),
            body=body,
            idempotency=idem,
        )
        if isinstance(created, Created):
            return created
        raise _fail(new, created)

    async def export(self, ref: ConversationRef) -> AsyncIterator[bytes]:
        """JSON Lines: the conversation and its settings, then every message, oldest first, read
        a page at a time. Raises here (404) before anything is sent; a rewrite during the export
        ends it with an `error` line rather than mixing two logs."""
        first = await self._edits.read(ref, 0, PAGE_SIZE - 1, generation=None)
        if not isinstance(first, Slice):
            raise _fail(ref, first)
        meta = first.meta
        if meta is None:
            raise ConversationNotFound(f"no conversation {ref.id!r}")
        return self._export_lines(ref, meta, first)

    async def _export_lines(
        self, ref: ConversationRef, meta: ConversationMeta, first: Slice
    ) -> AsyncIterator[bytes]:
        yield _header(ref, meta, first)
        try:
            async for page in self._pages(ref, first, first.length):
                for record in page.records:
                    line = _export_message(record)
                    if line is not None:
                        yield line
        except ServiceError as exc:
            yield orjson.dumps({"type": "error", "error": exc.problem()}) + b"\n"

    async def import_(
        self,
        ref: ConversationRef,
        raw: bytes,
        parsed: tuple[ExportHeader, list[Message]],
        idempotency_key: str | None,
    ) -> Created:
        """Create `ref` from `raw`, an export parsed by parse_import; 409 if it exists."""
        header, messages = parsed
        idem = idempotency(idempotency_key, "import", hashlib.sha256(raw).hexdigest())
        fields = header.settings.meta_changes()[0]
        count = len(messages)
        if header.summary is not None and header.summary.covers_through <= count:
            fields.update(
                {
                    "summary_text": header.summary.text,
                    "summary_through": str(header.summary.covers_through),
                    "summary_version": "1",
                    "summary_at": repr(time.time()),
                }
            )
        start = header.window_start
        if start is not None and start <= count and messages[start - 1].role is Role.USER:
            fields["window_start"] = str(start)
        records = [m.to_json() for m in messages]
        tokens = [m.tokens for m in messages]
        body = orjson.dumps({"id": ref.id, "message_count": count, "generation": 0})
        created = await self._edits.create(
            ref,
            pages=_in_pages(records, tokens),
            fields=fields,
            body=body,
            idempotency=idem,
        )
        if isinstance(created, Created):
            return created
        raise _fail(ref, created)


async def _no_pages() -> AsyncIterator[tuple[list[bytes], list[int]]]:
    return
    yield  # an async generator that yields nothing


async def _in_pages(
    records: list[bytes], tokens: list[int]
) -> AsyncIterator[tuple[list[bytes], list[int]]]:
    for i in range(0, len(records), PAGE_SIZE):
        yield records[i : i + PAGE_SIZE], tokens[i : i + PAGE_SIZE]


def _line_problem(number: int, exc: ValidationError) -> InvalidRequest:
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error.get("loc", ())) or "line"
    return InvalidRequest(f"line {number}: {where}: {error.get('msg', 'invalid')}")


def _parsed_line(number: int, line: bytes) -> None:
    """A line is JSON and nests no deeper than a turn may."""
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"line {number}: not JSON") from exc
    if limits.json_depth_exceeds(value):
        raise InvalidRequest(f"line {number}: {limits.depth_problem()}")


def parse_import(raw: bytes, *, max_messages: int) -> tuple[ExportHeader, list[Message]]:
    """An export read back, line by line: a header line, then one line per message with `seq`
    its position. Raises InvalidRequest naming the first bad line; nothing is stored before
    every line passed."""
    lines = [line for line in raw.split(b"\n") if line.strip()]
    if not lines:
        raise InvalidRequest("line 1: the conversation line is missing")
    if len(lines) - 1 > max_messages:
        raise InvalidRequest(f"at most {max_messages} messages may be imported")
    _parsed_line(1, lines[0])
    try:
        header = ExportHeader.model_validate_json(lines[0])
    except ValidationError as exc:
        raise _line_problem(1, exc) from exc
    now = time.time()
    messages: list[Message] = []
    for number, line in enumerate(lines[1:], start=2):
        _parsed_line(number, line)
        try:
            item = ExportMessage.model_validate_json(line)
        except ValidationError as exc:
            raise _line_problem(number, exc) from exc
        seq = len(messages) + 1
        if item.seq != seq:
            raise InvalidRequest(f"line {number}: seq: expected {seq} (messages in order)")
        wire = item.to_wire()
        created_at = item.created_at.timestamp() if item.created_at else now
        messages.append(
            Message.stored(wire, tokens=message_tokens(wire), seq=seq, created_at=created_at)
        )
    return header, messages
