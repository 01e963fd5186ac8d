"""Whatever any client writes under the prefix, applying it to a snapshot never raises: it is
taken, or refused with a reason, and a later valid write of the key replaces the refusal."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from fleetd.keys import KeyLayout
from fleetd.snapshot import Snapshot

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
