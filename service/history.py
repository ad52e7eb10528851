"""Apps that send their whole history (issue 15, part 3): per-message content hashes, and which
part of a resent history is new. Pure.

Every stored message has a hash beside it (service/store.py's `hash` list). A `/v1` request with
a conversation id whose messages begin with the stored log is a "full history" request: only
what follows the log is new. The hash is of what a client can resend: role, content (text parts
joined, null as empty), tool calls (id, name, arguments), tool_call_id and name; not
`cache_control`, timestamps or ids of our own, so an app that adds or drops a cache breakpoint,
or resends `null` where we stored `""`, still matches.

A diverged history forks into a new conversation when the request says
`X-Conversation-Divergence: fork` (service/openai_service.py does it with EditingService.fork):
`fork_point` says how much of the log the new conversation keeps, `fork_id` what it is called.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from service.errors import ServiceError
from service.idempotency import key_hash
from service.models import JSONObject

HASH_CHARS = 16  # 64 bits: a collision inside one conversation is not a practical concern
UNKNOWN = ""  # a message stored before hashes existed; computed from its record when needed


class HistoryDiverged(ServiceError):
    status = 409
    title = "History diverged"
    slug = "history-diverged"

    def __init__(self, detail: str = "", *, common: int = 0) -> None:
        super().__init__(detail)
        self.common = common  # how many of the request's first messages the log has too


def _content(content: Any) -> Any:
    if content is None:
        return ""
    if isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" for part in content
    ):
        return "".join(str(part.get("text") or "") for part in content)
    return content


def _tool_calls(calls: Any) -> Any:
    if not isinstance(calls, list) or not calls:
        return None
    out = []
    for call in calls:
        if not isinstance(call, dict):
            out.append(call)
            continue
        function = call.get("function")
        if not isinstance(function, dict):
            function = {}
        out.append([call.get("id"), function.get("name"), function.get("arguments") or ""])
    return out


def message_hash(wire: JSONObject) -> str:
    """The hash of one message as the gateway receives it (our wire form)."""
    canonical = [
        wire.get("role"),
        _content(wire.get("content")),
        _tool_calls(wire.get("tool_calls")),
        wire.get("tool_call_id"),
        wire.get("name"),
    ]
    digest = hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return digest[:HASH_CHARS]


@dataclass(frozen=True, slots=True)
class Resent:
    """How a request's messages relate to the stored log: `first_new` is the index of the first
    new message (0: all of them are new)."""

    first_new: int


def new_part(sent: list[str], stored: list[str]) -> Resent:
    """Which of the request's messages (their hashes, `sent`) are new, given the stored log's.

    - One message, or an empty log, or a first message other than the log's: the newest-only way
      (our own route's): all of them are new.
    - The log, then more: a full history; what follows the log is new.
    - Otherwise (the first message is the log's, then they part, or the request stops within
      the log): HistoryDiverged, naming where.
    """
    if len(sent) <= 1 or not stored or sent[0] != stored[0]:
        return Resent(first_new=0)
    common = 0
    for mine, theirs in zip(sent, stored, strict=False):
        if mine != theirs:
            break
        common += 1
    if common == len(stored) and len(sent) > common:
        return Resent(first_new=common)
    if common == len(sent):
        raise HistoryDiverged(
            f"messages: the {len(sent)} sent are the first of the {len(stored)} stored, with "
            "nothing new after them; send the whole history and the new message(s), or only "
            "the new one(s)",
            common=common,
        )
    raise HistoryDiverged(
        f"messages.{common}: the history sent differs from the conversation's stored "
        f"{len(stored)} messages at message {common + 1}; nothing was stored (to keep this "
        "history, send it under a new conversation id, or with X-Conversation-Divergence: "
        "fork)",
        common=common,
    )


def fork_point(sent: Sequence[JSONObject], common: int) -> int:
    """How many messages of the log a fork of a diverged history keeps: the `common` first
    messages it shares with the request (`sent`), cut back to the end of the last whole turn in
    them (an assistant message that calls no tool). So the fork's log ends where a turn ended, a
    tool call is never parted from its results, and the rest of the request (never empty) is the
    turn's new messages; 0 when no turn ended in the shared part."""
    for end in range(min(common, len(sent) - 1), 0, -1):
        message = sent[end - 1]
        if message.get("role") == "assistant" and not message.get("tool_calls"):
            return end
    return 0


FORK_TAG = ".fork-"
_FORK_SUFFIX = re.compile(re.escape(FORK_TAG) + r"[0-9a-f]{16}$")
MAX_ID_CHARS = 128  # as service/schemas.py's CONVERSATION_ID admits


def fork_id(conversation_id: str, idempotency_key: str | None) -> str:
    """The new conversation's id: `<id>.fork-<16 hex>`, within the id pattern and 128 chars
    (a long id is cut, a fork of a fork replaces the tag rather than adding one). With an
    Idempotency-Key the tag is a hash of the old id and the key, so a retry forks onto the same
    id (and EditingService.fork replays); without one it is random, as each request is new."""
    if idempotency_key is None:
        tag = secrets.token_hex(8)
    else:
        seed = orjson.dumps([conversation_id, key_hash(idempotency_key)])
        tag = hashlib.sha256(seed).hexdigest()[:16]
    base = _FORK_SUFFIX.sub("", conversation_id)[: MAX_ID_CHARS - len(FORK_TAG) - len(tag)]
    return f"{base}{FORK_TAG}{tag}"
