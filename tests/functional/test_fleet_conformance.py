"""fleet's own functional suite (coreos/fleet v1.0.0, functional/*.go), ported test by test where
the earlier functional modules do not cover it already; tests/functional/CONFORMANCE.md maps all
43 of fleet's tests. Each test is named after fleet's and uses our own fixture units in
tests/functional/fixtures/units/ (fleet's shapes, /bin/sh instead of /bin/bash).

One three-machine local cluster serves the whole module (fixtures/cluster-conformance.toml: the
machines carry `hostname` metadata, as fleet's test machines do). Where fleet starts a cluster of
one or two machines, the test says what the third machine changes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    AGENT_TTL,
    FIXTURES,
    SETTLE,
    VENV_BIN,
    Cluster,
    _env,
    one_line_error,
    wait_until,
)

from fleetctl import __version__

pytestmark = pytest.mark.functional

CLUSTER_CONFIG = FIXTURES / "cluster-conformance.toml"
FX = FIXTURES / "units"

# What undoes each way of launching units, as in fleet's unit_action_test.go.
CLEAN = {"submit": "destroy", "load": "unload", "start": "stop", "restart": "stop"}


def fx(*names: str) -> list[Path]:
    return [FX / name for name in names]


def hello_instances(n: int) -> list[str]:
    return [f"hello@{i}.service" for i in range(1, n + 1)]


def active_units(fleet: Cluster) -> dict[str, list[str]]:
    """What `fleetctl list-units` reports active: unit -> sorted machine names."""
    out: dict[str, list[str]] = {}
    for unit, active, machine in fleet.rows("list-units", "unit,active,machine"):
        if active == "active":
            out.setdefault(unit, []).append(fleet.name_of(machine.split("/")[0]))
    return {unit: sorted(machines) for unit, machines in sorted(out.items())}


def wait_n_active(fleet: Cluster, n: int, timeout: float = SETTLE) -> dict[str, list[str]]:
    """fleet's WaitForNActiveUnits: exactly n active (unit, machine) rows."""

    def check() -> tuple[dict[str, list[str]]] | None:
        units = active_units(fleet)
        return (units,) if sum(len(m) for m in units.values()) == n else None

    found = wait_until(check, timeout, f"exactly {n} active units in list-units")
    assert found is not None
    return found[0]


def single_machines(units: dict[str, list[str]]) -> dict[str, str]:
    out = {}
    for unit, machines in units.items():
        assert len(machines) == 1, f"{unit} active on {machines}"
        out[unit] = machines[0]
    return out


def unit_property(fleet: Cluster, machine: str, unit: str, prop: str) -> str:
    out = fleet.ssh(machine, "systemctl", "--user", "show", "-p", prop, "--value", unit)
    return out.stdout.strip()


def log_offset(fleet: Cluster, machine: str) -> int:
    return len(fleetd_log(fleet, machine))


def fleetd_log(fleet: Cluster, machine: str, since: int = 0) -> str:
    return (fleet.dir / "m" / machine / "fleetd.log").read_text(errors="replace")[since:]


@contextlib.contextmanager
def etcd_paused(fleet: Cluster) -> Iterator[None]:
    """Every machine cut off from etcd at once: its processes are frozen (the local cluster's
    stand-in for fleet's iptables REJECT rule), and thawed however the block ends."""
    members = json.loads((fleet.dir / "etcd" / "etcd.json").read_text())["members"]
    pids = [int(member["pid"]) for member in members]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def run_fleetctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "fleetctl"), *args],
        capture_output=True,
        text=True,
        env=env if env is not None else _env(),
        timeout=60,
        check=False,
    )


# -- fleetctl_test.go: no cluster needed -----------------------------------------------------


def test_client_version_flag() -> None:
    proc = run_fleetctl("version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"fleetctl version {__version__}"


def test_client_version_help_output() -> None:
    proc = run_fleetctl("help")
    assert proc.returncode == 0, proc.stderr
    assert __version__ in proc.stdout


def test_client_help_flag() -> None:
    outputs = {}
    for args in (["--help"], ["-h"], ["help"], []):
        proc = run_fleetctl(*args)
        assert proc.returncode == 0, (args, proc.stderr)
        assert "Usage: fleetctl" in proc.stdout, args
        outputs[" ".join(args)] = proc.stdout
    assert outputs["--help"] == outputs["-h"]
    assert outputs["help"] == outputs[""]


# -- client_test.go -----------------------------------------------------------------------------


def test_fleetctl_with_env(fleet: Cluster) -> None:
    by_env = fleet.fleetctl("list-machines", "--no-legend", "--full", "--fields", "machine")
    assert sorted(by_env.stdout.split()) == sorted(fleet.ids.values())
    bare = {k: v for k, v in fleet.env.items() if k != "FLEETCTL_ENDPOINT"}
    by_flag = run_fleetctl(
        "--endpoint", fleet.endpoint, "list-machines", "--no-legend", "--full", "--fields",
        "machine", env=bare,
    )  # fmt: skip
    assert by_flag.returncode == 0, by_flag.stderr
    assert by_flag.stdout == by_env.stdout


# -- unit_action_test.go ------------------------------------------------------------------------


def units_after(fleet: Cluster, command: str) -> set[str]:
    """The units each way of launching shows: submitted ones in list-unit-files, loaded ones as
    rows of list-units, started ones as active rows of list-units."""
    if command == "submit":
        return {row[0] for row in fleet.rows("list-unit-files", "unit")}
    if command == "load":
        return {row[0] for row in fleet.rows("list-units", "unit")}
    return set(active_units(fleet))


def wait_units(fleet: Cluster, command: str, names: list[str]) -> None:
    wanted = set(names)
    wait_until(
        lambda: units_after(fleet, command) == wanted,
        what=f"exactly {sorted(wanted)} after {command}",
    )


def unit_start_common(fleet: Cluster, command: str, n: int) -> None:
    """Launch n instances, clean them up, launch and clean up again (fleet's unitStartCommon;
    fleet cleans up one unit per command, one command for all keeps the suite quick)."""
    names = hello_instances(n)
    for _ in range(2):
        proc = fleet.fleetctl(command, *fx(*names))
        assert "Error" not in proc.stderr, proc.stderr
        wait_units(fleet, command, names)
        fleet.fleetctl(CLEAN[command], *names)
        wait_units(fleet, command, [])


def test_unit_submit(fleet: Cluster) -> None:
    unit_start_common(fleet, "submit", 9)


def test_unit_load(fleet: Cluster) -> None:
    unit_start_common(fleet, "load", 6)


def test_unit_start(fleet: Cluster) -> None:
    unit_start_common(fleet, "start", 3)


def replace_unit_common(fleet: Cluster, command: str, n: int, tmp_path: Path) -> None:
    """Launch n instances, then `<command> --replace` each with a changed file: the registry
    holds the new text and the instances stay launched as before (fleet's replaceUnitCommon,
    which takes 9, 6 and 3 instances; 3 each keep the suite quick)."""
    names = hello_instances(n)
    fleet.fleetctl(command, *fx(*names))
    wait_units(fleet, command, names)
    changed = (FX / "hello.service").read_text().replace("sleep 1", "sleep 2")
    for name in names:
        before = fleet.fleetctl("cat", name).stdout
        path = tmp_path / name
        path.write_text(changed)
        fleet.fleetctl(command, "--replace", path)
        wait_units(fleet, command, names)
        after = fleet.fleetctl("cat", name).stdout
        assert after != before
        assert after == changed
    if command == "start":
        # The owners restarted every instance with the new text.
        wait_until(
            lambda: (
                set(fleet.running()) == set(names)
                and all(fleet.snapshot().units[u].text == changed for u in names)
            ),
            what="every instance running its replaced text",
        )
    fleet.fleetctl(CLEAN[command], *names)
    wait_units(fleet, command, [])


def test_unit_submit_replace(fleet: Cluster, tmp_path: Path) -> None:
    replace_unit_common(fleet, "submit", 3, tmp_path)


def test_unit_load_replace(fleet: Cluster, tmp_path: Path) -> None:
    replace_unit_common(fleet, "load", 3, tmp_path)


def test_unit_start_replace(fleet: Cluster, tmp_path: Path) -> None:
    replace_unit_common(fleet, "start", 3, tmp_path)


def main_pids(fleet: Cluster, names: list[str]) -> dict[str, str]:
    placed = single_machines(active_units(fleet))
    return {u: unit_property(fleet, placed[u], u, "MainPID") for u in names}


def test_unit_restart(fleet: Cluster) -> None:
    names = hello_instances(3)
    fleet.fleetctl("start", *fx(*names))
    wait_units(fleet, "start", names)
    before = main_pids(fleet, names)
    for _ in range(2):
        fleet.fleetctl("restart", *fx(*names))
        wait_units(fleet, "start", names)
        after = main_pids(fleet, names)
        for unit in names:
            assert after[unit] not in ("", "0", before[unit]), (unit, before, after)
        before = after
        fleet.fleetctl("stop", *names)
        wait_units(fleet, "start", [])


def test_unit_status(fleet: Cluster) -> None:
    fleet.fleetctl("load", FX / "hello.service")
    wait_units(fleet, "load", ["hello.service"])
    shown = fleet.fleetctl("status", "hello.service", check=False)
    # As in fleet, the exit status is that of the machine's `systemctl status`: 3 for a unit
    # that is loaded but not running.
    assert shown.returncode == 3, shown.stderr
    text = shown.stdout
    assert "Loaded: loaded" in " ".join(text.split()), text
    assert "Desired: loaded" in " ".join(text.split()), text


def test_list_unit_files_order(fleet: Cluster) -> None:
    names = [f"hello@{i:02d}.service" for i in range(1, 21)]
    shuffled = names[:]
    random.Random(11).shuffle(shuffled)
    for part in (shuffled[:10], shuffled[10:]):
        fleet.fleetctl("submit", *fx(*part))
    listed = fleet.fleetctl("list-unit-files", "--no-legend", "--fields", "unit").stdout
    assert listed.split() == sorted(names)


# -- install_test.go ----------------------------------------------------------------------------


def test_install_unit(fleet: Cluster) -> None:
    fleet.fleetctl("load", *fx("hello.service", "discovery.service"))

    def both_loaded() -> dict[str, str] | None:
        rows = fleet.rows("list-units", "unit,load,machine")
        where = {unit: fleet.name_of(m.split("/")[0]) for unit, load, m in rows if load == "loaded"}
        return where if set(where) == {"hello.service", "discovery.service"} else None

    where = wait_until(both_loaded, what="hello and discovery loaded")
    assert where is not None
    machine = where["hello.service"]
    assert where["discovery.service"] == machine  # MachineOf=hello.service

    def discovery(state: str) -> bool:
        return unit_property(fleet, machine, "discovery.service", "ActiveState") == state

    wait_until(lambda: discovery("inactive"), what="discovery.service loaded, not started")
    assert unit_property(fleet, machine, "discovery.service", "UnitFileState") == "enabled-runtime"

    fleet.fleetctl("start", FX / "hello.service")
    wait_until(lambda: discovery("active"), what="hello.service pulling discovery.service in")
    wait_until(
        lambda: active_units(fleet) == {"discovery.service": [machine], "hello.service": [machine]},
        what="both reported active",
    )
    # The agent leaves it running although its desired state is only loaded: a few agent rounds.
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert discovery("active")
        time.sleep(0.3)
    dstates = {u: d for u, d in fleet.rows("list-unit-files", "unit,dstate")}
    assert dstates == {"discovery.service": "loaded", "hello.service": "launched"}

    fleet.fleetctl("stop", FX / "hello.service")
    wait_until(lambda: discovery("inactive"), what="BindsTo= stopping discovery.service")
    assert unit_property(fleet, machine, "hello.service", "ActiveState") == "inactive"


# -- metadata_test.go ---------------------------------------------------------------------------


def test_templates_with_specifiers_in_metadata(fleet: Cluster) -> None:
    fleet.fleetctl("submit", FX / "metadata@.service")
    # Backwards, as fleet does: the n-th start must not land on the first free machine.
    for machine in reversed(fleet.baseline):
        fleet.fleetctl("start", FX / f"metadata@{machine}.service")
    placed = single_machines(wait_n_active(fleet, 3))
    assert placed == {f"metadata@{m}.service": m for m in fleet.baseline}

    proc = fleet.fleetctl(
        "start", "--block-attempts=3", FX / "metadata@invalid.service", check=False
    )
    line = one_line_error(proc)
    assert "metadata@invalid.service not launched" in line
    assert "hostname=invalid not matched" in line
    assert "metadata@invalid.service" not in active_units(fleet)


# -- scheduling_test.go (the ones the earlier modules do not cover) ---------------------------


def test_schedule_multiple_conflicts(fleet: Cluster, tmp_path: Path) -> None:
    # Their Conflicts= name conflict.0/1/2 (one line or one line each), never each other: all
    # three run, one per machine as the load-aware placement spreads them.
    units = [f"conflict.multiple.{i}.service" for i in range(3)]
    for unit in units:
        fleet.fleetctl("start", "--no-block", FX / unit)
    assert {row[0] for row in fleet.rows("list-unit-files", "unit")} == set(units)
    placed = single_machines(wait_n_active(fleet, 3))
    assert sorted(placed.values()) == sorted(fleet.baseline)

    # Beyond fleet's test: every pattern of both spellings is in force. A plain unit of each
    # conflicting name finds no machine (a one-way declaration keeps both apart).
    for i in range(3):
        plain = tmp_path / f"conflict.{i}.service"
        plain.write_text((FX / "hello.service").read_text())
        fleet.fleetctl("start", "--no-block", plain)
    for i in range(3):
        text = fleet.fleetctl("status", f"conflict.{i}.service").stdout
        assert "Not scheduled" in text, text
        for machine in fleet.baseline:
            assert f"{machine}: conflicts with conflict.multiple." in text, text
    assert sum(len(m) for m in active_units(fleet).values()) == 3


def test_schedule_global_units(fleet: Cluster) -> None:
    fleet.fleetctl("start", "--no-block", *fx("hello.service", "goodbye.service"))
    wait_n_active(fleet, 2)
    fleet.fleetctl("start", "--no-block", FX / "global.service")
    units = wait_n_active(fleet, 5)
    assert units["global.service"] == sorted(fleet.baseline)
    # fleet passes --no-block to status; its status has no such flag either.
    assert "global.service" in fleet.fleetctl("status", "global.service").stdout

    fleet.fleetctl("restart", "global.service")
    units = wait_n_active(fleet, 5)
    assert units["global.service"] == sorted(fleet.baseline)


# -- cluster_test.go ----------------------------------------------------------------------------


def test_dynamic_cluster_member_reboot(fleet: Cluster) -> None:
    units = [f"conflict.{i}.service" for i in range(3)]
    fleet.fleetctl("start", *fx(*units))
    assert len(fleet.rows("list-units", "unit")) == 3
    before = single_machines(wait_n_active(fleet, 3))
    assert sorted(before.values()) == sorted(fleet.baseline)

    # fleet powers the machine off and boots a fresh one; here the same machine comes back.
    fleet.halt("core-02")
    wait_until(lambda: len(fleet.rows("list-machines", "machine")) == 2, what="core-02 gone")
    (displaced,) = [u for u, m in before.items() if m == "core-02"]
    others = {u: m for u, m in before.items() if u != displaced}
    # Conflicts leave the displaced unit nowhere to go.
    wait_until(lambda: single_machines(active_units(fleet)) == others, what="two units running")
    fleet.start("core-02")
    after = single_machines(wait_n_active(fleet, 3))
    assert after == before  # only the rebooted machine's unit was disrupted, and it came back


# -- node_test.go -------------------------------------------------------------------------------


def test_node_shutdown(fleet: Cluster) -> None:
    unit = f"pin@{fleet.ids['core-01']}.service"
    fleet.fleetctl("start", FX / unit)
    assert wait_n_active(fleet, 1) == {unit: ["core-01"]}

    fleet.halt("core-01")
    # The machine leaves list-machines at once (its lease is revoked, no TTL to wait for) ...
    machines = fleet.rows("list-machines", "machine")
    assert sorted(m for (m,) in machines) == sorted([fleet.ids["core-02"], fleet.ids["core-03"]])
    # ... its unit's state is withdrawn, the pinned unit goes nowhere else ...
    wait_n_active(fleet, 0)
    # ... and it no longer runs there.
    assert unit_property(fleet, "core-01", unit, "ActiveState") == "inactive"
    status = fleet.fleetctl("status", unit).stdout
    assert "Not scheduled" in status


# -- server_test.go -----------------------------------------------------------------------------


def test_reconfigure_server(fleet: Cluster) -> None:
    fleet.fleetctl("start", FX / "hello.service")
    wait_n_active(fleet, 1)
    fleet.fleetctl("unload", "hello.service")
    since = log_offset(fleet, "core-01")
    pid = int(json.loads((fleet.dir / "m" / "core-01" / "fleetd.json").read_text())["pid"])
    os.kill(pid, signal.SIGHUP)
    wait_until(
        lambda: "configuration reloaded" in fleetd_log(fleet, "core-01", since),
        what="core-01's fleetd reloading its configuration",
    )
    assert fleet.fleetctl("list-units").returncode == 0
    assert fleet.status()["core-01"]["fleetd"] == "running"
    # Still a working member: it carries on scheduling.
    fleet.fleetctl("start", "hello.service")
    assert list(wait_n_active(fleet, 1)) == ["hello.service"]
    assert "Traceback" not in fleetd_log(fleet, "core-01", since)


# -- shutdown_test.go ---------------------------------------------------------------------------


def test_shutdown(fleet: Cluster) -> None:
    since = log_offset(fleet, "core-03")
    # `halt` fails unless fleetd exits by itself within its timeout after SIGTERM.
    out = fleet.lc("halt", "core-03").stdout
    assert out.strip() == "core-03: halted"
    log = fleetd_log(fleet, "core-03", since)
    assert log.rstrip().endswith("stopped"), log
    assert "Traceback" not in log
    assert fleet.ids["core-03"] not in fleet.snapshot().machines


def test_shutdown_vs_monitor(fleet: Cluster) -> None:
    # fleet stops fleetd while its health monitor restarts it for lack of etcd; ours: SIGTERM
    # while the agent has fenced itself for lack of etcd must still end in a clean exit.
    unit = f"pin@{fleet.ids['core-03']}.service"
    fleet.fleetctl("start", FX / unit)
    assert wait_n_active(fleet, 1) == {unit: ["core-03"]}
    since = log_offset(fleet, "core-03")
    with etcd_paused(fleet):
        # Fenced: it stopped its unit for lack of etcd.
        wait_until(
            lambda: unit_property(fleet, "core-03", unit, "ActiveState") != "active",
            AGENT_TTL + SETTLE,
            "core-03 fencing itself",
        )
        out = fleet.lc("halt", "core-03").stdout
        assert out.strip() == "core-03: halted"
    log = fleetd_log(fleet, "core-03", since)
    assert log.rstrip().endswith("stopped"), log
    assert "Traceback" not in log


# -- connectivity-loss_test.go: a deliberate difference -----------------------------------------


def test_single_node_connectivity_loss(fleet: Cluster) -> None:
    """fleet keeps a cut-off machine's units running; we guarantee the opposite (a machine that
    cannot keep its lease stops its units before another machine may claim them), and assert
    that. Everything fleet checks before the cut and after reconnecting holds as in fleet."""
    commands = {"inactive": ["submit"], "loaded": ["load", "--no-block"],
                "launched": ["start", "--no-block"]}  # fmt: skip
    dstates: dict[str, str] = {}
    expected: Counter[tuple[str, str]] = Counter()
    for kind, copies in (("single", 1), ("global", len(fleet.baseline))):
        for state, command in commands.items():
            unit = f"{kind}@{state}.service"
            fleet.fleetctl(*command, FX / unit)
            dstates[unit] = state
            if state != "inactive":
                active = "active" if state == "launched" else "inactive"
                expected[(unit, active)] += copies

    seen: list[object] = []

    def settled() -> dict[str, str] | None:
        files = dict(fleet.rows("list-unit-files", "unit,dstate"))
        rows = Counter((u, a) for u, a in fleet.rows("list-units", "unit,active"))
        seen[:] = [files, rows]
        if files != dstates or rows != expected:
            return None
        rows_with_machine = fleet.rows("list-units", "unit,machine")
        return {
            u: fleet.name_of(m.split("/")[0])
            for u, m in rows_with_machine
            if u.startswith("single@")
        }

    where = wait_until(settled, what="the initial states")
    assert where is not None
    running = [(where["single@launched.service"], "single@launched.service")] + [
        (m, "global@launched.service") for m in fleet.baseline
    ]
    loaded = [(where["single@loaded.service"], "single@loaded.service")] + [
        (m, "global@loaded.service") for m in fleet.baseline
    ]

    with etcd_paused(fleet):
        wait_until(
            lambda: all(unit_property(fleet, m, u, "ActiveState") != "active" for m, u in running),
            AGENT_TTL + SETTLE,
            "every cut-off machine stopping its launched units",
        )
        # Stopped, not removed: the unit files stay linked, as fleet leaves them.
        for machine, unit in running + loaded:
            assert unit_property(fleet, machine, unit, "UnitFileState") == "linked-runtime"

    # Reconnected: the machines join again and the cluster returns to the same picture.
    try:
        wait_until(settled, AGENT_TTL + SETTLE, "the same states after reconnecting")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen {seen}") from None
