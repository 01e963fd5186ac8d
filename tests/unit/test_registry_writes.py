"""How the registry sends a write that needs several transactions (`fleetd.registry._together`):
the parts go at once, every part runs whatever another does, and the caller hears the outcome
of all of them. Real etcd writes of many units are in the registry's contract tests."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from fleetd.registry import WRITE_WIDTH, _together


def test_the_parts_run_at_the_same_time() -> None:
    # Each call waits for WRITE_WIDTH of them to be running: one after another would time out.
    barrier = threading.Barrier(WRITE_WIDTH, timeout=5)

    def part() -> bool:
        barrier.wait()
        return True

    assert _together([part] * WRITE_WIDTH)


def test_no_more_than_the_width_run_at_once() -> None:
    running = 0
    most = 0
    lock = threading.Lock()
    gate = threading.Event()

    def part() -> bool:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        gate.wait(0.05)
        with lock:
            running -= 1
        return True

    assert _together([part] * 20, width=3)
    assert most == 3


@pytest.mark.parametrize("width", [1, 2, WRITE_WIDTH, 50])
def test_every_part_runs_once_and_false_from_one_is_false(width: int) -> None:
    ran: list[int] = []
    lock = threading.Lock()

    def part(index: int) -> Callable[[], bool]:
        def call() -> bool:
            with lock:
                ran.append(index)
            return index != 3

        return call

    assert not _together([part(i) for i in range(9)], width=width)
    assert sorted(ran) == list(range(9))
    ran.clear()
    assert _together([part(i) for i in range(3)], width=width)
    assert sorted(ran) == [0, 1, 2]


def test_the_first_failure_in_order_is_raised_after_all_ran() -> None:
    ran = []

    def part(index: int) -> Callable[[], bool]:
        def call() -> bool:
            ran.append(index)
            if index in (2, 5):
                raise RuntimeError(f"part {index}")
            return True

        return call

    with pytest.raises(RuntimeError, match="part 2"):
        _together([part(i) for i in range(8)], width=3)
    assert sorted(ran) == list(range(8))


def test_nothing_to_send_is_done() -> None:
    assert _together([])
