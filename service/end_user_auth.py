"""End-user tokens: verifying and minting the short-lived JWTs a browser front end carries.

A tenant's backend signs a token for one end user (HS256 with the tenant's secret from
END_USER_JWT_SECRETS, or RS256/ES256 with a key from the JWKS document at END_USER_JWKS_URLS),
or asks `POST /end-user-tokens` to sign one. The token names its tenant in `iss`: that picks the
keys, and a token signed with another tenant's keys fails its signature check. PyJWT does the
cryptography; this module pins the algorithms per key source, so `none` and HS/RS confusion are
refused before any key is tried.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import jwt

from service.errors import Forbidden, Unauthorized
from service.schemas import TurnParams

log = logging.getLogger("service.end_user_auth")
P = TypeVar("P", bound=TurnParams)

HMAC_ALGORITHMS = ("HS256",)
JWKS_ALGORITHMS = ("RS256", "ES256")
CLOCK_SKEW_SECONDS = 30
JWKS_REFETCH_SECONDS = 60.0  # an unknown `kid` refetches the document at most this often
JWKS_TIMEOUT_SECONDS = 5.0
MIN_SECRET_BYTES = 32  # RFC 7518 3.2: an HS256 key at least as long as the hash
SCOPES = ("read", "read write")
# `conv`: a conversation id, or a prefix of one followed by `*`.
CONV_CLAIM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\*?$")
_SEPARATORS = frozenset("._:-")
_TENANT = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_BEARER = {"WWW-Authenticate": 'Bearer error="invalid_token"'}


def conv_allows(pattern: str, conversation_id: str) -> bool:
    """Whether a token's `conv` covers a conversation id.

    A prefix matches only at a boundary: `user-1*` covers `user-1` and `user-1:chat`, never
    `user-10` (another user's), because what follows the prefix must start with a separator
    unless the prefix itself ends with one (`user-1:*` covers `user-1:anything`).
    """
    if not pattern.endswith("*"):
        return conversation_id == pattern
    prefix = pattern[:-1]
    if not conversation_id.startswith(prefix):
        return False
    rest = conversation_id[len(prefix) :]
    return not rest or prefix[-1] in _SEPARATORS or rest[0] in _SEPARATORS


@dataclass(frozen=True, slots=True)
class EndUser:
    """What a verified end-user token allows."""

    tenant: str
    sub: str
    conv: str
    scope: frozenset[str]
    expires_at: int
    model: str | None = None
    max_tokens: int | None = None

    def allows(self, conversation_id: str) -> bool:
        return conv_allows(self.conv, conversation_id)

    def require(self, conversation_id: str | None, scope: str) -> None:
        """403 unless the token covers this conversation (None: no particular one) and scope."""
        if scope not in self.scope:
            raise Forbidden(f"this token's scope does not include {scope!r}")
        if conversation_id is not None and not self.allows(conversation_id):
            raise Forbidden(f"this token does not cover conversation {conversation_id!r}")


def capped_turn(turn: P, grant: EndUser) -> P:
    """A turn within a token's caps: its model (fallbacks would name others), at most its
    max_tokens (the cap when none is asked), and never a system prompt: that is the tenant's."""
    if turn.system is not None:
        raise Forbidden("system: an end-user token cannot set the system prompt")
    updates: dict[str, Any] = {}
    if grant.model is not None:
        if turn.model is not None and turn.model != grant.model:
            raise Forbidden(f"model: this token allows only {grant.model!r}")
        if turn.fallbacks is not None:
            raise Forbidden("fallbacks: this token allows one model only")
        updates["model"] = grant.model
    if grant.max_tokens is not None:
        if turn.max_tokens is not None and turn.max_tokens > grant.max_tokens:
            raise Forbidden(f"max_tokens: this token allows at most {grant.max_tokens}")
        if turn.max_tokens is None:
            updates["max_tokens"] = grant.max_tokens
    return turn.model_copy(update=updates) if updates else turn


def parse_secrets(raw: str) -> dict[str, bytes]:
    """END_USER_JWT_SECRETS: comma-separated `tenant:<base64 secret>` pairs."""
    secrets: dict[str, bytes] = {}
    for pair in raw.split(","):
        if not pair.strip():
            continue
        tenant, sep, encoded = pair.strip().partition(":")
        if not sep or not _TENANT.match(tenant):
            raise ValueError("END_USER_JWT_SECRETS must be comma-separated tenant:<base64> pairs")
        try:
            secret = base64.b64decode(encoded, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"END_USER_JWT_SECRETS: {tenant}'s secret is not base64") from exc
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(
                f"END_USER_JWT_SECRETS: {tenant}'s secret must be at least "
                f"{MIN_SECRET_BYTES} bytes (HS256)"
            )
        secrets[tenant] = secret
    return secrets


def parse_jwks_urls(raw: str) -> dict[str, str]:
    """END_USER_JWKS_URLS: comma-separated `tenant:<https URL>` pairs."""
    urls: dict[str, str] = {}
    for pair in raw.split(","):
        if not pair.strip():
            continue
        tenant, sep, url = pair.strip().partition(":")
        if not sep or not _TENANT.match(tenant) or not url.startswith(("https://", "http://")):
            raise ValueError("END_USER_JWKS_URLS must be comma-separated tenant:<URL> pairs")
        urls[tenant] = url
    return urls


def looks_like_jwt(value: str) -> bool:
    """A compact JWS (three base64url parts) whose header is JSON: never a client key here."""
    if value.count(".") != 2:
        return False
    try:
        jwt.get_unverified_header(value)
    except jwt.InvalidTokenError:
        return False
    return True


class JwksCache:
    """One tenant's published keys, fetched when first needed and again (at most once a
    JWKS_REFETCH_SECONDS) when a token names a `kid` the cached document lacks."""

    def __init__(
        self,
        url: str,
        session: aiohttp.ClientSession,
        *,
        refetch_seconds: float = JWKS_REFETCH_SECONDS,
    ) -> None:
        self._url = url
        self._session = session
        self._refetch_seconds = refetch_seconds
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._lock = asyncio.Lock()

    async def key(self, kid: str | None) -> jwt.PyJWK:
        found = self._find(kid)
        if found is not None:
            return found
        async with self._lock:  # one fetch at a time; waiters see its result
            found = self._find(kid)
            stale = (
                self._fetched_at is None
                or time.monotonic() - self._fetched_at >= self._refetch_seconds
            )
            if found is None and stale:
                await self._fetch()
                found = self._find(kid)
        if found is None:
            raise Unauthorized(
                "the token's signing key is not in its tenant's JWKS", headers=_BEARER
            )
        return found

    def _find(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None:  # no `kid`: only an unambiguous document will do
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    async def _fetch(self) -> None:
        self._fetched_at = time.monotonic()
        try:
            timeout = aiohttp.ClientTimeout(total=JWKS_TIMEOUT_SECONDS)
            async with self._session.get(self._url, timeout=timeout) as response:
                response.raise_for_status()
                document: dict[str, Any] = await response.json(content_type=None)
            keys = jwt.PyJWKSet.from_dict(document).keys
        except (aiohttp.ClientError, TimeoutError, ValueError, jwt.PyJWKSetError) as exc:
            # Keep the keys we had: a publisher's outage must not lock out valid tokens.
            log.warning("JWKS not fetched", extra={"error": type(exc).__name__})
            return
        self._keys = {
            k.key_id or f"#{i}": k
            for i, k in enumerate(keys)
            if k.algorithm_name in JWKS_ALGORITHMS or k.algorithm_name is None
        }


class EndUserTokens:
    """Verifies end-user tokens and mints them for tenants that have a secret."""

    def __init__(
        self,
        secrets: Mapping[str, bytes],
        jwks_urls: Mapping[str, str],
        *,
        max_seconds: int,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self._secrets = dict(secrets)
        self._max_seconds = max_seconds
        self._jwks_urls = dict(jwks_urls)
        self._jwks = {
            tenant: JwksCache(url, session)
            for tenant, url in jwks_urls.items()
            if session is not None
        }

    @property
    def enabled(self) -> bool:
        return bool(self._secrets or self._jwks_urls)

    @property
    def max_seconds(self) -> int:
        return self._max_seconds

    def can_mint(self, tenant: str) -> bool:
        return tenant in self._secrets

    def mint(
        self,
        tenant: str,
        *,
        sub: str,
        conv: str,
        scope: str,
        ttl_seconds: int,
        model: str | None = None,
        max_tokens: int | None = None,
    ) -> tuple[str, int]:
        """A signed token and its expiry (epoch seconds); the caller checked the inputs."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": tenant,
            "sub": sub,
            "conv": conv,
            "scope": scope,
            "iat": now,
            "exp": now + ttl_seconds,
        }
        if model is not None:
            claims["model"] = model
        if max_tokens is not None:
            claims["max_tokens"] = max_tokens
        token = jwt.encode(claims, self._secrets[tenant], algorithm="HS256")
        return token, claims["exp"]

    async def verify(self, token: str) -> EndUser:
        """The token's grant, or 401 for anything bad, expired, foreign or too long-lived."""
        try:
            header = jwt.get_unverified_header(token)
            tenant = jwt.decode(token, options={"verify_signature": False}).get("iss")
        except jwt.InvalidTokenError as exc:
            raise Unauthorized("not a readable end-user token", headers=_BEARER) from exc
        algorithm = header.get("alg")
        if not isinstance(tenant, str):
            raise Unauthorized("the token names no tenant in `iss`", headers=_BEARER)
        key: Any
        if algorithm in HMAC_ALGORITHMS and tenant in self._secrets:
            key, allowed = self._secrets[tenant], list(HMAC_ALGORITHMS)
        elif algorithm in JWKS_ALGORITHMS and tenant in self._jwks:
            kid = header.get("kid")
            key = await self._jwks[tenant].key(kid if isinstance(kid, str) else None)
            allowed = list(JWKS_ALGORITHMS)
        else:
            raise Unauthorized(
                "the token's tenant or algorithm is not accepted here", headers=_BEARER
            )
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=allowed,
                issuer=tenant,
                leeway=CLOCK_SKEW_SECONDS,
                options={"require": ["exp", "sub", "iss"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthorized("the token has expired", headers=_BEARER) from exc
        except jwt.ImmatureSignatureError as exc:
            raise Unauthorized("the token is not valid yet", headers=_BEARER) from exc
        except jwt.InvalidTokenError as exc:
            raise Unauthorized(
                f"the token was refused ({type(exc).__name__})", headers=_BEARER
            ) from exc
        return self._grant(tenant, claims)

    def _grant(self, tenant: str, claims: dict[str, Any]) -> EndUser:
        exp = claims["exp"]
        issued = claims.get("iat")
        start = issued if isinstance(issued, int | float) else time.time()
        if exp - start > self._max_seconds + CLOCK_SKEW_SECONDS:
            raise Unauthorized(
                f"the token lives longer than {self._max_seconds} s (END_USER_TOKEN_MAX_SECONDS)",
                headers=_BEARER,
            )
        sub, conv, scope = claims.get("sub"), claims.get("conv"), claims.get("scope")
        model, max_tokens = claims.get("model"), claims.get("max_tokens")
        valid = (
            isinstance(sub, str)
            and 0 < len(sub) <= 256
            and isinstance(conv, str)
            and CONV_CLAIM.match(conv) is not None
            and scope in SCOPES
            and (model is None or (isinstance(model, str) and 0 < len(model) <= 200))
            and (max_tokens is None or _positive_int(max_tokens))
        )
        if not valid:
            raise Unauthorized(
                "the token's claims are malformed (sub, conv, scope, model, max_tokens)",
                headers=_BEARER,
            )
        return EndUser(
            tenant=tenant,
            sub=str(sub),
            conv=str(conv),
            scope=frozenset(str(scope).split()),
            expires_at=int(exp),
            model=model,
            max_tokens=max_tokens,
        )


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
