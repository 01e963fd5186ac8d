"""Issue 7, acceptance 6: the etcd leader dies under 100 running units (3 members) and not one
unit restarts. The agents' leases must ride out the election: losing a member is no machine's
death."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import SETTLE, Cluster, wait_until

pytestmark = pytest.mark.functional

ETCD_MEMBERS = 3
AGENT_TTL = 4.0
UNIT_COUNT = 100


def test_etcd_leader_killed_under_load_restarts_nothing(fleet: Cluster, unit_dir: Path) -> None:
    paths = []
    for index in range(UNIT_COUNT):
        path = unit_dir / f"load{index:03d}.service"
        path.write_text("[Service]\nExecStart=/bin/sleep 100000\n")
        paths.append(path)
    fleet.fleetctl("start", "--no-block", *paths, timeout=300)
    names = [p.name for p in paths]
    fleet.wait_running(names, timeout=120)
    history = fleet.history(interval=0.25).start()
    try:
        time.sleep(1.0)
        before = {c.unit: (c.machine, c.roots) for c in history.all_copies()}
        assert set(names) <= set(before)
        history.action("etcd-kill leader", disruptive=False)
        out = fleet.lc("etcd-kill", "leader").stdout
        killed = out.split()[2]
        # Two TTLs without that member, then it comes back.
        time.sleep(2 * AGENT_TTL)
        history.action("etcd-start", disruptive=False)
        fleet.lc("etcd-start", killed)
        time.sleep(AGENT_TTL)
        wait_until(lambda: all(n in fleet.running() for n in names), SETTLE, "all running")
    finally:
        history.stop()
    after = {c.unit: (c.machine, c.roots) for c in history.all_copies() if c.gone is None}
    assert {n: after.get(n) for n in names} == {n: before[n] for n in names}
    report = history.check()
    print(report.summary())
    assert report.violations == [], "\n".join(report.violations)
    for name in fleet.baseline:
        assert history.lease_lost(name) == [], f"{name} lost its lease"
