"""The incremental planner against the full pass it replaces: after every event of a random
sequence (units submitted, changed, destroyed, started and stopped; claims, releases, machines
joining, leaving and changing metadata; rebalance hints), `IncrementalPlanner.plan` must return
exactly what `plan_placements` returns for the same snapshot, reasons and rankings included."""

from __future__ import annotations

from collections.abc import Mapping

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetd.incremental import Change, IncrementalPlanner
from fleetd.keys import Kind
from fleetd.model import DesiredState, Machine, Owner
from fleetd.placement import Placement, plan_placements
from fleetd.snapshot import Desired, Snapshot, UnitRecord
from fleetd.unitfile import content_hash

NAMES = [
    "a.service",
    "b.service",
    "lead.service",
    "follow.service",
    "near.service",
    "glob.service",
    "old.service",
    "new.service",
    *(f"web@{i}.service" for i in range(1, 7)),
    *(f"db@{i}.service" for i in range(1, 4)),
    "tpl@.service",
]
RULES = [
    "",
    "",
    "",
    "Conflicts=web@*.service",
    "Conflicts=a.service b*.service",
    "ZoneConflicts=db@*.service",
    "RegionConflicts=web@1.service",
    "MaxPerMachine=1",
    "MaxPerZone=2",
    "MaxPerRegion=3",
    "Spread=machine",
    "Spread=region",
    "Spread=none",
    "MachineOf=lead.service",
    "ZoneOf=lead.service",
    "RegionOf=db@1.service",
    "Replaces=old.service",
    "Replaces=new.service",
    "Global=true",
    "MachineMetadata=disk=ssd",
    "MachineMetadata=zone!=z2",
    "MachineID=m1",
    "MachineOf=follow.service",
    "[broken",
]
# Rules that name no other unit: every unit is then interchangeable with the others of its
# template group, which the planner tracks by counts alone.
PLAIN_RULES = [
    "",
    "",
    "MaxPerMachine=1",
    "MaxPerZone=2",
    "MaxPerRegion=3",
    "Spread=machine",
    "Spread=region",
    "Spread=none",
    "MachineMetadata=disk=ssd",
]
MACHINES = ["m0", "m1", "m2", "m3", "m4"]
# Mostly shared zones and regions: zone-level rules and spread then see each other's units.
METADATA = [
    {},
    {"zone": "z1", "region": "r1"},
    {"zone": "z1", "region": "r1", "disk": "ssd"},
    {"zone": "z2", "region": "r1"},
    {"zone": "z3", "region": "r2", "disk": "ssd"},
]


def body(rule: str) -> str:
    text = "[Unit]\nDescription=t\n\n[Service]\nExecStart=/bin/sleep 100\n"
    if rule == "[broken":
        return text + "\n[X-Fleet\nConflicts=x\n"
    return text + (f"\n[X-Fleet]\n{rule}\n" if rule else "")


claims = st.tuples(st.just("claim"), st.integers(0, 5), st.integers(0, 2))
plain_units = st.tuples(st.just("unit"), st.sampled_from(NAMES), st.sampled_from(PLAIN_RULES))
events = st.one_of(
    claims,
    claims,
    plain_units,
    st.tuples(st.just("unit"), st.sampled_from(NAMES), st.sampled_from(RULES)),
    st.tuples(st.just("destroy"), st.sampled_from(NAMES)),
    st.tuples(st.just("desired"), st.sampled_from(NAMES), st.sampled_from(list(DesiredState))),
    st.tuples(st.just("claim-any"), st.sampled_from(NAMES), st.sampled_from(MACHINES)),
    st.tuples(st.just("release"), st.sampled_from(NAMES)),
    st.tuples(st.just("machine"), st.sampled_from(MACHINES), st.integers(0, len(METADATA) - 1)),
    st.tuples(st.just("leave"), st.sampled_from(MACHINES)),
    st.tuples(st.just("move"), st.sampled_from(NAMES), st.sampled_from([*MACHINES, None])),
    st.tuples(st.just("state"), st.sampled_from(NAMES)),
)


class World:
    """A snapshot changed in place, with the journal of keys each change touched."""

    def __init__(self) -> None:
        self.snap = Snapshot(revision=1)
        self.changes: set[Change] = set()

    def tick(self) -> int:
        self.snap.revision += 1
        return self.snap.revision

    def apply(self, event: tuple[object, ...], plan: Mapping[str, Placement]) -> None:
        snap, kind = self.snap, event[0]
        if kind == "unit":
            name, rule = str(event[1]), str(event[2])
            text = body(rule)
            snap.units[name] = UnitRecord(name, text, content_hash(text), self.tick())
            self.changes.add((Kind.UNIT, name))
            if name not in snap.desired:
                snap.desired[name] = Desired(DesiredState.LAUNCHED, self.tick())
                self.changes.add((Kind.DESIRED, name))
        elif kind == "destroy":
            name = str(event[1])
            for table, key_kind in ((snap.units, Kind.UNIT), (snap.desired, Kind.DESIRED)):
                table.pop(name, None)  # type: ignore[attr-defined]
                self.changes.add((key_kind, name))
        elif kind == "desired":
            name = str(event[1])
            state = event[2]
            assert isinstance(state, DesiredState)
            snap.desired[name] = Desired(state, self.tick())
            self.changes.add((Kind.DESIRED, name))
        elif kind in ("claim", "claim-any"):
            if kind == "claim":
                # Claim as agents do: a unit of the plan by the machine at that rank.
                ranked = [p for p in plan.values() if p.ranked]
                index, rank = int(event[1]), int(event[2])  # type: ignore[call-overload]
                if not ranked:
                    return
                placement = ranked[index % len(ranked)]
                name = placement.unit
                machine_id = placement.ranked[min(rank, len(placement.ranked) - 1)]
            else:
                name, machine_id = str(event[1]), str(event[2])
            if name in snap.owners:
                return
            revision = self.tick()
            snap.owners[name] = Owner(machine_id, revision, revision)
            self.changes.add((Kind.OWNER, name))
        elif kind == "release":
            name = str(event[1])
            snap.owners.pop(name, None)
            self.changes.add((Kind.OWNER, name))
        elif kind == "machine":
            machine_id = str(event[1])
            metadata = METADATA[int(event[2])]  # type: ignore[call-overload]
            snap.machines[machine_id] = Machine(machine_id, metadata=metadata, name=machine_id)
            self.changes.add((Kind.MACHINE, machine_id))
        elif kind == "leave":
            # A dead machine's lease takes its presence and its owner keys at once.
            machine_id = str(event[1])
            snap.machines.pop(machine_id, None)
            self.changes.add((Kind.MACHINE, machine_id))
            for name, owner in list(snap.owners.items()):
                if owner.machine_id == machine_id:
                    del snap.owners[name]
                    self.changes.add((Kind.OWNER, name))
        elif kind == "move":
            name, target = str(event[1]), event[2]
            if target is None:
                snap.moves.pop(name, None)
            else:
                snap.moves[name] = str(target)
            self.changes.add((Kind.MOVE, name))
        elif kind == "state":
            # A published state: a new revision, nothing journaled (no plan reads states).
            self.tick()

    def drain(self) -> set[Change]:
        changes, self.changes = self.changes, set()
        return changes


@settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    machines=st.lists(
        st.tuples(st.sampled_from(MACHINES), st.integers(0, len(METADATA) - 1)),
        min_size=1,
        max_size=5,
    ),
    units=st.lists(
        st.tuples(st.sampled_from(NAMES), st.sampled_from(PLAIN_RULES)), min_size=4, max_size=14
    ),
    script=st.lists(st.lists(events, min_size=1, max_size=4), min_size=1, max_size=40),
    limit=st.one_of(st.none(), st.integers(1, 4)),
    depth=st.one_of(st.none(), st.integers(1, 3)),
    share=st.sampled_from([1, 1, 2, 3]),
)
def test_incremental_plan_equals_the_full_pass(
    machines: list[tuple[str, int]],
    units: list[tuple[str, str]],
    script: list[list[tuple[object, ...]]],
    limit: int | None,
    depth: int | None,
    share: int,
) -> None:
    world = World()
    for machine_id, meta in machines:
        world.apply(("machine", machine_id, meta), {})
    for name, rule in units:
        world.apply(("unit", name, rule), {})
    world.drain()
    planner = IncrementalPlanner(world.snap.copy())
    plan = planner.plan(limit, depth, share)
    assert plan == plan_placements(world.snap.copy(), limit=limit, depth=depth, plain_share=share)
    for batch in script:
        for event in batch:
            world.apply(event, plan)
        planner.update(world.snap.copy(), world.drain())
        plan = planner.plan(limit, depth, share)
        expected = plan_placements(
            world.snap.copy(), limit=limit, depth=depth, plain_share=share
        )
        assert plan == expected, (batch, plan, expected)


def test_a_claim_where_planned_re_evaluates_few_machines() -> None:
    """The point of the module: a claim that lands where the plan put the unit leaves every
    other unit's machines as they were, so almost nothing is evaluated again."""
    world = World()
    for i in range(8):
        world.apply(("machine", f"m{i}", 0), {})
    for i in range(40):
        # A limit: not plain, so the replay (not the count buckets) plans them.
        world.apply(("unit", f"web@{i}.service", "MaxPerMachine=100"), {})
    world.drain()
    planner = IncrementalPlanner(world.snap.copy())
    plan = planner.plan()
    assert planner.evaluations == 40 * 8
    first = plan["web@0.service"]
    world.apply(("claim-any", "web@0.service", first.ranked[0]), plan)
    before = planner.evaluations
    planner.update(world.snap.copy(), world.drain())
    plan = planner.plan()
    assert plan == plan_placements(world.snap.copy())
    assert planner.evaluations - before == 0


def test_plain_units_are_ranked_from_count_buckets_exactly_as_the_full_pass() -> None:
    """Template instances with no rule that names them cost no verdict per machine: their
    ranking is read from the class's buckets, and it is the full pass's, cut or not."""
    world = World()
    for i in range(5):
        world.apply(("machine", f"m{i}", i % len(METADATA)), {})
    for i in range(30):
        world.apply(("unit", f"web@{i}.service", ""), {})
        world.apply(("unit", f"api@{i}.service", "Spread=region"), {})
    world.drain()
    planner = IncrementalPlanner(world.snap.copy())
    for depth in (None, 2):
        assert planner.plan(depth=depth) == plan_placements(world.snap.copy(), depth=depth)
    assert planner.evaluations == 0
    plan = planner.plan(depth=2)
    assert all(len(p.ranked) <= 2 for p in plan.values())
    # A claim away from the plan (the second choice) moves the counts; still the full pass.
    second = plan["web@3.service"].ranked[1]
    world.apply(("claim-any", "web@3.service", second), plan)
    planner.update(world.snap.copy(), world.drain())
    assert planner.plan(depth=2) == plan_placements(world.snap.copy(), depth=2)


def test_a_revision_of_published_states_alone_plans_nothing_again() -> None:
    """States are not journaled: a revision that brought only them hands back the last plan
    itself, and the next real change (a claim) is planned afresh."""
    world = World()
    for i in range(4):
        world.apply(("machine", f"m{i}", i % len(METADATA)), {})
    for i in range(12):
        world.apply(("unit", f"web@{i}.service", ""), {})
    world.drain()
    planner = IncrementalPlanner(world.snap.copy())
    plan = planner.plan(3, 2, 2)
    world.apply(("state", "web@0.service"), plan)
    planner.update(world.snap.copy(), world.drain())
    assert planner.plan(3, 2, 2) is plan
    # Other arguments are another plan.
    assert planner.plan(5, 2, 2) == plan_placements(
        world.snap.copy(), limit=5, depth=2, plain_share=2
    )
    plan = planner.plan(3, 2, 2)
    first = next(p for p in plan.values() if p.ranked)
    world.apply(("claim-any", first.unit, first.ranked[0]), plan)
    planner.update(world.snap.copy(), world.drain())
    again = planner.plan(3, 2, 2)
    assert first.unit not in again
    assert again == plan_placements(world.snap.copy(), limit=3, depth=2, plain_share=2)


def test_plain_units_count_a_share_of_the_window() -> None:
    """With plain_share, the window holds that many times more plain units, and a unit
    evaluated machine by machine still counts whole."""
    world = World()
    for i in range(3):
        world.apply(("machine", f"m{i}", 0), {})
    for i in range(10):
        world.apply(("unit", f"a{i}.service", ""), {})
        world.apply(("unit", f"b{i}.service", "MaxPerMachine=100"), {})
    plain = plan_placements(world.snap.copy(), limit=2, plain_share=3)
    assert sorted(plain) == [f"a{i}.service" for i in range(6)]
    world.drain()
    for i in range(10):
        world.apply(("destroy", f"a{i}.service"), {})
    mixed = plan_placements(world.snap.copy(), limit=2, plain_share=3)
    assert sorted(mixed) == ["b0.service", "b1.service"]
