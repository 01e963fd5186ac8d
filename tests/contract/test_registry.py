"""The Registry contract, run against the in-memory fake and `EtcdRegistry` on a real etcd, so
the fake the deterministic agent tests rely on cannot drift from etcd.

Lease expiry is driven by the fake's clock, and by waiting out a short real TTL on etcd.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from fleetd.clock import FakeClock
from fleetd.errors import RegistryUnavailable
from fleetd.fake_registry import FakeRegistry
from fleetd.keys import Kind
from fleetd.model import DesiredState, Machine, PublishedState
from fleetd.placement import NO_GUARDS, Guards
from fleetd.ports import Registry, WatchEvent
from fleetd.registry import EtcdRegistry
from fleetd.snapshot import Snapshot, UnitRecord
from fleetd.unitfile import content_hash

try:
    from tests.support.etcd_fixtures import etcd
except ModuleNotFoundError:  # tests/ itself is on sys.path rather than the repository root
    from support.etcd_fixtures import etcd  # type: ignore[no-redef]

__all__ = ["etcd"]  # a fixture: imported so pytest finds it here


TEXT = "[Service]\nExecStart=/bin/sleep 100\n"


@dataclass
class Backend:
    kind: str
    registry: Registry
    expire: Callable[[float], None]  # let this many seconds pass for leases

    def submit(self, *names: str, desired: DesiredState = DesiredState.LAUNCHED) -> Snapshot:
        records = [UnitRecord(n, TEXT, content_hash(TEXT)) for n in names]
        assert self.registry.write_units(records, desired, self.registry.snapshot())
        return self.registry.snapshot()

    def join(self, machine_id: str, ttl: float = 10.0) -> int:
        lease = self.registry.grant_lease(ttl)
        assert self.registry.register_machine(Machine(machine_id), lease)
        return lease


@pytest.fixture(params=["fake", "etcd", "etcd-http"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """The fake, and the etcd registry over each transport: gRPC (the agent's) and etcd's JSON
    gateway (fleetctl's)."""
    if request.param == "fake":
        clock = FakeClock()
        fake = FakeRegistry(clock=clock)

        def advance(seconds: float) -> None:
            clock.advance(seconds)
            fake.expire()

        yield Backend("fake", fake, advance)
        return
    cluster = request.getfixturevalue("etcd")
    transport = "http" if request.param == "etcd-http" else "grpc"
    real = EtcdRegistry(
        list(cluster.endpoints), f"/contract-{uuid.uuid4().hex[:10]}/", transport=transport
    )

    def wait(seconds: float) -> None:
        time.sleep(seconds)

    try:
        yield Backend(request.param, real, wait)
    finally:
        real.close()


def test_claim_creates_the_owner_once(backend: Backend) -> None:
    reg = backend.registry
    lease = backend.join("m1")
    snap = backend.submit("u.service")
    desired = snap.desired["u.service"].revision
    assert reg.claim("u.service", "m1", lease, snap.revision, desired, NO_GUARDS)
    assert not reg.claim("u.service", "m1", lease, snap.revision, desired, NO_GUARDS)
    after = reg.snapshot()
    assert after.owner_of("u.service") == "m1"
    owner = after.owners["u.service"]
    assert owner.revision == owner.mod_revision > snap.revision


def test_claim_fails_when_desired_state_or_units_changed_or_machine_absent(
    backend: Backend,
) -> None:
    reg = backend.registry
    lease = backend.join("m1")
    snap = backend.submit("u.service")
    desired = snap.desired["u.service"].revision
    reg.set_desired(["u.service"], DesiredState.LOADED)
    assert not reg.claim("u.service", "m1", lease, snap.revision, desired, NO_GUARDS)
    snap = reg.snapshot()
    desired = snap.desired["u.service"].revision
    # Unit content changed after the snapshot: a new unit whose rule names others.
    text = "[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nConflicts=u*.service\n"
    before = reg.snapshot()
    assert reg.write_units([UnitRecord("other.service", text, content_hash(text))], None, before)
    assert not reg.claim("u.service", "m1", lease, snap.revision, desired, NO_GUARDS)
    snap = reg.snapshot()
    assert not reg.claim("u.service", "nobody", lease, snap.revision, desired, NO_GUARDS)
    assert reg.claim("u.service", "m1", lease, snap.revision, desired, NO_GUARDS)


def test_claim_guards_on_owner_prefixes_and_exact_revisions(backend: Backend) -> None:
    reg = backend.registry
    lease = backend.join("m1")
    snap = backend.submit("web@1.service", "web@2.service", "db.service")
    rev = {n: d.revision for n, d in snap.desired.items()}
    assert reg.claim("web@1.service", "m1", lease, snap.revision, rev["web@1.service"], NO_GUARDS)
    # web@1's owner appeared after `snap`: a claim guarded on the web@ prefix must fail.
    prefix = Guards({}, frozenset({"web@"}))
    assert not reg.claim("web@2.service", "m1", lease, snap.revision, rev["web@2.service"], prefix)
    exact = Guards({"web@1.service": 0}, frozenset())
    assert not reg.claim("db.service", "m1", lease, snap.revision, rev["db.service"], exact)
    now = reg.snapshot()
    exact = Guards({"web@1.service": now.owners["web@1.service"].mod_revision}, frozenset())
    assert reg.claim("db.service", "m1", lease, now.revision, rev["db.service"], exact)


def test_release_only_by_the_holder(backend: Backend) -> None:
    reg = backend.registry
    lease = backend.join("m1")
    snap = backend.submit("u.service")
    reg.claim("u.service", "m1", lease, snap.revision, snap.desired["u.service"].revision,
              NO_GUARDS)
    assert not reg.release("u.service", "m2")
    assert reg.release("u.service", "m1")
    assert "u.service" not in reg.snapshot().owners


def test_register_refuses_a_live_id_and_accepts_its_own_lease_again(backend: Backend) -> None:
    reg = backend.registry
    lease = backend.join("m1")
    other = reg.grant_lease(10)
    assert not reg.register_machine(Machine("m1"), other)
    # A restarted agent re-attaching to its own lease announces itself again.
    assert reg.register_machine(Machine("m1", name="again"), lease)
    reg.update_machine(Machine("m1", name="renamed"), lease)
    assert reg.snapshot().machines["m1"].name == "renamed"


def test_keepalive_reports_the_ttl_and_zero_once_the_lease_is_gone(backend: Backend) -> None:
    reg = backend.registry
    lease = reg.grant_lease(5)
    assert 4 <= reg.keepalive(lease) <= 5
    reg.revoke(lease)
    assert reg.keepalive(lease) == 0


def test_an_expired_lease_takes_its_keys_and_refuses_writes(backend: Backend) -> None:
    reg = backend.registry
    lease = backend.join("m1", ttl=2)
    snap = backend.submit("u.service")
    reg.claim("u.service", "m1", lease, snap.revision, snap.desired["u.service"].revision,
              NO_GUARDS)
    state = PublishedState("m1", "loaded", "active", "running", "h", 1.0, "why")
    reg.publish_states("m1", lease, {"u.service": state})
    assert reg.snapshot().states["u.service"]["m1"] == state
    deadline = time.monotonic() + 15
    backend.expire(3.5)
    while backend.kind != "fake" and "m1" in reg.snapshot().machines:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    after = reg.snapshot()
    assert "m1" not in after.machines and "u.service" not in after.owners
    assert "u.service" not in after.states
    assert reg.keepalive(lease) == 0
    with pytest.raises(RegistryUnavailable):
        reg.publish_states("m1", lease, {"u.service": state})
    with pytest.raises(RegistryUnavailable):
        reg.register_machine(Machine("m1"), lease)
    assert "m1" not in reg.snapshot().machines


def test_revoke_removes_every_key_of_the_lease_at_once(backend: Backend) -> None:
    reg = backend.registry
    lease = backend.join("m1")
    snap = backend.submit("u.service")
    reg.claim("u.service", "m1", lease, snap.revision, snap.desired["u.service"].revision,
              NO_GUARDS)
    before = reg.snapshot().revision
    events: list[WatchEvent] = []
    cancel = reg.watch(before + 1, lambda b: events.extend(b) if isinstance(b, list) else None)
    try:
        reg.revoke(lease)
        deadline = time.monotonic() + 10
        while len(events) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        cancel()
    assert {e.key for e in events} == {
        reg.layout.machine("m1"),
        reg.layout.owner("u.service"),
    }
    assert all(e.value is None for e in events)
    assert len({e.mod_revision for e in events}) == 1


def test_watch_reports_every_change_in_order_from_the_revision(backend: Backend) -> None:
    reg = backend.registry
    start = reg.snapshot().revision
    backend.submit("a.service")
    events: list[WatchEvent] = []
    cancel = reg.watch(start + 1, lambda b: events.extend(b) if isinstance(b, list) else None)
    try:
        reg.set_desired(["a.service"], DesiredState.INACTIVE)
        reg.destroy(["a.service"])
        deadline = time.monotonic() + 10
        while len(events) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        cancel()
    keys = [(e.key.rsplit("/", 2)[-2], e.value is None) for e in events]
    assert keys == [
        ("unit", False),
        ("desired", False),  # no units-changed mark: a new self-contained unit adds no rule
        ("desired", False),
        ("unit", True),
        ("desired", True),
    ]
    revisions = [e.mod_revision for e in events]
    assert revisions == sorted(revisions) and revisions[0] == start + 1
    snap = Snapshot()
    for e in events:
        snap.apply(reg.layout, e.key, e.value, e.mod_revision, e.create_revision)
    assert snap.units == {} and snap.desired == {}


def test_write_units_is_guarded_on_what_the_writer_saw(backend: Backend) -> None:
    reg = backend.registry
    seen = reg.snapshot()
    backend.submit("a.service")
    changed = "[Service]\nExecStart=/bin/true\n"
    record = UnitRecord("a.service", changed, content_hash(changed))
    assert not reg.write_units([record], DesiredState.LAUNCHED, seen)
    assert reg.write_units([record], DesiredState.LAUNCHED, reg.snapshot())
    assert reg.snapshot().units["a.service"].text == changed


def test_move_requests_are_stored_and_cleared(backend: Backend) -> None:
    reg = backend.registry
    reg.request_move("a.service", "m2")
    assert reg.snapshot().moves == {"a.service": "m2"}
    reg.clear_move("a.service")
    assert reg.snapshot().moves == {}


def _put_raw(reg: Registry, key: str, value: bytes) -> None:
    if isinstance(reg, FakeRegistry):
        reg.put_raw(key, value)
    else:
        assert isinstance(reg, EtcdRegistry)
        reg.transport.put(key, value)


def test_snapshot_refuses_foreign_entries_with_the_reason(backend: Backend) -> None:
    reg = backend.registry
    _put_raw(reg, reg.layout.unit(".x.service"), b"{}")
    _put_raw(reg, reg.layout.desired("a.service"), b"\xff\xfe")
    snap = reg.snapshot()
    assert set(snap.refused) == {reg.layout.unit(".x.service"), reg.layout.desired("a.service")}
    assert snap.units == {} and snap.desired == {}


@pytest.mark.parametrize(
    "kinds",
    [
        {Kind.MACHINE},
        {Kind.MACHINE, Kind.STATE, Kind.DESIRED},
        {Kind.UNIT, Kind.OWNER, Kind.MOVE},
        set(Kind),
    ],
    ids=["machines", "states", "units-owners-moves", "every-kind"],
)
def test_a_snapshot_of_some_kinds_is_the_whole_one_restricted_to_them(
    backend: Backend, kinds: set[Kind], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listing reads only the kinds it shows: the same picture as a whole read leaves for
    them, at one revision, refused keys under those kinds' prefixes included, in pages."""
    import fleetd.registry

    # Pages of three keys: every prefix takes several, each at the first page's revision.
    monkeypatch.setattr(fleetd.registry, "SNAPSHOT_PAGE", 3)
    reg = backend.registry
    lease = backend.join("m1")
    backend.join("m2")
    snap = backend.submit(*(f"u{i}.service" for i in range(5)))
    desired = snap.desired["u1.service"].revision
    assert reg.claim("u1.service", "m1", lease, snap.revision, desired, NO_GUARDS)
    reg.publish_states(
        "m1", lease,
        {f"u{i}.service": PublishedState("m1", "loaded", "active", "running", "h", 1.0)
         for i in range(4)},
    )  # fmt: skip
    reg.request_move("u1.service", "m2")
    _put_raw(reg, reg.layout.state("u2.service", ""), b"{}")  # no machine id: refused
    _put_raw(reg, reg.layout.desired("u9.service"), b"sideways")  # unknown state: refused
    _put_raw(reg, reg.layout.prefix + "nonsense/x", b"1")  # no known kind: refused
    whole = reg.snapshot()
    assert whole.refused and whole.owners and whole.moves and whole.states
    part = reg.snapshot(kinds)
    assert part == whole.only(reg.layout, kinds)
    assert part.revision == whole.revision
    if Kind.STATE in kinds:
        assert reg.layout.state("u2.service", "") in part.refused
    if set(kinds) != set(Kind):
        assert reg.layout.prefix + "nonsense/x" not in part.refused


def test_a_snapshot_is_the_whole_picture_with_an_empty_journal(backend: Backend) -> None:
    """Planners start from a fresh read's whole picture: it journals only what follows."""
    snap = backend.submit("a.service", "b.service")
    assert set(snap.units) == {"a.service", "b.service"}
    assert snap.changes == set() and snap.journal
    key = backend.registry.layout.desired("a.service")
    snap.apply(backend.registry.layout, key, b"loaded", snap.revision + 1)
    assert snap.take_changes() == {(Kind.DESIRED, "a.service")}


def test_published_states_are_written_and_withdrawn_in_bulk(backend: Backend) -> None:
    reg = backend.registry
    lease = backend.join("m1")
    # More states than one transaction may hold: they are split, and every one arrives.
    many = {
        f"u{i}.service": PublishedState("m1", "loaded", "active", "running", "h", 1.0)
        for i in range(300)
    }
    reg.publish_states("m1", lease, many)
    states = reg.snapshot().states
    assert {n for n, per in states.items() if "m1" in per} == set(many)
    assert states["u7.service"]["m1"] == many["u7.service"]
    # One call both updates and withdraws; other machines' states are untouched.
    other = backend.join("m2")
    theirs = PublishedState("m2", "loaded", "inactive", "dead", "h", 2.0)
    reg.publish_states("m2", other, {"u1.service": theirs})
    failed = PublishedState("m1", "loaded", "failed", "failed", "h", 3.0)
    reg.publish_states(
        "m1", lease, {"u0.service": failed}, withdrawn=[f"u{i}.service" for i in range(1, 300)]
    )
    after = reg.snapshot().states
    assert {n for n, per in after.items() if "m1" in per} == {"u0.service"}
    assert after["u0.service"]["m1"] == failed
    assert after["u1.service"] == {"m2": theirs}
    # Nothing to write is no write at all.
    revision = reg.snapshot().revision
    reg.publish_states("m1", lease, {})
    assert reg.snapshot().revision == revision


def test_only_unit_content_writes_move_the_units_changed_mark(backend: Backend) -> None:
    """Claims compare this one key instead of every unit key: every content write moves it, a
    start or stop does not, and the snapshot neither pictures nor refuses it."""
    reg = backend.registry
    lease = backend.join("m1")
    snap = backend.submit("u.service")
    assert snap.refused == {}
    desired = snap.desired["u.service"].revision
    reg.set_desired(["u.service"], DesiredState.LAUNCHED)  # a start: no content changed
    snap = reg.snapshot()
    assert reg.claim(
        "u.service", "m1", lease, snap.revision - 1, snap.desired["u.service"].revision,
        NO_GUARDS,
    )
    assert desired != snap.desired["u.service"].revision
    # A new text for a unit moves the mark.
    backend.submit("v.service")
    before = reg.snapshot()
    text = "[Service]\nExecStart=/bin/true\n"
    assert reg.write_units([UnitRecord("u.service", text, content_hash(text))], None, before)
    assert not reg.claim(
        "v.service", "m1", lease, before.revision, before.desired["v.service"].revision,
        NO_GUARDS,
    )
    after = reg.snapshot()
    assert after.refused == {}
    assert set(after.units) == {"u.service", "v.service"}
    assert after.units["u.service"].text == text


@pytest.mark.parametrize(
    ("xfleet", "moves"),
    [
        ("", False),
        ("MachineMetadata=disk=ssd\nMachineID=abc", False),
        ("Conflicts=web@*.service", True),
        ("ZoneConflicts=db*", True),
        ("RegionConflicts=db*", True),
        ("Replaces=old.service", True),
        ("MachineOf=w.service", True),
        ("ZoneOf=w.service", True),
        ("RegionOf=w.service", True),
        ("MaxPerMachine=1", True),
        ("MaxPerZone=1", True),
        ("MaxPerRegion=1", True),
        ("Global=true", True),
    ],
)
def test_a_new_unit_moves_the_units_changed_mark_only_when_it_can_add_a_rule(
    backend: Backend, xfleet: str, moves: bool
) -> None:
    """A claim in flight stays valid across new self-contained units (a submission of plain
    instances goes on while the first of them are claimed); a unit whose rules name or count
    others, or a global one, could add a rule the claim did not guard on, and fails it."""
    reg = backend.registry
    lease = backend.join("m1")
    snap = backend.submit("w.service")
    text = TEXT + (f"\n[X-Fleet]\n{xfleet}\n" if xfleet else "")
    assert reg.write_units(
        [UnitRecord("web@7.service", text, content_hash(text))], DesiredState.LAUNCHED, snap
    )
    won = reg.claim(
        "w.service", "m1", lease, snap.revision, snap.desired["w.service"].revision, NO_GUARDS
    )
    assert won is not moves
    many = backend.submit("x.service")
    assert reg.write_units(
        [UnitRecord("web@8.service", text, content_hash(text))], DesiredState.LAUNCHED, many
    )
    assert reg.claim_many(
        {"x.service": many.desired["x.service"].revision}, "m1", lease, many.revision
    ) == {"x.service": not moves}


def test_claim_many_wins_or_loses_each_unit_on_its_own(backend: Backend) -> None:
    reg = backend.registry
    lease = backend.join("m1")
    other = backend.join("m2")
    snap = backend.submit("a.service", "b.service", "c.service", "d.service")
    desired = {n: d.revision for n, d in snap.desired.items()}
    # b is taken meanwhile, c's desired state changed: only a and d can be won.
    assert reg.claim("b.service", "m2", other, snap.revision, desired["b.service"], NO_GUARDS)
    reg.set_desired(["c.service"], DesiredState.LOADED)
    won = reg.claim_many(desired, "m1", lease, snap.revision)
    assert won == {"a.service": True, "b.service": False, "c.service": False, "d.service": True}
    owners = reg.snapshot().owners
    assert {n: o.machine_id for n, o in owners.items()} == {
        "a.service": "m1", "b.service": "m2", "d.service": "m1",
    }
    # The same claims again (a retry after a committed write): all lost, nothing changed.
    before = reg.snapshot().revision
    assert not any(reg.claim_many(desired, "m1", lease, snap.revision).values())
    assert reg.snapshot().revision == before
    # Unit content written after the snapshot (a new text for a): every claim of the batch
    # is lost.
    snap = backend.submit("e.service", "f.service")
    seen = {n: snap.desired[n].revision for n in ("e.service", "f.service")}
    text = TEXT + "# v2\n"
    assert reg.write_units([UnitRecord("a.service", text, content_hash(text))], None, snap)
    assert reg.claim_many(seen, "m1", lease, snap.revision) == {
        "e.service": False, "f.service": False,
    }
    # More claims than one transaction holds are split, and each is judged.
    names = [f"many{i}.service" for i in range(130)]
    snap = backend.submit(*names)
    won = reg.claim_many({n: snap.desired[n].revision for n in names}, "m1", lease, snap.revision)
    assert len(won) == 130 and all(won.values())
