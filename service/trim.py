"""Choosing the forwarded window: every trimming decision, in pure functions, no I/O.

The array sent upstream is: the pinned system prompt (and a summary, when one is forwarded), then
whole turns of stored history, then the new message(s). A turn starts at a user message, so
cutting at turn boundaries never leaves an orphan assistant or tool message at the front and never
separates an assistant's `tool_calls` from their results.

Cache-stable windows: a conversation keeps a window start (the seq the forwarded history begins
at). A turn keeps it while everything still fits the budget, so the forwarded prefix is the same
bytes as the previous turn's and the provider's prompt cache hits. When it no longer fits, the
start jumps forward to a turn boundary, far enough that the prefix and the kept history use at
most `low_water` of the budget, and stays there until the next overflow. With `low_water` 1 this
is the plain sliding window (the newest turns that fit).

The store only reads: it returns the suffix of the log from the window start, stopping once the
suffix's estimates pass `fetch_limit` (budget x `fetch_scale`), and each stored message carries
its own estimate. Everything else is decided here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from service.models import USER, Message, Role
from service.tokens import ARRAY_OVERHEAD, MIN_FACTOR, corrected

# Over-fetch the window, so a correction that dropped since our last look still fills it.
FETCH_MARGIN = 0.8
# A cold read's correction: the estimate's own. Reads enough for any correction down to 0.8
# (FETCH_MARGIN); one under that, read cold, shortens that one turn's window, never overfills it.
COLD_FETCH_FACTOR = 1.0


class BudgetExceeded(Exception):
    """The new message(s) and the system prompt alone do not fit the budget."""

    def __init__(self, needed: int, budget: int) -> None:
        super().__init__(f"the new message(s) need about {needed} tokens; the budget is {budget}")


@dataclass(frozen=True, slots=True)
class Window:
    history: list[Message]  # forwarded stored history, oldest first
    history_tokens: int  # the forwarded history's own estimates, summed (local units)
    estimated_tokens: int  # the whole forwarded array, in the gateway's units
    dropped_messages: int  # stored messages not forwarded
    start: int  # the window start after this turn: the seq the next turn's history begins at
    previous_start: int  # the start this turn found
    jumped: bool  # the start moved this turn: the messages from previous_start to start - 1 left

    @property
    def jump_dropped(self) -> range:
        """The seqs this turn's jump left out (empty when the start was kept)."""
        return range(self.previous_start, self.start) if self.jumped else range(0)


def fetch_scale(factor: float | None) -> float:
    """Estimate units the store reads per budget token: the budget in estimate units, with a
    margin for a correction that sank since it was last read. None: no correction read yet (a
    process's first turn for a tenant and model; the turn reads the corrections in the same round
    trip and trims with them): sized for COLD_FETCH_FACTOR, not the prior (1.5), which read fewer
    messages than a usual correction (1.0 to 1.2) lets the window hold."""
    return 1 / (FETCH_MARGIN * max(MIN_FACTOR, COLD_FETCH_FACTOR if factor is None else factor))


def continues_turn(new_messages: Sequence[Mapping[str, Any]]) -> bool:
    """New messages that do not start with a user message (tool results, say) continue the
    newest stored turn, which is then pinned with them."""
    return bool(new_messages) and new_messages[0].get("role") != Role.USER.value


def turn_spans(history: Sequence[Message]) -> tuple[list[int], list[int]]:
    """(sizes, costs): the message count and summed estimates of the leading messages before any
    user message (the first entry, possibly empty), then of each turn (from a user message to the
    next). Counts, not lists of messages: one pass over a long window, and the forwarded part is
    then one slice of it (issue 10: per-message work is what a 200-message window multiplies)."""
    sizes, costs = [], []
    size = cost = 0  # the span being counted, in locals: cheaper than the lists' last items
    for message in history:
        if message.role is USER:
            sizes.append(size)
            costs.append(cost)
            size, cost = 1, message.tokens
        else:
            size += 1
            cost += message.tokens
    sizes.append(size)
    costs.append(cost)
    return sizes, costs


def choose_window(
    *,
    history: Sequence[Message],
    stored_count: int,
    system_tokens: int,
    new_tokens: int,
    continues_turn: bool,
    budget: int,
    factor: float,
    summary_tokens: int = 0,
    start: int = 1,
    low_water: float = 1.0,
) -> Window:
    """The forwarded history, from `history` (the suffix of the stored log from the window start
    `start`, possibly cut short by the fetch limit).

    `system_tokens` counts everything pinned before the history besides a summary (the system
    prompt, tool definitions); `summary_tokens` the summary message forwarded, if any.
    Raises BudgetExceeded when the pinned part alone is over budget.
    """
    if not 1 <= start <= stored_count + 1:
        start = 1  # the log was cut back (or the start never set): begin again
    if history and history[0].seq < start:  # seqs ascend: only a fetch from before the start
        history = [m for m in history if m.seq >= start]
    reached = not history or history[0].seq <= start  # the fetch read back to the start
    sizes, costs = turn_spans(history)
    lead_size, lead_cost = sizes.pop(0), costs.pop(0)
    prefix = ARRAY_OVERHEAD + system_tokens + summary_tokens
    pinned_size, pinned_cost = 0, 0  # the newest turn, which the new messages continue
    if continues_turn:
        if sizes:
            pinned_size, pinned_cost = sizes.pop(), costs.pop()
        elif not reached:
            # The open turn began before the fetched suffix, which already spans the budget.
            needed = prefix + new_tokens + lead_cost
            raise BudgetExceeded(corrected(needed, factor), budget)
        else:
            # the whole history is one open turn without a user message
            pinned_size, pinned_cost = lead_size, lead_cost
    fixed = prefix + new_tokens + pinned_cost
    if corrected(fixed, factor) > budget:
        raise BudgetExceeded(corrected(fixed, factor), budget)
    # Leading messages before any user message would be orphans at the front: never forwarded.
    everything = fixed + sum(costs)
    if reached and corrected(everything, factor) <= budget:
        kept = len(sizes)  # the start is kept
        used = everything
    else:
        # Jump: the newest whole turns within the low-water share (without the new messages),
        # and within the budget with them.
        water = low_water * budget
        kept_cost = prefix + pinned_cost
        used = fixed
        kept = 0
        for cost in reversed(costs):
            if (
                corrected(kept_cost + cost, factor) > water
                or corrected(used + cost, factor) > budget
            ):
                break
            kept_cost += cost
            used += cost
            kept += 1
    # The kept turns and the pinned one are the newest messages: one slice of the history.
    count = pinned_size + sum(sizes[len(sizes) - kept :])
    forwarded = list(history[len(history) - count :]) if count else []
    new_start = forwarded[0].seq if forwarded else stored_count + 1
    return Window(
        history=forwarded,
        history_tokens=used - prefix - new_tokens,
        estimated_tokens=corrected(used, factor),
        dropped_messages=stored_count - len(forwarded),
        start=new_start,
        previous_start=start,
        jumped=new_start != start,
    )


def jump_start(
    history: Sequence[Message],
    *,
    prefix_tokens: int,
    budget: int,
    factor: float,
    low_water: float,
) -> int:
    """Where the next jump would cut `history` (the stored history a window forwards, its newest
    turn included): the seq of the oldest turn boundary from which the prefix (`prefix_tokens`:
    system prompt, summary, tools) and the history use at most `low_water` of the budget. The cut
    a rolling summary can prepare ahead of the jump; the next message sent may move it further
    only if it is larger than what the low-water share leaves free."""
    sizes, costs = turn_spans(history)
    used = ARRAY_OVERHEAD + prefix_tokens
    cut = history[-1].seq + 1 if history else 1
    first = len(history)  # where the turn looked at begins
    for size, cost in zip(reversed(sizes[1:]), reversed(costs[1:]), strict=True):
        first -= size
        used += cost
        if corrected(used, factor) > low_water * budget:
            break
        cut = history[first].seq
    return cut
