"""What the gateway reports a call cost, read from every usage shape it may send. Pure.

Anthropic-style usage counts only the uncached part of the prompt in `input_tokens`; the prompt's
real size is `input_tokens + cache_read_input_tokens + cache_creation_input_tokens`. OpenAI-style
usage reports the whole prompt in `prompt_tokens`, with `prompt_tokens_details.cached_tokens`
inside it. Gateways mix the two, so the prompt's size is the larger of both readings, and the
token correction is fed that size, never `input_tokens` alone (which sinks once caching works).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Usage:
    uncached: int  # prompt tokens billed at the full rate
    cache_read: int  # prompt tokens served from the provider's prompt cache
    cache_write: int  # prompt tokens written to it
    output: int

    @property
    def prompt(self) -> int:
        """The forwarded array's full size as the gateway counted it."""
        return self.uncached + self.cache_read + self.cache_write


NO_USAGE = Usage(0, 0, 0, 0)


def _count(source: Any, name: str) -> int:
    value = source.get(name) if isinstance(source, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return 0


def read_usage(usage: Any) -> Usage:
    """Usage in any of the shapes: Anthropic's fields, OpenAI's, or both at once."""
    if not isinstance(usage, dict):
        return NO_USAGE
    details = usage.get("prompt_tokens_details")
    cache_read, cache_creation = (
        _count(usage, "cache_read_input_tokens"),
        _count(usage, "cache_creation_input_tokens"),
    )
    read = max(cache_read, _count(details, "cached_tokens"))
    write = max(cache_creation, _count(details, "cache_write_tokens"))
    anthropic = _count(usage, "input_tokens") + cache_read + cache_creation
    prompt = max(_count(usage, "prompt_tokens"), anthropic)
    read = min(read, prompt)
    write = min(write, prompt - read)
    return Usage(
        uncached=prompt - read - write,
        cache_read=read,
        cache_write=write,
        output=_count(usage, "output_tokens") or _count(usage, "completion_tokens"),
    )
