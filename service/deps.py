"""FastAPI dependencies: typed access to lifespan objects, the caller and the conversation."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Depends, Header, Path, Request

from service.auth import Authenticator, Caller
from service.chat import ChatService
from service.config import Settings
from service.errors import InvalidRequest
from service.logs import annotate
from service.schemas import CONVERSATION_ID, ConversationUpdate, TurnCreate
from service.store import ConversationRef, ConversationStore

MAX_IDEMPOTENCY_KEY = 255


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.state.settings
    return settings


async def get_store(request: Request) -> ConversationStore:
    store: ConversationStore = request.state.store
    return store


async def get_chat(request: Request) -> ChatService:
    chat: ChatService = request.state.chat
    return chat


async def get_caller(request: Request) -> Caller:
    authenticator: Authenticator = request.state.authenticator
    caller = authenticator.authenticate(request.headers.get("authorization"))
    annotate(tenant=caller.tenant)
    return caller


async def get_request_id(request: Request) -> str:
    request_id: str = request.scope["state"]["request_id"]
    return request_id


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[ConversationStore, Depends(get_store)]
ChatDep = Annotated[ChatService, Depends(get_chat)]
CallerDep = Annotated[Caller, Depends(get_caller)]
RequestIdDep = Annotated[str, Depends(get_request_id)]


async def get_conversation(
    caller: CallerDep,
    conversation_id: Annotated[
        str, Path(min_length=1, max_length=128, pattern=CONVERSATION_ID.pattern)
    ],
) -> ConversationRef:
    return ConversationRef(tenant=caller.tenant, id=conversation_id)


ConversationDep = Annotated[ConversationRef, Depends(get_conversation)]


# Visible ASCII, spaces inside only (HTTP trims them at the ends anyway).
IDEMPOTENCY_KEY = re.compile(rf"^[!-~](?:[ -~]{{0,{MAX_IDEMPOTENCY_KEY - 2}}}[!-~])?$")


async def get_idempotency_key(
    idempotency_key: Annotated[
        str | None,
        Header(alias="Idempotency-Key", pattern=IDEMPOTENCY_KEY.pattern, max_length=255),
    ] = None,
) -> str | None:
    return idempotency_key


IdempotencyKeyDep = Annotated[str | None, Depends(get_idempotency_key)]


async def get_turn(body: TurnCreate, settings: SettingsDep) -> TurnCreate:
    """The turn's body, refused when it names a field neither we nor the operator allow."""
    unknown = body.unknown_fields(settings.extra_gateway_params())
    if unknown:
        raise InvalidRequest(
            f"{unknown[0]}: not a parameter this service forwards "
            "(the operator may allow it with GATEWAY_EXTRA_PARAMS)"
        )
    return body


async def get_update(update: ConversationUpdate, settings: SettingsDep) -> ConversationUpdate:
    """Settings within the operator's caps: token budget and time to live."""
    if update.token_budget is not None and update.token_budget > settings.max_token_budget:
        raise InvalidRequest(
            f"token_budget: at most {settings.max_token_budget} (MAX_TOKEN_BUDGET)"
        )
    cap = settings.max_conversation_ttl_seconds
    if cap and update.ttl_seconds is not None and not 0 < update.ttl_seconds <= cap:
        raise InvalidRequest(
            f"ttl_seconds: 1 to {cap} (MAX_CONVERSATION_TTL_SECONDS); this service does not "
            "keep conversations forever"
        )
    return update


TurnDep = Annotated[TurnCreate, Depends(get_turn)]
UpdateDep = Annotated[ConversationUpdate, Depends(get_update)]
