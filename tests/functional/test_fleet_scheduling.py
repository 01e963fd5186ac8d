"""fleet's scheduling scenarios on a real three-machine local cluster (vagrant/cluster.toml):
Conflicts (mutual, one-way, several patterns), MachineOf pairs, MachineID pins, Global units,
Replaces, templated metadata, a fourth machine taking over, and [X-Fleet] validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import (
    UNITS,
    Cluster,
    assert_refused,
    one_line_error,
    wait_until,
    write_unit,
)

pytestmark = pytest.mark.functional


def start(fleet: Cluster, folder: Path, *units: str) -> None:
    fleet.fleetctl("start", "--no-block", *(folder / u for u in units))


def status(fleet: Cluster, unit: str) -> str:
    return fleet.fleetctl("status", unit).stdout


def stays_waiting(fleet: Cluster, unit: str, fragment: str) -> str:
    """Wait until `status` gives the reason `unit` runs nowhere; return that status."""

    def check() -> str | None:
        text = status(fleet, unit)
        ok = "Not scheduled" in text and fragment in text and unit not in fleet.running()
        return text if ok else None

    return wait_until(check, what=f"{unit} waiting because of {fragment!r}")


# -- Conflicts ----------------------------------------------------------------------------------


def test_conflicting_units_take_one_machine_each(fleet: Cluster, unit_dir: Path) -> None:
    units = [f"conflict.{i}.service" for i in range(5)]
    for unit in units:
        write_unit(unit_dir, unit, "Conflicts=conflict.*.service")
    start(fleet, unit_dir, *units)

    def three_running() -> dict[str, str] | None:
        placed = {u: m for u, m in fleet.where().items() if u in units}
        return placed if len(placed) == 3 else None

    placed = wait_until(three_running, what="three conflict units running")
    assert sorted(placed.values()) == sorted(fleet.baseline)
    waiting = sorted(set(units) - set(placed))
    for unit in waiting:
        text = stays_waiting(fleet, unit, "conflicts with conflict.")
        for machine in fleet.baseline:
            assert f"{machine}: conflicts with conflict." in text, text
        assert "(Conflicts=conflict.*.service)" in text
    # Still exactly three once every agent has had its say.
    assert len([u for u in fleet.running() if u in units]) == 3


def test_one_way_conflict(fleet: Cluster, unit_dir: Path) -> None:
    # fleet's TestScheduleOneWayConflict ran on one machine; zone us-east-1a has only core-01.
    write_unit(
        unit_dir,
        "conflicts-with-hello.service",
        "Conflicts=hello.service\nMachineMetadata=zone=us-east-1a",
    )
    write_unit(unit_dir, "hello.service", "MachineMetadata=zone=us-east-1a")
    fleet.fleetctl("start", unit_dir / "conflicts-with-hello.service")
    start(fleet, unit_dir, "hello.service")
    text = stays_waiting(fleet, "hello.service", "conflicts with conflicts-with-hello.service")
    assert "core-01: conflicts with conflicts-with-hello.service" in text
    assert fleet.running() == {"conflicts-with-hello.service": ["core-01"]}

    fleet.fleetctl("destroy", "conflicts-with-hello.service")
    running = fleet.wait_running(["hello.service"])
    assert running == {"hello.service": ["core-01"]}


def test_several_conflict_patterns_on_one_line(fleet: Cluster, unit_dir: Path) -> None:
    write_unit(unit_dir, "alpha.service", f"MachineID={fleet.ids['core-01']}")
    write_unit(unit_dir, "beta-1.service", f"MachineID={fleet.ids['core-02'][:8]}")
    fleet.fleetctl("start", unit_dir / "alpha.service", unit_dir / "beta-1.service")
    write_unit(unit_dir, "multi@.service", 'Conflicts=alpha.service "beta-*.service"')
    multis = [f"multi@{i}.service" for i in range(1, 4)]
    fleet.fleetctl("start", *(unit_dir / u for u in multis))
    placed = fleet.where()
    assert placed["alpha.service"] == "core-01"
    assert placed["beta-1.service"] == "core-02"
    assert {placed[u] for u in multis} == {"core-03"}


# -- MachineOf, MachineID -----------------------------------------------------------------------


def test_machine_of_pairs_move_together(fleet: Cluster, unit_dir: Path) -> None:
    write_unit(unit_dir, "ping@.service")
    write_unit(unit_dir, "pong@.service", "MachineOf=ping@%i.service")
    pairs = [(f"ping@{i}.service", f"pong@{i}.service") for i in range(1, 4)]
    start(fleet, unit_dir, *(u for pair in pairs for u in pair))
    fleet.wait_running([u for pair in pairs for u in pair])
    placed = fleet.where()
    for ping, pong in pairs:
        assert placed[ping] == placed[pong], placed

    victim = placed["ping@1.service"]
    fleet.halt(victim)

    def moved() -> dict[str, str] | None:
        now = fleet.where()
        gone = all(u in now and now[u] != victim for pair in pairs for u in pair)
        return now if gone else None

    after = wait_until(moved, what="pairs off the halted machine")
    for ping, pong in pairs:
        assert after[ping] == after[pong], after


def test_machine_id_pins_three_units(fleet: Cluster, unit_dir: Path) -> None:
    wanted = {"pin-a.service": "core-03", "pin-b.service": "core-01", "pin-c.service": "core-02"}
    for unit, machine in wanted.items():
        write_unit(unit_dir, unit, f"MachineID={fleet.ids[machine]}")
    fleet.fleetctl("start", *(unit_dir / u for u in wanted))
    assert fleet.where() == wanted


# -- Global -------------------------------------------------------------------------------------


def active_rows(fleet: Cluster) -> list[list[str]]:
    return [r for r in fleet.rows("list-units", "unit,machine,active") if r[2] == "active"]


def test_global_unit_leaves_and_returns_with_its_machine(fleet: Cluster) -> None:
    fleet.fleetctl("start", UNITS / "hello@1.service", UNITS / "hello@2.service")
    fleet.fleetctl("start", UNITS / "monitor.service")

    def five_rows() -> list[list[str]] | None:
        rows = active_rows(fleet)
        return rows if len(rows) == 5 else None

    rows = wait_until(five_rows, what="five active rows")
    assert (
        sorted(r[0] for r in rows)
        == ["hello@1.service", "hello@2.service"] + ["monitor.service"] * 3
    )
    assert fleet.running()["monitor.service"] == sorted(fleet.baseline)
    files = fleet.rows("list-unit-files", "unit,global,target")
    assert ["monitor.service", "true", "global"] in files

    fleet.halt("core-02")
    others = sorted(set(fleet.baseline) - {"core-02"})
    wait_until(lambda: fleet.running().get("monitor.service") == others, what="global leaves")
    fleet.wait_running(["hello@1.service", "hello@2.service"])
    assert fleet.is_active_on("core-02", "monitor.service") != "active"

    fleet.start("core-02")
    wait_until(
        lambda: fleet.running().get("monitor.service") == sorted(fleet.baseline),
        what="global back on every machine",
    )
    assert fleet.is_active_on("core-02", "monitor.service") == "active"


def test_conflicting_globals_first_by_name_wins(fleet: Cluster, unit_dir: Path) -> None:
    write_unit(unit_dir, "global-b.service", "Global=true\nConflicts=global-a.service")
    write_unit(unit_dir, "global-a.service", "Global=true\nConflicts=global-b.service")
    start(fleet, unit_dir, "global-b.service", "global-a.service")
    wait_until(
        lambda: fleet.running().get("global-a.service") == sorted(fleet.baseline),
        what="global-a on every machine",
    )
    assert "global-b.service" not in fleet.running()
    for machine in fleet.baseline:
        assert fleet.is_active_on(machine, "global-b.service") != "active"


# -- Replaces -----------------------------------------------------------------------------------


def test_replacing_unit_takes_the_replaced_units_machine(fleet: Cluster, unit_dir: Path) -> None:
    write_unit(unit_dir, "old.service")
    fleet.fleetctl("start", unit_dir / "old.service")
    where_old = fleet.where()["old.service"]
    write_unit(unit_dir, "new.service", "Replaces=old.service")
    fleet.fleetctl("start", unit_dir / "new.service")

    def settled() -> dict[str, str] | None:
        now = fleet.where()
        ok = now.get("new.service") == where_old and now.get("old.service") not in (None, where_old)
        return now if ok else None

    wait_until(settled, what="new.service on old's machine, old.service moved away")


def test_circular_replaces_runs_one(fleet: Cluster, unit_dir: Path) -> None:
    write_unit(unit_dir, "circ-a.service", "Replaces=circ-b.service")
    write_unit(unit_dir, "circ-b.service", "Replaces=circ-a.service")
    start(fleet, unit_dir, "circ-a.service", "circ-b.service")
    winner = wait_until(
        lambda: [u for u in fleet.running() if u.startswith("circ-")], what="one circ unit"
    )
    assert len(winner) == 1
    loser = "circ-b.service" if winner == ["circ-a.service"] else "circ-a.service"
    stays_waiting(fleet, loser, "replace each other")
    assert [u for u in fleet.running() if u.startswith("circ-")] == winner


# -- templates ----------------------------------------------------------------------------------


def test_template_with_metadata_specifier(fleet: Cluster, unit_dir: Path) -> None:
    write_unit(unit_dir, "meta@.service", "MachineMetadata=zone=%i")
    fleet.fleetctl("start", unit_dir / "meta@us-east-1a.service")
    assert fleet.where() == {"meta@us-east-1a.service": "core-01"}
    failed = fleet.fleetctl("start", "--block-attempts", "3", unit_dir / "meta@nowhere.service",
                            check=False)  # fmt: skip
    line = one_line_error(failed)
    assert "meta@nowhere.service not launched" in line
    assert "metadata zone=nowhere not matched" in line
    assert "meta@nowhere.service" not in fleet.running()


# -- a machine joins ----------------------------------------------------------------------------


def test_halting_a_busy_machine_moves_only_its_unit(fleet: Cluster, unit_dir: Path) -> None:
    fleet.add("core-04", "region=us-west,zone=us-west-1b")
    wait_until(lambda: "core-04" in fleet.machines_up(), what="core-04 registered")
    units = [f"excl.{i}.service" for i in range(3)]
    for unit in units:
        write_unit(unit_dir, unit, "Conflicts=excl.*.service")
    fleet.fleetctl("start", *(unit_dir / u for u in units))
    before = fleet.where()
    assert len(set(before.values())) == 3
    (free,) = {*fleet.baseline, "core-04"} - set(before.values())
    victim = before["excl.0.service"]
    fleet.halt(victim)

    def moved() -> dict[str, str] | None:
        now = fleet.where()
        return now if now.get("excl.0.service") == free else None

    after = wait_until(moved, what="excl.0 on the free machine")
    assert {u: m for u, m in after.items() if u != "excl.0.service"} == {
        u: m for u, m in before.items() if u != "excl.0.service"
    }


# -- validation ---------------------------------------------------------------------------------

INVALID = {
    "MachineID and Global": ("MachineID={id}\nGlobal=true", "cannot be combined with Global"),
    "MachineID and MachineOf": ("MachineID={id}\nMachineOf=x.service", "MachineOf"),
    "MachineID and Conflicts": ("MachineID={id}\nConflicts=x.service", "Conflicts"),
    "MachineID and Replaces": ("MachineID={id}\nReplaces=x.service", "Replaces"),
    "Global and MachineOf": ("Global=true\nMachineOf=x.service", "MachineOf"),
    "Global and Replaces": ("Global=true\nReplaces=x.service", "Replaces"),
    "Conflicts and Replaces": ("Conflicts=x.service\nReplaces=y.service", "Replaces"),
    "MachineOf itself": ("MachineOf=bad.service", "names the unit itself"),
    "MachineOf a conflict": ("MachineOf=x.service\nConflicts=x*.service", "cannot follow"),
    "bad boolean": ("Global=maybe", "not a boolean"),
    "bad metadata": ("MachineMetadata=region", "key=value"),
    "bad machine id": ("MachineID=../etc", "not a machine id"),
    "bad MachineOf name": ("MachineOf=no-suffix", "MachineOf=no-suffix"),
}


def test_invalid_x_fleet_is_refused(fleet: Cluster, unit_dir: Path) -> None:
    assert_refused(fleet, unit_dir, INVALID)
