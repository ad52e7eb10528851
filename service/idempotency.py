"""What an `Idempotency-Key` means: the key's hash, the body's fingerprint, and the formats the
turn's lease and its stored record carry them in. The Lua scripts (redis_scripts.py) only compare
these strings; every one of them is made here."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import orjson

from service.errors import IdempotencyKeyReused
from service.ids import random_id
from service.schemas import TurnParams

FINGERPRINT_HEX = 64  # the Lua reads a record's fingerprint as its first 64 characters


def key_hash(key: str) -> str:
    """Keys are stored hashed: a client's key may be long and is none of Redis's business."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def fingerprint(turn: TurnParams) -> str:
    """The request body, canonical, without `stream` and `detach`: how the answer is delivered,
    so a replay may ask for either form."""
    body = turn.model_dump(mode="json", exclude={"stream", "detach"}, exclude_unset=True)
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def reused() -> IdempotencyKeyReused:
    return IdempotencyKeyReused("this Idempotency-Key was used with another request body")


@dataclass(frozen=True, slots=True)
class Idempotency:
    key_hash: str
    fingerprint: str  # FINGERPRINT_HEX hex characters

    @classmethod
    def of(cls, key: str | None, turn: TurnParams) -> Idempotency | None:
        return None if key is None else cls(key_hash(key), fingerprint(turn))

    def is_running_as(self, running_key_hash: str, running_fingerprint: str) -> bool:
        """Whether a running turn (its key hash and fingerprint) is this request: the same key
        with another body is 422, never an attachment."""
        if running_key_hash != self.key_hash:
            return False
        if running_fingerprint != self.fingerprint:
            raise reused()
        return True


def lease_value(idempotency: Idempotency | None) -> str:
    """The turn lease's value: a random token (fencing), then the key hash and fingerprint, so
    that a duplicate meeting the lease can tell "my own request, still running" (409 in flight,
    or wait) from "another body under my key" (422)."""
    held = f"{idempotency.key_hash}\n{idempotency.fingerprint}" if idempotency else "\n"
    return f"{random_id()}\n{held}"


@dataclass(frozen=True, slots=True)
class IdempotentRecord:
    """A finished turn's answer, stored by its commit for replays."""

    idempotency: Idempotency
    body: bytes

    def encoded(self) -> str:
        return f"{self.idempotency.fingerprint}\n{self.body.decode()}"
