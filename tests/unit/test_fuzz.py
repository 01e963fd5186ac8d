"""Fuzzing of everything that reads outside input: unit names, unit files and [X-Fleet] rules
(fleetctl's arguments, and the agents' copy of whatever a client stored), fleetd's metadata and
fleetctl's --fields, registry keys and values (anyone with write access to etcd), and planning
over a registry built from such values.

The contract under test: bad input is refused with the project's own error types, or ignored by
the registry decoder; no other exception escapes. Each property has a bounded budget (examples,
no deadline: the suite runs on a busy 2-core machine). Inputs that once crashed are pinned as
`@example`s and in the regression tables below.
"""

from __future__ import annotations

import contextlib
import json
import string

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fleetctl.output import UNIT_FIELDS, UnknownField, parse_fields
from fleetd.config import parse_metadata
from fleetd.errors import ConfigError, InvalidUnitFile, InvalidUnitName
from fleetd.keys import KeyLayout, Kind
from fleetd.placement import View, explain, plan_placements
from fleetd.planner import plan_local, release_reasons
from fleetd.snapshot import Snapshot
from fleetd.unitfile import (
    default_unit_name,
    parse_requirements,
    parse_unit_file,
    parse_unit_name,
    requirements_for,
)

JSONISH_SMALL = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8))
BUDGET = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
LAYOUT = KeyLayout("/fleet/")

# Lines that look like unit files: sections, keys fleet knows, continuations, comments.
SECTIONS = st.sampled_from(["[Unit]", "[Service]", "[X-Fleet]", "[Install]", "[", "[]", "[X-Fleet"])
KEYS = st.sampled_from(
    [
        "MachineID", "MachineOf", "MachineMetadata", "Conflicts", "Global", "Replaces",
        "ZoneOf", "RegionOf", "ZoneConflicts", "RegionConflicts", "MaxPerMachine", "MaxPerZone",
        "MaxPerRegion", "Spread", "Pin", "X-ConditionMachineID", "X-Conflicts", "Description",
        "ExecStart", "",
    ]
)  # fmt: skip
VALUES = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["true", "false", "0", "-1", "99999999999999999999", "zone", "%i", "%n",
                     "a=b", "a!=b", '"a=b" "c!=d"', "web@*.service", "*", "\\", '"']),
)  # fmt: skip
LINES = st.one_of(
    SECTIONS,
    st.builds(lambda k, v: f"{k}={v}", KEYS, VALUES),
    st.builds(lambda k, v: f"{k} = {v}\\", KEYS, VALUES),
    st.sampled_from(["#", ";", "", " ", "\t", "\\"]),
    st.text(max_size=40),
)
UNIT_TEXTS = st.lists(LINES, max_size=25).map("\n".join)
NAME_CHARS = string.ascii_letters + string.digits + "@.-_:\\%/ \x00é"
NAMES = st.one_of(
    st.text(alphabet=NAME_CHARS, max_size=40),
    st.builds(
        lambda p, i, s: f"{p}@{i}.{s}",
        st.text(alphabet=NAME_CHARS, max_size=10),
        st.text(alphabet=NAME_CHARS, max_size=6),
        st.sampled_from(["service", "socket", "timer", "mount", "target", "x"]),
    ),
)


# -------------------------------------------------------------------------------- names


@BUDGET
@given(NAMES)
@example("@.service")
@example(".service")
@example("a@.service")
@example("a/b.service")
def test_unit_names_parse_or_are_refused(text: str) -> None:
    try:
        name = parse_unit_name(text)
    except InvalidUnitName as exc:
        assert "\n" not in str(exc)
        return
    assert name.name == text
    if name.is_instance:
        assert name.template is not None


@BUDGET
@given(st.text(max_size=60))
def test_arguments_name_a_unit_or_are_refused(text: str) -> None:
    with contextlib.suppress(InvalidUnitName):
        parse_unit_name(default_unit_name(text))


# --------------------------------------------------------------------------- unit files


@BUDGET
@given(UNIT_TEXTS, NAMES)
@example("[X-Fleet]\nMaxPerZone=99999999999999999999999", "a.service")
@example("[X-Fleet]\nMachineMetadata=\"unterminated", "a.service")
@example("[X-Fleet]\nConflicts=\\", "a.service")
def test_unit_files_parse_or_are_refused(text: str, name: str) -> None:
    try:
        unit = parse_unit_file(text, name)
        parse_requirements(unit, name)
    except (InvalidUnitFile, InvalidUnitName) as exc:
        assert str(exc)
        return
    # Whatever parses, parses the same way twice (the agents and fleetctl agree).
    assert requirements_for(text, name) == requirements_for(text, name)


# ------------------------------------------------------------------- other operator input


@BUDGET
@given(st.one_of(st.text(max_size=60), st.dictionaries(st.text(max_size=8), JSONISH_SMALL)))
@example("a=b,,=c")
@example({"": ""})
def test_fleetd_metadata_parses_or_is_refused(value: object) -> None:
    try:
        metadata = parse_metadata(value, "test")
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    assert all(isinstance(k, str) and isinstance(v, str) and v for k, v in metadata.items())


@BUDGET
@given(st.text(max_size=40))
def test_fields_parse_or_are_refused(spec: str) -> None:
    try:
        fields = parse_fields(spec, UNIT_FIELDS)
    except UnknownField:
        return
    assert fields and set(fields) <= set(UNIT_FIELDS)


# ---------------------------------------------------------------------- registry decoder

KINDS = st.sampled_from([k.value for k in Kind] + ["", "units", "machine/x"])
JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELD_NAMES = ["id", "name", "text", "hash", "machine_id", "public_ip", "metadata", "version",
               "load", "active", "sub", "since"]  # fmt: skip
RECORDS = st.dictionaries(st.sampled_from(FIELD_NAMES), JSONISH, max_size=8)
VALUES_BYTES = st.one_of(
    st.binary(max_size=64),
    RECORDS.map(lambda d: json.dumps(d).encode()),
    st.sampled_from([b"launched", b"loaded", b"inactive", b"\xff\xfe", b"[" * 5000, b"{}"]),
)
KEYS_TEXT = st.builds(
    lambda kind, name, tail: f"/fleet/{kind}/{name}{tail}",
    KINDS,
    st.text(alphabet=NAME_CHARS, max_size=20),
    st.sampled_from(["", "/" + "a" * 32, "/", "//x"]),
)


@BUDGET
@given(st.lists(st.tuples(KEYS_TEXT, st.one_of(st.none(), VALUES_BYTES)), max_size=12))
@example([("/fleet/unit/a.service", b"[" * 100_000)])
@example([("/fleet/machine/m", b'{"id": "m", "metadata": [["a", "b"], ["c"]]}')])
def test_any_registry_content_is_decoded_or_ignored(events: list[tuple[str, bytes | None]]) -> None:
    snapshot = Snapshot()
    for revision, (key, value) in enumerate(events, start=1):
        snapshot.apply(LAYOUT, key, value, revision, revision)
    # Whatever got in is usable by the planners: a foreign writer cannot crash the agents.
    view = View(snapshot)
    for machine_id in list(snapshot.machines)[:2]:
        release_reasons(snapshot, machine_id, view)
        plan_local(snapshot, machine_id, view, {}, {}, frozenset())
    plan_placements(snapshot)
    for name in list(snapshot.units)[:3]:
        explain(snapshot, name)


# Inputs that crashed a decoder or parser once; kept so they never do again.
REGRESSIONS: list[tuple[str, bytes]] = [
    # JSON nested deeper than Python's recursion limit: json.loads raised RecursionError.
    ("/fleet/unit/deep.service", b"[" * 100_000),
    ("/fleet/state/deep.service/" + "a" * 32, b'{"load": ' + b"[" * 100_000),
]


@pytest.mark.parametrize(("key", "value"), REGRESSIONS)
def test_regressions(key: str, value: bytes) -> None:
    snapshot = Snapshot()
    reason = snapshot.apply(LAYOUT, key, value, 7, 7)
    assert reason is not None and "undecodable value" in reason
    assert not snapshot.units and not snapshot.states
    assert snapshot.refused == {key: reason}
