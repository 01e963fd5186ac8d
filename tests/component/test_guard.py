"""The guard on a real systemd user manager: started as a transient service by the D-Bus adapter,
it reads the lease file fleetd left behind and takes a unit that ignores SIGTERM down before the
lease's deadline; a file refreshed in time keeps it quiet, a removed file ends it."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from fleetd.agent import guard_unit_name
from fleetd.agent.lease import LeaseFile, LeaseRecord, boot_id
from fleetd.systemd import DbusUnitManager
from tests.support.systemd_fixtures import requires_real_manager, running_manager

STUBBORN = (
    "[Service]\nTimeoutStopSec=60\n"
    "ExecStart=/bin/sh -c 'trap \"\" TERM; while :; do sleep 0.2; done'\n"
)
MARGIN = 1.0


def wait_for(predicate, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


@requires_real_manager
def test_guard_kills_the_units_before_an_unrenewed_lease_expires(tmp_path: Path) -> None:
    with running_manager("g", tmp_path / "g") as handle:
        units = tmp_path / "units"
        manager = DbusUnitManager(units, user=True, bus_address=handle.bus_address)
        try:
            manager.load("stubborn.service", STUBBORN)
            manager.start("stubborn.service")
            wait_for(lambda: manager.states(["stubborn.service"])["stubborn.service"].active
                     == "active")
            lease_file = LeaseFile(tmp_path / "fleetd-lease.json")
            # Far enough for the guard's Python to start, near enough to keep the test short.
            deadline = time.monotonic() + 4.0
            lease_file.save(LeaseRecord(42, deadline, "m" * 32, boot_id()))
            name = guard_unit_name("m" * 32)
            manager.start_guard(name, [
                sys.executable, "-m", "fleetd.guard", "--lease-file", str(lease_file.path),
                "--units-directory", str(units), "--margin", str(MARGIN), "--user",
            ])
            wait_for(lambda: manager.states([name])[name].active == "active")

            def dead() -> bool:
                state = manager.states(["stubborn.service"])["stubborn.service"]
                return state.active in ("inactive", "failed")

            wait_for(lambda: dead() or time.monotonic() >= deadline, timeout=10)
            assert dead(), "the unit still ran at the lease's deadline"
            assert time.monotonic() < deadline
            # The lease is over and nothing runs: the guard is done.
            wait_for(lambda: manager.states([name])[name].active != "active", timeout=10)
        finally:
            manager.close()


@requires_real_manager
def test_guard_stays_quiet_while_the_lease_is_renewed_and_exits_on_drain(tmp_path: Path) -> None:
    with running_manager("q", tmp_path / "q") as handle:
        units = tmp_path / "units"
        manager = DbusUnitManager(units, user=True, bus_address=handle.bus_address)
        try:
            manager.load("calm.service", STUBBORN)
            manager.start("calm.service")
            lease_file = LeaseFile(tmp_path / "fleetd-lease.json")
            lease_file.save(LeaseRecord(7, time.monotonic() + 3.0, "q" * 32, boot_id()))
            name = guard_unit_name("q" * 32)
            manager.start_guard(name, [
                sys.executable, "-m", "fleetd.guard", "--lease-file", str(lease_file.path),
                "--units-directory", str(units), "--margin", str(MARGIN), "--user",
            ])
            wait_for(lambda: manager.states([name])[name].active == "active")
            until = time.monotonic() + 4.0
            while time.monotonic() < until:  # a successor renewing the same lease
                lease_file.save(LeaseRecord(7, time.monotonic() + 3.0, "q" * 32, boot_id()))
                time.sleep(0.2)
            assert manager.states(["calm.service"])["calm.service"].active == "active"
            lease_file.remove()  # fleetd drained the machine
            wait_for(lambda: manager.states([name])[name].active != "active", timeout=10)
            assert manager.states(["calm.service"])["calm.service"].active == "active"
            manager.kill("calm.service")
        finally:
            manager.close()
