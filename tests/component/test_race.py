"""Racing agents never break a hard rule: many real agents (each with its own etcd connection,
lease and watch) claim at once against a real etcd, and the whole history of owner keys, not only
the end state, is checked by an independent replay (tests/support/history.py)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from fleetd.model import DesiredState
from tests.support.agents import Harness, unit_text
from tests.support.etcd_fixtures import etcd, etcd_prefix  # noqa: F401
from tests.support.history import Rules, owner_events, violations

pytestmark = pytest.mark.component


def _decode(value: bytes) -> str:
    return str(json.loads(value)["machine_id"])


@pytest.fixture
def harness(etcd, etcd_prefix):  # noqa: F811
    h = Harness(list(etcd.endpoints), etcd_prefix, stagger=0.2)
    yield h
    h.stop_all()


def test_fifty_mutually_conflicting_units_on_twenty_machines(harness: Harness) -> None:
    for i in range(20):
        harness.add(f"m{i:02d}")
    harness.wait(lambda s: len(s.machines) == 20)
    start = harness.snapshot().revision
    units = {f"race.{i}.service": unit_text(xfleet="Conflicts=race.*.service") for i in range(50)}
    harness.submit(units, DesiredState.LAUNCHED)
    snap = harness.wait(lambda s: len(s.owners) == 20, timeout=30)
    # Let the losers keep trying for a while: nothing may change any more.
    harness.wait(lambda s: all(len(s.states.get(u, {})) == 1 for u in s.owners), timeout=30)
    end = harness.snapshot()
    assert len(end.owners) == 20
    machines = Counter(o.machine_id for o in end.owners.values())
    assert max(machines.values()) == 1, machines
    client = harness.client()
    events = owner_events(client, start, end.revision)
    rules = Rules(
        conflicts={u: ("race.*.service",) for u in units},
        zone_conflicts={},
        max_per_zone={},
        zone={},
    )
    assert len(events) >= 20
    assert violations(events, client.layout, rules, _decode) == []
    assert snap.owners.keys() <= units.keys()


def test_two_hundred_units_with_zone_rules_on_twenty_machines_in_four_zones(
    harness: Harness,
) -> None:
    zones = ["z1", "z2", "z3", "z4"]
    machine_zone: dict[str, str] = {}
    for i in range(20):
        node = harness.add(f"m{i:02d}", {"zone": zones[i % 4], "region": "r1"})
        machine_zone[node.agent.me] = zones[i % 4]
    harness.wait(lambda s: len(s.machines) == 20)
    start = harness.snapshot().revision
    units: dict[str, str] = {}
    for i in range(1, 121):
        units[f"web@{i}.service"] = unit_text(xfleet="MaxPerZone=5")
    for i in range(1, 81):
        units[f"db@{i}.service"] = unit_text(xfleet="ZoneConflicts=db@*.service")
    harness.submit(units, DesiredState.LAUNCHED)
    # 5 web per zone and 1 db per zone can run.
    harness.wait(lambda s: len(s.owners) == 24, timeout=60)
    end = harness.wait(
        lambda s: all(len(s.states.get(u, {})) == 1 for u in s.owners), timeout=30
    )
    per_zone = Counter(
        machine_zone[o.machine_id] for u, o in end.owners.items() if u.startswith("web@")
    )
    assert per_zone == {z: 5 for z in zones}
    db_zones = Counter(
        machine_zone[o.machine_id] for u, o in end.owners.items() if u.startswith("db@")
    )
    assert db_zones == {z: 1 for z in zones}
    client = harness.client()
    events = owner_events(client, start, end.revision)
    rules = Rules(
        conflicts={},
        zone_conflicts={u: ("db@*.service",) for u in units if u.startswith("db@")},
        max_per_zone={u: ("web@", 5) for u in units if u.startswith("web@")},
        zone=machine_zone,
    )
    assert violations(events, client.layout, rules, _decode) == []


def test_the_checker_sees_a_violation_in_history(harness: Harness) -> None:
    """The history checker itself must be able to fail: write two conflicting owners by hand."""
    client = harness.client()
    start = client.snapshot().revision
    lease = client.grant_lease(5)
    from fleetd.placement import Guards

    for unit in ("a.service", "b.service"):
        harness.submit({unit: unit_text(xfleet="Conflicts=*.service")})
        snap = client.snapshot()
        from fleetd.model import Machine

        client.register_machine(Machine("m1"), lease) if "m1" not in snap.machines else None
        snap = client.snapshot()
        # Guards left empty on purpose: this is the unsafe claim the real agents never make.
        assert client.claim(unit, "m1", lease, snap.revision, snap.desired[unit].revision,
                            Guards({}, frozenset()))
    end = client.snapshot().revision
    rules = Rules({"a.service": ("*.service",), "b.service": ("*.service",)}, {}, {}, {})
    found = violations(owner_events(client, start, end), client.layout, rules, _decode)
    client.revoke(lease)
    assert found and "conflict" in found[0]
