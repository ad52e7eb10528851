"""Who is calling: client keys (each names a tenant) or pass-through of the caller's gateway key."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from service.errors import Unauthorized


@dataclass(frozen=True, slots=True)
class Caller:
    tenant: str
    upstream_key: str | None  # the caller's own gateway key in pass-through mode, else None


class Authenticator:
    """Resolves an `Authorization` header to a Caller, comparing keys in constant time."""

    def __init__(self, client_keys: dict[str, str]) -> None:
        # Compare digests: equal length, so compare_digest's timing says nothing about the key.
        self._keys = [
            (hashlib.sha256(key.encode()).digest(), tenant) for key, tenant in client_keys.items()
        ]

    @property
    def pass_through(self) -> bool:
        return not self._keys

    def authenticate(self, authorization: str | None) -> Caller:
        key = _bare_key(authorization)
        if key is None:
            raise Unauthorized(
                "send your key in the Authorization header", headers={"WWW-Authenticate": "Bearer"}
            )
        if self.pass_through:
            return Caller(tenant=tenant_of_key(key), upstream_key=key)
        digest = hashlib.sha256(key.encode()).digest()
        tenant = None
        for known, name in self._keys:  # no early exit: every key is compared
            if hmac.compare_digest(known, digest):
                tenant = name
        if tenant is None:
            raise Unauthorized("unknown key", headers={"WWW-Authenticate": "Bearer"})
        return Caller(tenant=tenant, upstream_key=None)


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
