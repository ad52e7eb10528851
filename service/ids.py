"""random_id(): every random token the service makes (request ids, leases' fencing tokens, the
gateway's Idempotency-Key, detached turn ids, claims): 32 hex digits from the OS's CSPRNG, as
uuid4().hex gave, at a fifth of its CPU (three per turn: issue 10)."""

from __future__ import annotations

import os


def random_id() -> str:
    return os.urandom(16).hex()
