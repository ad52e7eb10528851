"""Routes of detached turns (issue 16): follow one from any replica, cancel it. The turn itself
starts at `POST /conversations/{id}/messages` with `"detach": true`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query
from fastapi.responses import StreamingResponse

from service.deps import ConversationDep, DetachedDep
from service.routes import SSE_HEADERS
from service.schemas import TurnStatus

router = APIRouter(prefix="/conversations", tags=["conversations"])
EVENT_ID_PATTERN = r"^(?:[0-9a-f]{16}-)?[0-9]{1,9}$"


@router.get(
    "/{conversation_id}/stream",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The detached turn's events after the one named (all of them when "
            "none is), live until its last: each with an `id:`, as the turn's own response sent "
            "them",
            "content": {
                "text/event-stream": {
                    "schema": {
                        "type": "object",
                        "description": "One server-sent event, with its `id`",
                        "properties": {
                            "event": {"type": "string"},
                            "data": {"type": "string"},
                            "id": {"type": "string"},
                        },
                    }
                }
            },
        }
    },
)
async def follow_turn(
    ref: ConversationDep,
    detached: DetachedDep,
    last_event_id: Annotated[
        str | None, Header(alias="Last-Event-ID", pattern=EVENT_ID_PATTERN)
    ] = None,
    after: Annotated[str | None, Query(pattern=EVENT_ID_PATTERN)] = None,
) -> StreamingResponse:
    events = await detached.resume(ref, last_event_id or after)
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


@router.post("/{conversation_id}/cancel")
async def cancel_turn(ref: ConversationDep, detached: DetachedDep) -> TurnStatus:
    return await detached.cancel(ref)
