"""pytest helpers that give tests real `systemd --user` managers, one per simulated machine.

Managers come from the local cluster's launcher (vagrant/localcluster/manager.py), so tests and
the local cluster exercise the same code. Every manager a helper starts is stopped and its cgroup
removed when the helper's scope ends, whether the test passed or not.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_VAGRANT_DIR = Path(__file__).resolve().parents[2] / "vagrant"
if str(_VAGRANT_DIR) not in sys.path:
    sys.path.insert(0, str(_VAGRANT_DIR))

from localcluster.manager import (  # noqa: E402
    SYSTEMD,
    ManagerHandle,
    become_subreaper,
    start_manager,
)


def real_manager_unavailable() -> str | None:
    """Why real managers cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "real systemd managers need root (own cgroup subtree, private mount namespace)"
    if not Path(SYSTEMD).exists():
        return f"{SYSTEMD} is missing (install systemd)"
    return None


__all__ = [
    "ManagerHandle",
    "real_manager_unavailable",
    "requires_real_manager",
    "running_manager",
    "user_manager",
]

requires_real_manager: pytest.MarkDecorator = pytest.mark.skipif(
    real_manager_unavailable() is not None, reason=real_manager_unavailable() or ""
)


@contextlib.contextmanager
def running_manager(name: str, state_dir: Path) -> Iterator[ManagerHandle]:
    """A manager for machine `name` that is stopped and cleaned up on exit."""
    # Units of a killed manager would otherwise become orphans of a PID 1 that may never reap.
    become_subreaper()
    handle = start_manager(name, state_dir)
    try:
        yield handle
    finally:
        try:
            handle.stop(timeout=5)
        finally:
            handle.cleanup()


@pytest.fixture(scope="module")
def user_manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagerHandle]:
    """One real user manager shared by a test module; tests keep apart by unit names."""
    reason = real_manager_unavailable()
    if reason is not None:
        pytest.skip(reason)
    with running_manager("m1", tmp_path_factory.mktemp("machine")) as handle:
        yield handle
