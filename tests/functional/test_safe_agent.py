"""Issue 7's promise on a real local cluster: at most one running copy of every non-global unit at
every instant, through any fault; no agent dies of what is in the registry; no unit restarts but
by its machine's death or an operator.

Each scenario records the cluster's whole history (tests/support/history.py: an etcd watch and
the machines' own process trees) and checks it at the end, with every fault and operator action
declared as it is taken. The slow units ignore SIGTERM, so every stop takes `TimeoutStopSec`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyetcd
import pytest
from conftest import SETTLE, UNITS, Cluster, one_line_error, wait_until

from fleetd.unitfile import content_hash
from tests.support.history import ClusterHistory

pytestmark = pytest.mark.functional

AGENT_TTL = 3.0
STOP_TIMEOUT = 20  # the TimeoutStopSec: a stop takes longer than the TTL, many times
SLOW_BODY = f"TimeoutStopSec={STOP_TIMEOUT}\n"
SLOW_EXEC = "/bin/sh -c 'trap \"\" TERM; while true; do sleep 1; done'"


@pytest.fixture(autouse=True)
def no_process_left(fleet: Cluster) -> Iterator[None]:
    """After each scenario: no unit destroyed, no process of one left on any machine, so a slow
    unit still dying cannot pass for a copy of the next scenario's unit."""
    yield
    for machine in fleet.baseline:
        if fleet.status()[machine]["fleetd"] == "paused":
            fleet.lc("resume", machine)
    names = sorted(fleet.snapshot().units)
    if names:
        fleet.fleetctl("destroy", *names, check=False)
    history = fleet.history()

    def units_on(cgroups: list[Path]) -> list[str]:
        # The manager's bus, the agent's own guard and the machine's journald are no units of
        # the registry.
        return sorted(
            u
            for u in history.running_now(cgroups)
            if u != "dbus.service" and not u.startswith(("fleet-guard-", "fleet-local-"))
        )

    def left() -> dict[str, list[str]]:
        found = {m: units_on(cgroups) for m, cgroups in history._machines().items()}
        return {m: units for m, units in found.items() if units}

    # The scenario is over and checked: a slow unit need not take its whole stop timeout now.
    for machine, units in left().items():
        fleet.ssh(machine, "systemctl", "--user", "kill", "--signal=SIGKILL", *units)
    try:
        wait_until(lambda: not left(), STOP_TIMEOUT + SETTLE)
    except AssertionError:
        raise AssertionError(
            f"unit processes left after the registry was emptied: {left()}"
        ) from None


def slow_unit(folder: Path, name: str, xfleet: str = "") -> Path:
    """A unit whose main process ignores SIGTERM: stopping it takes STOP_TIMEOUT seconds."""
    text = f"[Unit]\nDescription=slow {name}\n\n[Service]\nExecStart={SLOW_EXEC}\n{SLOW_BODY}"
    if xfleet:
        text += f"\n[X-Fleet]\n{xfleet.strip()}\n"
    path = folder / name
    path.write_text(text)
    return path


@contextmanager
def recorded(
    fleet: Cluster, grace: float = STOP_TIMEOUT + 2 * AGENT_TTL + 5
) -> Iterator[ClusterHistory]:
    """Record the scenario; at the end, no violation of the promise may be in its history. An
    action explains a stop that ends up to `grace` seconds after it: a slow unit's stop takes
    STOP_TIMEOUT."""
    history = fleet.history().start()
    try:
        yield history
        # A last look after the dust settled, so a late second copy is not missed.
        time.sleep(1.0)
    finally:
        history.stop()
    report = history.check(grace=grace)
    print(report.summary())
    assert report.violations == [], "\n".join(report.violations)


def runs_on(history: ClusterHistory, unit: str) -> set[str]:
    """Machines whose processes show a copy of `unit` right now."""
    return {
        name
        for name, cgroups in history._machines().items()
        if unit in history.running_now(cgroups)
    }


def main_pid(fleet: Cluster, machine: str, unit: str) -> int:
    out = fleet.ssh(machine, "systemctl", "--user", "show", "-p", "MainPID", "--value", unit)
    return int(out.stdout.strip() or 0)


def fleetd_pid(fleet: Cluster, machine: str) -> int:
    return int(json.loads((fleet.dir / "m" / machine / "fleetd.json").read_text())["pid"])


# --------------------------------------------------------------------------------------- 1


# Names systemd refuses as unit file names, each for another reason (':' and a second '@' in
# the instance are allowed by systemd, so they are not here).
INVALID_NAMES = [
    ".x.service",
    "no-suffix",
    "x.notatype",
    "a b.service",
    "ä.service",
    ".service",
    "x" * 250 + ".service",
    "@.service",
    "a/b.service",
    "-",
]


def test_invalid_registry_entries_stop_no_agent(fleet: Cluster, unit_dir: Path) -> None:
    for name in (".x.service", "a b.service"):
        line = one_line_error(fleet.fleetctl("start", "--no-block", name, check=False))
        assert name in line, line
    host, _, port = fleet.endpoint.split(",")[0].removeprefix("http://").partition(":")
    client = pyetcd.client(host=host, port=int(port))
    junk = [f"/fleet/{kind}/{name}" for name in INVALID_NAMES for kind in ("unit", "desired")]
    junk += [
        "/fleet/unit/badhash.service",
        "/fleet/desired/badhash.service",
        "/fleet/unit/junk.service",
        "/fleet/desired/junk.service",
        "/fleet/desired/odd.service",
        "/fleet/owner/nobody.service",
        "/fleet/machine/" + "f" * 32,
        "/fleet/whatever/" + os.urandom(8).hex(),
        "/fleet/state/x/y/z",
    ]
    try:
        with recorded(fleet) as history:
            text = "[Service]\nExecStart=/bin/sleep 1000\n"
            for name in INVALID_NAMES:
                record = {"name": name, "text": text, "hash": content_hash(text)}
                client.put(f"/fleet/unit/{name}", json.dumps(record))
                client.put(f"/fleet/desired/{name}", "launched")
            # A valid name whose stored hash is not its text's.
            record = {"name": "badhash.service", "text": text, "hash": "0" * 40}
            client.put("/fleet/unit/badhash.service", json.dumps(record))
            for key in junk[2 * len(INVALID_NAMES) + 2 :]:
                client.put(key, os.urandom(40))
            for name in ("badhash.service", "junk.service"):
                client.put(f"/fleet/desired/{name}", "launched")
            # The cluster goes on scheduling.
            fleet.fleetctl("start", UNITS / "hello.service")
            fleet.wait_running(["hello.service"])
            time.sleep(2 * AGENT_TTL)
            assert {m["fleetd"] for m in fleet.status().values()} == {"running"}
            assert fleet.machines_up() == set(fleet.baseline)
            assert "hello.service" in fleet.running()
            assert runs_on(history, "hello.service")
        listing = fleet.fleetctl("list-unit-files", "--full", check=False)
        assert listing.returncode == 0, listing.stderr
        lines = listing.stdout.splitlines()
        for name in [".x.service", "no-suffix", "junk.service", "badhash.service"]:
            row = [
                line
                for line in lines
                if line.split() and line.split()[0] in (name, f"/fleet/unit/{name}")
            ]
            assert row, f"{name} not listed:\n{listing.stdout}"
            assert re.search(r"refused|invalid", row[0], re.I), row[0]
        # Why, in words: the warnings of the listing, or status of the entry.
        for name, why in [(".x.service", "name"), ("badhash.service", "hash")]:
            status = fleet.fleetctl("status", f"/fleet/unit/{name}", check=False)
            said = listing.stderr + status.stdout + status.stderr
            assert re.search(rf"{re.escape(name)}.*{why}", said, re.I), said
    finally:
        # fleetctl cannot name these: take them out directly, for the next test.
        for key in junk:
            client.delete(key)
        client.close()


def test_history_checker_sees_a_second_copy_started_by_hand(fleet: Cluster, unit_dir: Path) -> None:
    """The control experiment: the checker is not blind. A copy started behind fleet's back is
    reported as a unit running twice, and its stop as a restart nobody asked for."""
    fleet.fleetctl("start", UNITS / "hello.service")
    where = fleet.where()["hello.service"]
    other = next(m for m in fleet.baseline if m != where)
    history = fleet.history().start()
    try:
        run = fleet.ssh(
            other, "systemd-run", "--user", "--unit=hello.service", "/bin/sleep", "1000"
        )
        assert run.returncode == 0, run.stderr
        wait_until(lambda: runs_on(history, "hello.service") == {where, other}, SETTLE)
        time.sleep(0.5)
        fleet.ssh(other, "systemctl", "--user", "stop", "hello.service")
        wait_until(lambda: runs_on(history, "hello.service") == {where}, SETTLE)
        time.sleep(0.5)
    finally:
        history.stop()
    found = history.check().violations
    assert any("hello.service ran twice" in v and other in v for v in found), found
    assert any(f"hello.service stopped on {other}" in v for v in found), found


def test_history_checker_sees_a_conflict(fleet: Cluster, unit_dir: Path) -> None:
    """A unit started by hand beside one it conflicts with breaks the rule at that instant."""
    path = unit_dir / "web.service"
    path.write_text("[Service]\nExecStart=/bin/sleep 1000\n\n[X-Fleet]\nConflicts=db.service\n")
    fleet.fleetctl("start", path)
    fleet.fleetctl("submit", UNITS / "hello.service")
    where = fleet.where()["web.service"]
    history = fleet.history().start()
    try:
        # db.service is no fleet unit: submit one so its rules are known, never started.
        db = unit_dir / "db.service"
        db.write_text("[Service]\nExecStart=/bin/sleep 1000\n")
        fleet.fleetctl("submit", db)
        fleet.ssh(where, "systemd-run", "--user", "--unit=db.service", "/bin/sleep", "1000")
        wait_until(lambda: where in runs_on(history, "db.service"), SETTLE)
        time.sleep(0.5)
        fleet.ssh(where, "systemctl", "--user", "stop", "db.service")
    finally:
        history.stop()
    found = history.check().violations
    assert any("Conflicts=db.service" in v for v in found), found


# --------------------------------------------------------------------------------------- 2


def test_slow_unit_moved_by_replaces_runs_once(fleet: Cluster, unit_dir: Path) -> None:
    fleet.fleetctl("start", slow_unit(unit_dir, "slow.service"))
    where = fleet.where()["slow.service"]
    with recorded(fleet) as history:
        new = unit_dir / "new.service"
        new.write_text(
            "[Service]\nExecStart=/bin/sleep 1000\n\n[X-Fleet]\n"
            f"Replaces=slow.service\nMachineMetadata=zone={_zone(fleet, where)}\n"
        )
        history.action("start new.service (Replaces=slow.service)", unit="slow.service")
        fleet.fleetctl("start", "--no-block", new)
        placed = wait_until(
            lambda: _moved(fleet, "slow.service", where), STOP_TIMEOUT + SETTLE, "slow moved"
        )
        assert placed != where
        wait_until(lambda: fleet.where().get("new.service") == where, SETTLE, "new placed")


def test_slow_unit_moved_by_rebalance_runs_once(fleet: Cluster, unit_dir: Path) -> None:
    others = [m for m in fleet.baseline if m != "core-01"]
    for machine in others:
        fleet.halt(machine)
    fleet.fleetctl("start", slow_unit(unit_dir, "slow.service"))
    pinned = []
    for index in range(3):
        path = unit_dir / f"pinned{index}.service"
        path.write_text("[Service]\nExecStart=/bin/sleep 1000\n\n[X-Fleet]\nPin=true\n")
        pinned.append(path)
    fleet.fleetctl("start", *pinned)
    for machine in others:
        fleet.start(machine)
    wait_until(lambda: fleet.machines_up() == set(fleet.baseline), SETTLE)
    with recorded(fleet) as history:
        history.action("rebalance", unit="slow.service")
        fleet.fleetctl("rebalance", "--max-moves", "1")
        wait_until(lambda: _moved(fleet, "slow.service", "core-01"), STOP_TIMEOUT + SETTLE, "moved")


def test_slow_unit_moved_by_metadata_change_runs_once(fleet: Cluster, unit_dir: Path) -> None:
    fleet.fleetctl("start", slow_unit(unit_dir, "slow.service", "MachineMetadata=region=us-east"))
    where = fleet.where()["slow.service"]
    config = fleet.dir / "m" / where / "fleet.toml"
    original = config.read_text()
    try:
        with recorded(fleet) as history:
            config.write_text(original.replace('"us-east"', '"elsewhere"'))
            history.action("metadata change (SIGHUP)", machine=where)
            os.kill(fleetd_pid(fleet, where), signal.SIGHUP)
            placed = wait_until(
                lambda: _moved(fleet, "slow.service", where), STOP_TIMEOUT + SETTLE, "moved"
            )
            assert placed in ("core-01", "core-02")
    finally:
        config.write_text(original)
        os.kill(fleetd_pid(fleet, where), signal.SIGHUP)


def test_slow_unit_destroyed_then_started_elsewhere_runs_once(
    fleet: Cluster, unit_dir: Path
) -> None:
    fleet.fleetctl("start", slow_unit(unit_dir, "slow.service"))
    where = fleet.where()["slow.service"]
    other = next(m for m in fleet.baseline if m != where)
    with recorded(fleet) as history:
        history.action("destroy, start elsewhere", unit="slow.service")
        fleet.fleetctl("destroy", "slow.service")
        path = slow_unit(unit_dir, "slow.service", f"MachineID={fleet.ids[other]}")
        fleet.fleetctl("start", "--no-block", path)
        wait_until(
            lambda: fleet.running().get("slow.service") == [other],
            STOP_TIMEOUT + SETTLE,
            "slow running elsewhere",
        )
        assert runs_on(history, "slow.service") == {other}


def _zone(fleet: Cluster, machine: str) -> str:
    return str(fleet.status()[machine]["metadata"]["zone"])  # type: ignore[index]


def _moved(fleet: Cluster, unit: str, old: str) -> str | None:
    """The machine the unit runs on now, once it is not `old` any more."""
    running = fleet.running().get(unit, [])
    return running[0] if running and old not in running else None


# --------------------------------------------------------------------------------------- 3, 4


def _start_movable(fleet: Cluster, unit_dir: Path) -> list[str]:
    """Slow units that may run on core-01 or core-02 (region us-east), all on core-01."""
    fleet.halt("core-02")
    names = [f"slow{i}.service" for i in range(2)]
    fleet.fleetctl(
        "start", *(slow_unit(unit_dir, n, "MachineMetadata=region=us-east") for n in names)
    )
    fleet.start("core-02")
    assert all(fleet.where()[n] == "core-01" for n in names)
    return names


def _cut_off(fleet: Cluster, unit_dir: Path, cut: str, restore: str) -> None:
    names = _start_movable(fleet, unit_dir)
    with recorded(fleet) as history:
        fault = history.action(cut, machine="core-01")
        fleet.lc(cut, "core-01")
        wait_until(
            lambda: all(fleet.running().get(n) == ["core-02"] for n in names),
            4 * AGENT_TTL + SETTLE,
            "units moved to core-02",
        )
        lost = history.lease_lost("core-01")
        assert lost, "core-01's lease never expired"
        for name in names:
            on_01 = [c for c in history.copies_of(name) if c.machine == "core-01"]
            assert on_01 and on_01[-1].gone is not None, f"{name} still runs on core-01"
            # Dead there before its lease expired, so before anyone could claim it.
            assert on_01[-1].gone <= lost[0] + 0.3, (name, on_01[-1].gone - lost[0])
        fleet.lc(restore, "core-01")
        fault.finish()
        wait_until(lambda: fleet.machines_up() == set(fleet.baseline), SETTLE, "rejoined")
        time.sleep(2 * AGENT_TTL)
        assert {n: fleet.running().get(n) for n in names} == {n: ["core-02"] for n in names}


def test_partitioned_machine_stops_units_before_they_start_elsewhere(
    fleet: Cluster, unit_dir: Path
) -> None:
    _cut_off(fleet, unit_dir, "partition", "heal")


def test_paused_agent_past_ttl_runs_nothing_twice(fleet: Cluster, unit_dir: Path) -> None:
    _cut_off(fleet, unit_dir, "pause", "resume")


# --------------------------------------------------------------------------------------- 5


@pytest.mark.parametrize("how", [(), ("--kill",)], ids=["sigusr2", "sigkill"])
def test_restart_of_fleetd_keeps_units_running(
    fleet: Cluster, unit_dir: Path, how: tuple[str, ...]
) -> None:
    names = _start_movable(fleet, unit_dir)
    before = {n: main_pid(fleet, "core-01", n) for n in names}
    assert all(before.values())
    with recorded(fleet) as history:
        history.action("restart fleetd " + " ".join(how), machine="core-01", disruptive=False)
        fleet.lc("restart", "core-01", *how)
        time.sleep(2 * AGENT_TTL)
        assert {n: main_pid(fleet, "core-01", n) for n in names} == before
        assert {n: fleet.running().get(n) for n in names} == {n: ["core-01"] for n in names}
        assert history.lease_lost("core-01") == []


def test_fleetd_not_back_in_time_stops_units_before_its_lease_expires(
    fleet: Cluster, unit_dir: Path
) -> None:
    names = _start_movable(fleet, unit_dir)
    with recorded(fleet) as history:
        fault = history.action("restart fleetd, down past the TTL", machine="core-01")
        fleet.lc("restart", "core-01", "--down-for", str(3 * AGENT_TTL))
        fault.finish()
        lost = history.lease_lost("core-01")
        assert lost, "core-01's lease never expired while its fleetd was down"
        for name in names:
            on_01 = [c for c in history.copies_of(name) if c.machine == "core-01"]
            assert on_01[0].gone is not None, f"{name} kept running on core-01"
            assert on_01[0].gone <= lost[0] + 0.3, (name, on_01[0].gone - lost[0])
        wait_until(lambda: all(n in fleet.running() for n in names), SETTLE, "units back")
