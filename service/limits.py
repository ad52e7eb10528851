"""Input limits: how deep, how many and how large a request may be, checked before parsing.

Each check here is cheap and runs on the body as JSON (dicts and lists) before pydantic builds
models from it, so a hostile body is refused for the price of a walk, not of a full validation.
The limits bound what the service stores, too: anything accepted must read back.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# Deeper than any real message (a tool call's arguments are a string); well under the 200 levels
# at which pydantic's JSON reader refuses a stored record, and orjson's 255.
MAX_JSON_DEPTH = 32
# An OpenAI-style request may carry the whole history (service/openai_compat.py); what is new in
# it is held to MAX_NEW_MESSAGES like any turn.
MAX_REQUEST_MESSAGES = 10_000
MAX_NEW_MESSAGES = 256  # per turn: a user message, or an assistant's tool calls and their results
MAX_CONTENT_PARTS = 256  # per message
MAX_TOOL_CALLS = 128  # per message
MAX_TOOLS = 128  # tool definitions per turn
MAX_STOP_SEQUENCES = 16
MAX_FALLBACKS = 16
MAX_SYSTEM_CHARS = 128 * 1024  # a conversation's system prompt
MAX_METADATA_BYTES = 16 * 1024  # a conversation's metadata, as JSON
MAX_TEXT_CHARS = 256  # ids, names, model names, regions
# Messages in one import (service/editing.py): as many as a turn's window may read. The body is
# held to MAX_BODY_BYTES besides, like every other.
MAX_IMPORT_MESSAGES = 10_000


def json_depth_exceeds(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when containers nest deeper than `limit` (the body itself is level 1).

    Iterative and stops at the first level past the limit, so its cost is bounded by the
    containers within the limit, never by how deep a hostile body goes.
    """
    level: list[Any] = [value]
    depth = 0
    while level:
        containers = [v for v in level if isinstance(v, dict | list)]
        if not containers:
            return False
        depth += 1
        if depth > limit:
            return True
        level = []
        for container in containers:
            children: Iterable[Any] = (
                container.values() if isinstance(container, dict) else container
            )
            level.extend(children)
    return False


def depth_problem(limit: int = MAX_JSON_DEPTH) -> str:
    return f"the body nests deeper than {limit} levels (MAX_JSON_DEPTH)"


def count_problem(field: str, value: Any, limit: int) -> str | None:
    """A message naming `field` when it is a list longer than `limit`; None otherwise."""
    if isinstance(value, list) and len(value) > limit:
        return f"{field}: at most {limit} items (got {len(value)})"
    return None
