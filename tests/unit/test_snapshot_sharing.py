"""A large registry's picture keeps repeated values once: the records and revisions of keys
written by one transaction, a template's name parts. Sharing must never change a value."""

from __future__ import annotations

import json

import pytest

from fleetd import model
from fleetd.errors import InvalidUnitName
from fleetd.keys import KeyLayout, Kind
from fleetd.model import DesiredState, Owner, shared_value
from fleetd.snapshot import Desired, OneState, Snapshot
from fleetd.unitfile import content_hash, parse_unit_name, template_group

LAYOUT = KeyLayout("/fleet/")
M = "a" * 32


def test_shared_value_returns_one_object_per_value_and_never_another_type() -> None:
    first = Desired(DesiredState.LAUNCHED, 70_001)
    again = Desired(DesiredState.LAUNCHED, 70_001)
    assert first is not again
    assert shared_value(first) is first and shared_value(again) is first
    # Equal across types (1 == 1.0 == True) is not the same value.
    assert type(shared_value(70_001)) is int
    assert type(shared_value(70_001.0)) is float
    assert type(shared_value(True)) is bool


def test_shared_value_table_is_bounded() -> None:
    for n in range(model._SHARED_LIMIT + 10):
        shared_value(10**9 + n)
    assert len(model._shared_values) <= model._SHARED_LIMIT


def _units_of_one_transaction(snap: Snapshot, revision: int, count: int) -> None:
    text = "[Service]\nExecStart=/bin/true\n"
    for n in range(count):
        name = f"web@{n}.service"
        value = json.dumps({"name": name, "text": text, "hash": content_hash(text)})
        # Fresh int objects for each key, as the etcd client hands them over.
        rev = int(str(revision))
        snap.apply(LAYOUT, f"/fleet/unit/{name}", value.encode(), rev, rev)
        snap.apply(LAYOUT, f"/fleet/desired/{name}", b"launched", int(str(revision)))
        owner = json.dumps({"machine_id": M}).encode()
        claim = int(str(revision + 1))
        snap.apply(LAYOUT, f"/fleet/owner/{name}", owner, claim, int(str(revision + 1)))


def test_keys_of_one_transaction_share_records_and_revisions() -> None:
    snap = Snapshot()
    _units_of_one_transaction(snap, 123_456, 5)
    desired = list(snap.desired.values())
    owners = list(snap.owners.values())
    assert all(d is desired[0] for d in desired)
    assert desired[0] == Desired(DesiredState.LAUNCHED, 123_456)
    assert all(o is owners[0] for o in owners)
    assert owners[0] == Owner(M, 123_457, 123_457)
    assert owners[0].revision is owners[0].mod_revision
    revisions = {id(r.revision) for r in snap.units.values()}
    assert len(revisions) == 1 and snap.units["web@3.service"].revision == 123_456


def test_a_shared_record_stays_right_when_one_of_its_keys_changes() -> None:
    snap = Snapshot()
    _units_of_one_transaction(snap, 500_000, 3)
    snap.apply(LAYOUT, "/fleet/desired/web@1.service", b"loaded", 500_010)
    assert snap.desired["web@1.service"] == Desired(DesiredState.LOADED, 500_010)
    assert snap.desired["web@0.service"] == Desired(DesiredState.LAUNCHED, 500_000)
    assert snap.desired["web@2.service"] is snap.desired["web@0.service"]


def test_a_known_name_is_not_validated_again_but_a_refused_one_always_is() -> None:
    snap = Snapshot()
    _units_of_one_transaction(snap, 7_000, 1)
    assert snap.apply(LAYOUT, "/fleet/move/web@0.service", M.encode(), 7_002) is None
    assert snap.moves == {"web@0.service": M}
    for revision in (7_003, 7_004):
        reason = snap.apply(LAYOUT, "/fleet/desired/bad name.service", b"launched", revision)
        assert reason is not None and "invalid characters" in reason
    assert "bad name.service" not in snap.desired


def test_instances_of_a_template_share_its_name_parts() -> None:
    one, two = parse_unit_name("db@1.service"), parse_unit_name("db@2.service")
    assert one.prefix is two.prefix and one.suffix is two.suffix
    assert one.template == "db@.service" and one.template is two.template
    assert template_group("db@1.service") is template_group("db@2.service")
    assert parse_unit_name("db@.service").template == "db@.service"
    assert parse_unit_name("db.service").template is None
    assert template_group("db.service") is None
    assert template_group("bad name@1.service") is None


def _state_value(active: str) -> bytes:
    return json.dumps(
        {"load": "loaded", "active": active, "sub": "running", "hash": "h", "since": 1.5}
    ).encode()


def test_one_machines_state_is_a_small_mapping_that_reads_like_a_dict() -> None:
    snap = Snapshot()
    b = "b" * 32
    snap.apply(LAYOUT, f"/fleet/state/web.service/{M}", _state_value("active"), 10)
    per = snap.states["web.service"]
    assert isinstance(per, OneState)
    state = per[M]
    expected = {M: state}
    assert per == expected and expected == per and dict(per) == expected
    assert M in per and b not in per and len(per) == 1 and list(per) == [M]
    assert per.get(M) is state and per.get(b) is None and per.get(b, "x") == "x"
    assert {**per} == expected and list(per.items()) == [(M, state)]
    assert repr(per) == repr(expected)
    with pytest.raises(KeyError):
        per[b]
    # A second machine's state makes it a plain map; taking one away, small again.
    snap.apply(LAYOUT, f"/fleet/state/web.service/{b}", _state_value("failed"), 11)
    both = snap.states["web.service"]
    assert set(both) == {M, b} and both[M] is state and both[b].active == "failed"
    snap.apply(LAYOUT, f"/fleet/state/web.service/{M}", None, 12)
    left = snap.states["web.service"]
    assert isinstance(left, OneState) and list(left) == [b] and left[b].active == "failed"
    snap.apply(LAYOUT, f"/fleet/state/web.service/{b}", None, 13)
    assert "web.service" not in snap.states


def test_a_copy_shares_the_state_maps_and_later_events_leave_it_alone() -> None:
    snap = Snapshot()
    snap.apply(LAYOUT, f"/fleet/state/web.service/{M}", _state_value("active"), 10)
    copy = snap.copy()
    snap.apply(LAYOUT, f"/fleet/state/web.service/{M}", _state_value("failed"), 11)
    assert copy.states["web.service"][M].active == "active"
    assert snap.states["web.service"][M].active == "failed"


def test_name_parses_are_cached_within_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    from fleetd import unitfile

    assert parse_unit_name("cache@7.service") is parse_unit_name("cache@7.service")
    monkeypatch.setattr(unitfile, "_NAMES_LIMIT", 100)
    for n in range(250):
        assert parse_unit_name(f"bound@{n}.service").instance == str(n)
        assert len(unitfile._names) <= 100
    with pytest.raises(InvalidUnitName):
        parse_unit_name("bad name.service")
    assert "bad name.service" not in unitfile._names


def test_a_whole_read_starts_with_an_empty_journal_and_journals_what_follows() -> None:
    from fleetd.fake_registry import FakeRegistry
    from fleetd.snapshot import UnitRecord

    registry = FakeRegistry()
    text = "[Service]\nExecStart=/bin/true\n"
    records = [UnitRecord(f"web@{n}.service", text, content_hash(text)) for n in range(3)]
    registry.write_units(records, DesiredState.LAUNCHED, registry.snapshot())
    snap = registry.snapshot()
    assert set(snap.units) == {r.name for r in records} and snap.changes == set()
    assert snap.journal
    snap.apply(LAYOUT, "/fleet/desired/web@1.service", b"loaded", snap.revision + 1)
    assert snap.take_changes() == {(Kind.DESIRED, "web@1.service")}
    # Without the journal, nothing is noted; the picture is the same.
    quiet = Snapshot(journal=False)
    quiet.apply(LAYOUT, "/fleet/desired/web@1.service", b"loaded", 9)
    assert quiet.changes == set() and quiet.desired_state("web@1.service") is DesiredState.LOADED
