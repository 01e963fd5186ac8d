"""The etcd adapter's transactions against a real etcd: batches larger than one transaction,
the guards of unit writes, and every guard of a claim."""

from __future__ import annotations

import pytest

from fleetd.errors import RegistryUnavailable
from fleetd.model import DesiredState, Machine
from fleetd.placement import NO_GUARDS, Guards
from fleetd.registry import MAX_TXN_OPS, EtcdRegistry
from fleetd.snapshot import UnitRecord
from fleetd.unitfile import content_hash
from tests.support.bulk import bulk_pages
from tests.support.etcd_fixtures import etcd, etcd_prefix  # noqa: F401

pytestmark = pytest.mark.component




def record(name: str, text: str = "[Service]\nExecStart=/bin/true\n") -> UnitRecord:
    return UnitRecord(name, text, content_hash(text))


@pytest.fixture(params=["grpc", "http"])
def registry(request, etcd, etcd_prefix):  # noqa: F811
    """Over each transport: gRPC (the agent's) and etcd's JSON gateway (fleetctl's)."""
    reg = EtcdRegistry(list(etcd.endpoints), etcd_prefix, transport=request.param)
    yield reg
    reg.close()


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_a_dead_endpoint_fails_over_to_the_next_and_none_left_is_one_line(
    etcd, etcd_prefix, transport  # noqa: F811
) -> None:
    dead = "http://127.0.0.1:1"
    reg = EtcdRegistry([dead, *etcd.endpoints], etcd_prefix, timeout=2, transport=transport)
    try:
        for _ in range(3):  # whichever endpoint a request starts from, it gets an answer
            assert reg.write_units([record("over.service")], None, reg.snapshot())
            assert "over.service" in reg.snapshot().units
    finally:
        reg.close()
    alone = EtcdRegistry([dead], etcd_prefix, timeout=2, transport=transport)
    try:
        with pytest.raises(RegistryUnavailable) as refused:
            alone.snapshot()
    finally:
        alone.close()
    message = str(refused.value)
    assert message.startswith(f"cannot reach etcd at {dead}: ") and "\n" not in message


def test_a_batch_larger_than_one_transaction(registry: EtcdRegistry) -> None:
    count = MAX_TXN_OPS + 30
    records = [record(f"many@{i}.service") for i in range(count)]
    assert registry.write_units(records, DesiredState.LAUNCHED, registry.snapshot())
    snap = registry.snapshot()
    assert len(snap.units) == count
    assert {d.state for d in snap.desired.values()} == {DesiredState.LAUNCHED}


def test_a_registry_larger_than_grpcs_default_answer_limit_reads_whole(
    registry: EtcdRegistry,
) -> None:
    """10,000 units with owners and states are about 6 MB, over gRPC's default 4 MB limit on
    one answer: the snapshot (an agent joining, fleetctl's listings) must still read."""
    padding = "x" * 1000
    text = f"[Unit]\nDescription={padding}\n\n[Service]\nExecStart=/bin/true\n"
    records = [record(f"big@{i}.service", text) for i in range(5000)]
    assert registry.write_units(records, DesiredState.LAUNCHED, registry.snapshot())
    assert len(registry.snapshot().units) == 5000


@pytest.mark.parametrize("fail", [False, True], ids=["over gRPC", "gRPC failing"])
def test_a_large_read_over_http_goes_on_over_grpc_and_reads_the_same(
    etcd, etcd_prefix, monkeypatch, fail  # noqa: F811
) -> None:
    """A read over the JSON gateway with many keys to come reads the rest over gRPC, at the
    same revision; when gRPC does not get through, it goes on over HTTP. Either way the picture
    is the one a gRPC registry reads; a small read never loads gRPC."""
    http = EtcdRegistry(list(etcd.endpoints), etcd_prefix, transport="http")
    grpc = EtcdRegistry(list(etcd.endpoints), etcd_prefix)
    try:
        assert http.write_units([record("few@1.service")], DesiredState.LAUNCHED, http.snapshot())
        pages = bulk_pages(monkeypatch, fail, spared=grpc.transport)
        assert set(http.snapshot().units) == {"few@1.service"}
        assert pages == []  # 2 keys: nothing to gain
        records = [record(f"many@{i}.service") for i in range(150)]
        assert http.write_units(records, DesiredState.LAUNCHED, http.snapshot())
        pages.clear()
        read = http.snapshot()
        expected = grpc.snapshot()
        assert len(read.units) == 151
        assert read.revision == expected.revision
        assert read.units == expected.units and read.desired == expected.desired
        # 302 keys in pages of 40: the first over HTTP, then over gRPC (or one try of it).
        assert len(pages) == (1 if fail else 7)
        pages.clear()
        assert http.snapshot().units == expected.units
        assert len(pages) == (0 if fail else 7)  # a failed gRPC is not tried again
    finally:
        http.close()
        grpc.close()


def test_a_stale_guard_in_a_later_part_fails_and_a_retry_converges(
    registry: EtcdRegistry,
) -> None:
    names = [f"part@{i}.service" for i in range(MAX_TXN_OPS)]
    stale = registry.snapshot()
    # Someone else writes the last unit after our snapshot.
    assert registry.write_units(
        [record(names[-1], "[Service]\nExecStart=/bin/false\n")], None, stale
    )
    assert not registry.write_units([record(n) for n in names], DesiredState.LOADED, stale)
    fresh = registry.snapshot()
    assert registry.write_units([record(n) for n in names], DesiredState.LOADED, fresh)
    final = registry.snapshot()
    assert {n for n in final.units} == set(names)
    assert all(final.units[n].hash == record(n).hash for n in names)


def _machine(registry: EtcdRegistry, machine_id: str = "m1") -> int:
    lease = registry.grant_lease(10)
    assert registry.register_machine(Machine(machine_id), lease)
    return lease


def test_claim_is_refused_once_a_unit_content_that_can_add_a_rule_changed(
    registry: EtcdRegistry,
) -> None:
    lease = _machine(registry)
    names = ["a1.service", "a2.service", "a3.service"]
    registry.write_units([record(n) for n in names], DesiredState.LAUNCHED, registry.snapshot())
    snap = registry.snapshot()
    desired = {n: snap.desired[n].revision for n in names}
    # A new self-contained unit adds no rule: a claim planned before it stands...
    registry.write_units([record("plain.service")], None, registry.snapshot())
    assert registry.claim("a1.service", "m1", lease, snap.revision, desired["a1.service"],
                          NO_GUARDS)
    # ... but not across a new unit whose rule names others, nor across a new text of a unit.
    naming = "[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nConflicts=a*\n"
    registry.write_units([record("naming.service", naming)], None, registry.snapshot())
    assert not registry.claim("a2.service", "m1", lease, snap.revision, desired["a2.service"],
                              NO_GUARDS)
    later = registry.snapshot()
    changed = record("plain.service", "[Service]\nExecStart=/bin/false\n")
    registry.write_units([changed], None, later)
    assert not registry.claim("a3.service", "m1", lease, later.revision, desired["a3.service"],
                              NO_GUARDS)
    fresh = registry.snapshot()
    assert registry.claim("a3.service", "m1", lease, fresh.revision, desired["a3.service"],
                          NO_GUARDS)
    assert not registry.claim("a3.service", "m1", lease, fresh.revision, desired["a3.service"],
                              NO_GUARDS)


def test_claim_is_refused_when_a_guarded_owner_changed(registry: EtcdRegistry) -> None:
    lease = _machine(registry)
    names = ["web@1.service", "web@2.service", "db.service"]
    registry.write_units([record(n) for n in names], DesiredState.LAUNCHED, registry.snapshot())
    snap = registry.snapshot()
    rev = {n: snap.desired[n].revision for n in names}
    # web@1 is claimed after the snapshot: a claim guarded on the "web@" prefix must fail...
    assert registry.claim(
        "web@1.service", "m1", lease, snap.revision, rev["web@1.service"], NO_GUARDS
    )
    by_prefix = Guards({}, frozenset({"web@"}))
    assert not registry.claim(
        "web@2.service", "m1", lease, snap.revision, rev["web@2.service"], by_prefix
    )
    # ... and so must one guarded on web@1's exact owner revision as seen (absent).
    exact = Guards({"web@1.service": 0}, frozenset())
    assert not registry.claim("db.service", "m1", lease, snap.revision, rev["db.service"], exact)
    # An unrelated guard does not stop it.
    other = Guards({"cache.service": 0}, frozenset({"cache"}))
    assert registry.claim("db.service", "m1", lease, snap.revision, rev["db.service"], other)


def test_claim_needs_a_live_machine_and_the_desired_state_seen(registry: EtcdRegistry) -> None:
    lease = _machine(registry)
    registry.write_units([record("a.service")], DesiredState.LAUNCHED, registry.snapshot())
    snap = registry.snapshot()
    desired = snap.desired["a.service"].revision
    assert not registry.claim("a.service", "ghost", lease, snap.revision, desired, NO_GUARDS)
    registry.set_desired(["a.service"], DesiredState.LOADED)
    later = registry.snapshot()
    assert not registry.claim("a.service", "m1", lease, later.revision, desired, NO_GUARDS)


def test_release_only_by_the_owner(registry: EtcdRegistry) -> None:
    lease = _machine(registry)
    registry.write_units([record("a.service")], DesiredState.LAUNCHED, registry.snapshot())
    snap = registry.snapshot()
    assert registry.claim(
        "a.service", "m1", lease, snap.revision, snap.desired["a.service"].revision, NO_GUARDS
    )
    assert not registry.release("a.service", "m2")
    assert registry.release("a.service", "m1")
    assert "a.service" not in registry.snapshot().owners


def test_machine_registration_is_exclusive_but_recognises_its_own_lease(
    registry: EtcdRegistry,
) -> None:
    lease = _machine(registry, "m9")
    other = registry.grant_lease(10)
    assert not registry.register_machine(Machine("m9"), other)
    # Sending our own registration again (a retry after a lost answer) is a success.
    assert registry.register_machine(Machine("m9"), lease)
    registry.revoke(lease)
    assert registry.register_machine(Machine("m9"), other)
