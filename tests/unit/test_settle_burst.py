"""How long the agent's loop lets a burst of watch events land before it plans
(`fleetd.agent.runner.settle_burst`), against a scripted arrival of wakes and a fake clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetd.agent.runner import settle_burst

QUIET = 0.015
LONGEST = 0.05


def settle(arrivals: list[float]) -> float:
    """The time the burst is taken as landed, for wakes arriving at these times (seconds after
    the first wake, which came at 0)."""
    clock = [0.0]
    due = sorted(arrivals)

    def next_wake(timeout: float) -> bool:
        assert timeout > 0
        # Wakes that came while the loop was not waiting are one wake (the event stays set).
        while due and due[0] <= clock[0]:
            due.pop(0)
            return True
        if due and due[0] <= clock[0] + timeout:
            clock[0] = due.pop(0)
            return True
        clock[0] += timeout
        return False

    settle_burst(next_wake, lambda: clock[0], QUIET, LONGEST)
    return clock[0]


@pytest.mark.parametrize(
    ("arrivals", "landed"),
    [
        ([], QUIET),  # one wake alone: planned after a short quiet, not the longest wait
        ([0.004, 0.009], 0.009 + QUIET),  # a submission's parts landing together
        ([0.014], 0.014 + QUIET),
        ([0.016], QUIET),  # came after the quiet: the next round's business
        ([0.01 * i for i in range(1, 20)], LONGEST),  # a stream of events: never past longest
        ([0.01, 0.02, 0.03, 0.04], LONGEST),  # the last quiet is cut short by the longest wait
    ],
)
def test_a_burst_has_landed_after_a_quiet_or_the_longest_wait(
    arrivals: list[float], landed: float
) -> None:
    assert settle(arrivals) == pytest.approx(landed)


@given(st.lists(st.floats(min_value=0.0, max_value=0.2), max_size=30))
def test_never_longer_than_the_longest_wait_nor_shorter_than_a_quiet(arrivals: list[float]) -> None:
    landed = settle(arrivals)
    assert min(QUIET, LONGEST) - 1e-9 <= landed <= LONGEST + 1e-9
    # Nothing that arrived before the end was followed by a quiet that ended it earlier.
    seen = sorted(a for a in arrivals if a <= landed)
    gaps = [b - a for a, b in zip([0.0, *seen], [*seen, landed], strict=True)]
    assert all(gap <= QUIET + 1e-9 for gap in gaps[:-1])
