"""OpenAICompletions: `/v1/chat/completions` on top of ChatService (issue 12).

A request that names a conversation is a turn like any other: ChatService takes the lease,
trims, calls the gateway and commits (idempotency, summaries and cache breakpoints included);
only the edges are translated (service/openai_compat.py). A request without one goes to the
gateway as it is and touches no Redis key. A resent history that diverged from the log is 409,
or with `X-Conversation-Divergence: fork` a turn on a fork of the log (`_forked`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
import orjson
from pydantic import ValidationError

from service import limits
from service.auth import Caller
from service.chat import ChatService
from service.detached import DetachedTurns
from service.editing import EditingService
from service.errors import GatewayError, InvalidRequest, ServiceError
from service.gateway import GatewayClient, UpstreamStream, parse_reply, record_upstream_time
from service.history import HistoryDiverged, fork_id, fork_point
from service.logs import annotate
from service.openai_compat import (
    ChatCompletionCreate,
    ChunkTranslator,
    HistoryTurnCreate,
    Identity,
    completion,
    error_body,
    resolve_history,
)
from service.openai_compat import conversation_headers as headers_of
from service.relay import relay_upstream
from service.schemas import TurnCreate
from service.sse import SSEDecoder
from service.store import ConversationRef
from service.streaming import DONE, StreamAssembler, completion_as_sse, sse_data

log = logging.getLogger("service.openai")
# The fork's own Idempotency-Key, derived from the request's: EditingService.fork keeps its record
# under the new conversation, where the turn keeps the request's own.
FORK_KEY_PREFIX = "divergence-fork:"


@dataclass(frozen=True, slots=True)
class StreamPolicy:
    turn_seconds: float  # GATEWAY_TIMEOUT_SECONDS
    ping_seconds: float  # SSE_PING_SECONDS


@dataclass(slots=True)
class Answer:
    """What the route sends: a JSON body or an SSE stream, and the headers to send with it."""

    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    events: AsyncIterator[bytes] | None = None


def invalid(exc: ValidationError | ValueError) -> InvalidRequest:
    """A body our own turn model refused, said as our route says it (field path first)."""
    if isinstance(exc, ValidationError):
        parts = []
        for error in exc.errors()[:10]:
            where = ".".join(str(p) for p in error.get("loc", ()))
            text = str(error.get("msg", "invalid")).removeprefix("Value error, ")
            parts.append(f"{where}: {text}" if where else text)
        return InvalidRequest("; ".join(parts))
    return InvalidRequest(str(exc))


@dataclass(frozen=True, slots=True)
class _Call:
    """One request's turn, as it runs on a conversation (and again on its fork)."""

    turn: TurnCreate
    identity: Identity
    include_usage: bool
    caller: Caller
    request_id: str
    idempotency_key: str | None
    detach: bool
    stream: bool
    resent: bool


class OpenAICompletions:
    def __init__(
        self,
        chat: ChatService,
        detached: DetachedTurns,
        editing: EditingService,
        gateway: GatewayClient,
        policy: StreamPolicy,
        *,
        allowed_extra: frozenset[str],
    ) -> None:
        self._chat = chat
        self._detached = detached
        self._editing = editing
        self._gateway = gateway
        self._policy = policy
        self._allowed_extra = allowed_extra

    def _checked(self, turn: TurnCreate) -> TurnCreate:
        unknown = turn.unknown_fields(self._allowed_extra)
        if unknown:
            raise InvalidRequest(
                f"{unknown[0]}: not a parameter this service forwards "
                "(the operator may allow it with GATEWAY_EXTRA_PARAMS)"
            )
        return turn

    async def create(
        self,
        body: ChatCompletionCreate,
        *,
        caller: Caller,
        conversation_id: str | None,
        request_id: str,
        idempotency_key: str | None,
        detach: bool,
        fork: bool = False,
    ) -> Answer:
        """`fork`: a resent history that diverged from the log forks (`_forked`), not 409."""
        if detach and (conversation_id is None or not body.stream):
            raise InvalidRequest(
                "X-Detach: a detached turn needs a conversation id and `stream: true`"
            )
        try:
            system, rest = body.split()
            # Several messages may be a resent history (issue 15.3): checked under the lease.
            resent = conversation_id is not None and len(rest) > 1
            if conversation_id is None:
                turn = self._checked(body.turn(None, rest, stream=body.stream))
            else:
                turn = self._checked(
                    body.turn(
                        system,
                        rest,
                        stream=body.stream,
                        detach=detach,
                        model=HistoryTurnCreate if resent else TurnCreate,
                    )
                )
        except (ValidationError, ValueError) as exc:
            raise invalid(exc) from exc
        identity = Identity(request_id, body.model)
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        if conversation_id is None:
            return await self._stateless(body, turn, identity, include_usage, caller, request_id)
        annotate(conversation_id=conversation_id)  # as our own route's path parameter is logged
        ref = ConversationRef(tenant=caller.tenant, id=conversation_id)
        call = _Call(
            turn,
            identity,
            include_usage,
            caller,
            request_id,
            idempotency_key,
            detach,
            body.stream,
            resent,
        )
        try:
            return await self._turn(ref, call)
        except HistoryDiverged as diverged:
            if not fork:
                raise
            return await self._forked(ref, call, diverged)

    async def _turn(self, ref: ConversationRef, call: _Call) -> Answer:
        answer = Answer(headers={"X-Conversation-Id": ref.id})
        resolve = resolve_history if call.resent else None
        if not call.stream:
            result = await self._chat.turn(
                ref,
                call.turn,
                caller=call.caller,
                request_id=call.request_id,
                idempotency_key=call.idempotency_key,
                resolve=resolve,
            )
            stored = orjson.loads(result.body)
            answer.headers.update(headers_of(stored.get("conversation")))
            if result.replayed:
                answer.headers["Idempotent-Replayed"] = "true"
            answer.body = orjson.dumps(completion(stored, call.identity))
            return answer
        start = self._detached.start if call.detach else self._chat.stream
        events, replayed = await start(
            ref,
            call.turn,
            caller=call.caller,
            request_id=call.request_id,
            idempotency_key=call.idempotency_key,
            on_open=lambda conversation: answer.headers.update(headers_of(conversation)),
            resolve=resolve,
        )
        if replayed:
            answer.headers["Idempotent-Replayed"] = "true"
        translator = ChunkTranslator(call.identity, include_usage=call.include_usage)
        answer.events = translated(events, translator)
        return answer

    async def _forked(self, ref: ConversationRef, call: _Call, diverged: HistoryDiverged) -> Answer:
        """The turn on a new conversation: the log's first `fork_point` messages (copied by
        EditingService.fork, settings included), then the rest of the request as the turn's new
        messages; the old conversation stays as it was. A retry with the same Idempotency-Key
        finds the same fork (`fork_id`), whose fork and turn both replay. A fork this request
        made whose turn then fails before answering is deleted: a failed request stores
        nothing (a stream cut after it began leaves the fork with the copied log only)."""
        sent = [m.to_wire() for m in call.turn.new_messages()]
        through = fork_point(sent, diverged.common)
        if len(sent) - through > limits.MAX_NEW_MESSAGES:
            raise InvalidRequest(
                f"messages: at most {limits.MAX_NEW_MESSAGES} new messages in one turn (got "
                f"{len(sent) - through} after the {through} a fork would keep)"
            )
        new = ConversationRef(tenant=ref.tenant, id=fork_id(ref.id, call.idempotency_key))
        key = None if call.idempotency_key is None else FORK_KEY_PREFIX + call.idempotency_key
        created = await self._editing.fork(ref, new, through, key)
        annotate(conversation_id=new.id, forked_from=ref.id)
        try:
            return await self._turn(new, call)
        except BaseException:
            if not created.replayed:
                with anyio.CancelScope(shield=True), contextlib.suppress(ServiceError):
                    await self._chat.delete(new)
            raise

    async def _stateless(
        self,
        body: ChatCompletionCreate,
        turn: TurnCreate,
        identity: Identity,
        include_usage: bool,
        caller: Caller,
        request_id: str,
    ) -> Answer:
        """No conversation: the request goes to the gateway as sent, nothing is read or stored."""
        payload = body.stateless_payload(turn.gateway_params())
        deadline = asyncio.get_running_loop().time() + self._policy.turn_seconds
        if not body.stream:
            upstream, _ = await self._gateway.complete(
                payload, client_key=caller.upstream_key, request_id=request_id, deadline=deadline
            )
            return Answer(body=orjson.dumps(completion(upstream, identity)))
        opened = await self._gateway.open_stream(
            payload, client_key=caller.upstream_key, request_id=request_id, deadline=deadline
        )
        translator = ChunkTranslator(identity, include_usage=include_usage)
        return Answer(events=translated(self._relay(opened, deadline), translator))

    async def _relay(self, upstream: UpstreamStream, deadline: float) -> AsyncIterator[bytes]:
        """A stateless stream in the service's own SSE (as ChatService relays a turn's)."""
        try:
            if upstream.completion is not None:  # the model ignored stream: true
                parse_reply(upstream.completion)  # not a completion: an error, as on a turn
                for event in completion_as_sse(upstream.completion):
                    yield event
            else:
                pieces = relay_upstream(
                    upstream,
                    StreamAssembler(),
                    deadline=deadline,
                    ping_seconds=self._policy.ping_seconds,
                    limit_seconds=self._policy.turn_seconds,
                )
                async with contextlib.aclosing(pieces):
                    async for piece in pieces:
                        yield piece
            yield DONE
        except (ServiceError, ValueError) as exc:  # ValueError: a chunk that is not JSON
            error = (
                exc
                if isinstance(exc, ServiceError)
                else GatewayError(f"the gateway's stream failed ({type(exc).__name__})")
            )
            log.warning("stateless stream failed", extra={"error": type(exc).__name__})
            yield b"event: error\n" + sse_data({"error": error.problem()})
        finally:
            record_upstream_time(upstream.started)
            await upstream.aclose()


async def translated(
    events: AsyncIterator[bytes], translator: ChunkTranslator
) -> AsyncIterator[bytes]:
    """The service's own SSE as OpenAI's: chunks translated, `event: conversation` left out
    (its facts are in the headers), an error as the `data: {"error": ...}` event the SDKs raise
    on, pings and (for a detached turn) event ids kept. An event left out leaves no trace: an
    `id:` without `data` is an event the SDKs try, and fail, to parse."""
    decoder = SSEDecoder()
    async with contextlib.aclosing(events):  # type: ignore[type-var] # an async generator
        async for piece in events:
            if piece.startswith(b":"):  # a keep-alive comment
                yield piece
                continue
            for event in decoder.feed(piece):
                prefix = f"id: {event.id}\n".encode() if event.id else b""
                if event.data == "[DONE]":
                    yield prefix + DONE
                elif event.event == "error":
                    problem = orjson.loads(event.data).get("error")
                    yield prefix + sse_data(error_body(problem))
                elif event.event == "message":
                    chunk = translator.chunk(orjson.loads(event.data))
                    if chunk is not None:
                        yield prefix + sse_data(chunk)
                    if (late := translator.late_usage()) is not None:
                        yield sse_data(late)
