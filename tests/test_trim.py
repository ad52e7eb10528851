"""Trimming and token estimates: pure functions, with hypothesis properties."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.models import Message, Role
from service.tokens import (
    ARRAY_OVERHEAD,
    MESSAGE_OVERHEAD,
    MIN_FACTOR,
    NON_TEXT_PART,
    SAFETY_MARGIN,
    corrected,
    corrected_each,
    message_tokens,
    next_factor,
    text_tokens,
    tools_tokens,
)
from service.trim import (
    BudgetExceeded,
    choose_window,
    continues_turn,
    fetch_scale,
    jump_start,
)


def split_turns(history: list[Message]) -> tuple[list[Message], list[list[Message]]]:
    """The tests' own oracle: (messages before any user message, turns each from a user one)."""
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
    # The forwarded history's own estimates, summed (after_turn's history_tokens relies on it).
    assert window.history_tokens == sum(m.tokens for m in kept)
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


# ---- exact values and boundaries: what mutation testing (`make mutate`) found unprotected ----


def turns_of_ten(count: int) -> list[Message]:
    """`count` turns, each a user message and a reply of 10 tokens each."""
    return [msg(i + 1, Role.USER if i % 2 == 0 else Role.ASSISTANT) for i in range(2 * count)]


def test_only_a_first_message_that_is_not_the_users_continues_the_open_turn() -> None:
    tool_result = {"role": "tool", "tool_call_id": "a", "content": "found"}
    assert not continues_turn([])
    assert not continues_turn([{"role": "user", "content": "hi"}])
    assert not continues_turn([{"role": "user", "content": "hi"}, tool_result])
    assert continues_turn([tool_result])
    assert continues_turn([{"role": "assistant", "content": "go on"}])


def test_an_open_turn_without_a_user_message_is_pinned_whole() -> None:
    history = [
        msg(1, Role.ASSISTANT, calls=["a"]),
        msg(2, Role.TOOL, call_id="a"),
        msg(3, Role.ASSISTANT, calls=["b"]),
    ]
    assert split_turns(history) == (history, [])
    window = choose_window(
        history=history,
        stored_count=3,
        system_tokens=0,
        new_tokens=5,
        continues_turn=True,
        budget=1000,
        factor=1.0,
    )
    assert window.history == history


def test_the_413_says_what_the_turn_needs_in_the_gateways_units() -> None:
    with pytest.raises(BudgetExceeded) as pinned_part:
        choose_window(
            history=[],
            stored_count=0,
            system_tokens=50,
            new_tokens=60,
            continues_turn=False,
            budget=100,
            factor=2.0,
        )
    needed = 2 * (ARRAY_OVERHEAD + 50 + 60)
    assert str(pinned_part.value) == (
        f"the new message(s) need about {needed} tokens; the budget is 100"
    )
    with pytest.raises(BudgetExceeded) as open_turn:  # its start lies before the fetched suffix
        choose_window(
            history=[msg(5, Role.TOOL, call_id="x"), msg(6, Role.ASSISTANT, calls=["y"])],
            stored_count=6,
            system_tokens=0,
            new_tokens=5,
            continues_turn=True,
            budget=1000,
            factor=2.0,
        )
    needed = 2 * (ARRAY_OVERHEAD + 5 + 20)
    assert str(open_turn.value) == (
        f"the new message(s) need about {needed} tokens; the budget is 1000"
    )


@pytest.mark.parametrize(
    ("start", "forwarded", "next_start"),
    [
        (3, [3, 4], 3),
        (5, [], 5),  # a summary covers everything stored: no history, the start stays
        (6, [1, 2, 3, 4], 1),  # past the log (it was cut back): begin again
        (0, [1, 2, 3, 4], 1),
    ],
)
def test_a_window_start_is_honoured_only_within_the_log(
    start: int, forwarded: list[int], next_start: int
) -> None:
    window = choose_window(
        history=turns_of_ten(2),
        stored_count=4,
        system_tokens=0,
        new_tokens=7,
        continues_turn=False,
        budget=1000,
        factor=1.0,
        start=start,
        low_water=0.5,
    )
    assert [m.seq for m in window.history] == forwarded
    assert window.start == next_start
    assert window.dropped_messages == 4 - len(forwarded)


def test_a_window_that_fills_the_budget_exactly_keeps_its_start() -> None:
    window = choose_window(
        history=turns_of_ten(1),
        stored_count=2,
        system_tokens=0,
        new_tokens=7,
        continues_turn=False,
        budget=ARRAY_OVERHEAD + 7 + 20,  # exactly the whole array
        factor=1.0,
        low_water=0.5,
    )
    assert [m.seq for m in window.history] == [1, 2]
    assert not window.jumped
    assert window.estimated_tokens == ARRAY_OVERHEAD + 7 + 20


def test_a_jump_keeps_a_turn_that_reaches_the_low_water_mark_exactly() -> None:
    window = choose_window(
        history=turns_of_ten(2),
        stored_count=4,
        system_tokens=0,
        new_tokens=7,
        continues_turn=False,
        budget=46,  # everything is 50: over, so the start jumps
        factor=1.0,
        low_water=0.5,  # 23: the prefix (3) and the newest turn (20), exactly
    )
    assert [m.seq for m in window.history] == [3, 4]
    assert (window.start, window.previous_start, window.jumped) == (3, 1, True)
    assert list(window.jump_dropped) == [1, 2]


def test_a_jump_that_keeps_nothing_starts_after_the_log() -> None:
    window = choose_window(
        history=turns_of_ten(2),
        stored_count=4,
        system_tokens=0,
        new_tokens=7,
        continues_turn=False,
        budget=20,
        factor=1.0,
        low_water=0.5,
    )
    assert window.history == []
    assert window.start == 5
    assert window.dropped_messages == 4


@pytest.mark.parametrize(
    ("history", "prefix", "budget", "cut"),
    [
        ([], 0, 100, 1),
        (turns_of_ten(2), 10, 100, 3),  # 13 + 20 is within low water (50); 13 + 40 is not
        (turns_of_ten(2), 0, 100, 1),  # all of it fits
        (turns_of_ten(2), 60, 100, 5),  # nothing fits: the cut is after the last message
        (turns_of_ten(2), 7, 60, 3),  # 10 + 20 is exactly the low-water mark (30)
    ],
)
def test_where_the_next_jump_cuts(
    history: list[Message], prefix: int, budget: int, cut: int
) -> None:
    assert (
        jump_start(history, prefix_tokens=prefix, budget=budget, factor=1.0, low_water=0.5) == cut
    )


@pytest.mark.parametrize("factor", [MIN_FACTOR, 0.5, 1.0, 1.5, 4.0])
def test_the_store_reads_at_least_a_budget_of_history(factor: float) -> None:
    """Budget x fetch_scale estimate units are, corrected, at least the budget itself."""
    assert fetch_scale(factor) * factor >= 1.0


def test_estimates_are_exact() -> None:
    """Each message's estimate is what a preview (`POST .../context`) shows and what the window
    is cut by: bytes / 4 rounded up, the overhead, every part, tool call and name."""
    assert text_tokens("a" * 40) == 10
    assert text_tokens("a" * 41) == 11
    assert message_tokens({"role": "assistant", "content": None}) == MESSAGE_OVERHEAD
    parts = [
        {"type": "text", "text": "a" * 40},
        {"type": "image_url", "image_url": {"url": "https://x.example/i.png"}},
        {"type": "text", "text": "b" * 8},
    ]
    assert message_tokens({"role": "user", "content": parts}) == (
        MESSAGE_OVERHEAD + 10 + NON_TEXT_PART + 2
    )
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    assert message_tokens({"role": "assistant", "content": "a" * 8, "tool_calls": calls}) == (
        MESSAGE_OVERHEAD + 2 + text_tokens(orjson.dumps(calls).decode())
    )
    result = {"role": "tool", "tool_call_id": "c" * 8, "name": "n" * 4, "content": "a" * 4}
    assert message_tokens(result) == MESSAGE_OVERHEAD + 1 + 2 + 1
    tools = [{"type": "function", "function": {"name": "f", "description": "d" * 100}}]
    assert tools_tokens(None) == tools_tokens([]) == 0
    assert tools_tokens(tools) == text_tokens(orjson.dumps(tools).decode())


def test_an_observation_without_a_count_leaves_the_correction_alone() -> None:
    assert next_factor(1.5, 100, 0) == 1.5  # a gateway that reported no usage
    assert next_factor(1.5, 0, 100) == 1.5
    assert next_factor(1.0, 1, 2) == pytest.approx(2 * SAFETY_MARGIN)
    # One reported token for a hundred estimated: the correction sinks, slowly, to the floor.
    assert next_factor(1.0, 100, 1) == pytest.approx(1.0 + (MIN_FACTOR - 1.0) * 0.2)


@settings(max_examples=300, deadline=None)
@given(
    estimates=st.lists(st.integers(min_value=0, max_value=10**9), max_size=30),
    factor=st.floats(min_value=MIN_FACTOR, max_value=4.0) | st.integers(min_value=1, max_value=3),
)
def test_corrected_each_is_corrected_of_each(estimates: list[int], factor: float) -> None:
    assert corrected_each(estimates, factor) == [corrected(e, factor) for e in estimates]
