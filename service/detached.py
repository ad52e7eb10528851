"""Detached turns (issue 16): a streamed turn that runs to its end whatever its client does.

The replica that takes the turn drives ChatService's own stream (relay, commit, abandon: the same
code as any streamed turn) in a task of its own, and appends every event to the turn's journal
(TurnJournal, a Redis Stream). Every client, the one that started the turn included, reads the
journal: from the start, or after the `id:` of the last event it saw, on any replica. So a client
that reconnects gets exactly the bytes it would have got, with no gap and no repeat.

- Exactly once: the turn commits once, in ChatService, under its lease. A retry with the same
  Idempotency-Key attaches to the running turn; once it ended, ChatService replays it.
- Cancel: any replica writes a cancel request to the journal; the replica running the turn
  watches for it and cancels the turn's scope, which closes the upstream call and releases the
  lease without storing anything (ChatService's abandon path, as for a client that went away).
- A replica that dies mid-turn takes the upstream call with it: its lease expires, nothing was
  stored, and readers on other replicas, seeing the turn's `alive` key expire, end with an error
  event saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import anyio

from service import metrics
from service.auth import Caller
from service.chat import ChatService, Resolver
from service.errors import ServiceError
from service.idempotency import Idempotency, fingerprint, key_hash
from service.ids import random_id
from service.models import JSONObject
from service.schemas import TurnCreate, TurnStatus
from service.store import ConversationRef
from service.streaming import DONE, PING_COMMENT, sse_event
from service.turn_journal import Entry, State, TurnJournal

log = logging.getLogger("service.detached")

MAX_BLOCK_MS = 5000  # a blocking read stays well under the Redis client's socket timeout (10 s)
ERROR_EVENT = b"event: error\n"
CANCEL_POLL_SECONDS = 0.25


class TurnNotFound(ServiceError):
    status = 404
    title = "No such turn"
    slug = "turn-not-found"


class NoRunningTurn(ServiceError):
    status = 409
    title = "No running detached turn"
    slug = "no-running-turn"


class TurnCancelled(ServiceError):
    status = 409
    title = "Turn cancelled"
    slug = "turn-cancelled"


class TurnLost(ServiceError):
    status = 503
    title = "Turn lost"
    slug = "turn-lost"


class EventsTrimmed(ServiceError):
    status = 410
    title = "Events no longer kept"
    slug = "events-trimmed"


@dataclass(frozen=True, slots=True)
class DetachedPolicy:
    lease_seconds: float  # LOCK_TTL_SECONDS: a dead replica's turn is known lost after this
    ping_seconds: float
    cancel_wait_seconds: float  # how long POST /cancel waits to see the turn stop
    shutdown_seconds: float  # how long a stopping replica lets its detached turns finish


@dataclass(slots=True)
class _Running:
    scope: anyio.CancelScope
    reason: str = field(default="")


def _error_event(error: ServiceError) -> bytes:
    return sse_event("error", {"error": error.problem()})


def _final_state(piece: bytes) -> State | None:
    """The state a turn ends in with this event, or None if more follow."""
    if piece == DONE:
        return "done"
    if piece.startswith(ERROR_EVENT):
        return "failed"
    return None


def with_id(turn_id: str, entry: Entry) -> bytes:
    return f"id: {turn_id}-{entry.n}\n".encode() + entry.data


class DetachedTurns:
    def __init__(self, chat: ChatService, journal: TurnJournal, policy: DetachedPolicy) -> None:
        self._chat = chat
        self._journal = journal
        self._policy = policy
        self._running: dict[str, _Running] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def _lease_ms(self) -> int:
        return int(self._policy.lease_seconds * 1000)

    @property
    def _block_ms(self) -> int:
        """How long one read waits: a ping goes out, and the turn's replica is checked, this
        often; the replica renews its `alive` key as often, a third of a lease."""
        seconds = min(self._policy.ping_seconds, self._policy.lease_seconds / 3)
        return max(10, min(MAX_BLOCK_MS, int(seconds * 1000)))

    # ---- starting, attaching, resuming --------------------------------------------------------

    async def start(
        self,
        ref: ConversationRef,
        request: TurnCreate,
        *,
        caller: Caller,
        request_id: str,
        idempotency_key: str | None,
        on_open: Callable[[JSONObject], None] | None = None,
        resolve: Resolver | None = None,
    ) -> tuple[AsyncIterator[bytes], bool]:
        """Start a detached turn (or attach to the one this Idempotency-Key started) and follow
        it from its first event. Errors up to the gateway's first byte raise here, as for any
        turn. The flag says whether this is a replay or an attachment."""
        body_fingerprint = fingerprint(request)
        idem = key_hash(idempotency_key) if idempotency_key else ""
        if idem:
            idempotency = Idempotency(idem, body_fingerprint)
            current = await self._journal.pointer(ref)
            if (
                current is not None
                and current.state == "running"
                and idempotency.is_running_as(current.idem, current.fingerprint)
            ):
                return self.follow(ref, current.id, after=0), True
        turn_id = random_id()[:16]
        # Before the lease: readers may wait on the turn from its first moment. A turn that
        # fails to start leaves only this key, which expires within a lease.
        await self._journal.mark_alive(ref, turn_id, self._lease_ms)
        events, replayed = await self._chat.stream(
            ref,
            request,
            caller=caller,
            request_id=request_id,
            idempotency_key=idempotency_key,
            on_open=on_open,
            resolve=resolve,
        )
        if replayed:
            return events, True
        running = _Running(anyio.CancelScope())
        self._running[turn_id] = running
        task = asyncio.create_task(
            self._drive(ref, turn_id, events, running, idem=idem, body_fingerprint=body_fingerprint)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return self.follow(ref, turn_id, after=0), False

    async def resume(self, ref: ConversationRef, event_id: str | None) -> AsyncIterator[bytes]:
        """Follow a turn after an event id (`<turn>-<n>`, as the route's pattern admits), or the
        latest detached turn after its n-th event (`n`) or from its start (None)."""
        if event_id is None or "-" not in event_id:
            current = await self._journal.pointer(ref)
            if current is None:
                raise TurnNotFound(f"conversation {ref.id!r} has no detached turn to stream")
            turn_id, after = current.id, int(event_id or 0)
        else:
            turn_id, _, n = event_id.partition("-")
            after = int(n)
        if not await self._journal.known(ref, turn_id):
            raise TurnNotFound(f"turn {turn_id} is not known (its events expired, or never were)")
        return self.follow(ref, turn_id, after=after)

    async def follow(
        self, ref: ConversationRef, turn_id: str, *, after: int
    ) -> AsyncIterator[bytes]:
        """The turn's events after the `after`-th, live until its last one, each with its id.
        Pings (comments, no id) while it is silent."""
        last = after
        metrics.DETACHED_READERS.inc()
        try:
            while True:
                entries = await self._journal.read(
                    ref, turn_id, after=last, block_ms=self._block_ms
                )
                if not entries:
                    if await self._journal.alive(ref, turn_id):
                        yield PING_COMMENT
                        continue
                    # It may have ended between the read and this look: one more read.
                    entries = await self._journal.read(ref, turn_id, after=last, block_ms=None)
                    if not entries:
                        yield _error_event(
                            TurnLost(
                                "the replica running this turn stopped before it ended; "
                                "nothing was stored, so the turn can be sent again"
                            )
                        )
                        return
                for entry in entries:
                    if entry.n != last + 1:
                        yield _error_event(
                            EventsTrimmed(
                                f"event {last + 1} of this turn is no longer kept "
                                "(DETACHED_MAX_EVENTS); its reply is in the conversation"
                            )
                        )
                        return
                    yield with_id(turn_id, entry)
                    last = entry.n
                    if entry.last:
                        return
        except ServiceError as exc:  # Redis went away: headers are sent, say it in the stream
            yield _error_event(exc)
        finally:
            metrics.DETACHED_READERS.dec()

    # ---- the replica running the turn ---------------------------------------------------------

    async def _drive(
        self,
        ref: ConversationRef,
        turn_id: str,
        events: AsyncIterator[bytes],
        running: _Running,
        *,
        idem: str,
        body_fingerprint: str,
    ) -> None:
        """Run the turn to its end, appending its events to the journal. Appends are shielded:
        a cancel lands between events, where ChatService stores nothing unless it committed."""
        n = 0
        ended = unjournaled = False
        with running.scope:
            watcher = asyncio.create_task(self._watch(ref, turn_id, running))
            try:
                try:
                    await self._journal.begin(
                        ref,
                        turn_id,
                        idem=idem,
                        fingerprint=body_fingerprint,
                        lease_ms=self._lease_ms,
                    )
                except ServiceError:  # nobody could follow it: cancel it, which stores nothing
                    running.reason = "the turn could not be journaled (Redis unavailable)"
                    running.scope.cancel()
                async with contextlib.aclosing(events):  # type: ignore[type-var]
                    async for piece in events:
                        if piece == PING_COMMENT:  # readers make their own
                            continue
                        n += 1
                        final = _final_state(piece)
                        with anyio.CancelScope(shield=True):
                            if final is None:
                                await self._journal.append(ref, turn_id, n, piece)
                            else:
                                await self._journal.finish(ref, turn_id, n, piece, final)
                                ended = True
                                metrics.DETACHED_TURNS.labels(final).inc()
            except ServiceError:
                log.warning("detached turn could not be journaled", extra={"turn_id": turn_id})
                metrics.DETACHED_TURNS.labels("unjournaled").inc()
                unjournaled = True
            finally:
                watcher.cancel()
                self._running.pop(turn_id, None)
        if not ended:
            if not unjournaled:
                metrics.DETACHED_TURNS.labels("cancelled").inc()
            reason = running.reason or "the turn stopped before its end"
            with contextlib.suppress(ServiceError):
                await self._journal.finish(
                    ref,
                    turn_id,
                    n + 1,
                    _error_event(TurnCancelled(f"{reason}; nothing was stored")),
                    "cancelled",
                )

    async def _watch(self, ref: ConversationRef, turn_id: str, running: _Running) -> None:
        """Renew the turn's `alive` key and wait for a cancel request, a third of a lease at a
        time."""
        while True:
            try:
                if await self._journal.cancel_requested(ref, turn_id, self._block_ms):
                    running.reason = "cancelled by POST /conversations/{id}/cancel"
                    running.scope.cancel()
                    return
                await self._journal.mark_alive(ref, turn_id, self._lease_ms)
            except ServiceError:
                log.warning("detached turn heartbeat failed", extra={"turn_id": turn_id})
                await asyncio.sleep(self._block_ms / 1000)

    # ---- cancel and status ---------------------------------------------------------------------

    async def cancel(self, ref: ConversationRef) -> TurnStatus:
        """Cancel the running detached turn and wait (up to cancel_wait_seconds) until it
        stopped; 409 if there is none, or it ended first."""
        current = await self._journal.pointer(ref)
        if current is None or current.state != "running":
            raise NoRunningTurn(f"conversation {ref.id!r} has no running detached turn")
        await self._journal.request_cancel(ref, current.id)
        deadline = time.monotonic() + self._policy.cancel_wait_seconds
        pause = 0.01
        while True:
            state = await self._journal.state_of(ref, current.id)
            if state != "running" or time.monotonic() >= deadline:
                break
            await asyncio.sleep(pause)
            pause = min(pause * 2, CANCEL_POLL_SECONDS)
        if state in ("cancelled", "running"):  # running: the request stands, and will be seen
            return TurnStatus(id=current.id, state=state, detached=True)
        raise NoRunningTurn(f"turn {current.id} ended ({state}) before it could be cancelled")

    async def status(self, ref: ConversationRef) -> TurnStatus | None:
        """The running turn, detached or not; else the latest detached turn; else None."""
        current = await self._journal.pointer(ref)
        if current is not None and current.state == "running":
            return TurnStatus(id=current.id, state="running", detached=True)
        if await self._journal.lease_held(ref):
            return TurnStatus(id=None, state="running", detached=False)
        if current is not None:
            return TurnStatus(id=current.id, state=current.state, detached=True)
        return None

    async def aclose(self) -> None:
        """At shutdown: let running turns finish for a while, then cancel them (nothing of a
        cancelled turn is stored; its readers are told)."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=self._policy.shutdown_seconds)
        for running in list(self._running.values()):
            running.reason = "the replica running the turn was stopped"
            running.scope.cancel()
        if pending:
            await asyncio.wait(pending)
