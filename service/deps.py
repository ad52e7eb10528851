"""FastAPI dependencies: typed access to lifespan objects, the caller and the conversation."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Path, Request

from service.auth import Authenticator, Caller
from service.chat import ChatService
from service.config import Settings
from service.detached import DetachedTurns
from service.editing import EditingService
from service.end_user_auth import P, capped_turn
from service.errors import Forbidden, InvalidRequest
from service.log_edits import LogEditStore
from service.logs import annotate
from service.rate_limits import RateLimiter
from service.schemas import CONVERSATION_ID, ConversationUpdate, RegenerateCreate, TurnCreate
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


async def get_edits(request: Request) -> LogEditStore:
    edits: LogEditStore = request.state.edits
    return edits


async def get_editing(request: Request) -> EditingService:
    editing: EditingService = request.state.editing
    return editing


EditsDep = Annotated[LogEditStore, Depends(get_edits)]
EditingDep = Annotated[EditingService, Depends(get_editing)]


async def get_detached(request: Request) -> DetachedTurns:
    detached: DetachedTurns = request.state.detached
    return detached


DetachedDep = Annotated[DetachedTurns, Depends(get_detached)]


async def get_caller(request: Request) -> Caller:
    """The authenticated caller, once its tenant's and end user's rate limits let it in."""
    authenticator: Authenticator = request.state.authenticator
    caller = await authenticator.authenticate(request.headers.get("authorization"))
    annotate(tenant=caller.tenant)
    # A route takes end-user tokens only if it checks what they allow: those under
    # /conversations do (get_conversation, get_turn, get_update); any other must opt in here.
    path = request.scope["path"]  # not request.url: building a URL costs more than the check
    if caller.end_user is not None and not (
        path == "/conversations" or path.startswith("/conversations/")
    ):
        raise Forbidden("end-user tokens are accepted on /conversations routes only")
    limiter: RateLimiter = request.state.limiter
    await limiter.take(caller.tenant, caller.end_user.sub if caller.end_user else None)
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
    request: Request,
    caller: CallerDep,
    conversation_id: Annotated[
        str, Path(min_length=1, max_length=128, pattern=CONVERSATION_ID.pattern)
    ],
) -> ConversationRef:
    if caller.end_user is not None:  # reads need `read`; anything else changes something
        caller.end_user.require(conversation_id, "read" if request.method == "GET" else "write")
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


_NO_PARAMETERS = RegenerateCreate()


async def get_turn(body: TurnCreate, request: Request, caller: CallerDep) -> TurnCreate:
    """The turn's body, refused when it names a field neither we nor the operator allow, and
    held to an end-user token's caps. (Settings straight from the state, not SettingsDep: see
    TurnServices.)"""
    return _allowed(body, request.state.settings, caller)


async def get_regenerate(
    body: RegenerateCreate = _NO_PARAMETERS, *, request: Request, caller: CallerDep
) -> RegenerateCreate:
    """A regenerate's body, held to the same rules as a turn's. Every field is optional, so no
    body at all is the same as `{}` (FastAPI gives each request a copy of the default)."""
    return _allowed(body, request.state.settings, caller)


def _allowed(body: P, settings: Settings, caller: Caller) -> P:
    unknown = body.unknown_fields(settings.extra_gateway_params())
    if unknown:
        raise InvalidRequest(
            f"{unknown[0]}: not a parameter this service forwards "
            "(the operator may allow it with GATEWAY_EXTRA_PARAMS)"
        )
    if caller.end_user is not None:
        return capped_turn(body, caller.end_user)
    return body


def checked_update(
    update: ConversationUpdate, settings: Settings, caller: Caller
) -> ConversationUpdate:
    """Settings within the operator's caps: token budget and time to live. End users may set
    only `metadata`: the rest is the tenant's to decide. (An import's settings too.)"""
    if caller.end_user is not None:
        fields = sorted(update.model_fields_set - {"metadata"})
        if fields:
            raise Forbidden(f"{fields[0]}: an end-user token may set only metadata")
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


async def get_update(
    update: ConversationUpdate, settings: SettingsDep, caller: CallerDep
) -> ConversationUpdate:
    return checked_update(update, settings, caller)


@dataclass(frozen=True, slots=True)
class TurnServices:
    """What the turn route takes from the lifespan and the request, as one dependency: FastAPI
    solves each dependency of a route on every request, at about 9 us of CPU apiece, and the
    turn is the hot path (four dependencies became this one: issue 10)."""

    chat: ChatService
    detached: DetachedTurns
    store: ConversationStore
    request_id: str


async def get_turn_services(request: Request) -> TurnServices:
    state = request.state
    return TurnServices(
        chat=state.chat,
        detached=state.detached,
        store=state.store,
        request_id=request.scope["state"]["request_id"],
    )


TurnDep = Annotated[TurnCreate, Depends(get_turn)]
RegenerateDep = Annotated[RegenerateCreate, Depends(get_regenerate)]
TurnServicesDep = Annotated[TurnServices, Depends(get_turn_services)]
UpdateDep = Annotated[ConversationUpdate, Depends(get_update)]
