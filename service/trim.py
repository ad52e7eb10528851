"""Choosing the forwarded window: pure functions, no I/O.

The array sent upstream is: the pinned system prompt, then the newest whole turns of history that
fit the token budget, then the new message(s). A turn starts at a user message, so dropping whole
turns oldest-first never leaves an orphan assistant or tool message at the front and never
separates an assistant's `tool_calls` from their results.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from service.models import Message, Role
from service.tokens import ARRAY_OVERHEAD, corrected


class BudgetExceeded(Exception):
    """The new message(s) and the system prompt alone do not fit the budget."""

    def __init__(self, needed: int, budget: int) -> None:
        super().__init__(f"the new message(s) need about {needed} tokens; the budget is {budget}")
        self.needed = needed
        self.budget = budget


@dataclass(frozen=True, slots=True)
class Window:
    history: list[Message]  # forwarded history, oldest first
    estimated_tokens: int  # the whole forwarded array, in the gateway's units
    dropped_messages: int  # stored messages not forwarded


def split_turns(history: Sequence[Message]) -> tuple[list[Message], list[list[Message]]]:
    """Split into (leading messages before any user message, turns each starting at a user)."""
    lead: list[Message] = []
    turns: list[list[Message]] = []
    for message in history:
        if message.role is Role.USER:
            turns.append([message])
        elif turns:
            turns[-1].append(message)
        else:
            lead.append(message)
    return lead, turns


def choose_window(
    *,
    history: Sequence[Message],
    stored_count: int,
    system_tokens: int,
    new_tokens: int,
    continues_turn: bool,
    budget: int,
    factor: float,
) -> Window:
    """Pick the newest whole turns of `history` (a suffix of the stored log) that fit `budget`.

    `continues_turn` is true when the new messages do not start with a user message (tool results,
    say): the newest stored turn is then part of the current one and is pinned with them.
    Raises BudgetExceeded when the pinned part alone is over budget.
    """
    lead, turns = split_turns(history)
    pinned: list[Message] = []
    if continues_turn:
        if turns:
            pinned = turns.pop()
        elif len(history) < stored_count:
            # The open turn began before the fetched suffix, which already spans the budget.
            needed = ARRAY_OVERHEAD + system_tokens + new_tokens + sum(m.tokens for m in history)
            raise BudgetExceeded(corrected(needed, factor), budget)
        else:
            pinned = lead  # the whole stored history is one open turn without a user message
    fixed = ARRAY_OVERHEAD + system_tokens + new_tokens + sum(m.tokens for m in pinned)
    if corrected(fixed, factor) > budget:
        raise BudgetExceeded(corrected(fixed, factor), budget)
    used = fixed
    kept: list[list[Message]] = []
    for turn in reversed(turns):
        cost = sum(m.tokens for m in turn)
        if corrected(used + cost, factor) > budget:
            break
        used += cost
        kept.append(turn)
    forwarded = [m for turn in reversed(kept) for m in turn] + pinned
    return Window(
        history=forwarded,
        estimated_tokens=corrected(used, factor),
        dropped_messages=stored_count - len(forwarded),
    )
