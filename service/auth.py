"""Who is calling: client keys (each names a tenant), end-user tokens (service/end_user_auth.py),
or pass-through of the caller's gateway key."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from service.end_user_auth import EndUser, EndUserTokens, looks_like_jwt
from service.errors import Unauthorized


@dataclass(frozen=True, slots=True)
class Caller:
    tenant: str
    upstream_key: str | None  # the caller's own gateway key in pass-through mode, else None
    end_user: EndUser | None = None  # set when the caller holds an end-user token


class Authenticator:
    """Resolves an `Authorization` header to a Caller, comparing keys in constant time."""

    def __init__(self, client_keys: dict[str, str], end_users: EndUserTokens | None = None) -> None:
        # Compare digests: equal length, so compare_digest's timing says nothing about the key.
        self._keys = [
            (hashlib.sha256(key.encode()).digest(), tenant) for key, tenant in client_keys.items()
        ]
        self._end_users = end_users if end_users is not None and end_users.enabled else None

    @property
    def pass_through(self) -> bool:
        return not self._keys

    async def authenticate(self, authorization: str | None) -> Caller:
        key = _bare_key(authorization)
        if key is None:
            raise Unauthorized(
                "send your key in the Authorization header", headers={"WWW-Authenticate": "Bearer"}
            )
        if self.pass_through:
            # The key goes upstream as it is: an end-user token must never be one of them.
            if self._end_users is not None and looks_like_jwt(key):
                raise Unauthorized(
                    "end-user tokens need client-key mode (API_KEYS); pass-through forwards "
                    "keys to the gateway",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            return Caller(tenant=tenant_of_key(key), upstream_key=key)
        digest = hashlib.sha256(key.encode()).digest()
        tenant = None
        for known, name in self._keys:  # no early exit: every key is compared
            if hmac.compare_digest(known, digest):
                tenant = name
        if tenant is not None:
            return Caller(tenant=tenant, upstream_key=None)
        if self._end_users is not None and looks_like_jwt(key):
            end_user = await self._end_users.verify(key)
            return Caller(tenant=end_user.tenant, upstream_key=None, end_user=end_user)
        raise Unauthorized("unknown key", headers={"WWW-Authenticate": "Bearer"})


def tenant_of_key(key: str) -> str:
    """A pass-through tenant: a hash of the key, never the key itself."""
    return "k" + hashlib.sha256(key.encode()).hexdigest()[:24]


def _bare_key(authorization: str | None) -> str | None:
    if not authorization:
        return None
    value = authorization.strip()
    scheme, _, rest = value.partition(" ")
    if scheme.lower() == "bearer":
        value = rest.strip()
    return value or None
