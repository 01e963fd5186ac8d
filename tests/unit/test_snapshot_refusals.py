"""Whatever any client writes under the prefix, applying it to a snapshot never raises: it is
taken, or refused with a reason, and a later valid write of the key replaces the refusal."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetd.keys import KeyLayout, Kind, ParsedKey
from fleetd.snapshot import Snapshot
from fleetd.unitfile import content_hash

LAYOUT = KeyLayout("/fleet/")
KINDS = ["unit/", "desired/", "owner/", "machine/", "state/", "move/", "", "other/"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@given(
    kind=st.sampled_from(KINDS),
    tail=st.text(max_size=30),
    value=st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()),
)
def test_apply_never_raises_and_refuses_with_a_reason(kind: str, tail: str, value: bytes) -> None:
    snap = Snapshot()
    key = "/fleet/" + kind + tail
    reason = snap.apply(LAYOUT, key, value, 5, 5)
    if reason is None:
        assert key not in snap.refused
    else:
        assert snap.refused == {key: reason} and reason
    snap.apply(LAYOUT, key, None, 6)
    assert snap.refused == {}


def test_a_valid_write_replaces_a_refused_one() -> None:
    snap = Snapshot()
    assert snap.apply(LAYOUT, "/fleet/desired/a.service", b"bogus", 2) is not None
    assert snap.apply(LAYOUT, "/fleet/desired/a.service", b"launched", 3) is None
    assert snap.refused == {} and snap.desired_state("a.service").value == "launched"
    # A refused write after a valid one leaves nothing stale behind either.
    assert snap.apply(LAYOUT, "/fleet/desired/a.service", b"nope", 4) is not None
    assert "a.service" not in snap.desired


def test_a_unit_whose_hash_is_not_its_text_is_refused() -> None:
    text = "[Service]\nExecStart=/bin/true\n"
    value = json.dumps({"name": "a.service", "text": text, "hash": "0" * 40}).encode()
    reason = Snapshot().apply(LAYOUT, "/fleet/unit/a.service", value, 2)
    assert reason is not None and "hash" in reason


def test_a_bad_unit_name_is_refused_in_every_key_and_every_time() -> None:
    snap = Snapshot()
    reasons = [
        snap.apply(LAYOUT, "/fleet/desired/web@1.bogus", b"launched", 2),
        snap.apply(LAYOUT, "/fleet/desired/web@1.bogus", b"launched", 3),
        snap.apply(LAYOUT, "/fleet/owner/web@1.bogus", b'{"machine_id": "m1"}', 4),
    ]
    assert all(reason and "unit type suffix" in reason for reason in reasons)
    assert snap.desired == {} and snap.owners == {}
    assert sorted(snap.refused) == ["/fleet/desired/web@1.bogus", "/fleet/owner/web@1.bogus"]


def test_an_unknown_desired_state_is_refused_with_the_enums_reason() -> None:
    reason = Snapshot().apply(LAYOUT, "/fleet/desired/a.service", b"started", 2)
    assert reason == "undecodable value: ValueError: 'started' is not a valid DesiredState"


def test_every_kind_lands_in_its_map_and_a_delete_removes_it() -> None:
    snap = Snapshot()
    text = "[Service]\nExecStart=/bin/true\n"
    unit = json.dumps({"name": "a.service", "text": text, "hash": content_hash(text)})
    state = json.dumps({"load": "loaded", "active": "active", "sub": "running", "hash": ""})
    puts = {
        "/fleet/unit/a.service": unit.encode(),
        "/fleet/desired/a.service": b"launched",
        "/fleet/owner/a.service": b'{"machine_id": "m1"}',
        "/fleet/machine/m1": b'{"id": "m1"}',
        "/fleet/state/a.service/m1": state.encode(),
        "/fleet/move/a.service": b"m2",
    }
    for revision, (key, value) in enumerate(puts.items(), start=2):
        assert snap.apply(LAYOUT, key, value, revision) is None
    assert set(snap.units) == set(snap.desired) == set(snap.owners) == {"a.service"}
    assert set(snap.machines) == {"m1"} and snap.moves == {"a.service": "m2"}
    assert set(snap.states["a.service"]) == {"m1"} and snap.revision == 7
    for key in puts:
        snap.apply(LAYOUT, key, None, 9)
    assert (snap.units, snap.desired, snap.owners, snap.machines, snap.states, snap.moves) == (
        {}, {}, {}, {}, {}, {},
    )


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("/fleet/unit/a.service", ParsedKey(Kind.UNIT, "a.service")),
        ("/fleet/state/a.service/m1", ParsedKey(Kind.STATE, "a.service", "m1")),
        ("/fleet/machine/m1", ParsedKey(Kind.MACHINE, "m1")),
        ("/fleet/move/a.service", ParsedKey(Kind.MOVE, "a.service")),
        ("/fleet/state/a.service", None),
        ("/fleet/state//m1", None),
        ("/fleet/unit/a/b.service", None),
        ("/fleet/unit/", None),
        ("/fleet/other/a.service", None),
        ("/fleet/UNIT/a.service", None),
        ("/other/unit/a.service", None),
    ],
)
def test_keys_split_into_kind_name_and_machine(key: str, expected: ParsedKey | None) -> None:
    assert LAYOUT.parse(key) == expected
    parts = LAYOUT.split(key)
    assert (parts and ParsedKey(*parts)) == (expected or None)
