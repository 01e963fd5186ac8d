"""The mirror's incremental plan through the real path: registry writes become watch events,
`Snapshot.apply` journals the keys they touch, the mirror feeds them to its planner. After every
write the plan must be the full pass over the mirror's own copy. Also: agents sharing one mirror
share its watch until the last of them closes it."""

from __future__ import annotations

import platform
import sys
from collections.abc import Collection

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetd.agent.mirror import Mirror
from fleetd.errors import RegistryUnavailable
from fleetd.fake_registry import FakeRegistry
from fleetd.keys import Kind
from fleetd.model import DesiredState, Machine
from fleetd.placement import claim_guards, plan_placements
from fleetd.planner import BID_DEPTH
from fleetd.snapshot import Snapshot, UnitRecord
from fleetd.unitfile import content_hash

NAMES = [f"web@{i}.service" for i in range(1, 7)] + ["db.service", "cache.service"]
XFLEET = ["", "Conflicts=web@*.service", "MachineOf=db.service", "MaxPerZone=1", "Spread=machine"]


def text(xfleet: str) -> str:
    body = "[Service]\nExecStart=/bin/sleep 100\n"
    return body + (f"\n[X-Fleet]\n{xfleet}\n" if xfleet else "")


steps = st.one_of(
    st.tuples(st.just("submit"), st.sampled_from(NAMES), st.sampled_from(XFLEET)),
    st.tuples(st.just("claim"), st.integers(0, 7), st.integers(0, 3)),
    st.tuples(st.just("claim"), st.integers(0, 7), st.integers(0, 3)),
    st.tuples(st.just("release"), st.integers(0, 7), st.integers(0, 0)),
    st.tuples(st.just("stop"), st.sampled_from(NAMES), st.just("")),
    st.tuples(st.just("destroy"), st.sampled_from(NAMES), st.just("")),
    st.tuples(st.just("expire"), st.integers(0, 3), st.integers(0, 0)),
)


@settings(max_examples=60, deadline=None)
@given(script=st.lists(steps, min_size=1, max_size=30), limit=st.integers(1, 5))
def test_the_mirror_plan_is_the_full_pass_over_its_copy(
    script: list[tuple[str, object, object]], limit: int
) -> None:
    registry = FakeRegistry()
    leases = []
    for i in range(4):
        lease = registry.grant_lease(10)
        leases.append(lease)
        zone = {"zone": f"z{i % 2}"}
        registry.register_machine(Machine(f"m{i}", metadata=zone, name=f"m{i}"), lease)
    mirror = Mirror(registry, lambda: None)
    mirror.sync()

    def check() -> dict[str, object]:
        snap, plan = mirror.plan(lambda s: limit)
        assert snap is mirror.copy()
        assert plan == plan_placements(snap, limit=limit)
        return dict(plan)

    plan = check()
    for kind, a, b in script:
        if kind == "submit":
            record = UnitRecord(str(a), text(str(b)), content_hash(text(str(b))))
            registry.write_units([record], DesiredState.LAUNCHED, mirror.copy())
        elif kind == "claim":
            ranked = [p for p in plan.values() if p.ranked]  # type: ignore[attr-defined]
            if ranked:
                placement = ranked[int(a) % len(ranked)]  # type: ignore[call-overload]
                rank = int(b) % len(placement.ranked)  # type: ignore[call-overload]
                _claim(registry, mirror, placement.unit, placement.ranked[rank], leases)
        elif kind == "release":
            owned = sorted(mirror.copy().owners.items())
            if owned:
                unit, owner = owned[int(a) % len(owned)]  # type: ignore[call-overload]
                registry.release(unit, owner.machine_id)
        elif kind == "stop":
            registry.set_desired([str(a)], DesiredState.INACTIVE)
        elif kind == "destroy":
            registry.destroy([str(a)])
        elif kind == "expire":
            registry.revoke(leases[int(a)])  # type: ignore[call-overload]
        plan = check()
    mirror.close()


def _claim(
    registry: FakeRegistry, mirror: Mirror, unit: str, machine: str, leases: list[int]
) -> None:
    snap = mirror.copy()
    desired = snap.desired.get(unit)
    registry.claim(
        unit,
        machine,
        leases[int(machine[1:])],
        snap.revision,
        desired.revision if desired else 0,
        claim_guards(snap, unit),
    )


def test_agents_sharing_a_mirror_keep_its_watch_until_the_last_closes_it() -> None:
    registry = FakeRegistry()
    woken: list[str] = []
    mirror = Mirror(registry, lambda: woken.append("first"))
    mirror.share(lambda: woken.append("second"))
    mirror.sync()
    woken.clear()
    lease = registry.grant_lease(10)
    registry.register_machine(Machine("m1"), lease)
    assert woken == ["first", "second"]
    assert "m1" in mirror.copy().machines
    mirror.close()
    registry.register_machine(Machine("m2"), lease)
    assert "m2" in mirror.copy().machines
    mirror.close()
    registry.register_machine(Machine("m3"), lease)
    assert "m3" not in mirror.copy().machines


class CountingRegistry(FakeRegistry):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def snapshot(self, kinds: Collection[Kind] | None = None) -> Snapshot:
        self.reads += 1
        return super().snapshot(kinds)


def test_agents_joining_together_share_one_read_but_never_an_older_one() -> None:
    registry = CountingRegistry()
    mirror = Mirror(registry, lambda: None)
    mirror.share(lambda: None)
    # Two agents take their tokens when they join; the first read serves both.
    first, second = mirror.reads(), mirror.reads()
    mirror.sync(newer_than=first)
    mirror.sync(newer_than=second)
    assert registry.reads == 1
    # An agent joining later (a new lease) must see a read that began after it joined.
    later = mirror.reads()
    lease = registry.grant_lease(10)
    registry.register_machine(Machine("m1"), lease)
    mirror.sync(newer_than=later)
    assert registry.reads == 2
    assert "m1" in mirror.copy().machines
    # A read that failed serves nobody: the next call reads again.
    token = mirror.reads()
    registry.unavailable = True
    with pytest.raises(RegistryUnavailable):
        mirror.sync(newer_than=token)
    registry.unavailable = False
    mirror.sync(newer_than=token)
    assert registry.reads == 4
    # Without a token, sync always reads.
    mirror.sync()
    assert registry.reads == 5


def test_a_machines_bids_are_the_units_that_rank_it_high_enough() -> None:
    registry = FakeRegistry()
    lease = registry.grant_lease(10)
    for i in range(12):
        registry.register_machine(Machine(f"m{i:02d}", name=f"m{i:02d}"), lease)
    records = [UnitRecord(f"web@{i}.service", text(""), content_hash(text(""))) for i in range(30)]
    registry.write_units(records, DesiredState.LAUNCHED, registry.snapshot())
    mirror = Mirror(registry, lambda: None)
    mirror.sync()
    _, plan = mirror.plan(lambda s: 100)
    for i in range(12):
        me = f"m{i:02d}"
        expected = {u: p for u, p in plan.items() if me in p.ranked[:BID_DEPTH]}
        assert dict(mirror.bids(plan, me)) == expected
    assert mirror.bids(plan, "nobody") == {}


def one_machine_with_units() -> tuple[FakeRegistry, int]:
    """A registry with machine m1 (its lease returned) and five template instances."""
    registry = FakeRegistry()
    lease = registry.grant_lease(10)
    registry.register_machine(Machine("m1", name="m1"), lease)
    records = [UnitRecord(f"web@{i}.service", text(""), content_hash(text(""))) for i in range(5)]
    registry.write_units(records, DesiredState.LAUNCHED, registry.snapshot())
    return registry, lease


def test_free_memory_is_released_after_each_full_pass_and_only_then() -> None:
    registry, lease = one_machine_with_units()
    released: list[int] = []
    mirror = Mirror(registry, lambda: None, release_memory=lambda: released.append(1))
    mirror.sync()
    assert released == []  # the read alone: the pass that follows needs memory too
    mirror.plan(lambda s: 100)
    assert len(released) == 1
    mirror.plan(lambda s: 100)  # the same revision, planned already
    assert len(released) == 1
    # A unit changed: an incremental pass, nothing to release.
    more = [UnitRecord("db.service", text(""), content_hash(text("")))]
    registry.write_units(more, DesiredState.LAUNCHED, mirror.copy())
    _, plan = mirror.plan(lambda s: 100)
    assert "db.service" in plan and len(released) == 1
    # A machine joined: the planner starts over, a full pass.
    registry.register_machine(Machine("m2", name="m2"), lease)
    mirror.plan(lambda s: 100)
    assert len(released) == 2
    # A fresh read: a new planner, a full pass.
    mirror.sync()
    mirror.plan(lambda s: 100)
    assert len(released) == 3
    mirror.close()


def test_planning_passes_are_recorded_whole_with_whether_they_started_from_scratch() -> None:
    registry, lease = one_machine_with_units()
    mirror = Mirror(registry, lambda: None)
    mirror.sync()
    mirror.plan(lambda s: 100)
    mirror.plan(lambda s: 100)  # planned already: no pass
    more = [UnitRecord(f"db{i}.service", text(""), content_hash(text(""))) for i in range(2)]
    registry.write_units(more, DesiredState.LAUNCHED, mirror.copy())
    mirror.plan(lambda s: 100)
    passes = mirror.plan_passes(clear=True)
    assert [p.full for p in passes] == [True, False]
    # The incremental pass took in the two units' keys (content and desired state, at least).
    assert passes[1].events >= 2 and all(p.seconds >= 0 for p in passes)
    assert mirror.plan_passes() == []
    registry.register_machine(Machine("m2", name="m2"), lease)  # the planner starts over
    mirror.plan(lambda s: 100)
    assert [p.full for p in mirror.plan_passes()] == [True]
    mirror.close()


def test_free_memory_goes_back_through_glibc_and_is_a_no_op_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fleetd import memory

    on_glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert memory.release_free_memory() is on_glibc
    monkeypatch.setattr(memory, "_TRIM", None)  # a C library without malloc_trim
    assert memory.release_free_memory() is False


def test_a_watch_ending_after_the_last_user_left_is_not_news(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With etcd out of reach a cancelled watch ends only when the client closes, after the
    mirror's last user left (a fleetd shutting down): no warning, no read scheduled."""
    registry, _ = one_machine_with_units()
    mirror = Mirror(registry, lambda: None)
    mirror.sync()
    mirror.close()
    with caplog.at_level("DEBUG", logger="fleetd"):
        mirror._on_watch(RuntimeError("Stream removed (Channel closed!)"))
    assert not mirror.needs_sync
    assert "watch ended" not in caplog.text
