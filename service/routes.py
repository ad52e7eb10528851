"""HTTP routes: thin handlers that parse, delegate to ChatService or ConversationStore, answer."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.auth import Caller
from service.config import Settings
from service.deps import (
    CallerDep,
    ChatDep,
    ConversationDep,
    DetachedDep,
    EditsDep,
    IdempotencyKeyDep,
    SettingsDep,
    StoreDep,
    TurnDep,
    TurnServices,
    TurnServicesDep,
    UpdateDep,
)
from service.errors import ConversationNotFound, LogRewritten, StoreUnavailable
from service.log_edits import Page
from service.schemas import (
    ContextPreview,
    ConversationList,
    ConversationListItem,
    ConversationPublic,
    MessagePage,
    MessagePublic,
    TurnCreate,
    TurnParams,
    TurnPublic,
)
from service.store import ConversationRef, ConversationStore
from service.streaming import DONE
from service.turn_route import TurnRoute

router = APIRouter(prefix="/conversations", tags=["conversations"])
ops = APIRouter(tags=["operations"])

# The answer of a turn (and of a regenerate): the completion as JSON, or its SSE events.
TURN_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The gateway's completion plus `conversation`; "
        "`text/event-stream` when `stream` is true",
        "model": TurnPublic,
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "description": "One server-sent event: the gateway's chunks, then "
                    "`event: conversation`, then `data: [DONE]`",
                    "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
                }
            }
        },
    }
}
# `<last activity, epoch seconds>~<conversation id>`: the place after which the next page starts.
CURSOR = re.compile(r"^[0-9]{1,16}(?:\.[0-9]{1,20})?~[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def post_turn(
    body: TurnDep,
    ref: ConversationDep,
    caller: CallerDep,
    services: TurnServicesDep,
    idempotency_key: IdempotencyKeyDep,
) -> Response:
    return await answer_turn(body, ref, caller, services, idempotency_key)


# The hot path: its parameters solved by TurnRoute (service/turn_route.py), not FastAPI's solver,
# and the route given to the app itself, first (`FastAPI(routes=...)`), not through `router`: the
# app's router then matches it at once, where FastAPI (0.165) matches a request to an included
# router twice over, the inclusion's routes and then the route, with scope bookkeeping at each
# step: 4% of a turn's instructions (issue 10). Same path, tag and OpenAPI operation as before.
def turn_route() -> TurnRoute:
    """POST /conversations/{id}/messages, new for each app (a route keeps per-app state)."""
    return TurnRoute(
        "/conversations/{conversation_id}/messages",
        post_turn,
        methods=["POST"],
        response_model=None,
        responses=TURN_RESPONSES,
        tags=["conversations"],
    )


async def answer_turn(
    body: TurnParams,
    ref: ConversationRef,
    caller: Caller,
    services: TurnServices,
    idempotency_key: str | None,
) -> Response:
    """A turn's (or a regenerate's) answer: JSON, or SSE with `stream`; the end user's index
    is written once the turn is stored."""
    chat, store, request_id = services.chat, services.store, services.request_id
    if body.stream:
        if isinstance(body, TurnCreate) and body.detach:
            events, replayed = await services.detached.start(
                ref, body, caller=caller, request_id=request_id, idempotency_key=idempotency_key
            )
        else:
            events, replayed = await chat.stream(
                ref, body, caller=caller, request_id=request_id, idempotency_key=idempotency_key
            )
        headers = {**SSE_HEADERS, "Idempotent-Replayed": "true"} if replayed else SSE_HEADERS
        if caller.end_user is not None:
            events = _indexed_when_done(events, store, ref, caller.end_user.sub)
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
    result = await chat.turn(
        ref, body, caller=caller, request_id=request_id, idempotency_key=idempotency_key
    )
    if caller.end_user is not None:
        await store.touch_user_index(ref, caller.end_user.sub)
    replay = {"Idempotent-Replayed": "true"} if result.replayed else None
    return Response(result.body, media_type="application/json", headers=replay)


async def _indexed_when_done(
    events: AsyncIterator[bytes], store: ConversationStore, ref: ConversationRef, sub: str
) -> AsyncIterator[bytes]:
    """The stream, then the end user's index, once the turn is stored (its last event)."""
    last = b""
    async with contextlib.aclosing(events):  # type: ignore[type-var] # an async generator
        async for last in events:
            yield last
    if last.endswith(DONE):  # a detached turn's events carry an `id:` line first
        await store.touch_user_index(ref, sub)


@router.post("/{conversation_id}/context")
async def preview_context(body: TurnDep, ref: ConversationDep, chat: ChatDep) -> ContextPreview:
    """The exact array a turn with this body would forward: no gateway call, no lease, nothing
    stored. Bad input is answered as for a turn."""
    return ContextPreview.model_validate(await chat.preview(ref, body))


@router.get("/{conversation_id}/messages", response_model_exclude_unset=True)
async def get_messages(
    ref: ConversationDep,
    edits: EditsDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before: Annotated[int | None, Query(ge=1)] = None,
    generation: Annotated[
        int | None,
        Query(
            ge=0,
            le=2**53,
            description="The `generation` of the page `before` came from: a log rewritten since "
            "(regenerate, edit, truncate) is 409 rather than a page of another log",
        ),
    ] = None,
) -> MessagePage:
    page = await edits.page(ref, limit=limit, before=before, generation=generation)
    if page == "gone":
        raise ConversationNotFound(f"no conversation {ref.id!r}")
    if not isinstance(page, Page):
        raise LogRewritten(
            f"conversation {ref.id!r} was rewritten since generation {generation}; "
            "page again from the newest"
        )
    return MessagePage(
        messages=[MessagePublic.from_record(m) for m in page.messages],
        has_more=page.has_more,
        generation=page.generation,
    )


@router.get("/{conversation_id}")
async def get_conversation(
    ref: ConversationDep, store: StoreDep, settings: SettingsDep, detached: DetachedDep
) -> ConversationPublic:
    public = await _public(store, ref, settings)
    public.turn = await detached.status(ref)
    return public


@router.put("/{conversation_id}", responses={201: {"description": "Created"}})
async def put_conversation(
    update: UpdateDep,
    ref: ConversationDep,
    caller: CallerDep,
    store: StoreDep,
    settings: SettingsDep,
    response: Response,
) -> ConversationPublic:
    set_fields, clear_fields = update.meta_changes()
    created = await store.upsert(ref, set_fields=set_fields, clear_fields=clear_fields)
    if caller.end_user is not None:
        await store.touch_user_index(ref, caller.end_user.sub)
    response.status_code = 201 if created else 200
    return await _public(store, ref, settings)


@router.delete("/{conversation_id}", status_code=204)
async def delete_conversation(ref: ConversationDep, chat: ChatDep) -> Response:
    if not await chat.delete(ref):
        raise ConversationNotFound(f"no conversation {ref.id!r}")
    return Response(status_code=204)


@router.get("")
async def list_conversations(
    caller: CallerDep,
    store: StoreDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(pattern=CURSOR.pattern, max_length=200)] = None,
) -> ConversationList:
    end_user = caller.end_user
    if end_user is not None:  # only what this end user wrote, and only what the token covers
        end_user.require(None, "read")
    items, next_cursor = await store.list_conversations(
        caller.tenant,
        limit=limit,
        cursor=_decode_cursor(cursor) if cursor else None,
        sub=end_user.sub if end_user else None,
        keep=end_user.allows if end_user else None,
    )
    return ConversationList(
        conversations=[ConversationListItem.from_summary(s) for s in items],
        next_cursor=_encode_cursor(next_cursor) if next_cursor else None,
    )


@ops.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@ops.get("/readyz")
async def readyz(request: Request, store: StoreDep) -> dict[str, str]:
    if request.state.lifecycle.draining:
        raise StoreUnavailable("shutting down", headers={"Retry-After": "5"})
    try:
        await store.ping()
    except Exception as exc:
        raise StoreUnavailable("Redis does not answer", headers={"Retry-After": "1"}) from exc
    return {"status": "ready"}


@ops.get("/metrics", response_class=PlainTextResponse)
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def _public(
    store: ConversationStore, ref: ConversationDep, settings: Settings
) -> ConversationPublic:
    summary = await store.summary(ref)
    if summary is None:
        raise ConversationNotFound(f"no conversation {ref.id!r}")
    return ConversationPublic.from_summary(summary, settings)


def _encode_cursor(cursor: tuple[float, str]) -> str:
    return f"{cursor[0]!r}~{cursor[1]}"


def _decode_cursor(raw: str) -> tuple[float, str]:
    """CURSOR's pattern admits only a (score, id) pair; any such pair is a place in the list."""
    score, _, conversation_id = raw.partition("~")
    return float(score), conversation_id
