"""HTTP routes for editing a conversation: regenerate, fork, truncate, export, import. Thin
handlers over EditingService and ChatService (service/editing.py says what each one does)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from service.deps import (
    CallerDep,
    ConversationDep,
    EditingDep,
    IdempotencyKeyDep,
    RegenerateDep,
    SettingsDep,
    StoreDep,
    TurnServicesDep,
    checked_update,
)
from service.editing import parse_import
from service.limits import MAX_IMPORT_MESSAGES
from service.log_edits import Created
from service.routes import TURN_RESPONSES, answer_turn
from service.schemas import EditResult, ForkCreate
from service.store import ConversationRef
from service.turn_route import TurnRoute

router = APIRouter(prefix="/conversations", tags=["editing"])

JSON_LINES = "application/jsonl"  # an import is read from application/x-ndjson too
_EXPORT_LINE = {
    "type": "object",
    "description": "The first line: the conversation (`type: conversation`, `settings` as for "
    "PUT, `summary`); then one line per message (`type: message`, `seq`, `role`, `content`, "
    "...), oldest first",
}


def _created(created: Created, status: int) -> Response:
    headers = {"Idempotent-Replayed": "true"} if created.replayed else None
    return Response(
        created.body, status_code=status, media_type="application/json", headers=headers
    )


async def regenerate(
    body: RegenerateDep,
    ref: ConversationDep,
    caller: CallerDep,
    services: TurnServicesDep,
    idempotency_key: IdempotencyKeyDep,
) -> Response:
    """A new completion for the history up to the last user message, replacing every message
    after it, committed atomically once the gateway answered (until then the old reply stays)."""
    return await answer_turn(body, ref, caller, services, idempotency_key)


router.add_api_route(  # a turn's shape: solved like one (service/turn_route.py)
    "/{conversation_id}/regenerate",
    regenerate,
    methods=["POST"],
    response_model=None,
    responses=TURN_RESPONSES,
    route_class_override=TurnRoute,
)


@router.post(
    "/{conversation_id}/fork",
    status_code=201,
    response_model=EditResult,
    responses={201: {"description": "The new conversation"}},
)
async def fork(
    body: ForkCreate,
    ref: ConversationDep,
    caller: CallerDep,
    editing: EditingDep,
    store: StoreDep,
    idempotency_key: IdempotencyKeyDep,
) -> Response:
    """A new conversation `new_id` with this one's first `through_seq` messages (all when
    absent) and its settings; 409 when `new_id` exists."""
    if caller.end_user is not None:  # the copy is a write to new_id: the token must cover it
        caller.end_user.require(body.new_id, "write")
    new = ConversationRef(tenant=ref.tenant, id=body.new_id)
    created = await editing.fork(ref, new, body.through_seq, idempotency_key)
    if caller.end_user is not None:
        await store.touch_user_index(new, caller.end_user.sub)
    return _created(created, 201)


@router.delete("/{conversation_id}/messages", response_model=EditResult)
async def truncate(
    ref: ConversationDep,
    editing: EditingDep,
    from_seq: Annotated[int, Query(ge=1, le=2**53, description="The first seq removed")],
    idempotency_key: IdempotencyKeyDep,
) -> Response:
    """Remove message `from_seq` and every later one (waits for a running turn, as DELETE of
    the conversation does)."""
    return _created(await editing.truncate(ref, from_seq, idempotency_key), 200)


@router.get(
    "/{conversation_id}/export",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "JSON Lines, streamed",
            "content": {JSON_LINES: {"schema": _EXPORT_LINE}},
        }
    },
)
async def export(ref: ConversationDep, editing: EditingDep) -> StreamingResponse:
    """The conversation as JSON Lines: settings first, then every message, read a page at a
    time. Its output is what `POST /conversations/{id}/import` takes."""
    lines = await editing.export(ref)
    return StreamingResponse(
        lines,
        media_type=JSON_LINES,
        headers={"Content-Disposition": f'attachment; filename="{ref.id}.jsonl"'},
    )


@router.post(
    "/{conversation_id}/import",
    status_code=201,
    response_model=EditResult,
    responses={201: {"description": "The conversation, created"}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "An export: a conversation line, then one line per message",
            "content": {JSON_LINES: {"schema": {"$ref": "#/components/schemas/ImportLines"}}},
        }
    },
)
async def import_conversation(
    request: Request,
    ref: ConversationDep,
    caller: CallerDep,
    editing: EditingDep,
    settings: SettingsDep,
    store: StoreDep,
    idempotency_key: IdempotencyKeyDep,
) -> Response:
    """Create this conversation from an export, validated line by line before anything is
    stored; 409 when it exists."""
    raw = await request.body()
    header, messages = parse_import(raw, max_messages=MAX_IMPORT_MESSAGES)
    checked_update(header.settings, settings, caller)
    created = await editing.import_(ref, raw, (header, messages), idempotency_key)
    if caller.end_user is not None:
        await store.touch_user_index(ref, caller.end_user.sub)
    return _created(created, 201)
