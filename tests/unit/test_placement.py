"""The placement pipeline on hand-built snapshots: each checker and scorer alone, then whole
planning passes (overlay, spread, Replaces, followers, global units), `recheck`, `explain` and the
claim guards. Hypothesis properties at the end compare random plans against a small independent
checker of the hard rules written here, not against the placement module itself."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetd.model import DesiredState, Machine, Owner
from fleetd.placement import (
    PLANNED,
    Placement,
    View,
    check_conflicts,
    check_limits,
    check_machine_id,
    check_machine_of,
    check_metadata,
    check_region_conflicts,
    check_region_of,
    check_replaced,
    check_topology,
    check_zone_conflicts,
    check_zone_of,
    claim_guards,
    explain,
    glob_literal_prefix,
    machines_running_global,
    pending_units,
    plan_placements,
    rank,
    recheck,
    score_replaces,
    score_spread,
    score_tiebreak,
    unit_blocked,
)
from fleetd.snapshot import Desired, Snapshot, UnitRecord
from fleetd.unitfile import content_hash, glob_match, template_group

# ---------------------------------------------------------------------------------- builders

Meta = Mapping[str, str]


def text(xfleet: str = "") -> str:
    body = "[Unit]\nDescription=t\n\n[Service]\nExecStart=/bin/sleep 100\n"
    return body + (f"\n[X-Fleet]\n{xfleet}\n" if xfleet else "")


def cluster(
    machines: Mapping[str, Meta],
    units: Mapping[str, str],
    owners: Mapping[str, str] | None = None,
    desired: Mapping[str, DesiredState] | None = None,
) -> Snapshot:
    """A snapshot: machines by id with metadata, units by name with their [X-Fleet] lines, and
    owners (unit -> machine) whose claim revisions follow the order given: earlier is older."""
    snap = Snapshot(revision=1000)
    for machine_id, metadata in machines.items():
        snap.machines[machine_id] = Machine(machine_id, metadata=dict(metadata), name=machine_id)
    for revision, (name, xfleet) in enumerate(units.items(), start=1):
        body = text(xfleet)
        snap.units[name] = UnitRecord(name, body, content_hash(body), revision)
        state = (desired or {}).get(name, DesiredState.LAUNCHED)
        snap.desired[name] = Desired(state, revision)
    for revision, (name, machine_id) in enumerate((owners or {}).items(), start=100):
        snap.owners[name] = Owner(machine_id, revision, revision + 1)
    return snap


def placed(plan: Mapping[str, Placement]) -> dict[str, str]:
    return {u: p.ranked[0] for u, p in plan.items() if p.ranked}


ZONED = {
    "m1": {"zone": "z1", "region": "r1"},
    "m2": {"zone": "z1", "region": "r1"},
    "m3": {"zone": "z2", "region": "r1"},
    "m4": {"zone": "z3", "region": "r2"},
    "bare": {},
}


def verdict_of(checker, snap: Snapshot, unit: str, machine: str, before: int | None = None):  # type: ignore[no-untyped-def]
    view = View(snap)
    return checker(unit, view.requirements[unit], view.machines[machine], view, before)


# --------------------------------------------------------------------------------- checkers

CHECKER_CASES = [
    # (id, checker, units, owners, unit, machine, ok, reason)
    (
        "machine-id ok",
        check_machine_id,
        {"u.service": "MachineID=m1"},
        {},
        "u.service",
        "m1",
        True,
        "",
    ),
    (
        "machine-id other",
        check_machine_id,
        {"u.service": "MachineID=m1"},
        {},
        "u.service",
        "m3",
        False,
        "unit is pinned to MachineID=m1",
    ),
    ("machine-id none", check_machine_id, {"u.service": ""}, {}, "u.service", "m3", True, ""),
    (
        "metadata match",
        check_metadata,
        {"u.service": "MachineMetadata=zone=z1"},
        {},
        "u.service",
        "m1",
        True,
        "",
    ),
    (
        "metadata or",
        check_metadata,
        {"u.service": "MachineMetadata=zone=z1 zone=z2"},
        {},
        "u.service",
        "m3",
        True,
        "",
    ),
    (
        "metadata or miss",
        check_metadata,
        {"u.service": "MachineMetadata=zone=z1 zone=z2"},
        {},
        "u.service",
        "m4",
        False,
        "metadata zone=z1 or zone=z2 not matched",
    ),
    (
        "metadata and",
        check_metadata,
        {"u.service": "MachineMetadata=zone=z1 region=r2"},
        {},
        "u.service",
        "m1",
        False,
        "metadata region=r2 not matched",
    ),
    (
        "metadata missing key",
        check_metadata,
        {"u.service": "MachineMetadata=zone=z1"},
        {},
        "u.service",
        "bare",
        False,
        "metadata zone=z1 not matched",
    ),
    (
        "metadata negated",
        check_metadata,
        {"u.service": "MachineMetadata=zone!=z1"},
        {},
        "u.service",
        "m1",
        False,
        "metadata zone!=z1 excluded",
    ),
    (
        "metadata negated other",
        check_metadata,
        {"u.service": "MachineMetadata=zone!=z1"},
        {},
        "u.service",
        "m3",
        True,
        "",
    ),
    (
        "metadata negated absent key",
        check_metadata,
        {"u.service": "MachineMetadata=zone!=z1"},
        {},
        "u.service",
        "bare",
        True,
        "",
    ),
    (
        "topology zone",
        check_topology,
        {"u.service": "ZoneConflicts=x.service"},
        {},
        "u.service",
        "bare",
        False,
        "machine has no zone metadata, which the unit's zone rules need",
    ),
    (
        "topology region",
        check_topology,
        {"u.service": "RegionOf=x.service"},
        {"x.service": "m1"},
        "u.service",
        "bare",
        False,
        "machine has no region metadata, which the unit's region rules need",
    ),
    (
        "topology ok",
        check_topology,
        {"u.service": "ZoneConflicts=x.service"},
        {},
        "u.service",
        "m1",
        True,
        "",
    ),
    (
        "machine-of same",
        check_machine_of,
        {"u.service": "MachineOf=x.service", "x.service": ""},
        {"x.service": "m1"},
        "u.service",
        "m1",
        True,
        "",
    ),
    (
        "machine-of other",
        check_machine_of,
        {"u.service": "MachineOf=x.service", "x.service": ""},
        {"x.service": "m1"},
        "u.service",
        "m2",
        False,
        "MachineOf=x.service: x.service runs in another machine (m1)",
    ),
    (
        "machine-of unplaced",
        check_machine_of,
        {"u.service": "MachineOf=x.service", "x.service": ""},
        {},
        "u.service",
        "m2",
        False,
        "waits for x.service to be scheduled (MachineOf=x.service)",
    ),
    (
        "zone-of same zone",
        check_zone_of,
        {"u.service": "ZoneOf=x.service", "x.service": ""},
        {"x.service": "m1"},
        "u.service",
        "m2",
        True,
        "",
    ),
    (
        "zone-of other zone",
        check_zone_of,
        {"u.service": "ZoneOf=x.service", "x.service": ""},
        {"x.service": "m1"},
        "u.service",
        "m3",
        False,
        "ZoneOf=x.service: x.service runs in another zone (m1)",
    ),
    (
        "zone-of peer without zone",
        check_zone_of,
        {"u.service": "ZoneOf=x.service", "x.service": ""},
        {"x.service": "bare"},
        "u.service",
        "m1",
        False,
        "ZoneOf=x.service: x.service runs in another zone (bare)",
    ),
    (
        "region-of same region",
        check_region_of,
        {"u.service": "RegionOf=x.service", "x.service": ""},
        {"x.service": "m1"},
        "u.service",
        "m3",
        True,
        "",
    ),
    (
        "region-of other region",
        check_region_of,
        {"u.service": "RegionOf=x.service", "x.service": ""},
        {"x.service": "m1"},
        "u.service",
        "m4",
        False,
        "RegionOf=x.service: x.service runs in another region (m1)",
    ),
    (
        "conflicts mine",
        check_conflicts,
        {"u.service": "Conflicts=x*", "x1.service": ""},
        {"x1.service": "m1"},
        "u.service",
        "m1",
        False,
        "conflicts with x1.service (Conflicts=x*)",
    ),
    (
        "conflicts theirs",
        check_conflicts,
        {"u.service": "", "x1.service": "Conflicts=u.service"},
        {"x1.service": "m1"},
        "u.service",
        "m1",
        False,
        "conflicts with x1.service (Conflicts=u.service)",
    ),
    (
        "conflicts elsewhere",
        check_conflicts,
        {"u.service": "Conflicts=x*", "x1.service": ""},
        {"x1.service": "m1"},
        "u.service",
        "m2",
        True,
        "",
    ),
    (
        "zone conflicts mine",
        check_zone_conflicts,
        {"u.service": "ZoneConflicts=db*", "db1.service": ""},
        {"db1.service": "m1"},
        "u.service",
        "m2",
        False,
        "zone z1 already runs db1.service (ZoneConflicts=db*)",
    ),
    (
        "zone conflicts theirs",
        check_zone_conflicts,
        {"u.service": "", "db1.service": "ZoneConflicts=u.service"},
        {"db1.service": "m1"},
        "u.service",
        "m2",
        False,
        "zone z1 already runs db1.service (ZoneConflicts=u.service)",
    ),
    (
        "zone conflicts other zone",
        check_zone_conflicts,
        {"u.service": "ZoneConflicts=db*", "db1.service": ""},
        {"db1.service": "m1"},
        "u.service",
        "m3",
        True,
        "",
    ),
    (
        "region conflicts",
        check_region_conflicts,
        {"u.service": "RegionConflicts=db*", "db1.service": ""},
        {"db1.service": "m1"},
        "u.service",
        "m3",
        False,
        "region r1 already runs db1.service (RegionConflicts=db*)",
    ),
    (
        "region conflicts other region",
        check_region_conflicts,
        {"u.service": "RegionConflicts=db*", "db1.service": ""},
        {"db1.service": "m1"},
        "u.service",
        "m4",
        True,
        "",
    ),
    (
        "max per machine",
        check_limits,
        {"w@1.service": "MaxPerMachine=1", "w@2.service": "MaxPerMachine=1"},
        {"w@1.service": "m1"},
        "w@2.service",
        "m1",
        False,
        "MaxPerMachine=1 reached on m1",
    ),
    (
        "max per machine other",
        check_limits,
        {"w@1.service": "MaxPerMachine=1", "w@2.service": "MaxPerMachine=1"},
        {"w@1.service": "m1"},
        "w@2.service",
        "m2",
        True,
        "",
    ),
    (
        "max per zone",
        check_limits,
        {"w@1.service": "MaxPerZone=1", "w@2.service": "MaxPerZone=1"},
        {"w@1.service": "m1"},
        "w@2.service",
        "m2",
        False,
        "MaxPerZone=1 reached in z1",
    ),
    (
        "max per zone two",
        check_limits,
        {"w@1.service": "MaxPerZone=2", "w@2.service": "MaxPerZone=2"},
        {"w@1.service": "m1"},
        "w@2.service",
        "m2",
        True,
        "",
    ),
    (
        "max per region",
        check_limits,
        {"w@1.service": "MaxPerRegion=1", "w@2.service": "MaxPerRegion=1"},
        {"w@1.service": "m1"},
        "w@2.service",
        "m3",
        False,
        "MaxPerRegion=1 reached in r1",
    ),
    (
        "limit counts only the group",
        check_limits,
        {"v@1.service": "", "w@2.service": "MaxPerMachine=1"},
        {"v@1.service": "m1"},
        "w@2.service",
        "m1",
        True,
        "",
    ),
    (
        "replaced here",
        check_replaced,
        {"new.service": "Replaces=old.service", "old.service": ""},
        {"new.service": "m1"},
        "old.service",
        "m1",
        False,
        "replaced by new.service (Replaces=old.service)",
    ),
    (
        "replaced elsewhere",
        check_replaced,
        {"new.service": "Replaces=old.service", "old.service": ""},
        {"new.service": "m1"},
        "old.service",
        "m2",
        True,
        "",
    ),
    (
        "mutual replace",
        check_replaced,
        {"a.service": "Replaces=b.service", "b.service": "Replaces=a.service"},
        {"a.service": "m1"},
        "b.service",
        "m3",
        False,
        "a.service runs on m1 and the two replace each other",
    ),
]


@pytest.mark.parametrize(
    ("checker", "units", "owners", "unit", "machine", "ok", "reason"),
    [pytest.param(*case[1:], id=case[0]) for case in CHECKER_CASES],
)
def test_checker(  # type: ignore[no-untyped-def]
    checker, units, owners, unit, machine, ok, reason
) -> None:
    verdict = verdict_of(checker, cluster(ZONED, units, owners), unit, machine)
    assert verdict.ok is ok
    assert verdict.reason == reason


def test_conflicts_with_before_only_see_older_claims() -> None:
    snap = cluster(
        ZONED,
        {"a.service": "Conflicts=b.service", "b.service": ""},
        {"a.service": "m1", "b.service": "m1"},
    )
    a_rev, b_rev = snap.owners["a.service"].revision, snap.owners["b.service"].revision
    assert a_rev < b_rev
    assert verdict_of(check_conflicts, snap, "a.service", "m1", a_rev).ok
    verdict = verdict_of(check_conflicts, snap, "b.service", "m1", b_rev)
    assert verdict.reason == "conflicts with a.service (Conflicts=b.service)"


def test_conflicts_with_a_global_unit_on_the_machine() -> None:
    snap = cluster(ZONED, {"g.service": "Global=true", "u.service": "Conflicts=g.service"})
    verdict = verdict_of(check_conflicts, snap, "u.service", "m1")
    assert verdict.reason == "conflicts with g.service (Conflicts=g.service)"


def test_machine_of_a_global_unit_follows_it_where_it_runs() -> None:
    snap = cluster(
        ZONED,
        {"g.service": "Global=true\nMachineMetadata=zone=z1", "u.service": "MachineOf=g.service"},
    )
    assert verdict_of(check_machine_of, snap, "u.service", "m1").ok
    assert not verdict_of(check_machine_of, snap, "u.service", "m3").ok


# ----------------------------------------------------------------------------------- scorers


def test_score_replaces_prefers_the_replaced_units_machine() -> None:
    snap = cluster(
        ZONED, {"new.service": "Replaces=old.service", "old.service": ""}, {"old.service": "m3"}
    )
    view = View(snap)
    req = view.requirements["new.service"]
    scores = {m: score_replaces("new.service", req, view.machines[m], view) for m in view.machines}
    assert scores == {"m1": (1,), "m2": (1,), "m3": (0,), "m4": (1,), "bare": (1,)}
    order = rank("new.service", req, view.machines.values(), view)
    assert order[0] == "m3"


def test_score_spread_for_plain_units_is_the_load() -> None:
    snap = cluster(
        ZONED,
        {"a.service": "", "b.service": "", "c.service": ""},
        {"a.service": "m1", "b.service": "m1"},
    )
    view = View(snap)
    req = view.requirements["c.service"]
    assert score_spread("c.service", req, view.machines["m1"], view) == (2,)
    assert score_spread("c.service", req, view.machines["m2"], view) == (0,)


@pytest.mark.parametrize(
    ("spread", "machine", "expected"),
    [
        # w@1 on m1 (z1, r1) and w@2 on m3 (z2, r1); x.service on m2 adds load only.
        ("zone", "m1", (1, 1, 1)),
        ("zone", "m2", (1, 0, 1)),
        ("zone", "m4", (0, 0, 0)),
        ("machine", "m2", (0, 1)),
        ("machine", "m1", (1, 1)),
        ("region", "m2", (2, 1, 0, 1)),
        ("region", "m4", (0, 0, 0, 0)),
        ("none", "m1", (1,)),
    ],
)
def test_score_spread_for_template_instances(
    spread: str, machine: str, expected: tuple[int, ...]
) -> None:
    xfleet = f"Spread={spread}"
    snap = cluster(
        ZONED,
        {
            "w@1.service": xfleet,
            "w@2.service": xfleet,
            "w@3.service": xfleet,
            "x.service": "",
        },
        {"w@1.service": "m1", "w@2.service": "m3", "x.service": "m2"},
    )
    view = View(snap)
    req = view.requirements["w@3.service"]
    assert score_spread("w@3.service", req, view.machines[machine], view) == expected


def test_tiebreak_is_stable_and_differs_per_unit() -> None:
    snap = cluster({f"m{i}": {} for i in range(8)}, {"a.service": "", "b.service": ""})
    view = View(snap)
    req = view.requirements["a.service"]
    firsts = set()
    for unit in (f"u{i}.service" for i in range(20)):
        order = sorted(
            view.machines, key=lambda m, u=unit: score_tiebreak(u, req, view.machines[m], view)
        )
        again = sorted(
            view.machines, key=lambda m, u=unit: score_tiebreak(u, req, view.machines[m], view)
        )
        assert order == again
        firsts.add(order[0])
    assert len(firsts) > 1


# ------------------------------------------------------------------------------ whole passes


def test_mutually_conflicting_pending_units_never_share_a_machine() -> None:
    units = {f"c{i}.service": "Conflicts=c*.service" for i in range(5)}
    snap = cluster({"m1": {}, "m2": {}, "m3": {}}, units)
    plan = plan_placements(snap)
    where = placed(plan)
    assert len(where) == 3
    assert sorted(where.values()) == ["m1", "m2", "m3"]
    for unit in set(units) - set(where):
        assert set(plan[unit].refusals) == {"m1", "m2", "m3"}
        assert all(r.startswith("conflicts with c") for r in plan[unit].refusals.values())


def test_one_way_conflict_keeps_pending_units_apart() -> None:
    snap = cluster({"m1": {}, "m2": {}}, {"a.service": "Conflicts=b.service", "b.service": ""})
    where = placed(plan_placements(snap))
    assert where["a.service"] != where["b.service"]


def test_max_per_zone_holds_within_one_pass() -> None:
    units = {f"w@{i}.service": "MaxPerZone=1" for i in range(1, 7)}
    snap = cluster(ZONED, units)
    plan = plan_placements(snap)
    zones = Counter(ZONED[m]["zone"] for m in placed(plan).values())
    assert zones == {"z1": 1, "z2": 1, "z3": 1}
    waiting = [u for u, p in plan.items() if not p.ranked]
    assert len(waiting) == 3
    for unit in waiting:
        reasons = plan[unit].refusals
        assert reasons["bare"] == "machine has no zone metadata, which the unit's zone rules need"
        assert {reasons[m] for m in ("m1", "m2")} == {"MaxPerZone=1 reached in z1"}


def test_ten_instances_on_three_machines_are_planned_four_three_three() -> None:
    snap = cluster({"m1": {}, "m2": {}, "m3": {}}, {f"web@{i}.service": "" for i in range(10)})
    counts = Counter(placed(plan_placements(snap)).values())
    assert sorted(counts.values()) == [3, 3, 4]


def test_nine_instances_on_six_machines_in_three_zones_are_three_per_zone() -> None:
    machines = {f"m{i}": {"zone": f"z{i % 3}"} for i in range(6)}
    snap = cluster(machines, {f"web@{i}.service": "" for i in range(9)})
    where = placed(plan_placements(snap))
    assert Counter(machines[m]["zone"] for m in where.values()) == {"z0": 3, "z1": 3, "z2": 3}
    # Within a zone the machines share too: 2 and 1, never 3 and 0.
    assert max(Counter(where.values()).values()) == 2


def test_instances_spread_around_units_already_owned() -> None:
    machines = {"m1": {}, "m2": {}}
    units = {f"web@{i}.service": "" for i in range(4)}
    snap = cluster(machines, units, {"web@0.service": "m1", "web@1.service": "m1"})
    where = placed(plan_placements(snap))
    assert where == {"web@2.service": "m2", "web@3.service": "m2"}


def test_replacer_goes_to_the_replaced_units_machine_and_pushes_it_away() -> None:
    machines = {"m1": {}, "m2": {}, "m3": {}}
    units = {"new.service": "Replaces=old.service", "old.service": ""}
    snap = cluster(machines, units, {"old.service": "m2"})
    plan = plan_placements(snap)
    assert plan["new.service"].ranked[0] == "m2"
    # Once the replacer holds m2, the replaced unit may not stay, and is planned elsewhere.
    after = cluster(machines, units, {"old.service": "m2", "new.service": "m2"})
    verdict = recheck(after, "old.service", "m2")
    assert verdict.reason == "replaced by new.service (Replaces=old.service)"
    assert recheck(after, "new.service", "m2").ok
    moved = cluster(machines, units, {"new.service": "m2"})
    replan = plan_placements(moved)["old.service"]
    assert replan.refusals == {"m2": "replaced by new.service (Replaces=old.service)"}
    assert set(replan.ranked) == {"m1", "m3"}


def test_circular_replaces_places_only_one() -> None:
    snap = cluster(
        {"m1": {}, "m2": {}}, {"a.service": "Replaces=b.service", "b.service": "Replaces=a.service"}
    )
    plan = plan_placements(snap)
    assert list(placed(plan)) == ["a.service"]
    where = plan["a.service"].ranked[0]
    assert plan["b.service"].refusals == {
        m: f"a.service runs on {where} and the two replace each other" for m in ("m1", "m2")
    }


def test_circular_replaces_older_claim_keeps_running() -> None:
    units = {"a.service": "Replaces=b.service", "b.service": "Replaces=a.service"}
    snap = cluster({"m1": {}, "m2": {}}, units, {"b.service": "m1", "a.service": "m2"})
    assert recheck(snap, "b.service", "m1").ok
    assert recheck(snap, "a.service", "m2").reason == (
        "b.service runs on m1 and the two replace each other"
    )


def test_followers_are_planned_after_their_leader() -> None:
    units = {
        "a-follower.service": "MachineOf=z-leader.service",
        "b-follower.service": "MachineOf=a-follower.service",
        "z-leader.service": "",
    }
    snap = cluster({f"m{i}": {} for i in range(5)}, units)
    view = View(snap)
    assert pending_units(snap, view) == [
        "z-leader.service",
        "a-follower.service",
        "b-follower.service",
    ]
    plan = plan_placements(snap, view)
    leader = plan["z-leader.service"].ranked[0]
    assert plan["a-follower.service"].ranked == (leader,)
    assert plan["b-follower.service"].ranked == (leader,)


def test_mutual_machine_of_blocks_both_with_a_reason() -> None:
    units = {"a.service": "MachineOf=b.service", "b.service": "MachineOf=a.service"}
    plan = plan_placements(cluster({"m1": {}, "m2": {}}, units))
    assert placed(plan) == {}
    assert plan["a.service"].refusals == {
        m: "waits for b.service to be scheduled (MachineOf=b.service)" for m in ("m1", "m2")
    }
    assert plan["b.service"].refusals == {
        m: "waits for a.service to be scheduled (MachineOf=a.service)" for m in ("m1", "m2")
    }


def test_zone_of_follower_goes_to_the_leaders_zone() -> None:
    snap = cluster(ZONED, {"l.service": "MachineID=m3", "f.service": "ZoneOf=l.service"})
    plan = plan_placements(snap)
    assert plan["l.service"].ranked == ("m3",)
    assert plan["f.service"].ranked == ("m3",)


def test_global_units_run_everywhere_they_match() -> None:
    snap = cluster(
        ZONED,
        {
            "all.service": "Global=true",
            "z1only.service": "Global=true\nMachineMetadata=zone=z1",
            "off.service": "Global=true",
        },
        desired={"off.service": DesiredState.INACTIVE},
    )
    view = View(snap)
    assert view.globals_on["m1"] == ["all.service", "z1only.service"]
    assert view.globals_on["m3"] == ["all.service"]
    assert machines_running_global(snap, "z1only.service") == ["m1", "m2"]
    assert machines_running_global(snap, "off.service") == []
    # Global units are never claimed, so never pending.
    assert plan_placements(snap) == {}


def test_conflicting_global_units_first_by_name_wins() -> None:
    snap = cluster(
        {"m1": {}, "m2": {}},
        {
            "b-global.service": "Global=true\nConflicts=a-global.service",
            "a-global.service": "Global=true",
        },
    )
    view = View(snap)
    assert view.globals_on == {"m1": ["a-global.service"], "m2": ["a-global.service"]}


def test_owned_unit_keeps_a_conflicting_global_off_its_machine() -> None:
    snap = cluster(
        {"m1": {}, "m2": {}},
        {"g.service": "Global=true\nConflicts=x.service", "x.service": ""},
        {"x.service": "m1"},
    )
    assert machines_running_global(snap, "g.service") == ["m2"]


def test_blocked_units_say_why_for_every_machine() -> None:
    snap = cluster(
        {"m1": {}},
        {"t@.service": "", "off.service": "", "bad.service": "MachineID=x\nGlobal=true"},
        desired={"off.service": DesiredState.INACTIVE},
    )
    view = View(snap)
    assert unit_blocked(snap, view, "t@.service") == (
        "cannot activate a template: start an instance such as t@1.service"
    )
    assert unit_blocked(snap, view, "off.service") == "desired state is inactive"
    assert unit_blocked(snap, view, "gone.service") == "unit is not in the registry"
    assert "MachineID cannot be combined with Global" in unit_blocked(snap, view, "bad.service")
    plan = plan_placements(snap)
    assert "off.service" not in plan
    assert plan["t@.service"].blocked.startswith("cannot activate a template")
    empty = cluster({}, {"u.service": ""})
    assert plan_placements(empty)["u.service"].blocked == "no machines are in the cluster"


def test_owners_on_vanished_machines_do_not_count() -> None:
    snap = cluster(
        {"m1": {}}, {"a.service": "Conflicts=b.service", "b.service": ""}, {"b.service": "gone"}
    )
    view = View(snap)
    assert "b.service" not in view.location
    assert plan_placements(snap, view)["a.service"].ranked == ("m1",)


# ---------------------------------------------------------------------------------- recheck


def test_recheck_older_claim_wins_conflicts() -> None:
    snap = cluster(
        {"m1": {}, "m2": {}},
        {"a.service": "Conflicts=b.service", "b.service": ""},
        {"b.service": "m1", "a.service": "m1"},
    )
    assert recheck(snap, "b.service", "m1").ok
    assert recheck(snap, "a.service", "m1").reason == (
        "conflicts with b.service (Conflicts=b.service)"
    )


def test_recheck_older_claims_win_limits() -> None:
    units = {f"w@{i}.service": "MaxPerZone=2" for i in range(3)}
    owners = {"w@0.service": "m1", "w@1.service": "m2", "w@2.service": "m1"}
    snap = cluster(ZONED, units, owners)
    assert recheck(snap, "w@0.service", "m1").ok
    assert recheck(snap, "w@1.service", "m2").ok
    assert recheck(snap, "w@2.service", "m1").reason == "MaxPerZone=2 reached in z1"


def test_recheck_refuses_what_no_longer_matches() -> None:
    snap = cluster(ZONED, {"u.service": "MachineMetadata=zone=z2"}, {"u.service": "m1"})
    assert recheck(snap, "u.service", "m1").reason == "metadata zone=z2 not matched"
    assert recheck(snap, "u.service", "gone").reason == "machine is not in the cluster"
    inactive = cluster(
        ZONED, {"u.service": ""}, {"u.service": "m1"}, {"u.service": DesiredState.INACTIVE}
    )
    assert recheck(inactive, "u.service", "m1").reason == "desired state is inactive"


def test_recheck_of_a_planned_unit_counts_every_real_claim() -> None:
    snap = cluster(
        {"m1": {}}, {"a.service": "Conflicts=b.service", "b.service": ""}, {"b.service": "m1"}
    )
    view = View(snap)
    view.place("a.service", "m1")
    assert view.revision["a.service"] == PLANNED
    assert not recheck(snap, "a.service", "m1", view).ok


# ---------------------------------------------------------------------------------- explain


def test_explain_gives_every_machines_verdict_without_the_unit_itself() -> None:
    snap = cluster(
        ZONED,
        {
            "db@1.service": "ZoneConflicts=db@*.service",
            "db@2.service": "ZoneConflicts=db@*.service",
        },
        {"db@1.service": "m1"},
    )
    why = explain(snap, "db@2.service")
    assert why.refusals == {
        "m1": "zone z1 already runs db@1.service (ZoneConflicts=db@*.service)",
        "m2": "zone z1 already runs db@1.service (ZoneConflicts=db@*.service)",
        "bare": "machine has no zone metadata, which the unit's zone rules need",
    }
    assert set(why.ranked) == {"m3", "m4"}
    # An owned unit is explained as if it were not placed: its own machine stays feasible.
    mine = explain(snap, "db@1.service")
    assert "m1" in mine.ranked
    assert explain(snap, "nope.service").blocked == "unit is not in the registry"


# ----------------------------------------------------------------------------- claim guards


@pytest.mark.parametrize(
    ("pattern", "prefix"),
    [
        ("web@*.service", "web@"),
        ("a.service", "a.service"),
        ("*", ""),
        ("x?y", "x"),
        ("db[12].service", "db"),
    ],
)
def test_glob_literal_prefix(pattern: str, prefix: str) -> None:
    assert glob_literal_prefix(pattern) == prefix


def test_claim_guards_prefixes_come_from_every_pattern() -> None:
    snap = cluster(
        ZONED,
        {
            "u@1.service": "Conflicts=web@*.service\nZoneConflicts=db?.service\n"
            "RegionConflicts=cache.service\nMaxPerZone=2",
            "r.service": "Replaces=old*.service",
        },
    )
    assert claim_guards(snap, "u@1.service").prefixes == frozenset(
        {"web@", "db", "cache.service", "u@"}
    )
    assert claim_guards(snap, "r.service").prefixes == frozenset({"old"})


def test_claim_guards_exact_revisions_of_peers_and_of_units_that_name_this_one() -> None:
    snap = cluster(
        {"m1": {}, "m2": {}},
        {
            "f.service": "MachineOf=lead.service\nZoneOf=zl.service\nRegionOf=rl.service",
            "lead.service": "",
            "zl.service": "",
            "rl.service": "",
            "hater.service": "Conflicts=f*.service",
            "zhater.service": "ZoneConflicts=f.service",
            "replacer.service": "Replaces=f.service",
            "bystander.service": "Conflicts=x.service",
        },
        {"lead.service": "m1", "hater.service": "m2"},
    )
    guards = claim_guards(snap, "f.service")
    assert guards.exact == {
        "lead.service": snap.owners["lead.service"].mod_revision,
        "zl.service": 0,
        "rl.service": 0,
        "hater.service": snap.owners["hater.service"].mod_revision,
        "zhater.service": 0,
        "replacer.service": 0,
    }
    assert guards.prefixes == frozenset()
    # The agent passes the snapshot's View, whose rule indexes find the same units.
    assert claim_guards(snap, "f.service", View(snap)) == guards


def test_claim_guards_of_an_unlimited_plain_unit_are_empty() -> None:
    snap = cluster({"m1": {}}, {"p.service": "", "q@1.service": ""})
    assert claim_guards(snap, "p.service").exact == {}
    assert claim_guards(snap, "p.service").prefixes == frozenset()
    assert claim_guards(snap, "q@1.service").prefixes == frozenset()
    assert claim_guards(snap, "missing.service").prefixes == frozenset()


# ------------------------------------------------------------------------------ properties

NAMES = [
    "a.service",
    "b.service",
    "c.service",
    *(f"web@{i}.service" for i in range(1, 5)),
    *(f"db@{i}.service" for i in range(1, 4)),
]
PATTERNS = ["a.service", "b*.service", "web@*.service", "db@1.service", "db@*.service", "?.service"]
ZONES = ["z1", "z2", "z3", None]


@st.composite
def random_clusters(draw: st.DrawFn) -> tuple[Snapshot, dict[str, dict[str, object]]]:
    machine_count = draw(st.integers(1, 6))
    machines: dict[str, dict[str, str]] = {}
    for i in range(machine_count):
        zone = draw(st.sampled_from(ZONES))
        machines[f"m{i}"] = {"zone": zone} if zone else {}
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=len(NAMES), unique=True))
    # A template group shares one limit, as instances of one template file would.
    group_limit = {g: draw(st.one_of(st.none(), st.integers(1, 2))) for g in ("web", "db")}
    rules: dict[str, dict[str, object]] = {}
    units: dict[str, str] = {}
    for name in names:
        conflicts = draw(st.lists(st.sampled_from(PATTERNS), max_size=2, unique=True))
        zone_conflicts = draw(st.lists(st.sampled_from(PATTERNS), max_size=1, unique=True))
        group = name.split("@")[0] if "@" in name else None
        limit = group_limit[group] if group else None
        lines = []
        if conflicts:
            lines.append("Conflicts=" + " ".join(conflicts))
        if zone_conflicts:
            lines.append("ZoneConflicts=" + " ".join(zone_conflicts))
        if limit is not None:
            lines.append(f"MaxPerZone={limit}")
        units[name] = "\n".join(lines)
        rules[name] = {
            "conflicts": conflicts,
            "zone_conflicts": zone_conflicts,
            "max_per_zone": limit,
            "group": group,
        }
    owned = draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)))
    owners = {u: draw(st.sampled_from(sorted(machines))) for u in owned}
    return cluster(machines, units, owners), rules


def hard_rule_breaks(
    where: Mapping[str, str],
    zone: Mapping[str, str | None],
    rules: Mapping[str, Mapping[str, object]],
    planned: set[str],
) -> list[str]:
    """Every broken rule that involves a planned unit, found without the placement module."""
    found: list[str] = []
    for a, b in itertools.combinations(sorted(where), 2):
        if a not in planned and b not in planned:
            continue
        a_pats = rules[a]["conflicts"]
        b_pats = rules[b]["conflicts"]
        a_zpats = rules[a]["zone_conflicts"]
        b_zpats = rules[b]["zone_conflicts"]
        assert isinstance(a_pats, list) and isinstance(b_pats, list)
        assert isinstance(a_zpats, list) and isinstance(b_zpats, list)
        either = any(glob_match(p, b) for p in a_pats) or any(glob_match(p, a) for p in b_pats)
        if where[a] == where[b] and either:
            found.append(f"{a} and {b} conflict on {where[a]}")
        za, zb = zone[where[a]], zone[where[b]]
        zone_either = any(glob_match(p, b) for p in a_zpats) or any(
            glob_match(p, a) for p in b_zpats
        )
        if za is not None and za == zb and zone_either:
            found.append(f"{a} and {b} zone-conflict in {za}")
    for unit in planned:
        uses_zone = bool(rules[unit]["zone_conflicts"]) or rules[unit]["max_per_zone"] is not None
        if uses_zone and zone[where[unit]] is None:
            found.append(f"{unit} has zone rules on zoneless {where[unit]}")
        limit = rules[unit]["max_per_zone"]
        if isinstance(limit, int) and zone[where[unit]] is not None:
            peers = [
                u
                for u in where
                if rules[u]["group"] == rules[unit]["group"] and zone[where[u]] == zone[where[unit]]
            ]
            if len(peers) > limit:
                found.append(f"{len(peers)} of {rules[unit]['group']} in {zone[where[unit]]}")
    return found


def test_the_independent_checker_can_find_breaks() -> None:
    rules = {
        "a.service": {
            "conflicts": ["b*.service"],
            "zone_conflicts": [],
            "max_per_zone": None,
            "group": None,
        },
        "b.service": {
            "conflicts": [],
            "zone_conflicts": ["a.service"],
            "max_per_zone": None,
            "group": None,
        },
        "web@1.service": {"conflicts": [], "zone_conflicts": [], "max_per_zone": 1, "group": "web"},
        "web@2.service": {"conflicts": [], "zone_conflicts": [], "max_per_zone": 1, "group": "web"},
    }
    zone = {"m1": "z1", "m2": "z1", "m3": None}
    where = {"a.service": "m1", "b.service": "m1", "web@1.service": "m2", "web@2.service": "m1"}
    found = hard_rule_breaks(where, zone, rules, set(where))
    assert "a.service and b.service conflict on m1" in found
    assert "a.service and b.service zone-conflict in z1" in found
    assert "2 of web in z1" in found
    assert hard_rule_breaks({"b.service": "m3"}, zone, rules, {"b.service"}) == [
        "b.service has zone rules on zoneless m3"
    ]


@settings(max_examples=300, deadline=None)
@given(random_clusters())
def test_a_plan_breaks_no_hard_rule(case: tuple[Snapshot, dict[str, dict[str, object]]]) -> None:
    snap, rules = case
    plan = plan_placements(snap)
    planned = placed(plan)
    where = {u: o.machine_id for u, o in snap.owners.items()} | planned
    zone = {m: machine.zone for m, machine in snap.machines.items()}
    assert hard_rule_breaks(where, zone, rules, set(planned)) == []


@settings(max_examples=300, deadline=None)
@given(random_clusters())
def test_applying_a_plan_leaves_nothing_more_to_plan(
    case: tuple[Snapshot, dict[str, dict[str, object]]],
) -> None:
    snap, _ = case
    planned = placed(plan_placements(snap))
    after = snap.copy()
    base = max((o.revision for o in snap.owners.values()), default=100) + 10
    for offset, (unit, machine_id) in enumerate(planned.items()):
        after.owners[unit] = Owner(machine_id, base + offset, base + offset)
    replan = plan_placements(after)
    assert not set(replan) & set(planned)
    assert placed(replan) == {}
    # Each claim, made in plan order, survives its owner's re-check.
    for unit, machine_id in planned.items():
        assert recheck(after, unit, machine_id).ok, (unit, recheck(after, unit, machine_id))


@settings(max_examples=300, deadline=None)
@given(random_clusters())
def test_every_waiting_unit_has_a_reason_for_every_machine(
    case: tuple[Snapshot, dict[str, dict[str, object]]],
) -> None:
    snap, _ = case
    for unit, placement in plan_placements(snap).items():
        if placement.ranked:
            assert set(placement.ranked).isdisjoint(placement.refusals)
            assert set(placement.ranked) | set(placement.refusals) == set(snap.machines)
            continue
        if placement.blocked:
            continue
        assert set(placement.refusals) == set(snap.machines), unit
        assert all(placement.refusals.values())


def test_template_group_sanity_for_the_generator() -> None:
    # The independent checker groups by the text before '@'; so does the placement module.
    assert {template_group(n) for n in NAMES if "@" in n} == {"web@.service", "db@.service"}
