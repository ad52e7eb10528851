"""`python -m service`'s own settings translation."""

from __future__ import annotations

import pytest

from service.__main__ import graceful_shutdown_seconds


@pytest.mark.parametrize(("seconds", "expected"), [(0, 0), (0.5, 1), (1, 1), (29.2, 30)])
def test_a_shutdown_timeout_is_never_an_endless_wait(seconds: float, expected: int) -> None:
    assert graceful_shutdown_seconds(seconds) == expected
