"""random_id(): the random tokens of a request (its id, a lease's fencing token, the gateway's
Idempotency-Key): 32 hex digits from the OS's CSPRNG, as uuid4().hex gave, at a fifth of its CPU
(three per turn: issue 10)."""

from __future__ import annotations

import os


def random_id() -> str:
    return os.urandom(16).hex()
