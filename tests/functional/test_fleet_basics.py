"""fleet's basic scenarios on a real three-machine local cluster (vagrant/cluster.toml): a unit's
life cycle, spreading, metadata and machine-id placement, machines leaving cleanly or by power
cut, a duplicate agent, replacing content, bad input and the listings' columns."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import (
    AGENT_TTL,
    SETTLE,
    UNITS,
    VENV_BIN,
    Cluster,
    one_line_error,
    registry_picture,
    wait_until,
    write_unit,
)

from fleetd.unitfile import content_hash

pytestmark = pytest.mark.functional

HELLO = UNITS / "hello.service"
TEMPLATE = UNITS / "hello@.service"


def instances(n: int) -> list[str]:
    return [str(UNITS / f"hello@{i}.service") for i in range(1, n + 1)]


def names(n: int) -> list[str]:
    return [f"hello@{i}.service" for i in range(1, n + 1)]


def load_state(fleet: Cluster, machine: str, unit: str) -> str:
    out = fleet.ssh(machine, "systemctl", "--user", "show", "-p", "LoadState", "--value", unit)
    return out.stdout.strip()


# -- a unit's life ------------------------------------------------------------------------------


def test_start_stop_destroy(fleet: Cluster) -> None:
    out = fleet.fleetctl("start", HELLO).stdout
    assert "Unit hello.service launched on" in out

    rows = fleet.rows("list-units", "unit,machine,active,sub")
    assert len(rows) == 1, rows
    unit, machine, active, sub = rows[0]
    assert (unit, active, sub) == ("hello.service", "active", "running")
    host = fleet.name_of(machine.split("/")[0])
    assert fleet.is_active_on(host, "hello.service") == "active"
    for other in set(fleet.baseline) - {host}:
        assert fleet.is_active_on(other, "hello.service") != "active"

    fleet.fleetctl("stop", "hello.service")
    assert fleet.is_active_on(host, "hello.service") == "inactive"
    rows = fleet.rows("list-unit-files", "unit,dstate,state")
    assert rows == [["hello.service", "loaded", "loaded"]]

    assert fleet.fleetctl("destroy", "hello.service").stdout.strip() == "Destroyed hello.service"
    wait_until(lambda: not fleet.snapshot().states, what="hello.service's state withdrawn")
    assert fleet.rows("list-units", "unit,machine") == []
    assert fleet.rows("list-unit-files", "unit") == []
    for machine in fleet.baseline:
        assert load_state(fleet, machine, "hello.service") == "not-found", machine


def test_ten_instances_spread_evenly(fleet: Cluster) -> None:
    fleet.fleetctl("start", *instances(10))
    running = fleet.wait_running(names(10))
    per_machine = Counter(machines[0] for machines in running.values())
    assert sum(per_machine.values()) == 10
    counts = [per_machine.get(m, 0) for m in fleet.baseline]
    assert max(counts) - min(counts) <= 1, per_machine
    # The listing agrees with the machines' own managers.
    for unit, (machine,) in running.items():
        assert fleet.is_active_on(machine, unit) == "active", (unit, machine)


# -- placement rules ----------------------------------------------------------------------------


def test_machine_metadata_keeps_units_in_their_zone(fleet: Cluster, unit_dir: Path) -> None:
    write_unit(unit_dir, "zoned@.service", "MachineMetadata=zone=us-east-1b")
    fleet.fleetctl("start", *(unit_dir / f"zoned@{i}.service" for i in range(1, 5)))
    running = fleet.wait_running([f"zoned@{i}.service" for i in range(1, 5)])
    assert {u: m for u, m in running.items() if u.startswith("zoned@")} == {
        f"zoned@{i}.service": ["core-02"] for i in range(1, 5)
    }


def test_metadata_nobody_has_fails_to_start(fleet: Cluster, unit_dir: Path) -> None:
    path = write_unit(unit_dir, "nokey.service", "MachineMetadata=rack=r9")
    line = one_line_error(fleet.fleetctl("start", "--block-attempts", "3", path, check=False))
    assert "nokey.service" in line and "not launched" in line
    assert "rack=r9 not matched" in line
    assert "nokey.service" not in fleet.running()
    status = fleet.fleetctl("status", "nokey.service").stdout
    assert "Not scheduled" in status and "rack=r9 not matched" in status


def test_machine_id_prefix_pins(fleet: Cluster, unit_dir: Path) -> None:
    target = fleet.ids["core-03"]
    write_unit(unit_dir, "pinned@.service", f"MachineID={target[:8]}")
    units = [f"pinned@{i}.service" for i in range(1, 4)]
    fleet.fleetctl("start", *(unit_dir / u for u in units))
    running = fleet.wait_running(units)
    assert all(running[u] == ["core-03"] for u in units), running


# -- machines leaving ---------------------------------------------------------------------------


def test_halt_moves_only_that_machines_units(fleet: Cluster) -> None:
    fleet.fleetctl("start", *instances(6))
    before = {u: m[0] for u, m in fleet.wait_running(names(6)).items()}
    victim = before["hello@1.service"]
    leaving = {u for u, m in before.items() if m == victim}
    staying = {u: m for u, m in before.items() if m != victim}
    fleet.halt(victim)

    def moved() -> dict[str, list[str]] | None:
        running = fleet.running()
        done = all(u in running and victim not in running[u] for u in before)
        return running if done else None

    after = wait_until(moved, 10, "the halted machine's units running elsewhere")
    assert {u: after[u][0] for u in staying} == staying
    for unit in leaving:
        assert after[unit] != [victim]
        assert fleet.is_active_on(victim, unit) != "active"


def test_a_burst_of_signals_still_drains_fleetd(fleet: Cluster) -> None:
    # Every kind of signal fleetd takes, thousands of them over a second, so that many arrive
    # while the one before is still being acted on: fleetd must serve them and drain, not wedge
    # with its lease still renewed (a handler once waited there on a lock its own thread held).
    fleet.fleetctl("start", *instances(6))
    before = {u: m[0] for u, m in fleet.wait_running(names(6)).items()}
    victim = before["hello@1.service"]
    machine_dir = fleet.dir / "m" / victim
    pid = int(json.loads((machine_dir / "fleetd.json").read_text())["pid"])
    kinds = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
    end = time.monotonic() + 1.0
    with contextlib.suppress(ProcessLookupError):
        while time.monotonic() < end:
            for sig in kinds:
                os.kill(pid, sig)
                time.sleep(0)

    def gone() -> bool:
        try:
            return str(machine_dir / "fleet.toml") not in Path(f"/proc/{pid}/cmdline").read_text()
        except OSError:
            return True

    wait_until(gone, 20, f"fleetd of {victim} exited")
    log = (machine_dir / "fleetd.log").read_text()
    assert "shutting down: stopping units and leaving the cluster" in log
    assert any(line.endswith(": stopped") for line in log.splitlines()), log[-2000:]

    def moved() -> dict[str, list[str]] | None:
        running = fleet.running()
        done = all(u in running and victim not in running[u] for u in before)
        return running if done else None

    after = wait_until(moved, 10, "the drained machine's units running elsewhere")
    staying = {u: m for u, m in before.items() if m != victim}
    assert {u: after[u][0] for u in staying} == staying


def test_killed_machines_units_move_after_ttl(fleet: Cluster) -> None:
    fleet.fleetctl("start", *instances(6))
    before = {u: m[0] for u, m in fleet.wait_running(names(6)).items()}
    victim = before["hello@2.service"]
    fleet.kill(victim)

    def moved() -> bool:
        running = fleet.running()
        return all(u in running and victim not in running[u] for u in before)

    wait_until(moved, AGENT_TTL + 5, "the killed machine's units running elsewhere")
    assert fleet.ids[victim] not in fleet.snapshot().machines


def test_second_agent_with_the_same_machine_id_refuses(fleet: Cluster, tmp_path: Path) -> None:
    pin = write_unit(tmp_path, "pin1.service", f"MachineID={fleet.ids['core-01']}")
    fleet.fleetctl("start", pin)
    before = fleet.snapshot()
    assert fleet.name_of(before.owner_of("pin1.service") or "") == "core-01"

    machine_env = dict(
        line.split("=", 1)
        for line in fleet.ssh("core-01", "env").stdout.splitlines()
        if line.startswith(("DBUS_SESSION_BUS_ADDRESS=", "XDG_RUNTIME_DIR="))
    )
    assert len(machine_env) == 2, machine_env
    config = (fleet.dir / "m" / "core-01" / "fleet.toml").read_text()
    own_units = str(fleet.dir / "m" / "core-01" / "units")
    assert own_units in config
    other_units = tmp_path / "dup-units"
    other_units.mkdir()
    copy = tmp_path / "dup.toml"
    # Not the metrics address: that port is taken by the machine's own fleetd.
    copy.write_text(
        "".join(
            line
            for line in config.replace(own_units, str(other_units)).splitlines(keepends=True)
            if not line.startswith("metrics_address")
        )
    )
    log = tmp_path / "dup.log"
    with log.open("w") as stderr:
        dup = subprocess.Popen(
            [str(VENV_BIN / "fleetd"), "--config", str(copy)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env={**fleet.env, **machine_env},
        )
    try:
        wait_until(lambda: "already held" in log.read_text(), 15, "the duplicate refusing")
        line = next(x for x in log.read_text().splitlines() if "already held" in x)
        assert fleet.ids["core-01"] in line
        assert dup.poll() is None or dup.returncode != 0
    finally:
        if dup.poll() is None:
            os.kill(dup.pid, signal.SIGTERM)
        dup.wait(timeout=30)
    time.sleep(AGENT_TTL)  # anything the duplicate broke would show by now
    after = fleet.snapshot()
    assert after.owner_of("pin1.service") == fleet.ids["core-01"]
    assert after.machines[fleet.ids["core-01"]] == before.machines[fleet.ids["core-01"]]
    assert fleet.running(after) == {"pin1.service": ["core-01"]}
    assert fleet.is_active_on("core-01", "pin1.service") == "active"
    assert not list(other_units.iterdir())


# -- content ------------------------------------------------------------------------------------


def marker_unit(folder: Path, version: str) -> Path:
    return write_unit(
        folder,
        "versioned.service",
        body=f"ExecStartPre=/bin/sh -c 'echo {version} > %t/versioned.out'\n",
    )


def test_submit_and_start_replace(fleet: Cluster, unit_dir: Path) -> None:
    path = marker_unit(unit_dir, "v1")
    fleet.fleetctl("submit", path)
    path = marker_unit(unit_dir, "v2")
    plain = fleet.fleetctl("submit", path)
    assert "differs" in plain.stderr and "--replace" in plain.stderr
    assert "v1" in fleet.fleetctl("cat", "versioned.service").stdout
    fleet.fleetctl("submit", "--replace", path)
    assert fleet.fleetctl("cat", "versioned.service").stdout == path.read_text()

    fleet.fleetctl("start", path)
    (machine,) = fleet.wait_running(["versioned.service"])["versioned.service"]
    read = ("sh", "-c", 'cat "$XDG_RUNTIME_DIR/versioned.out"')
    assert fleet.ssh(machine, *read).stdout.strip() == "v2"

    path = marker_unit(unit_dir, "v3")
    fleet.fleetctl("start", "--replace", path)
    assert fleet.fleetctl("cat", "versioned.service").stdout == path.read_text()
    new_hash = content_hash(path.read_text())

    def restarted() -> bool:
        snap = fleet.snapshot()
        owner = snap.owner_of("versioned.service")
        state = snap.states.get("versioned.service", {}).get(owner or "")
        return state is not None and state.hash == new_hash and state.active == "active"

    wait_until(restarted, SETTLE, "the unit running its new content")
    (machine,) = fleet.running()["versioned.service"]
    assert fleet.ssh(machine, *read).stdout.strip() == "v3"

    # submit --replace of a running unit: the owner restarts it with the new content.
    path = marker_unit(unit_dir, "v4")
    fleet.fleetctl("submit", "--replace", path)
    assert fleet.fleetctl("cat", "versioned.service").stdout == path.read_text()
    new_hash = content_hash(path.read_text())
    wait_until(restarted, SETTLE, "the unit running the content submitted with --replace")
    (machine,) = fleet.running()["versioned.service"]
    assert fleet.ssh(machine, *read).stdout.strip() == "v4"


# -- bad input ----------------------------------------------------------------------------------


def test_bad_input_is_one_line_and_writes_nothing(fleet: Cluster, unit_dir: Path) -> None:
    fleet.fleetctl("start", HELLO)
    before = registry_picture(fleet.snapshot())
    malformed = unit_dir / "malformed.service"
    malformed.write_text("[Unit]\nDescription=broken\nthis is no option\n")
    header = unit_dir / "header.service"
    header.write_text("[Unit\nDescription=broken\n")
    cases: dict[str, tuple[list[str | Path], str]] = {
        "missing file": (["start", unit_dir / "absent.service"], "not found"),
        "invalid name": (["start", unit_dir / "bad name!.service"], "invalid characters"),
        "malformed": (["start", malformed], "line 3"),
        "bad header": (["submit", header], "malformed section header"),
        "template": (["start", TEMPLATE], "template"),
        "status unknown": (["status", "nosuch.service"], "not found"),
        "destroy unknown": (["destroy", "nosuch.service"], "not found"),
        "stop unknown": (["stop", "nosuch.service"], "not found"),
        "one good one bad": (["start", instances(1)[0], unit_dir / "absent.service"], "absent"),
    }
    for case, (args, fragment) in cases.items():
        line = one_line_error(fleet.fleetctl(*args, check=False))
        assert line.startswith("fleetctl: "), case
        assert fragment in line, (case, line)
        assert registry_picture(fleet.snapshot()) == before, case


# -- listings -----------------------------------------------------------------------------------


def test_listing_columns_and_flags(fleet: Cluster) -> None:
    fleet.fleetctl("start", HELLO)
    snap = fleet.snapshot()
    machines = fleet.fleetctl("list-machines").stdout.splitlines()
    assert machines[0].split() == ["MACHINE", "IP", "METADATA"]
    assert len(machines) == 4
    by_ip = {m.public_ip: m for m in snap.machines.values()}
    for line in machines[1:]:
        short, ip, metadata = line.split()
        machine = by_ip[ip]
        assert short == f"{machine.id[:8]}..."
        assert metadata == ",".join(f"{k}={v}" for k, v in sorted(machine.metadata.items()))
    full = fleet.fleetctl("list-machines", "--full", "--no-legend", "--fields", "machine,ip")
    assert sorted(line.split() for line in full.stdout.splitlines()) == sorted(
        [m.id, m.public_ip] for m in snap.machines.values()
    )

    units = fleet.fleetctl("list-units").stdout.splitlines()
    assert units[0].split() == ["UNIT", "MACHINE", "ACTIVE", "SUB"]
    (owner,) = fleet.running()["hello.service"]
    mid = fleet.ids[owner]
    ip = snap.machines[mid].public_ip
    assert units[1].split() == ["hello.service", f"{mid[:8]}.../{ip}", "active", "running"]
    record = snap.units["hello.service"]
    every = fleet.fleetctl(
        "list-units", "--full", "--fields", "unit,load,active,sub,machine,hash"
    ).stdout.splitlines()
    assert every[0].split() == ["UNIT", "LOAD", "ACTIVE", "SUB", "MACHINE", "HASH"]
    assert every[1].split() == ["hello.service", "loaded", "active", "running", f"{mid}/{ip}",
                                record.hash]  # fmt: skip
    short = fleet.fleetctl("list-units", "--no-legend", "--fields", "hash").stdout
    assert short.strip() == record.hash[:7]

    files = fleet.fleetctl("list-unit-files").stdout.splitlines()
    assert files[0].split() == ["UNIT", "HASH", "DSTATE", "STATE", "TARGET"]
    assert files[1].split() == ["hello.service", record.hash[:7], "launched", "launched",
                                f"{mid[:8]}.../{ip}"]  # fmt: skip
    desc = fleet.fleetctl("list-unit-files", "--no-legend", "--fields", "unit,global,desc")
    assert desc.stdout.split("\t", 1)[0] == "hello.service"
    assert desc.stdout.rstrip("\n").endswith("false\tHello World: a line every second")

    for command in ("list-machines", "list-units", "list-unit-files"):
        line = one_line_error(fleet.fleetctl(command, "--fields", "bogus", check=False))
        assert "bogus" in line and "valid fields" in line
