"""`POST /end-user-tokens`: a tenant's backend asks the service to mint an end-user token."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

from service.deps import CallerDep
from service.end_user_auth import CONV_CLAIM, EndUserTokens
from service.errors import Forbidden, InvalidRequest

router = APIRouter(tags=["end users"])
DEFAULT_TTL_SECONDS = 900


class EndUserTokenCreate(BaseModel):
    """What the token allows: one end user (`sub`), a conversation id or a prefix ending in
    `*` (`conv`), `read` or `read write`, for `ttl_seconds`, with optional caps."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"sub": "user-1", "conv": "user-1:*", "scope": "read write", "ttl_seconds": 900}
            ]
        },
    )

    sub: StrictStr = Field(min_length=1, max_length=256)
    conv: StrictStr = Field(min_length=1, max_length=129, pattern=CONV_CLAIM.pattern)
    scope: Literal["read", "read write"] = "read write"
    ttl_seconds: Annotated[StrictInt, Field(ge=1)] | None = None
    model: StrictStr | None = Field(default=None, min_length=1, max_length=200)
    max_tokens: Annotated[StrictInt, Field(gt=0, le=2**31)] | None = None

    @field_validator("ttl_seconds", "max_tokens", mode="before")
    @classmethod
    def _whole_numbers(cls, value: object) -> object:
        """JSON has one number type: `900.0` is the integer 900 to a JSON Schema, so to us too."""
        return int(value) if isinstance(value, float) and value.is_integer() else value


class EndUserTokenPublic(BaseModel):
    token: str
    token_type: Literal["Bearer"] = "Bearer"  # noqa: S105 - a scheme name, not a secret
    expires_at: int  # epoch seconds
    expires_in: int  # seconds


@router.post("/end-user-tokens")
async def mint_end_user_token(
    body: EndUserTokenCreate, caller: CallerDep, request: Request
) -> EndUserTokenPublic:
    tokens: EndUserTokens = request.state.end_user_tokens
    if caller.upstream_key is not None:
        raise Forbidden("pass-through mode cannot mint end-user tokens (set API_KEYS)")
    if not tokens.can_mint(caller.tenant):
        raise Forbidden(f"no END_USER_JWT_SECRETS entry for tenant {caller.tenant!r}")
    ttl = body.ttl_seconds or min(DEFAULT_TTL_SECONDS, tokens.max_seconds)
    if ttl > tokens.max_seconds:
        raise InvalidRequest(
            f"ttl_seconds: at most {tokens.max_seconds} (END_USER_TOKEN_MAX_SECONDS)"
        )
    token, expires_at = tokens.mint(
        caller.tenant,
        sub=body.sub,
        conv=body.conv,
        scope=body.scope,
        ttl_seconds=ttl,
        model=body.model,
        max_tokens=body.max_tokens,
    )
    return EndUserTokenPublic(token=token, expires_at=expires_at, expires_in=ttl)
