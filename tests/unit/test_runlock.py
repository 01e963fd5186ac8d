"""One fleetd per machine: the runtime-directory lock refuses a second holder with one line
naming the first one's pid, and passes to a successor once the holder is gone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fleetd.runlock import AlreadyRunning, hold_runtime_lock


def test_second_fleetd_is_refused_and_a_successor_gets_the_lock(tmp_path: Path) -> None:
    first = hold_runtime_lock(tmp_path / "run")
    with pytest.raises(AlreadyRunning) as info:
        hold_runtime_lock(tmp_path / "run", wait=0.2)
    message = str(info.value)
    assert f"pid {os.getpid()}" in message and "\n" not in message
    first.close()  # the predecessor exits (the kernel drops the lock however it ends)
    successor = hold_runtime_lock(tmp_path / "run", wait=0.2)
    successor.close()
