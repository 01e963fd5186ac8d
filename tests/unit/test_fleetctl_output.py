"""fleetctl's output formats on hand-built snapshots: columns, order, --fields, --no-legend, --full
and the tab alignment of fleet's tabwriter."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetctl import output
from fleetd.model import Container, DesiredState, Machine, Owner, PublishedState
from fleetd.snapshot import Desired, Snapshot, UnitRecord
from fleetd.unitfile import content_hash

A = "2f9e13a1" + "0" * 24
B = "7c0ffee0" + "1" * 24
C = "0abc1234" + "2" * 24

HELLO = "[Unit]\nDescription=Hello World\n\n[Service]\nExecStart=/bin/sleep 1000\n"
GLOBAL = "[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nGlobal=true\n"
META = "[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nMachineMetadata=zone=nowhere\n"


def record(name: str, text: str) -> UnitRecord:
    return UnitRecord(name, text, content_hash(text), 1)


def state(
    machine_id: str, text: str, active: str = "active", sub: str = "running"
) -> PublishedState:
    return PublishedState(machine_id, "loaded", active, sub, content_hash(text), 1000.0)


def cluster() -> Snapshot:
    snap = Snapshot()
    snap.machines = {
        B: Machine(B, "10.0.0.2", {"zone": "b", "disk": "ssd"}, "0.1.0", "core-02"),
        A: Machine(A, "10.0.0.1", {}, "0.1.0", "core-01"),
        C: Machine(C, "", {"zone": "a"}, "0.1.0", ""),
    }
    snap.units = {
        "hello.service": record("hello.service", HELLO),
        "global.service": record("global.service", GLOBAL),
        "meta.service": record("meta.service", META),
        "idle.service": record("idle.service", HELLO),
    }
    snap.desired = {
        "hello.service": Desired(DesiredState.LAUNCHED, 2),
        "global.service": Desired(DesiredState.LAUNCHED, 2),
        "meta.service": Desired(DesiredState.LAUNCHED, 2),
        "idle.service": Desired(DesiredState.INACTIVE, 2),
    }
    snap.owners = {"hello.service": Owner(A, 5, 5)}
    snap.states = {
        "hello.service": {A: state(A, HELLO)},
        "global.service": {B: state(B, GLOBAL, "active", "exited"), A: state(A, GLOBAL)},
    }
    return snap


def lines(text: str) -> list[list[str]]:
    return [[cell for cell in line.split("\t") if cell] for line in text.splitlines()]


@pytest.mark.parametrize(
    ("cells", "expected"),
    [
        ([["UNIT", "SUB"], ["a", "x"]], "UNIT\tSUB\na\tx\n"),
        ([["MACHINE", "IP"], ["2f9e13a1...", "-"]], "MACHINE\t\tIP\n2f9e13a1...\t-\n"),
        ([["a" * 7, "b"], ["c" * 8, "d"]], "aaaaaaa\t\tb\ncccccccc\td\n"),
        ([["", "b"], ["", "d"]], "b\nd\n"),
        ([], ""),
    ],
    ids=["short", "wide", "tabstop", "empty-column", "no-rows"],
)
def test_tabulate_pads_with_tabs_to_tab_stops(cells: list[list[str]], expected: str) -> None:
    assert output.tabulate(cells) == expected


def reference_tabulate(lines: list[list[str]]) -> str:
    """fleet's tabwriter rule spelled out cell by cell: a column is as wide as its longest
    non-empty cell plus one, rounded up to a tab stop; every cell but a row's last is padded to
    it with tabs."""
    if not lines:
        return ""
    out = []
    for line in lines:
        text = ""
        for i, cell in enumerate(line[:-1]):
            width = max((len(row[i]) + 1 for row in lines if row[i]), default=0)
            stop = -(-width // 8) * 8
            text += cell + "\t" * (-(-(stop - len(cell)) // 8) if width else 0)
        out.append(text + line[-1] + "\n")
    return "".join(out)


@given(
    st.integers(min_value=1, max_value=4).flatmap(
        lambda count: st.lists(
            st.lists(st.text("ab-./", max_size=20), min_size=count, max_size=count), max_size=6
        )
    )
)
def test_tabulate_matches_the_rule_cell_by_cell(cells: list[list[str]]) -> None:
    assert output.tabulate(cells) == reference_tabulate(cells)


def test_tabulate_refuses_ragged_rows() -> None:
    with pytest.raises(ValueError, match="same number of cells"):
        output.tabulate([["a", "b"], ["c"]])


@pytest.mark.parametrize(
    ("fields", "full", "legend", "expected"),
    [
        (
            output.DEFAULT_MACHINE_FIELDS,
            False,
            True,
            [
                ["MACHINE", "IP", "METADATA"],
                ["0abc1234...", "-", "zone=a"],
                ["2f9e13a1...", "10.0.0.1", "-"],
                ["7c0ffee0...", "10.0.0.2", "disk=ssd,zone=b"],
            ],
        ),
        ("ip,machine", True, False, [["-", C], ["10.0.0.1", A], ["10.0.0.2", B]]),
        ("metadata", False, True, [["METADATA"], ["zone=a"], ["-"], ["disk=ssd,zone=b"]]),
    ],
    ids=["default", "fields-full-no-legend", "one-field"],
)
def test_machines_table(fields: str, full: bool, legend: bool, expected: list[list[str]]) -> None:
    assert lines(output.machines_table(cluster(), fields, full, legend)) == expected


def test_machines_table_exact_text() -> None:
    text = output.machines_table(cluster())
    assert text.splitlines()[0] == "MACHINE\t\tIP\t\tMETADATA"
    assert text.splitlines()[2] == "2f9e13a1...\t10.0.0.1\t-"


H = content_hash(HELLO)
G = content_hash(GLOBAL)


@pytest.mark.parametrize(
    ("fields", "full", "legend", "expected"),
    [
        (
            output.DEFAULT_UNIT_FIELDS,
            False,
            True,
            [
                ["UNIT", "MACHINE", "ACTIVE", "SUB"],
                ["global.service", "2f9e13a1.../10.0.0.1", "active", "running"],
                ["global.service", "7c0ffee0.../10.0.0.2", "active", "exited"],
                ["hello.service", "2f9e13a1.../10.0.0.1", "active", "running"],
                ["meta.service", "-", "-", "-"],
            ],
        ),
        (
            "unit,hash,load",
            False,
            False,
            [
                ["global.service", G[:7], "loaded"],
                ["global.service", G[:7], "loaded"],
                ["hello.service", H[:7], "loaded"],
                ["meta.service", "-", "-"],
            ],
        ),
        (
            "machine,hash",
            True,
            False,
            [[f"{A}/10.0.0.1", G], [f"{B}/10.0.0.2", G], [f"{A}/10.0.0.1", H], ["-", "-"]],
        ),
    ],
    ids=["default", "hash-short", "full"],
)
def test_units_table(fields: str, full: bool, legend: bool, expected: list[list[str]]) -> None:
    assert lines(output.units_table(cluster(), fields, full, legend)) == expected


@pytest.mark.parametrize(
    ("fields", "full", "legend", "expected"),
    [
        (
            output.DEFAULT_UNIT_FILE_FIELDS,
            False,
            True,
            [
                ["UNIT", "HASH", "DSTATE", "STATE", "TARGET"],
                ["global.service", G[:7], "launched", "-", "global"],
                ["hello.service", H[:7], "launched", "launched", "2f9e13a1.../10.0.0.1"],
                ["idle.service", H[:7], "inactive", "inactive", "-"],
                ["meta.service", content_hash(META)[:7], "launched", "inactive", "-"],
            ],
        ),
        (
            "unit,global,desc",
            False,
            False,
            [
                ["global.service", "true", "-"],
                ["hello.service", "false", "Hello World"],
                ["idle.service", "false", "Hello World"],
                ["meta.service", "false", "-"],
            ],
        ),
        (
            "hash,target",
            True,
            False,
            [
                [G, "global"],
                [H, f"{A}/10.0.0.1"],
                [H, "-"],
                [content_hash(META), "-"],
            ],
        ),
    ],
    ids=["default", "global-desc", "full"],
)
def test_unit_files_table(fields: str, full: bool, legend: bool, expected: list[list[str]]) -> None:
    assert lines(output.unit_files_table(cluster(), fields, full, legend)) == expected


def test_unit_files_state_follows_the_owners_report() -> None:
    snap = cluster()
    snap.states["hello.service"] = {A: state(A, HELLO, "inactive", "dead")}
    assert "loaded" in lines(output.unit_files_table(snap, "unit,state", False, False))[1]


@pytest.mark.parametrize(
    ("table", "spec", "valid"),
    [
        (output.machines_table, "machine,zone", "machine, ip, metadata"),
        (output.units_table, "unit,nope", "unit, load, active, sub, machine, hash"),
        (output.unit_files_table, "", "unit, global, dstate, state, target, hash, desc"),
    ],
)
def test_unknown_fields_name_the_valid_ones(
    table: Callable[[Snapshot, str], str], spec: str, valid: str
) -> None:
    with pytest.raises(output.UnknownField) as info:
        table(cluster(), spec)
    assert valid in str(info.value)
    assert "\n" not in str(info.value)


def test_empty_registry_prints_only_the_legend() -> None:
    assert output.units_table(Snapshot()) == "UNIT\tMACHINE\tACTIVE\tSUB\n"
    assert output.unit_files_table(Snapshot(), legend=False) == ""


def test_status_of_a_running_unit() -> None:
    snap = cluster()
    text = output.status_block(snap, snap.units["hello.service"], now=1042.0)
    got = text.splitlines()
    assert got[0] == "● hello.service - Hello World"
    assert got[1] == "   Machine: 2f9e13a1.../10.0.0.1 (core-01)"
    assert got[2] == "    Loaded: loaded"
    assert got[3].startswith("    Active: active (running) since ")
    assert got[3].endswith("; 42s ago")
    assert got[4:] == ["   Desired: launched", f"      Hash: {H}"]


def test_status_of_a_global_unit_has_a_block_per_machine() -> None:
    snap = cluster()
    text = output.status_block(snap, snap.units["global.service"], now=1000.0)
    assert text.count("● global.service") == 2
    assert "(core-02)" in text and "(core-01)" in text


def test_status_of_an_unschedulable_unit_gives_each_machines_reason() -> None:
    snap = cluster()
    text = output.status_block(snap, snap.units["meta.service"])
    got = text.splitlines()
    assert got[0] == "● meta.service"
    assert "Not scheduled:" in got
    assert "  core-01: metadata zone=nowhere not matched" in got
    assert "  0abc1234: metadata zone=nowhere not matched" in got


def test_status_of_an_inactive_unit_gives_one_reason() -> None:
    snap = cluster()
    text = output.status_block(snap, snap.units["idle.service"])
    assert "Not scheduled: desired state is inactive" in text.splitlines()


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0, "0s ago"),
        (59, "59s ago"),
        (61, "1min 1s ago"),
        (3700, "1h 1min ago"),
        (90000, "1d 1h ago"),
    ],
)
def test_format_ago(seconds: float, expected: str) -> None:
    assert output.format_ago(seconds) == expected


def test_status_of_a_container_unit_shows_its_container() -> None:
    snap = cluster()
    snap.states["hello.service"] = {
        A: replace(state(A, HELLO), container=Container("5210e58a269e" + "f" * 52, "localhost/x:1"))
    }
    got = output.status_block(snap, snap.units["hello.service"], now=1042.0).splitlines()
    assert got[3].startswith("    Active: active (running)")
    assert got[4] == " Container: 5210e58a269e (image localhost/x:1)"
    assert got[5] == "   Desired: launched"


def test_status_of_a_unit_stopping_for_a_move_says_where_and_why() -> None:
    snap = cluster()
    snap.states["hello.service"] = {
        A: PublishedState(A, "loaded", "deactivating", "stop-sigterm", H, 1000.0,
                          "replaced by new.service (Replaces=hello.service)")
    }
    got = output.status_block(snap, snap.units["hello.service"], now=1001.0).splitlines()
    assert got[3].startswith("    Active: deactivating (stop-sigterm)")
    assert got[4] == (
        "    Moving: stopping on core-01: replaced by new.service (Replaces=hello.service)"
    )


BAD_TEXT = "[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nGlobal=true\nMachineOf=x.service\n"


def test_refused_units_and_registry_entries_are_listed_with_the_reason() -> None:
    snap = cluster()
    snap.units["bad.service"] = record("bad.service", BAD_TEXT)
    snap.desired["bad.service"] = Desired(DesiredState.LAUNCHED, 2)
    snap.refused = {
        "/fleet/unit/.x.service": "unit name '.x.service' must not start with '.'",
        "/fleet/desired/hello.service": "undecodable value: ValueError: 'on' is not valid",
    }
    rows = lines(output.unit_files_table(snap, "unit,state,desc", False, False))
    assert rows[0][:2] == ["bad.service", "refused"] and "MachineOf" in rows[0][2]
    assert rows[-1] == [
        "/fleet/unit/.x.service", "refused", "unit name '.x.service' must not start with '.'"
    ]
    messages = output.refused_messages(snap)
    assert len(messages) == 3
    assert output.refused_messages(snap, ["hello.service"]) == [
        "registry entry /fleet/desired/hello.service is refused by every agent: "
        "undecodable value: ValueError: 'on' is not valid (not written by fleetctl; remove it "
        "with: etcdctl del '/fleet/desired/hello.service')"
    ]
    status = output.status_block(snap, snap.units["bad.service"]).splitlines()
    assert status[-1].startswith("Refused by every agent: ") and "MachineOf" in status[-1]
