"""The agent's planning step on hand-built snapshots: when a machine bids for a unit
(`plan_claims`), and which systemd tasks, in which order, bring it to what it owns
(`plan_local`)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from fleetd.model import DesiredState, Machine, Owner, SystemdState
from fleetd.placement import Placement, View
from fleetd.planner import BID_DEPTH, Task, TaskKind, plan_claims, plan_local, still_started
from fleetd.snapshot import Desired, Snapshot, UnitRecord
from fleetd.unitfile import content_hash

ME = "m1"
ACTIVE = SystemdState("loaded", "active", "running")
INACTIVE = SystemdState("loaded", "inactive", "dead")
FAILED = SystemdState("loaded", "failed", "failed")


# ------------------------------------------------------------------------------ plan_claims


def test_first_ranked_machine_claims_at_once() -> None:
    plan = plan_claims({"u.service": Placement("u.service", ("m1", "m2"))}, "m1", {}, 100.0, 0.5)
    assert [(t.kind, t.unit, t.reason) for t in plan.claims] == [
        (TaskKind.CLAIM, "u.service", "ranked first for placement")
    ]
    assert plan.first_seen == {"u.service": ("m1", 100.0)}
    assert plan.next_wake is None


@pytest.mark.parametrize(
    ("rank", "now", "claims"),
    [
        (1, 100.0, False),
        (1, 100.49, False),
        (1, 100.5, True),
        (2, 100.9, False),
        (2, 101.0, True),
        (3, 102.0, True),
    ],
)
def test_rank_r_claims_after_r_steps(rank: int, now: float, claims: bool) -> None:
    ranked = tuple(f"m{i}" for i in range(4))
    me = ranked[rank]
    plan = plan_claims(
        {"u.service": Placement("u.service", ranked)}, me, {"u.service": ("m0", 100.0)}, now, 0.5
    )
    assert bool(plan.claims) is claims
    if claims:
        assert plan.claims[0].reason.startswith(f"ranked {rank + 1}; nobody better claimed it in")
        assert plan.next_wake is None
    else:
        assert plan.next_wake == pytest.approx(100.0 + rank * 0.5)
    assert plan.first_seen == {"u.service": ("m0", 100.0)}


def test_next_wake_is_the_earliest_due_bid_and_unranked_units_are_ignored() -> None:
    placements = {
        "a.service": Placement("a.service", ("x", "y", "m1")),
        "b.service": Placement("b.service", ("x", "m1")),
        "c.service": Placement("c.service", ("x",)),
        "d.service": Placement("d.service", (), blocked="desired state is inactive"),
    }
    seen = {"a.service": ("x", 10.0), "gone.service": ("x", 1.0)}
    plan = plan_claims(placements, "m1", seen, 10.2, 1.0)
    assert plan.claims == ()
    # a is due at 10 + 2, b (first seen now) at 10.2 + 1.
    assert plan.next_wake == pytest.approx(11.2)
    # Units no longer pending are forgotten; new ones are stamped with now.
    assert plan.first_seen == {
        "a.service": ("x", 10.0),
        "b.service": ("x", 10.2),
        "c.service": ("x", 10.2),
        "d.service": ("", 10.2),
    }


def test_a_new_favourite_restarts_the_stagger() -> None:
    """While claims land the plan shifts: the clock of the fallback bids counts from when the
    current favourite became favourite, not from when the unit was first seen."""
    placements = {"u.service": Placement("u.service", ("y", "m1"))}
    plan = plan_claims(placements, "m1", {"u.service": ("x", 0.0)}, 5.0, 1.0)
    assert plan.claims == ()
    assert plan.first_seen == {"u.service": ("y", 5.0)}
    assert plan.next_wake == pytest.approx(6.0)
    later = plan_claims(placements, "m1", plan.first_seen, 6.0, 1.0)
    assert [t.unit for t in later.claims] == ["u.service"]


def test_machines_ranked_below_the_bid_depth_never_bid() -> None:
    ranked = tuple(f"m{i}" for i in range(BID_DEPTH + 2))
    placements = {"u.service": Placement("u.service", ranked)}
    deep = plan_claims(placements, ranked[BID_DEPTH], {"u.service": ("m0", 0.0)}, 1e6, 0.5)
    assert deep.claims == () and deep.next_wake is None
    last = plan_claims(placements, ranked[BID_DEPTH - 1], {"u.service": ("m0", 0.0)}, 1e6, 0.5)
    assert [t.unit for t in last.claims] == ["u.service"]


def test_several_claims_in_one_round() -> None:
    placements = {
        "a.service": Placement("a.service", ("m1",)),
        "b.service": Placement("b.service", ("m2", "m1")),
    }
    plan = plan_claims(placements, "m1", {"b.service": ("m2", 0.0)}, 5.0, 0.5)
    assert [t.unit for t in plan.claims] == ["a.service", "b.service"]


# ------------------------------------------------------------------------------- plan_local


def body(tag: str = "v1", xfleet: str = "") -> str:
    text = f"[Unit]\nDescription={tag}\n\n[Service]\nExecStart=/bin/sleep 100\n"
    return text + (f"\n[X-Fleet]\n{xfleet}\n" if xfleet else "")


def snapshot(
    units: Mapping[str, str],
    owners: Mapping[str, str],
    desired: Mapping[str, DesiredState] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Snapshot:
    snap = Snapshot(revision=500)
    snap.machines[ME] = Machine(ME, metadata=dict(metadata or {}), name=ME)
    snap.machines["m2"] = Machine("m2", name="m2")
    for revision, (name, text) in enumerate(units.items(), start=1):
        snap.units[name] = UnitRecord(name, text, content_hash(text), revision)
        snap.desired[name] = Desired((desired or {}).get(name, DesiredState.LAUNCHED), revision)
    for revision, (name, machine_id) in enumerate(owners.items(), start=100):
        snap.owners[name] = Owner(machine_id, revision, revision)
    return snap


def local(
    snap: Snapshot,
    loaded: Mapping[str, str] | None = None,
    states: Mapping[str, SystemdState] | None = None,
    started: frozenset[tuple[str, str]] = frozenset(),
) -> list[Task]:
    return plan_local(snap, ME, View(snap), loaded or {}, states or {}, started)


def steps(tasks: list[Task]) -> list[tuple[str, str]]:
    return [(t.kind.value, t.unit) for t in tasks]


def test_new_owned_unit_is_loaded_reloaded_and_started() -> None:
    text = body()
    tasks = local(snapshot({"u.service": text}, {"u.service": ME}))
    assert steps(tasks) == [("load", "u.service"), ("reload", ""), ("start", "u.service")]
    load, _, start = tasks
    assert load.text == text and load.hash == content_hash(text)
    assert load.reason == "owned here, desired launched"
    assert start.hash == content_hash(text)


NOT_FOUND = SystemdState("not-found", "inactive", "dead")
INSTALL = "\n[Install]\nWantedBy=default.target\n"


@pytest.mark.parametrize(
    ("case", "texts", "loaded", "states", "reason"),
    [
        # Units systemd does not know read their file when started: no reload.
        ("fresh units", {"a.service": body(), "b.service": body()}, {},
         {"a.service": NOT_FOUND, "b.service": NOT_FOUND}, ""),
        # Not read before planning: assume systemd may know it.
        ("state unknown", {"a.service": body()}, {}, {}, "unit files changed"),
        # In systemd's memory (from an earlier file): it would keep the old text.
        ("known to systemd", {"a.service": body(), "b.service": body()}, {},
         {"a.service": NOT_FOUND, "b.service": INACTIVE}, "unit files changed"),
        # Its .wants links are read at a reload.
        ("with [Install]", {"a.service": body() + INSTALL}, {}, {"a.service": NOT_FOUND},
         "unit files changed"),
        # Linked by us, yet systemd has not seen it: read it, do not fail its start forever.
        ("linked, not seen", {"a.service": body()}, {"a.service": content_hash(body())},
         {"a.service": NOT_FOUND}, "systemd does not see the file of a.service"),
    ],
)
def test_a_reload_comes_only_when_the_manager_would_not_see_the_files_without_one(
    case: str,
    texts: dict[str, str],
    loaded: dict[str, str],
    states: dict[str, SystemdState],
    reason: str,
) -> None:
    snap = snapshot(texts, dict.fromkeys(texts, ME))
    tasks = local(snap, loaded, states)
    reloads = [t for t in tasks if t.kind is TaskKind.RELOAD]
    assert [t.reason for t in reloads] == ([reason] if reason else []), case
    kinds = [t.kind for t in tasks]
    assert kinds.count(TaskKind.START) == len(texts), case
    if reloads:
        # Before every start, after every load.
        at = kinds.index(TaskKind.RELOAD)
        assert all(k is not TaskKind.START for k in kinds[:at])
        assert all(k is not TaskKind.LOAD for k in kinds[at:])


def test_running_unit_in_its_wanted_state_needs_nothing() -> None:
    text = body()
    snap = snapshot({"u.service": text}, {"u.service": ME})
    assert local(snap, {"u.service": content_hash(text)}, {"u.service": ACTIVE}) == []


def test_changed_content_is_stopped_unloaded_loaded_reloaded_started() -> None:
    new = body("v2")
    snap = snapshot({"u.service": new}, {"u.service": ME})
    tasks = local(
        snap,
        {"u.service": content_hash(body("v1"))},
        {"u.service": ACTIVE},
        frozenset({("u.service", content_hash(body("v1")))}),
    )
    assert steps(tasks) == [
        ("stop", "u.service"),
        ("unload", "u.service"),
        ("load", "u.service"),
        ("reload", ""),
        ("start", "u.service"),
    ]
    assert tasks[0].reason == "unit content changed"
    assert tasks[2].text == new


def test_desired_loaded_stops_an_active_unit_without_reloading() -> None:
    text = body()
    snap = snapshot({"u.service": text}, {"u.service": ME}, {"u.service": DesiredState.LOADED})
    launched = frozenset({("u.service", content_hash(text))})
    tasks = local(snap, {"u.service": content_hash(text)}, {"u.service": ACTIVE}, launched)
    assert [(t.kind, t.reason) for t in tasks] == [(TaskKind.STOP, "desired state is loaded")]


def test_desired_loaded_leaves_running_a_unit_systemd_started_as_a_dependency() -> None:
    # fleet's TestInstallUnit: discovery.service is only loaded, and systemd starts it because
    # hello.service wants it; fleet stops only what it launched itself.
    text, name = body(), "discovery.service"
    snap = snapshot({name: text}, {name: ME}, {name: DesiredState.LOADED})
    tasks = local(snap, {name: content_hash(text)}, {name: ACTIVE})
    assert tasks == []


@pytest.mark.parametrize(
    ("desired", "active", "kept"),
    [
        (DesiredState.LAUNCHED, "active", True),
        (DesiredState.LAUNCHED, "failed", True),  # not restarted in a loop
        (DesiredState.LOADED, "active", True),  # its stop is still to be done (or retried)
        (DesiredState.LOADED, "failed", False),  # down: a later start starts it again
        (DesiredState.LOADED, "inactive", False),
        (DesiredState.INACTIVE, "active", False),
    ],
)
def test_still_started(desired: DesiredState, active: str, kept: bool) -> None:
    text = body()
    snap = snapshot({"u.service": text}, {"u.service": ME}, {"u.service": desired})
    states = {
        "u.service": SystemdState("loaded", active, "running" if active == "active" else "dead")
    }
    assert ("u.service" in still_started(snap, states, ["u.service"])) is kept


def test_desired_loaded_only_loads_a_new_unit() -> None:
    snap = snapshot({"u.service": body()}, {"u.service": ME}, {"u.service": DesiredState.LOADED})
    assert steps(local(snap)) == [("load", "u.service"), ("reload", "")]


def test_desired_loaded_with_changed_content_is_stopped_once_and_not_started() -> None:
    snap = snapshot(
        {"u.service": body("v2")}, {"u.service": ME}, {"u.service": DesiredState.LOADED}
    )
    tasks = local(snap, {"u.service": content_hash(body("v1"))}, {"u.service": ACTIVE})
    assert steps(tasks) == [
        ("stop", "u.service"),
        ("unload", "u.service"),
        ("load", "u.service"),
        ("reload", ""),
    ]


def test_failed_unit_is_not_restarted_once_started_with_that_content() -> None:
    text = body()
    snap = snapshot({"u.service": text}, {"u.service": ME})
    digest = content_hash(text)
    assert (
        local(
            snap, {"u.service": digest}, {"u.service": FAILED}, frozenset({("u.service", digest)})
        )
        == []
    )
    # Not started by this agent (e.g. after a restart of fleetd): started once more.
    assert steps(local(snap, {"u.service": digest}, {"u.service": FAILED})) == [
        ("start", "u.service")
    ]


def test_inactive_loaded_unit_that_should_run_is_started() -> None:
    text = body()
    snap = snapshot({"u.service": text}, {"u.service": ME})
    tasks = local(snap, {"u.service": content_hash(text)}, {"u.service": INACTIVE})
    assert [(t.kind, t.reason) for t in tasks] == [(TaskKind.START, "desired state is launched")]


def test_destroyed_unit_is_stopped_unloaded_then_released() -> None:
    snap = snapshot({}, {"u.service": ME})
    tasks = local(snap, {"u.service": content_hash(body())}, {"u.service": ACTIVE})
    assert steps(tasks) == [
        ("stop", "u.service"),
        ("unload", "u.service"),
        ("reload", ""),
        ("release", "u.service"),
    ]
    assert {t.reason for t in tasks if t.unit} == {"unit was destroyed"}


def test_desired_inactive_releases_after_unloading() -> None:
    text = body()
    snap = snapshot({"u.service": text}, {"u.service": ME}, {"u.service": DesiredState.INACTIVE})
    tasks = local(snap, {"u.service": content_hash(text)}, {"u.service": ACTIVE})
    assert steps(tasks) == [
        ("stop", "u.service"),
        ("unload", "u.service"),
        ("reload", ""),
        ("release", "u.service"),
    ]
    assert tasks[-1].reason == "desired state is inactive"


def test_unit_that_no_longer_matches_is_released_with_the_reason() -> None:
    text = body(xfleet="MachineMetadata=disk=ssd")
    snap = snapshot({"u.service": text}, {"u.service": ME}, metadata={"disk": "hdd"})
    tasks = local(snap, {"u.service": content_hash(text)}, {"u.service": ACTIVE})
    assert steps(tasks) == [
        ("stop", "u.service"),
        ("unload", "u.service"),
        ("reload", ""),
        ("release", "u.service"),
    ]
    assert tasks[-1].reason == "may no longer run here: metadata disk=ssd not matched"


def test_unit_owned_elsewhere_is_taken_down_but_not_released() -> None:
    text = body()
    snap = snapshot({"u.service": text}, {"u.service": "m2"})
    tasks = local(snap, {"u.service": content_hash(text)}, {"u.service": ACTIVE})
    assert steps(tasks) == [("stop", "u.service"), ("unload", "u.service"), ("reload", "")]
    assert tasks[0].reason == "not scheduled here"


def test_newer_conflicting_claim_here_is_released() -> None:
    a = body("a", "Conflicts=b.service")
    b = body("b")
    snap = snapshot({"b.service": b, "a.service": a}, {"b.service": ME, "a.service": ME})
    tasks = local(
        snap,
        {"a.service": content_hash(a), "b.service": content_hash(b)},
        {"a.service": ACTIVE, "b.service": ACTIVE},
    )
    assert steps(tasks) == [
        ("stop", "a.service"),
        ("unload", "a.service"),
        ("reload", ""),
        ("release", "a.service"),
    ]


def test_global_unit_is_loaded_and_started_without_an_owner() -> None:
    snap = snapshot({"g.service": body(xfleet="Global=true")}, {})
    tasks = local(snap)
    assert steps(tasks) == [("load", "g.service"), ("reload", ""), ("start", "g.service")]
    assert tasks[0].reason == "global unit, desired launched"


def test_mixed_round_keeps_fleets_order() -> None:
    """Everything at once: each kind of task comes in its phase, with a single reload."""
    old, new = body("old"), body("new")
    units = {
        "changed.service": new,
        "fresh.service": body("fresh"),
        "parked.service": body("parked"),
        "steady.service": body("steady"),
    }
    snap = snapshot(
        units,
        {
            "changed.service": ME,
            "fresh.service": ME,
            "parked.service": ME,
            "steady.service": ME,
            "destroyed.service": ME,
        },
        {"parked.service": DesiredState.LOADED},
    )
    loaded = {
        "changed.service": content_hash(old),
        "parked.service": content_hash(units["parked.service"]),
        "steady.service": content_hash(units["steady.service"]),
        "destroyed.service": content_hash(body("gone")),
        "stray.service": content_hash(body("stray")),
    }
    states = {name: ACTIVE for name in loaded}
    tasks = local(snap, loaded, states, frozenset({("parked.service", loaded["parked.service"])}))
    kinds = [t.kind for t in tasks]
    assert kinds.count(TaskKind.RELOAD) == 1
    reload_at = kinds.index(TaskKind.RELOAD)

    def at(kind: TaskKind, unit: str) -> int:
        return next(i for i, t in enumerate(tasks) if t.kind is kind and t.unit == unit)

    for unit in ("changed.service", "destroyed.service", "stray.service"):
        assert at(TaskKind.STOP, unit) < at(TaskKind.UNLOAD, unit) < reload_at
    last_stop_before_reload = max(
        i for i, t in enumerate(tasks[:reload_at]) if t.kind is TaskKind.STOP
    )
    first_unload = min(i for i, t in enumerate(tasks) if t.kind is TaskKind.UNLOAD)
    last_unload = max(i for i, t in enumerate(tasks) if t.kind is TaskKind.UNLOAD)
    first_load = min(i for i, t in enumerate(tasks) if t.kind is TaskKind.LOAD)
    assert last_stop_before_reload < first_unload
    assert last_unload < first_load < reload_at
    assert {t.unit for t in tasks if t.kind is TaskKind.LOAD} == {
        "changed.service",
        "fresh.service",
    }
    for unit in ("changed.service", "fresh.service"):
        assert at(TaskKind.START, unit) > reload_at
    assert at(TaskKind.STOP, "parked.service") > reload_at
    assert at(TaskKind.RELEASE, "destroyed.service") > at(TaskKind.UNLOAD, "destroyed.service")
    assert tasks[-1].kind is TaskKind.RELEASE
    assert not any(t.unit == "steady.service" for t in tasks)
    assert not any(t.kind is TaskKind.RELEASE and t.unit == "stray.service" for t in tasks)


def test_task_text_names_kind_unit_and_reason() -> None:
    assert str(Task(TaskKind.STOP, "u.service", "why")) == "stop u.service: why"
    assert str(Task(TaskKind.RELOAD, "", "unit files changed")) == "unit files changed"
