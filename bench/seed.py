"""Seeding conversations straight into Redis, in the store's own layout (service/store.py)."""

from __future__ import annotations

import time

from redis import Redis

from bench.upstreams import REPLY_TEXT, USER_TEXT
from service.history import message_hash
from service.models import Message, Role
from service.store import ConversationRef
from service.tokens import SAFETY_MARGIN, message_tokens


def message(seq: int, now: float) -> Message:
    """Stored message `seq` (1-based): user on odd seqs, the assistant on even."""
    role = Role.USER if seq % 2 else Role.ASSISTANT
    text = USER_TEXT if role is Role.USER else REPLY_TEXT
    return Message(
        tokens=message_tokens({"role": role.value, "content": text}),
        seq=seq,
        role=role,
        content=text,
        created_at=now,
    )


def seed(
    redis: Redis,
    tenant: str,
    prefix: str,
    conversations: int,
    messages: int,
    *,
    ttl_seconds: int = 3600,
    meta: dict[str, str] | None = None,
) -> int:
    """Create conversations <prefix>0..N-1 with `messages` stored messages each (and `meta`:
    settings such as their own token budget). Returns the bytes of message JSON written."""
    now = time.time()
    records = [message(seq, now + seq / 1e6) for seq in range(1, messages + 1)]
    payloads = [m.to_json() for m in records]
    # The estimates beside the log, as the store keeps them (else the first turn rebuilds them),
    # and the content hashes, as every turn's commit writes them (else the first lays them anew
    # as unknown, work a conversation the service wrote never sees).
    tokens = [m.tokens for m in records]
    hashes = [message_hash(m.to_wire()) for m in records]
    written = 0
    index = ConversationRef(tenant, "").index_key
    pipe = redis.pipeline(transaction=False)
    for n in range(conversations):
        ref = ConversationRef(tenant, f"{prefix}{n}")
        log = ref.key("log")
        pipe.delete(log, ref.key("tok"), ref.key("hash"), ref.key("meta"), ref.key("lock"))
        for start in range(0, messages, 1000):
            pipe.rpush(log, *payloads[start : start + 1000])
            pipe.rpush(ref.key("tok"), *tokens[start : start + 1000])
            pipe.rpush(ref.key("hash"), *hashes[start : start + 1000])
        pipe.hset(
            ref.key("meta"),
            mapping={"created_at": repr(now), "updated_at": repr(now), **(meta or {})},
        )
        pipe.expire(log, ttl_seconds)
        pipe.expire(ref.key("tok"), ttl_seconds)
        pipe.expire(ref.key("hash"), ttl_seconds)
        pipe.expire(ref.key("meta"), ttl_seconds)
        pipe.zadd(index, {ref.id: now})
        written += sum(len(p) for p in payloads)
        if len(pipe) >= 2000:
            pipe.execute()
    pipe.execute()
    return written


def seed_calibration(redis: Redis, tenant: str, models: list[str]) -> None:
    """The tenant's correction factor for `models` at its settled value. The bench's upstreams
    report the same input tokens whatever they are sent, so from the prior factor (1.5) the first
    windows would be trimmed, the fixed report then read as a higher ratio, the windows trimmed
    further: a loop up to the largest factor and two-message windows. Seeded at SAFETY_MARGIN (what
    an exact report settles at), every turn forwards the whole window, as the reference does."""
    key = ConversationRef(tenant, "").calibration_key
    redis.hset(key, mapping={model: repr(SAFETY_MARGIN) for model in models})
