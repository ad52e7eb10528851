"""Stored messages (service/models.py): their records are the bytes the pydantic adapter writes,
and a new message is validated as its record is when read back."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from service.models import MESSAGE, Message, Role

# JSON values as a client or the gateway may send them (orjson's range: 64-bit integers).
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
objects = st.dictionaries(st.text(), json_values, max_size=4)


@st.composite
def messages(draw: st.DrawFn) -> Message:
    maybe = st.none() | st.text()
    return Message(
        tokens=draw(st.integers(min_value=0, max_value=10**9)),
        seq=draw(st.integers(min_value=1, max_value=2**53)),
        role=draw(st.sampled_from(Role)),
        content=draw(st.none() | st.text() | st.lists(objects, max_size=3)),
        tool_calls=draw(st.none() | st.lists(objects, max_size=3)),
        tool_call_id=draw(maybe),
        name=draw(maybe),
        cache_control=draw(st.none() | objects),
        created_at=draw(st.floats(min_value=0, max_value=4e9)),
    )


@settings(max_examples=500, deadline=None)
@given(messages())
def test_a_record_is_the_adapters_dump_and_reads_back(message: Message) -> None:
    record = message.to_json()
    assert record == MESSAGE.dump_json(message, exclude_none=True)
    assert Message.from_json(record) == message


def test_an_integer_orjson_cannot_write_goes_through_the_adapter() -> None:
    message = Message(
        tokens=1, seq=1, role=Role.USER, content="x", created_at=1.0, cache_control={"n": 2**70}
    )
    assert message.to_json() == MESSAGE.dump_json(message, exclude_none=True)
    assert b"1180591620717411303424" in message.to_json()


@settings(max_examples=300, deadline=None)
@given(messages())
def test_stored_builds_what_the_constructor_builds(message: Message) -> None:
    wire = message.to_wire()
    built = Message.stored(
        wire, tokens=message.tokens, seq=message.seq, created_at=message.created_at
    )
    assert built == Message(
        tokens=message.tokens,
        seq=message.seq,
        role=Role(wire["role"]),
        content=wire.get("content"),
        tool_calls=wire.get("tool_calls"),
        tool_call_id=wire.get("tool_call_id"),
        name=wire.get("name"),
        cache_control=wire.get("cache_control"),
        created_at=message.created_at,
    )


@pytest.mark.parametrize(
    "wire",
    [
        {"role": "assistant", "content": [1, 2]},  # parts must be objects
        {"role": "assistant", "content": None, "tool_calls": ["call"]},
        {"role": "wizard", "content": "x"},
        {"role": "user", "content": 5},
    ],
)
def test_what_would_not_read_back_is_not_stored(wire: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Message.stored(wire, tokens=1, seq=1, created_at=1.0)
