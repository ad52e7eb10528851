"""The OpenAI-compatible routes (issue 12): `POST /v1/chat/completions`, `GET /v1/models`.

Thin: parse, hand to OpenAICompletions (service/openai_service.py), answer. Errors here are
OpenAI's shape (service/openai_errors.py).
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import StreamingResponse

from service.catalog import ModelCatalog
from service.deps import CallerDep, IdempotencyKeyDep, RequestIdDep
from service.errors import GatewayError
from service.openai_compat import ChatCompletionCreate
from service.openai_service import OpenAICompletions, invalid
from service.routes import SSE_HEADERS
from service.schemas import CONVERSATION_ID

router = APIRouter(prefix="/v1", tags=["openai"])
MODELS_MAX_AGE_SECONDS = 60.0  # how old a model list /v1/models serves before reading it again


async def get_openai(request: Request) -> OpenAICompletions:
    completions: OpenAICompletions = request.state.openai
    return completions


async def get_catalog(request: Request) -> ModelCatalog:
    catalog: ModelCatalog = request.state.catalog
    return catalog


OpenAIDep = Annotated[OpenAICompletions, Depends(get_openai)]
CatalogDep = Annotated[ModelCatalog, Depends(get_catalog)]

_COMPLETION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "OpenAI's `chat.completion`",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "chat.completion"},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "choices": {"type": "array", "items": {"type": "object"}},
        "usage": {
            "type": "object",
            "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
            "properties": {
                "prompt_tokens": {"type": "integer"},
                "completion_tokens": {"type": "integer"},
                "total_tokens": {"type": "integer"},
            },
        },
    },
}
_HEADERS = {
    name: {"description": meaning, "schema": {"type": kind}}
    for name, meaning, kind in (
        (
            "X-Conversation-Id",
            "The conversation this turn was stored in (a new one when a diverged history forked)",
            "string",
        ),
        ("X-Conversation-Messages", "Messages stored after this turn", "integer"),
        ("X-Context-Messages", "Messages forwarded (system prompt, summary included)", "integer"),
        ("X-Context-Tokens", "The forwarded array's estimated tokens", "integer"),
        ("X-Context-Dropped", "Stored messages left out of the forwarded array", "integer"),
    )
}


@router.post(
    "/chat/completions",
    response_model=None,
    responses={
        200: {
            "description": "OpenAI's `chat.completion`; with `stream: true`, OpenAI's SSE "
            "(`chat.completion.chunk` events, then `data: [DONE]`). With a conversation id the "
            "`X-Conversation-*` and `X-Context-*` headers describe it.",
            "headers": _HEADERS,
            "content": {
                "application/json": {"schema": _COMPLETION_SCHEMA},
                "text/event-stream": {
                    "schema": {
                        "type": "object",
                        "description": "One server-sent event: a `chat.completion.chunk`, or "
                        '`{"error": ...}`, or `[DONE]`',
                        "properties": {"data": {"type": "string"}, "id": {"type": "string"}},
                    }
                },
            },
        }
    },
)
async def create_chat_completion(
    body: ChatCompletionCreate,
    caller: CallerDep,
    completions: OpenAIDep,
    request_id: RequestIdDep,
    idempotency_key: IdempotencyKeyDep,
    conversation_id: Annotated[
        str | None,
        Header(
            alias="X-Conversation-Id",
            min_length=1,
            max_length=128,
            pattern=CONVERSATION_ID.pattern,
            description="The conversation to continue (else `metadata.conversation_id`); none: "
            "a stateless pass-through",
        ),
    ] = None,
    detach: Annotated[
        str | None,
        Header(
            alias="X-Detach",
            pattern="^(?:true|false)$",
            description="`true`: a detached turn (as `detach: true` on our own route); needs a "
            "conversation id and `stream: true`",
        ),
    ] = None,
    divergence: Annotated[
        str | None,
        Header(
            alias="X-Conversation-Divergence",
            pattern="^(?:reject|fork)$",
            description="What a resent history that departs from the stored log does: "
            "`reject` (the default: 409 `history_diverged`) or `fork` (the turn runs on a new "
            "conversation with the log's shared whole turns; `X-Conversation-Id` in the answer "
            "names it)",
        ),
    ] = None,
) -> Response:
    try:
        named = body.conversation_id(conversation_id)
    except ValueError as exc:
        raise invalid(exc) from exc
    answer = await completions.create(
        body,
        caller=caller,
        conversation_id=named,
        request_id=request_id,
        idempotency_key=idempotency_key,
        detach=detach == "true",
        fork=divergence == "fork",
    )
    if answer.events is not None:
        return StreamingResponse(
            answer.events,
            media_type="text/event-stream",
            headers={**SSE_HEADERS, **answer.headers},
        )
    return Response(answer.body, media_type="application/json", headers=answer.headers)


@router.get(
    "/models",
    response_model=None,
    responses={
        200: {
            "description": "The gateway's model list, as OpenAI lists models",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["object", "data"],
                        "properties": {
                            "object": {"const": "list"},
                            "data": {"type": "array", "items": {"type": "object"}},
                        },
                    }
                }
            },
        }
    },
)
async def list_models(_caller: CallerDep, catalog: CatalogDep) -> Response:
    entries = await catalog.listing(MODELS_MAX_AGE_SECONDS)
    if entries is None:
        raise GatewayError("the gateway's model list could not be read")
    data = [
        {"object": "model", "created": 0, "owned_by": "llm-gateway", **entry} for entry in entries
    ]
    return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")
