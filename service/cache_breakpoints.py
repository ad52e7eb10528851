"""Automatic prompt-cache breakpoints for models that need explicit caching. Pure.

Claude models cache only up to a message marked `cache_control: {"type": "ephemeral"}`; others
cache automatically. For a model matching CACHE_CONTROL_MODELS, the forwarded copy (never the
stored messages) gets a breakpoint on the last message of the stable prefix (the stored history,
which the next turn forwards again byte for byte while the window start holds) and on the last
block of the pinned system prompt and summary, when what it closes is at least CACHE_MIN_TOKENS
(the provider caches nothing shorter). Anthropic allows 4 breakpoints per request, the client's
own included: those are counted, and ours are left out first (the system block's first).
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase
from functools import lru_cache
from typing import Any

import orjson

from service.models import JSONObject, Message

EPHEMERAL: JSONObject = {"type": "ephemeral"}
MAX_BREAKPOINTS = 4


@lru_cache(maxsize=1024)  # asked every turn; a model's answer never changes (bounded: client names)
def needs_breakpoints(model: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(model, pattern) for pattern in patterns)


def client_marks(value: Any) -> int:
    """cache_control markers a client put anywhere in a message or tool definition. Mostly there
    are none, which one search of the JSON finds in C: a marker's key serialises as the bytes
    below, and text in a string cannot contain them (its quotes are escaped). The walk counts only
    where they appear (issue 10: it was a third of what the features cost an ordinary turn)."""
    try:
        if _MARKER_KEY not in orjson.dumps(value):
            return 0
    except orjson.JSONEncodeError:
        pass  # not JSON as orjson writes it (an integer past 64 bits, say): walk it
    return _marks(value)


_MARKER_KEY = b'"cache_control"'


def stored_marks(history: Sequence[Message]) -> int:
    """client_marks of stored messages, looking only where a marker can be: a message's own
    `cache_control`, content parts, tool calls. Mostly none is there (plain text), and a Claude
    model's turn then scans nothing of its forwarded history (issue 10)."""
    carrying = [
        m.to_wire()
        for m in history
        if m.cache_control is not None or m.tool_calls is not None or type(m.content) is list
    ]
    return client_marks(carrying) if carrying else 0


def _marks(value: Any) -> int:
    """client_marks' count, by walking: plain loops that step into containers only."""
    count = 0
    if isinstance(value, dict):
        if isinstance(value.get("cache_control"), dict):
            count = 1
        for key, item in value.items():
            if key != "cache_control" and isinstance(item, dict | list):
                count += _marks(item)
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict | list):
                count += _marks(item)
    return count


def place_breakpoints(
    messages: Sequence[JSONObject],
    *,
    pinned: int,
    stable: int,
    pinned_tokens: int,
    stable_tokens: int,
    min_tokens: int,
    marks: int,
) -> tuple[list[JSONObject], list[int]]:
    """The array to forward, with breakpoints added, and their indexes.

    `pinned` is how many leading messages are the system prompt and summary, `stable` how many
    leading messages (pinned ones included) form the prefix the next turn repeats;
    `pinned_tokens` and `stable_tokens` are those prefixes' sizes in the gateway's units. A
    breakpoint closes a prefix of at least `min_tokens`; a message that already carries one is
    left as it is. `marks`: the client's own markers in `messages` and the tools, as the caller
    counted them (client_marks, stored_marks: it knows where none can be).
    """
    budget = MAX_BREAKPOINTS - marks
    wanted: list[int] = []
    # Most valuable first: the whole stable prefix.
    for end, size in ((stable, stable_tokens), (pinned, pinned_tokens)):
        index = end - 1
        if index < 0 or index in wanted or size < min_tokens:
            continue
        if isinstance(messages[index].get("cache_control"), dict):
            continue  # the client's own already closes this prefix
        wanted.append(index)
    chosen = sorted(wanted[: max(0, budget)])
    out = list(messages)  # a new list; only the marked messages are copied (the rest unchanged)
    for index in chosen:
        out[index] = {**messages[index], "cache_control": dict(EPHEMERAL)}
    return out, chosen
