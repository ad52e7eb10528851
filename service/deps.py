"""FastAPI dependencies: typed access to lifespan objects, the caller and the conversation."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Path, Request

from service.auth import Authenticator, Caller
from service.chat import ChatService
from service.config import Settings
from service.errors import InvalidRequest
from service.logs import annotate
from service.schemas import CONVERSATION_ID
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


async def get_idempotency_key(
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> str | None:
    if idempotency_key is None:
        return None
    if not 1 <= len(idempotency_key) <= MAX_IDEMPOTENCY_KEY or not idempotency_key.isprintable():
        raise InvalidRequest(
            f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} printable characters"
        )
    return idempotency_key


IdempotencyKeyDep = Annotated[str | None, Depends(get_idempotency_key)]
