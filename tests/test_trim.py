"""Trimming and token estimates: pure functions, with hypothesis properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.models import Message, Role
from service.tokens import (
    ARRAY_OVERHEAD,
    SAFETY_MARGIN,
    corrected,
    message_tokens,
    next_factor,
    text_tokens,
)
from service.trim import BudgetExceeded, choose_window, split_turns


def msg(
    seq: int,
    role: Role,
    tokens: int = 10,
    *,
    calls: list[str] | None = None,
    call_id: str | None = None,
) -> Message:
    tool_calls = (
        [{"id": c, "type": "function", "function": {"name": "f", "arguments": "{}"}} for c in calls]
        if calls
        else None
    )
    return Message(
        tokens=tokens,
        seq=seq,
        role=role,
        content=None if calls else f"m{seq}",
        tool_calls=tool_calls,
        tool_call_id=call_id,
        created_at=0.0,
    )


def conversation(turn_shapes: list[int]) -> list[Message]:
    """Turns of user, then `n` tool round trips (parallel calls), then a final assistant reply."""
    out: list[Message] = []
    for calls in turn_shapes:
        out.append(msg(len(out) + 1, Role.USER, 7))
        if calls:
            ids = [f"call{len(out)}_{i}" for i in range(calls)]
            out.append(msg(len(out) + 1, Role.ASSISTANT, 12, calls=ids))
            for call_id in ids:
                out.append(msg(len(out) + 1, Role.TOOL, 9, call_id=call_id))
        out.append(msg(len(out) + 1, Role.ASSISTANT, 11))
    return out


def test_keeps_everything_that_fits() -> None:
    history = conversation([0, 0])
    window = choose_window(
        history=history,
        stored_count=4,
        system_tokens=5,
        new_tokens=5,
        continues_turn=False,
        budget=1000,
        factor=1.0,
    )
    assert window.history == history
    assert window.dropped_messages == 0
    assert window.estimated_tokens == ARRAY_OVERHEAD + 5 + 5 + sum(m.tokens for m in history)


def test_drops_oldest_whole_turns_first() -> None:
    history = conversation([0, 0, 0])  # three turns of 18 tokens
    fixed = ARRAY_OVERHEAD + 10
    window = choose_window(
        history=history,
        stored_count=6,
        system_tokens=0,
        new_tokens=10,
        continues_turn=False,
        budget=fixed + 36,
        factor=1.0,
    )
    assert [m.seq for m in window.history] == [3, 4, 5, 6]
    assert window.dropped_messages == 2


def test_factor_scales_the_budget() -> None:
    history = conversation([0, 0, 0])
    window = choose_window(
        history=history,
        stored_count=6,
        system_tokens=0,
        new_tokens=10,
        continues_turn=False,
        budget=2 * (ARRAY_OVERHEAD + 10 + 18),
        factor=2.0,
    )
    assert [m.seq for m in window.history] == [5, 6]
    assert window.estimated_tokens <= 2 * (ARRAY_OVERHEAD + 10 + 18)


def test_new_messages_over_budget_raise() -> None:
    with pytest.raises(BudgetExceeded):
        choose_window(
            history=[],
            stored_count=0,
            system_tokens=50,
            new_tokens=60,
            continues_turn=False,
            budget=100,
            factor=1.0,
        )


def test_tool_results_pin_their_open_turn() -> None:
    history = [
        msg(1, Role.USER),
        msg(2, Role.ASSISTANT),
        msg(3, Role.USER),
        msg(4, Role.ASSISTANT, calls=["a", "b"]),
    ]
    window = choose_window(
        history=history,
        stored_count=4,
        system_tokens=0,
        new_tokens=20,
        continues_turn=True,
        budget=ARRAY_OVERHEAD + 20 + 20,
        factor=1.0,
    )
    assert [m.seq for m in window.history] == [3, 4]


def test_open_turn_cut_by_the_fetch_is_over_budget() -> None:
    history = [msg(5, Role.TOOL, call_id="x"), msg(6, Role.ASSISTANT, calls=["y"])]
    with pytest.raises(BudgetExceeded):
        choose_window(
            history=history,
            stored_count=6,
            system_tokens=0,
            new_tokens=5,
            continues_turn=True,
            budget=1000,
            factor=1.0,
        )


def test_leading_orphans_are_dropped() -> None:
    history = [msg(1, Role.ASSISTANT), msg(2, Role.USER), msg(3, Role.ASSISTANT)]
    window = choose_window(
        history=history,
        stored_count=3,
        system_tokens=0,
        new_tokens=5,
        continues_turn=False,
        budget=1000,
        factor=1.0,
    )
    assert [m.seq for m in window.history] == [2, 3]


@settings(max_examples=300, deadline=None)
@given(
    shapes=st.lists(st.integers(min_value=0, max_value=3), max_size=12),
    budget=st.integers(min_value=20, max_value=400),
    factor=st.floats(min_value=0.5, max_value=3.0),
    system=st.integers(min_value=0, max_value=30),
    new=st.integers(min_value=1, max_value=30),
)
def test_window_properties(
    shapes: list[int], budget: int, factor: float, system: int, new: int
) -> None:
    history = conversation(shapes)
    fixed = corrected(ARRAY_OVERHEAD + system + new, factor)
    if fixed > budget:
        with pytest.raises(BudgetExceeded):
            choose_window(
                history=history,
                stored_count=len(history),
                system_tokens=system,
                new_tokens=new,
                continues_turn=False,
                budget=budget,
                factor=factor,
            )
        return
    window = choose_window(
        history=history,
        stored_count=len(history),
        system_tokens=system,
        new_tokens=new,
        continues_turn=False,
        budget=budget,
        factor=factor,
    )
    kept = window.history
    # Within budget, counted the way the gateway will (estimate x factor).
    assert window.estimated_tokens <= budget
    assert window.estimated_tokens == corrected(
        ARRAY_OVERHEAD + system + new + sum(m.tokens for m in kept), factor
    )
    # A suffix of history: newest kept, nothing stored is lost or reordered.
    assert kept == history[len(history) - len(kept) :]
    assert window.dropped_messages == len(history) - len(kept)
    # Never starts with an orphan; whole turns only.
    if kept:
        assert kept[0].role is Role.USER
    # Every tool result travels with the assistant message that called it, and vice versa.
    calls = {c["id"] for m in kept for c in (m.tool_calls or [])}
    results = {m.tool_call_id for m in kept if m.role is Role.TOOL}
    assert calls == results
    # Maximal: the next older turn would not have fit.
    _, turns = split_turns(history)
    kept_turns = len(split_turns(kept)[1])
    if kept_turns < len(turns):
        older = turns[len(turns) - kept_turns - 1]
        total = (
            ARRAY_OVERHEAD
            + system
            + new
            + sum(m.tokens for m in kept)
            + sum(m.tokens for m in older)
        )
        assert corrected(total, factor) > budget


def test_estimates() -> None:
    assert text_tokens("") == 0
    assert text_tokens("abcd") == 1
    assert text_tokens("é" * 4) == 2  # bytes, so non-ASCII text costs more
    plain = message_tokens({"role": "user", "content": "hello world"})
    parts = message_tokens({"role": "user", "content": [{"type": "text", "text": "hello world"}]})
    assert plain == parts
    image = message_tokens({"role": "user", "content": [{"type": "image_url", "image_url": {}}]})
    assert image > message_tokens({"role": "user", "content": ""})
    call = message_tokens(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"},
                }
            ],
        }
    )
    assert call > message_tokens({"role": "assistant", "content": None})


def test_factor_rises_at_once_and_decays_slowly() -> None:
    # What is learned is the observed ratio with its safety margin.
    assert next_factor(1.0, 100, 150) == pytest.approx(1.5 * SAFETY_MARGIN)
    lower = next_factor(1.5, 100, 100)
    assert SAFETY_MARGIN < lower < 1.5
    assert next_factor(1.2, 0, 100) == 1.2
    assert next_factor(1.0, 10, 10_000) == 8.0
