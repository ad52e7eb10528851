"""SummaryService: the rolling-summary job, run in the background after a turn has answered.

A job folds the previous summary and exactly the messages it is given into a new summary with
one gateway call (the caller's key in pass-through mode, the service key otherwise). It is
single-flight per conversation across replicas (a lease of its own, renewed while it runs), is
stored only by compare and set (service/summary_store.py), never touches the stored log, and never
fails or delays a turn: a failure is logged, counted, and retried with back-off by a later turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from service import metrics
from service.errors import GatewayError
from service.gateway import GatewayClient
from service.ids import random_id
from service.models import ConversationMeta, Message
from service.store import ConversationRef
from service.summary_plan import (
    SummaryUse,
    next_cut,
    prefetch_through,
    summaries_enabled,
    summary_message,
    summary_model,
    summary_request,
    summary_state,
    summary_text,
    uncovered,
)
from service.summary_store import JobStart, SummaryStore
from service.tokens import message_tokens
from service.trim import BudgetExceeded, Window

log = logging.getLogger("service.summaries")

Outcome = Literal["stored", "failed", "stale", "gone", "backoff", "covered", "busy", "skipped"]


@dataclass(frozen=True, slots=True)
class SummaryPolicy:
    enabled: bool  # SUMMARY=on: the default for conversations that did not choose
    model: str | None  # SUMMARY_MODEL; None: the conversation's own model
    max_tokens: int  # SUMMARY_MAX_TOKENS: the summary call's max_tokens
    retry_seconds: float  # SUMMARY_RETRY_SECONDS: the first back-off; it doubles per failure
    lease_seconds: float  # a dead replica's job blocks the next one for at most this long
    timeout_seconds: float  # one summary call, retries included
    low_water: float = 0.6  # TRIM_LOW_WATER: the share of the budget the history jumps back to
    max_retry_seconds: float = 1800.0
    max_jobs: int = 64  # jobs running at once in this process; more are skipped, not queued
    max_messages: int = 2000  # messages one round reads
    max_rounds: int = 4  # rounds one job runs when the uncovered part exceeds one call's input


def summary_window(
    use: SummaryUse, choose: Callable[[SummaryUse | None], Window]
) -> tuple[Window, SummaryUse]:
    """The window a turn forwards, and the summary it forwards with it. `choose` picks the window
    for a summary (history after what it covers, its tokens in the budget).

    The current summary holds while the history after it fits. When it no longer fits, the window
    moves to the summary a job made for that moment (`next`), and both change in this one turn;
    without one, plain trimming leaves out the oldest turns (the summary lags). A summary that does
    not fit beside the new messages is left out. Raises BudgetExceeded as choose_window does."""
    try:
        window = choose(use)
    except BudgetExceeded:
        if use.message is None:
            raise
        return choose(use.without()), use.without()
    if window.dropped_messages > use.covers_through:  # the history outgrew the budget
        ahead = use.ahead()
        if ahead is not None:
            with contextlib.suppress(BudgetExceeded):
                return choose(ahead), ahead
    return window, use


class SummaryService:
    def __init__(self, store: SummaryStore, gateway: GatewayClient, policy: SummaryPolicy) -> None:
        self._store = store
        self._gateway = gateway
        self._policy = policy
        self._jobs: dict[ConversationRef, asyncio.Task[Outcome]] = {}

    def for_turn(
        self, meta: ConversationMeta | None, turn_model: str, *, stored: int | None = None
    ) -> SummaryUse | None:
        """The current summary, with summaries on: the forwarded history starts after it.
        `stored`: the log's length (summaries covering more are ignored). None with summaries
        off: such a turn forwards, reports and stores as if there were no summary machinery."""
        if not summaries_enabled(meta, default=self._policy.enabled):
            return None
        state = summary_state(meta, stored)
        record = state.current
        message = summary_message(record)
        return SummaryUse(
            state=state,
            record=record,
            message=message,
            tokens=message_tokens(message) if message is not None else 0,
            model=summary_model(meta, default=self._policy.model, turn_model=turn_model),
        )

    def after_turn(
        self,
        ref: ConversationRef,
        use: SummaryUse,
        *,
        first_seq: int,
        history: Sequence[Message],
        fixed_tokens: int,
        budget: int,
        factor: float,
        client_key: str | None,
        request_id: str,
        history_tokens: int,
    ) -> asyncio.Task[Outcome] | None:
        """After a turn's commit, in the background: fold what its window left out (before seq
        `first_seq`) and no summary covers yet, and, once the array nears the budget, what the
        window's next jump will leave out, so that the summary is ready when the window moves.
        `history` is what the next turn would forward (this window, the new messages, the reply),
        `history_tokens` its estimates summed; `fixed_tokens` the rest of the array. A job that
        is late leaves the previous summary."""
        lagging = uncovered(first_seq, use.state) > 0
        if lagging:
            metrics.SUMMARY_LAGGED_TURNS.inc()
        ahead = prefetch_through(
            history,
            fixed_tokens=fixed_tokens,
            budget=budget,
            factor=factor,
            low_water=self._policy.low_water,
            history_tokens=history_tokens,
        )
        through = max(first_seq - 1, ahead)
        if through <= use.state.covers_through:
            return None
        if use.state.retry_at > time.time():  # backing off after a failure
            metrics.SUMMARY_JOBS.labels("backoff").inc()
            return None
        return self.schedule(
            ref,
            through=through,
            model=use.model,
            input_cap=budget,
            client_key=client_key,
            request_id=request_id,
        )

    def schedule(
        self,
        ref: ConversationRef,
        *,
        through: int,
        model: str,
        input_cap: int,
        client_key: str | None,
        request_id: str,
    ) -> asyncio.Task[Outcome] | None:
        """Start a job in the background for the uncovered messages up to seq `through`, unless
        this process already runs one for the conversation or runs `max_jobs` (the next turn
        will ask again). Returns the task (tests await it), or None when skipped."""
        if ref in self._jobs or len(self._jobs) >= self._policy.max_jobs:
            metrics.SUMMARY_JOBS.labels("skipped").inc()
            return None
        job = self.run(
            ref,
            through=through,
            model=model,
            input_cap=input_cap,
            client_key=client_key,
            request_id=request_id,
        )
        # A context of its own: the job must not write into the turn's access-log fields.
        task = asyncio.get_running_loop().create_task(job, context=contextvars.Context())
        self._jobs[ref] = task
        metrics.SUMMARY_RUNNING.inc()
        task.add_done_callback(lambda _: self._done(ref))
        return task

    def _done(self, ref: ConversationRef) -> None:
        self._jobs.pop(ref, None)
        metrics.SUMMARY_RUNNING.dec()

    async def run(
        self,
        ref: ConversationRef,
        *,
        through: int,
        model: str,
        input_cap: int,
        client_key: str | None,
        request_id: str,
    ) -> Outcome:
        """Fold the messages up to `through` into the summary, in rounds of at most `input_cap`
        estimated tokens; the outcome of the last round."""
        outcome: Outcome = "covered"
        for _ in range(self._policy.max_rounds):
            outcome, covered = await self._round(
                ref,
                through=through,
                model=model,
                input_cap=input_cap,
                client_key=client_key,
                request_id=request_id,
            )
            if outcome != "stored" or covered >= through:
                break
        return outcome

    async def _round(
        self,
        ref: ConversationRef,
        *,
        through: int,
        model: str,
        input_cap: int,
        client_key: str | None,
        request_id: str,
    ) -> tuple[Outcome, int]:
        """One round: (its outcome, the seq the summary covers through after it; 0: unknown)."""
        lease_value = random_id()
        lease_ms = int(self._policy.lease_seconds * 1000)
        try:
            begun = await self._store.begin(
                ref,
                lease_value=lease_value,
                lease_ms=lease_ms,
                now=time.time(),
                through=through,
                max_messages=self._policy.max_messages,
            )
        except Exception as exc:  # Redis trouble: the next turn asks again
            return self._failed(ref, exc), 0
        if isinstance(begun, str):
            metrics.SUMMARY_JOBS.labels(begun).inc()
            return begun, 0
        started = time.perf_counter()
        renewal = asyncio.ensure_future(self._keep(ref, lease_value, lease_ms))
        try:
            return await self._fold(
                ref,
                begun,
                lease_value=lease_value,
                through=through,
                model=model,
                input_cap=input_cap,
                client_key=client_key,
                request_id=request_id,
            )
        except Exception as exc:
            with contextlib.suppress(Exception):  # best effort: the lease expires anyway
                await self._store.fail(
                    ref,
                    begun,
                    lease_value=lease_value,
                    now=time.time(),
                    first_backoff=self._policy.retry_seconds,
                    max_backoff=self._policy.max_retry_seconds,
                )
            return self._failed(ref, exc), 0
        finally:
            renewal.cancel()
            metrics.SUMMARY_DURATION.observe(time.perf_counter() - started)

    async def _fold(
        self,
        ref: ConversationRef,
        begun: JobStart,
        *,
        lease_value: str,
        through: int,
        model: str,
        input_cap: int,
        client_key: str | None,
        request_id: str,
    ) -> tuple[Outcome, int]:
        cut = next_cut(begun.uncovered, through=through, input_cap=input_cap)
        if not cut:  # nothing readable to fold
            await self._store.release(ref, lease_value)
            metrics.SUMMARY_JOBS.labels("covered").inc()
            return "covered", 0
        payload = summary_request(
            begun.previous, cut, model=model, max_tokens=self._policy.max_tokens
        )
        _, reply = await self._gateway.complete(
            payload,
            client_key=client_key,
            request_id=f"{request_id}.summary",
            deadline=asyncio.get_running_loop().time() + self._policy.timeout_seconds,
        )
        metrics.SUMMARY_TOKENS.labels("input").inc(reply.input_tokens)
        metrics.SUMMARY_TOKENS.labels("output").inc(reply.output_tokens)
        text = summary_text(reply.message.get("content"), max_tokens=self._policy.max_tokens)
        if text is None:
            raise GatewayError("the summary call answered no text")
        outcome = await self._store.commit(
            ref,
            begun,
            lease_value=lease_value,
            covers_through=cut[-1].seq,
            text=text,
            model=model,
            now=time.time(),
            input_tokens=reply.input_tokens,
            output_tokens=reply.output_tokens,
        )
        result: Outcome = "stored" if outcome == "ok" else outcome
        metrics.SUMMARY_JOBS.labels(result).inc()
        if result == "stored":
            log.info(
                "summary stored",
                extra={"conversation_id": ref.id, "covers_through": cut[-1].seq},
            )
        return result, cut[-1].seq

    def _failed(self, ref: ConversationRef, exc: Exception) -> Outcome:
        metrics.SUMMARY_JOBS.labels("failed").inc()
        # The type, never the message: it may quote the conversation or the gateway's answer.
        log.warning(
            "summary job failed", extra={"conversation_id": ref.id, "error": type(exc).__name__}
        )
        return "failed"

    async def _keep(self, ref: ConversationRef, lease_value: str, lease_ms: int) -> None:
        """Renew the job's lease every third of it while the job runs."""
        while True:
            await asyncio.sleep(lease_ms / 3000)
            try:
                if not await self._store.renew(ref, lease_value, lease_ms):
                    return
            except Exception:  # the commit's compare and set still guards what is stored
                log.warning("summary lease renewal failed", extra={"conversation_id": ref.id})

    async def aclose(self) -> None:
        """Cancel running jobs (at shutdown): a job cut short stores nothing, and its lease
        expires by itself."""
        tasks = list(self._jobs.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
