"""Local token estimates and their per-model correction from what the gateway reports.

The estimate is deliberately simple and fast (UTF-8 bytes / 4, plus a fixed per-message overhead):
it is never the gateway's count, so every model gets a correction factor learned from
`usage.input_tokens`, shared through Redis by every replica.
"""

from __future__ import annotations

from typing import Any

import orjson

MESSAGE_OVERHEAD = 4  # role marker and separators, as OpenAI-style chat templates add
ARRAY_OVERHEAD = 3  # the reply's priming tokens
NON_TEXT_PART = 85  # an image or other non-text part: a flat low-detail cost

MIN_FACTOR = 0.25
MAX_FACTOR = 8.0
DECAY = 0.2  # weight of a new observation when it is below the current factor


def text_tokens(text: str) -> int:
    return (len(text.encode("utf-8")) + 3) // 4


def _content_tokens(content: object) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return text_tokens(content)
    total = 0
    if isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                total += text_tokens(part["text"])
            else:
                total += NON_TEXT_PART
    return total


def message_tokens(message: dict[str, Any]) -> int:
    """Estimated tokens of one wire message (role, content, tool calls, names)."""
    total = MESSAGE_OVERHEAD + _content_tokens(message.get("content"))
    tool_calls = message.get("tool_calls")
    if tool_calls:
        total += text_tokens(orjson.dumps(tool_calls).decode())
    for field in ("name", "tool_call_id"):
        value = message.get(field)
        if isinstance(value, str):
            total += text_tokens(value)
    return total


def corrected(estimate: int, factor: float) -> int:
    """An estimate in the gateway's units."""
    return int(estimate * factor + 0.999)


def next_factor(current: float, estimate: int, reported: int) -> float:
    """Fold one observation (`reported` gateway tokens for an array estimated at `estimate`).

    Rises at once to a higher observed ratio and decays slowly towards a lower one, so the
    forwarded array errs on the side of fitting the budget as the gateway counts it.
    """
    if estimate <= 0 or reported <= 0:
        return current
    observed = min(MAX_FACTOR, max(MIN_FACTOR, reported / estimate))
    if observed >= current:
        return observed
    return current + (observed - current) * DECAY
