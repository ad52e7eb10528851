"""ChatService: one turn of a conversation, from lease to commit. No FastAPI, no redis here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import anyio
import orjson

from service import metrics
from service.auth import Caller
from service.cache_breakpoints import (
    client_marks,
    needs_breakpoints,
    place_breakpoints,
    stored_marks,
)
from service.catalog import ModelCatalog, catalog_budget
from service.errors import (
    ConversationBusy,
    ConversationNotFound,
    GatewayError,
    IdempotentRequestInFlight,
    InvalidRequest,
    NothingToRegenerate,
    OverTokenBudget,
    SeqBeyondLog,
    ServiceError,
)
from service.gateway import (
    GatewayClient,
    Reply,
    UpstreamStream,
    parse_reply,
    record_upstream_time,
)
from service.history import message_hash
from service.idempotency import Idempotency, IdempotentRecord, lease_value, reused
from service.lease import Renewal, wait_for_lease
from service.logs import annotate
from service.models import ConversationMeta, JSONObject, Message
from service.relay import relay_upstream
from service.schemas import RegenerateCreate, TurnCreate, TurnParams
from service.store import (
    ConversationRef,
    ConversationStore,
    Mismatch,
    Refused,
    Replay,
    Started,
    Waiting,
)
from service.streaming import DONE, StreamAssembler, completion_as_sse, sse_event
from service.summaries import SummaryService, summary_window
from service.summary_plan import SummaryUse, promotion, turn_context
from service.tokens import (
    ARRAY_OVERHEAD,
    corrected,
    corrected_each,
    message_tokens,
    next_factor,
    tools_tokens,
)
from service.trim import BudgetExceeded, Window, choose_window, continues_turn, fetch_scale

_TOKENS = operator.attrgetter("tokens")  # a stored message's estimate, read in C
log = logging.getLogger("service.chat")
R = TypeVar("R")
# A request that may resend the history: given the stored log (hashes included), the turn of
# what is new in it (service/openai_service.py).
Resolver = Callable[[TurnCreate, Started], TurnCreate]

MAX_WINDOW_MESSAGES = 10_000


@dataclass(frozen=True, slots=True)
class TurnPolicy:
    default_model: str
    token_budget: int
    lock_wait_seconds: float
    lease_seconds: float
    turn_seconds: float = 120.0  # the gateway's time limit: no turn holds its lease longer
    ping_seconds: float = 15.0  # a comment line this often while a stream is silent
    trim_low_water: float = 0.6  # TRIM_LOW_WATER: the share of the budget a window jumps to
    cache_control_models: tuple[str, ...] = ("claude-*",)  # CACHE_CONTROL_MODELS
    cache_min_tokens: int = 1024  # CACHE_MIN_TOKENS


@dataclass(frozen=True, slots=True)
class TurnResult:
    body: bytes  # the response JSON
    replayed: bool


@dataclass(slots=True)
class _Turn:
    """A turn that holds its conversation's lease and knows what it will forward."""

    ref: ConversationRef
    lock_value: str
    started: Started
    request: TurnParams
    idempotency: Idempotency | None
    model: str
    budget: int
    window: Window
    payload: JSONObject
    raw_estimate: int  # the forwarded array, in local estimate units
    new_messages: list[JSONObject]
    renewal: Renewal
    deadline: float  # loop time: the turn's one time limit, from taking the lease to the commit
    summary: SummaryUse | None  # None: this service runs no summaries
    first_seq: int  # the first stored message forwarded (or the first new one)
    upstream_key: str | None  # the caller's gateway key (pass-through), for the summary job
    request_id: str
    # A regenerate or an edit: the seq the log is rewritten from, and (regenerate) the stored
    # user message answered again, which stays where it is.
    rewrite_from: int | None = None
    carried: tuple[Message, ...] = ()


@dataclass(frozen=True, slots=True)
class Budget:
    tokens: int
    source: str  # "conversation", "token_budget_setting" or "model_context_length"


@dataclass(frozen=True, slots=True)
class Plan:
    """What a turn forwards, decided before the gateway is called."""

    model: str
    budget: Budget
    window: Window
    summary: SummaryUse | None
    payload: JSONObject  # the gateway request body, breakpoints included
    estimates: list[int]  # each forwarded message, in the gateway's units (when asked for)
    breakpoints: list[int]  # indexes of the messages given a cache breakpoint
    raw_estimate: int  # the forwarded array, in local estimate units


class ChatService:
    def __init__(
        self,
        store: ConversationStore,
        gateway: GatewayClient,
        policy: TurnPolicy,
        *,
        summaries: SummaryService | None = None,
        catalog: ModelCatalog | None = None,
    ) -> None:
        self._store = store
        self._gateway = gateway
        self._policy = policy
        self._summaries = summaries
        self._catalog = catalog

    async def turn(
        self,
        ref: ConversationRef,
        request: TurnParams,
        *,
        caller: Caller,
        request_id: str,
        idempotency_key: str | None,
        resolve: Resolver | None = None,
    ) -> TurnResult:
        """Run one turn and answer with the gateway's JSON plus the `conversation` object."""
        opened = await self._open(ref, request, idempotency_key, caller, request_id, resolve)
        if isinstance(opened, Replay):
            return TurnResult(body=opened.body, replayed=True)
        committed = False
        try:
            completion, reply = await self._gateway.complete(
                opened.payload,
                client_key=caller.upstream_key,
                request_id=request_id,
                deadline=opened.deadline,
            )
            body = await self._commit(opened, completion, reply)
            committed = True
            return TurnResult(body=body, replayed=False)
        finally:
            if not committed:
                await self._abandon(opened)

    async def stream(
        self,
        ref: ConversationRef,
        request: TurnParams,
        *,
        caller: Caller,
        request_id: str,
        idempotency_key: str | None,
        on_open: Callable[[JSONObject], None] | None = None,
        resolve: Resolver | None = None,
    ) -> tuple[AsyncIterator[bytes], bool]:
        """Open a streamed turn. Errors up to the gateway's first byte raise here; the returned
        iterator relays the chunks, commits at the end, and stores nothing if cut short.
        The flag says whether this is an idempotent replay. `on_open` is given the
        `conversation` object as known before the first byte (for response headers)."""
        opened = await self._open(ref, request, idempotency_key, caller, request_id, resolve)
        if isinstance(opened, Replay):
            if on_open is not None:
                on_open(orjson.loads(opened.body).get("conversation") or {})
            return _replay_as_sse(opened.body), True
        try:
            upstream = await self._gateway.open_stream(
                opened.payload,
                client_key=caller.upstream_key,
                request_id=request_id,
                deadline=opened.deadline,
            )
        except BaseException:
            await self._abandon(opened)
            raise
        if on_open is not None:
            on_open(_conversation(opened))
        return self._relay(opened, upstream), False

    async def _relay(self, turn: _Turn, upstream: UpstreamStream) -> AsyncIterator[bytes]:
        committed = False
        timed = False  # the upstream time is recorded once, whether the stream ended well or not
        try:
            if upstream.completion is not None:  # the model ignored stream: true
                body = await self._shielded_commit(
                    turn, upstream.completion, parse_reply(upstream.completion)
                )
                committed = True
                for event in completion_as_sse(upstream.completion):
                    yield event
            else:
                assembler = StreamAssembler()
                pieces = relay_upstream(
                    upstream,
                    assembler,
                    deadline=turn.deadline,
                    ping_seconds=self._policy.ping_seconds,
                    limit_seconds=self._policy.turn_seconds,
                )
                async with contextlib.aclosing(pieces):
                    async for piece in pieces:
                        yield piece
                completion = assembler.completion()
                record_upstream_time(upstream.started)
                timed = True
                body = await self._shielded_commit(turn, completion, parse_reply(completion))
                committed = True
            yield sse_event("conversation", {"conversation": orjson.loads(body)["conversation"]})
            yield DONE
        except (ServiceError, ValueError) as exc:  # ValueError: a chunk that is not JSON
            # Headers are sent: the failure can only be told in the stream itself.
            problem = (
                exc.problem()
                if isinstance(exc, ServiceError)
                else GatewayError(f"the gateway's stream failed ({type(exc).__name__})").problem()
            )
            log.warning("stream failed", extra={"error": type(exc).__name__})
            metrics.TURNS.labels("stream_failed").inc()
            yield sse_event("error", {"error": problem})
        finally:
            with anyio.CancelScope(shield=True):  # a client that left cancels us: clean up anyway
                if not timed:  # a stream that failed or was cut off took upstream time too
                    record_upstream_time(upstream.started)
                await upstream.aclose()
                if not committed:
                    annotate(stream_completed=False)
                    await self._abandon(turn)

    # ---- the steps of a turn -------------------------------------------------------------------

    async def _open(
        self,
        ref: ConversationRef,
        request: TurnParams,
        idempotency_key: str | None,
        caller: Caller,
        request_id: str,
        resolve: Resolver | None = None,
    ) -> _Turn | Replay:
        """Wait for the lease (or a replay), then choose the window and build the payload.
        `resolve` (a request that may resend the history) is given the stored log's hashes under
        the lease and answers the turn of what is new; it may raise, and then nothing is stored."""
        idempotency = Idempotency.of(idempotency_key, request)
        new_wire = [m.to_wire() for m in request.new_messages()]
        replace_from = request.replace_from if isinstance(request, TurnCreate) else None
        regenerate = isinstance(request, RegenerateCreate)
        lock_value = lease_value(idempotency)
        lease_ms = int(self._policy.lease_seconds * 1000)
        requested_model = request.model or self._policy.default_model
        scale = fetch_scale(self._store.known_factor(ref.tenant, requested_model))

        async def attempt() -> Started | Replay | Mismatch | Refused | Waiting:
            return await self._store.begin_turn(
                ref,
                lock_value=lock_value,
                lease_ms=lease_ms,
                default_budget=self._policy.token_budget,
                budget_scale=scale,
                max_messages=MAX_WINDOW_MESSAGES,
                idempotency=idempotency,
                replace_from=replace_from,
                regenerate=regenerate,
                hashes=resolve is not None,
            )

        waited = time.monotonic()
        try:
            # mypy solves `Waiting | R` against a wider union as object; it never returns Waiting.
            begun = cast(
                Started | Replay | Mismatch | Refused,
                await wait_for_lease(attempt, wait_seconds=self._policy.lock_wait_seconds),
            )
        except (ConversationBusy, IdempotentRequestInFlight):
            metrics.LOCK_WAIT.observe(time.monotonic() - waited)  # the longest waits count too
            raise
        if isinstance(begun, Mismatch):
            raise reused()
        if isinstance(begun, Refused):
            raise refusal(ref, begun, replace_from)
        if isinstance(begun, Replay):
            metrics.TURNS.labels("replayed").inc()
            return begun
        # One deadline for the whole turn, from here: the gateway call, its retries and the stream
        # all end by it, and the lease is renewed until it (and one lease beyond) has passed.
        deadline = asyncio.get_running_loop().time() + self._policy.turn_seconds
        renewal = Renewal(self._store, ref, lock_value, lease_ms=lease_ms, until=deadline)
        try:
            if resolve is not None and isinstance(request, TurnCreate):
                request = resolve(request, begun)
                new_wire = [m.to_wire() for m in request.new_messages()]
            carried = (begun.again,) if begun.again is not None else ()
            if regenerate and not carried:  # its record did not read back
                raise NothingToRegenerate("the last user message cannot be read")
            turn = self._plan(
                ref,
                request,
                begun,
                lock_value,
                idempotency,
                [m.to_wire() for m in carried] or new_wire,
                renewal,
                deadline,
                upstream_key=caller.upstream_key,
                request_id=request_id,
            )
            if begun.stored is not None:
                turn.rewrite_from = begun.length + 1 + len(carried)
                turn.carried = carried
                turn.new_messages = new_wire
            return turn
        except BaseException:
            renewal.cancel()
            await self._store.release(ref, lock_value)
            raise

    def _plan(
        self,
        ref: ConversationRef,
        request: TurnParams,
        begun: Started,
        lock_value: str,
        idempotency: Idempotency | None,
        new_wire: list[JSONObject],
        renewal: Renewal,
        deadline: float,
        *,
        upstream_key: str | None,
        request_id: str,
    ) -> _Turn:
        plan = self._forwarded(ref, request, begun, new_wire)
        window = plan.window
        annotate(dropped_messages=window.dropped_messages, estimated_tokens=window.estimated_tokens)
        return _Turn(
            ref=ref,
            lock_value=lock_value,
            started=begun,
            request=request,
            idempotency=idempotency,
            model=plan.model,
            budget=plan.budget.tokens,
            window=window,
            payload=plan.payload,
            raw_estimate=plan.raw_estimate,
            new_messages=new_wire,
            renewal=renewal,
            deadline=deadline,
            summary=plan.summary,
            first_seq=window.start,
            upstream_key=upstream_key,
            request_id=request_id,
        )

    def _budget(self, meta: ConversationMeta | None, model: str, max_tokens: Any) -> Budget:
        """The conversation's own budget, else min(TOKEN_BUDGET, the model's context length less
        the turn's max_tokens) from the gateway's catalog."""
        if meta is not None and meta.token_budget:
            return Budget(meta.token_budget, "conversation")
        limits = self._catalog.limits(model) if self._catalog is not None else None
        reserve = max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else None
        return Budget(*catalog_budget(self._policy.token_budget, limits, reserve))

    def _forwarded(
        self,
        ref: ConversationRef,
        request: TurnParams,
        begun: Started,
        new_wire: list[JSONObject],
        *,
        with_estimates: bool = False,
    ) -> Plan:
        """What a turn forwards: the window chosen (service/trim.py), the summary with it, and
        prompt-cache breakpoints on the forwarded copy. Raises OverTokenBudget."""
        meta = begun.meta
        model = request.model or (meta.model if meta else None) or self._policy.default_model
        system = request.system if request.system is not None else (meta.system if meta else None)
        system_wire = [{"role": "system", "content": system}] if system else []
        params = request.gateway_params()
        budget = self._budget(meta, model, params.get("max_tokens"))
        # Tool definitions are pinned like the system prompt: the gateway counts them.
        system_estimates = [*map(message_tokens, system_wire)]
        new_estimates = [*map(message_tokens, new_wire)]
        system_tokens = sum(system_estimates) + tools_tokens(params.get("tools"))
        new_tokens = sum(new_estimates)
        factor = self._store.cached_factor(ref.tenant, model)
        low_water = (meta.trim_low_water if meta else None) or self._policy.trim_low_water
        start = (meta.window_start if meta else None) or 1
        summary = (
            self._summaries.for_turn(meta, model, stored=begun.length) if self._summaries else None
        )

        def choose(forwarded: SummaryUse | None) -> Window:
            # A summary stands in for the messages it covers: the window starts after them.
            covered = forwarded.covers_through if forwarded else 0
            return choose_window(
                history=begun.window,
                stored_count=begun.length,
                system_tokens=system_tokens,
                summary_tokens=forwarded.tokens if forwarded else 0,
                new_tokens=new_tokens,
                continues_turn=continues_turn(new_wire),
                budget=budget.tokens,
                factor=factor,
                start=max(start, covered + 1),
                low_water=low_water,
            )

        try:
            if summary is None:
                window = choose(None)
            else:
                window, summary = summary_window(summary, choose)
        except BudgetExceeded as exc:
            raise OverTokenBudget(str(exc)) from exc
        summary_wire = [summary.message] if summary and summary.message else []
        messages = [
            *system_wire,
            *summary_wire,
            *map(Message.to_wire, window.history),  # no generator frame per message
            *new_wire,
        ]
        # Per-message estimates in the gateway's units only for the preview, which shows them:
        # breakpoints need two prefixes' sizes, known from the sums trimming made (issue 10).
        estimates: list[int] = []
        breakpoints: list[int] = []
        summary_raw = summary.tokens if summary_wire and summary else 0
        if with_estimates:
            # The history's estimates are stored beside it (trimming used them).
            raw_estimates = [
                *system_estimates,
                *([summary_raw] if summary_wire else []),
                *map(_TOKENS, window.history),
                *new_estimates,
            ]
            estimates = corrected_each(raw_estimates, factor)
        if needs_breakpoints(model, self._policy.cache_control_models):
            pinned = len(system_wire) + len(summary_wire)
            stable = pinned + len(window.history)
            pinned_raw = sum(system_estimates) + summary_raw
            # The client's own markers: in the new messages, the tools and the stored history
            # (the system prompt and the summary are text: theirs cannot).
            marks = (
                client_marks(new_wire)
                + client_marks(params.get("tools"))
                + stored_marks(window.history)
            )
            messages, breakpoints = place_breakpoints(
                messages,
                pinned=pinned,
                stable=stable,
                pinned_tokens=corrected(pinned_raw, factor),
                stable_tokens=corrected(pinned_raw + window.history_tokens, factor),
                min_tokens=self._policy.cache_min_tokens,
                marks=marks,
            )
        raw = (
            ARRAY_OVERHEAD
            + system_tokens
            + (summary.tokens if summary else 0)
            + new_tokens
            + window.history_tokens
        )
        return Plan(
            model=model,
            budget=budget,
            window=window,
            summary=summary,
            payload={**params, "model": model, "messages": messages},
            estimates=estimates,
            breakpoints=breakpoints,
            raw_estimate=raw,
        )

    async def preview(self, ref: ConversationRef, request: TurnCreate) -> JSONObject:
        """What a turn with this body would forward now: no lease, no gateway call, nothing
        stored (`POST /conversations/{id}/context`)."""
        new_wire = [m.to_wire() for m in request.new_messages()]
        requested_model = request.model or self._policy.default_model
        begun = await self._store.peek(
            ref,
            default_budget=self._policy.token_budget,
            budget_scale=fetch_scale(self._store.known_factor(ref.tenant, requested_model)),
            max_messages=MAX_WINDOW_MESSAGES,
            replace_from=request.replace_from,
        )
        if isinstance(begun, Refused):
            raise refusal(ref, begun, request.replace_from)
        plan = self._forwarded(ref, request, begun, new_wire, with_estimates=True)
        window = plan.window
        return {
            "request": plan.payload,
            "messages": plan.payload["messages"],
            "estimated_tokens": plan.estimates,
            "estimated_total": window.estimated_tokens,
            "breakpoints": plan.breakpoints,
            "window_start": window.start,
            "window_jumped": window.jumped,
            "dropped_messages": window.dropped_messages,
            **turn_context(plan.summary, window.start),
            "token_budget": plan.budget.tokens,
            "budget_source": plan.budget.source,
        }

    async def delete(self, ref: ConversationRef) -> bool:
        """Delete a conversation once no turn holds it; False if there was none."""
        return await wait_for_lease(
            lambda: self._store.delete(ref), wait_seconds=self._policy.lock_wait_seconds
        )

    async def _shielded_commit(self, turn: _Turn, completion: JSONObject, reply: Reply) -> bytes:
        with anyio.CancelScope(shield=True):
            body = await self._commit(turn, completion, reply)
        return body

    async def _commit(self, turn: _Turn, completion: JSONObject, reply: Reply) -> bytes:
        turn.renewal.cancel()
        now = time.time()
        first_seq = turn.started.length + 1 + len(turn.carried)
        wires = [*turn.new_messages, reply.message]
        records = [
            Message.stored(wire, tokens=message_tokens(wire), seq=first_seq + i, created_at=now)
            for i, wire in enumerate(wires)
        ]
        conversation = _conversation(turn)
        conversation["context"] |= {
            "cache_read_input_tokens": reply.usage.cache_read,
            "cache_creation_input_tokens": reply.usage.cache_write,
        }
        body = orjson.dumps({**completion, "conversation": conversation})
        meta_updates: dict[str, str] = {}
        if turn.request.model:
            meta_updates["model"] = turn.request.model
        if turn.request.system is not None:
            meta_updates["system"] = turn.request.system
        meta_updates.update(promotion(turn.summary))
        started_meta = turn.started.meta
        if (
            started_meta.window_start if started_meta else None
        ) != turn.window.start or turn.rewrite_from is not None:
            meta_updates["window_start"] = str(turn.window.start)
        factor = None
        if reply.usage.prompt > 0:  # the prompt's full size: cached parts count too
            factor = next_factor(
                self._store.cached_factor(turn.ref.tenant, turn.model),
                turn.raw_estimate,
                reply.usage.prompt,
            )
        outcome = await self._store.commit_turn(
            turn.ref,
            lock_value=turn.lock_value,
            expected_length=(
                turn.started.stored if turn.started.stored is not None else turn.started.length
            ),
            messages=records,
            meta_updates=meta_updates,
            usage=reply.usage,
            record=IdempotentRecord(turn.idempotency, body) if turn.idempotency else None,
            model=turn.model,
            factor=factor,
            hashes=[message_hash(wire) for wire in wires],
            known_hashes={
                index: message_hash(message.to_wire())
                for index, message in (turn.started.unhashed or {}).items()
            },
            rewrite_from=turn.rewrite_from,
        )
        if outcome != "ok":
            metrics.TURNS.labels("lease_lost").inc()
            raise ConversationBusy(
                "the turn lost its lease before it could be stored; retry it",
                headers={"Retry-After": "1"},
            )
        metrics.child(metrics.TURNS, "committed").inc()
        metrics.record_usage(turn.model, reply.usage)
        if turn.window.dropped_messages:  # an inc takes a lock: not for nothing
            metrics.DROPPED_MESSAGES.inc(turn.window.dropped_messages)
        annotate(input_tokens=reply.input_tokens, output_tokens=reply.output_tokens)
        self._summarize_after(turn, records)
        return body

    def _summarize_after(self, turn: _Turn, stored: list[Message]) -> None:
        if self._summaries is None or turn.summary is None:
            return
        added = [*turn.carried, *stored]
        self._summaries.after_turn(
            turn.ref,
            turn.summary,
            first_seq=turn.first_seq,
            history=[*turn.window.history, *added],
            # The window's estimates were summed by trimming: only what follows it is added here.
            history_tokens=turn.window.history_tokens + sum([m.tokens for m in added]),
            fixed_tokens=turn.raw_estimate - turn.window.history_tokens,
            budget=turn.budget,
            factor=self._store.cached_factor(turn.ref.tenant, turn.model),
            client_key=turn.upstream_key,
            request_id=turn.request_id,
        )

    async def _abandon(self, turn: _Turn) -> None:
        """A failed turn stores nothing and frees its conversation at once."""
        turn.renewal.cancel()
        metrics.TURNS.labels("failed").inc()
        with contextlib.suppress(ServiceError):
            await self._store.release(turn.ref, turn.lock_value)


def refusal(ref: ConversationRef, refused: Refused, seq: int | None) -> ServiceError:
    """The answer to a regenerate or an edit the log cannot take."""
    if refused.reason == "gone":
        return ConversationNotFound(f"no conversation {ref.id!r}")
    if refused.reason == "beyond":
        return SeqBeyondLog(f"replace_from: conversation {ref.id!r} has no message {seq}")
    if refused.reason == "role":
        return InvalidRequest(f"replace_from: message {seq} is not a user message")
    return NothingToRegenerate(f"conversation {ref.id!r} has no user message to answer again")


def _conversation(turn: _Turn) -> JSONObject:
    """The `conversation` object of a turn's answer, as far as it is known before the gateway
    answers: a turn stores its new messages and one reply (after the message a regenerate
    answers again, which stays)."""
    return {
        "id": turn.ref.id,
        "message_count": turn.started.length + len(turn.carried) + len(turn.new_messages) + 1,
        "context": {
            "messages": len(turn.payload["messages"]),
            "estimated_tokens": turn.window.estimated_tokens,
            "dropped_messages": turn.window.dropped_messages,
            "token_budget": turn.budget,
            "window_start": turn.window.start,
            **turn_context(turn.summary, turn.first_seq),
        },
    }


async def _replay_as_sse(body: bytes) -> AsyncIterator[bytes]:
    stored: dict[str, Any] = orjson.loads(body)
    for event in completion_as_sse(stored):
        yield event
    yield sse_event("conversation", {"conversation": stored.get("conversation")})
    yield DONE
