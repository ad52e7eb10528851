"""Local token estimates and their correction from what the gateway reports.

The estimate is deliberately simple and fast (UTF-8 bytes / 4, plus a fixed per-message overhead):
it is never the gateway's count, so each tenant and model gets a correction factor learned from
the prompt's full size as the gateway reports it (service/usage.py), shared through Redis by every
replica. Per tenant, so one tenant's odd content (2,000 `!`, which a tokenizer counts about one
token per character) raises only that tenant's correction, never another's window.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

MESSAGE_OVERHEAD = 4  # role marker and separators, as OpenAI-style chat templates add
ARRAY_OVERHEAD = 3  # the reply's priming tokens
NON_TEXT_PART = 85  # an image or other non-text part: a flat low-detail cost

MIN_FACTOR = 0.25
MAX_FACTOR = 8.0
DECAY = 0.2  # weight of a new observation when it is below the current factor
# Before any observation: generous, since bytes / 4 undercounts most tokenizers (code, punctuation
# and non-Latin text more), so the very first turn stays within the budget too.
PRIOR_FACTOR = 1.5
# What is learned is the observed ratio plus this margin: the next array mixes messages a little
# differently, and the budget is a cap, not a target.
SAFETY_MARGIN = 1.03


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


def tools_tokens(tools: object) -> int:
    """Tool definitions: the gateway counts them in the prompt, so the budget does too."""
    if not tools:
        return 0
    return text_tokens(orjson.dumps(tools).decode())


_ROUNDING = 0.999  # an estimate in the gateway's units is rounded up, bar float noise


def corrected(estimate: int, factor: float) -> int:
    """An estimate in the gateway's units."""
    return int(estimate * factor + _ROUNDING)


def corrected_each(estimates: Iterable[int], factor: float) -> list[int]:
    """corrected() of each estimate, the same arithmetic mapped in C: no bytecode per message (a
    Claude model's turn corrects its whole window for breakpoint placement; issue 10)."""
    return list(map(int, map(_ROUNDING.__add__, map(float(factor).__mul__, estimates))))


def next_factor(current: float, estimate: int, reported: int) -> float:
    """Fold one observation (`reported` gateway tokens for an array estimated at `estimate`).

    Rises at once to a higher observed ratio and decays slowly towards a lower one, so the
    forwarded array errs on the side of fitting the budget as the gateway counts it.
    """
    if estimate <= 0 or reported <= 0:
        return current
    observed = min(MAX_FACTOR, max(MIN_FACTOR, SAFETY_MARGIN * reported / estimate))
    if observed >= current:
        return observed
    return current + (observed - current) * DECAY
