"""No unit runs twice when a machine is cut off from etcd, and agents ride out an etcd leader
failover.

A partition is played by a loopback proxy between one agent and etcd (tests/support/proxy.py).
The cut-off agent cannot renew its lease; it must stop its units before the lease can expire and
another machine can claim them. A sampler records, every few milliseconds, which machines run the
unit: at no sample may two run it.
"""

from __future__ import annotations

import threading
import time
from urllib.parse import urlsplit

import pytest

from fleetd.model import DesiredState
from fleetd.snapshot import Snapshot
from tests.support.agents import Harness, unit_text
from tests.support.etcd_fixtures import etcd, etcd3, etcd_prefix  # noqa: F401
from tests.support.proxy import Proxy

pytestmark = pytest.mark.component


def _active(harness: Harness, machine: str, unit: str) -> bool:
    """The unit's process is alive there: a unit still stopping counts as running."""
    node = harness.nodes[machine]
    return node.manager.states([unit])[unit].active in (
        "active", "activating", "deactivating", "reloading"
    )


class Sampler:
    """Records which machines run `unit`, until stopped."""

    def __init__(self, harness: Harness, machines: list[str], unit: str) -> None:
        self.samples: list[tuple[float, frozenset[str]]] = []
        self._stop = threading.Event()

        def run() -> None:
            while not self._stop.is_set():
                running = frozenset(m for m in machines if _active(harness, m, unit))
                self.samples.append((time.monotonic(), running))
                time.sleep(0.005)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def overlaps(self) -> list[float]:
        return [t for t, running in self.samples if len(running) > 1]


def test_cut_off_machine_stops_its_unit_before_another_starts_it(etcd, etcd_prefix) -> None:  # noqa: F811
    endpoint = urlsplit(etcd.endpoints[0])
    proxy = Proxy(endpoint.hostname or "127.0.0.1", endpoint.port or 2379)
    harness = Harness(list(etcd.endpoints), etcd_prefix, ttl=3.0, stagger=0.2)
    try:
        harness.add("island", endpoints=[proxy.url])
        harness.wait(lambda s: len(s.machines) == 1)
        harness.submit({"solo.service": unit_text()}, DesiredState.LAUNCHED)
        harness.wait(lambda s: "solo.service" in s.states)
        harness.add("mainland")
        harness.wait(lambda s: len(s.machines) == 2)
        assert _active(harness, "island", "solo.service")
        sampler = Sampler(harness, ["island", "mainland"], "solo.service")
        cut_at = time.monotonic()
        proxy.cut()
        harness.wait(
            lambda s: s.owner_of("solo.service") == harness.nodes["mainland"].agent.me
            and "mainland" in (sampler.samples[-1][1] if sampler.samples else ()),
            timeout=20,
        )
        sampler.stop()
        assert sampler.overlaps() == []
        stopped = next(t for t, running in sampler.samples if "island" not in running)
        started = next(t for t, running in sampler.samples if "mainland" in running)
        # The island stopped before its 3 s lease could expire; the mainland started after.
        assert stopped - cut_at < 3.0
        assert started > stopped
        # Healed, the island rejoins with a new lease and does not take the unit back.
        proxy.heal()
        island = harness.nodes["island"].agent.me
        harness.wait(lambda s: island in s.machines, timeout=20)
        time.sleep(1.0)
        assert not _active(harness, "island", "solo.service")
        assert _active(harness, "mainland", "solo.service")
    finally:
        harness.stop_all()
        proxy.close()


def test_agents_ride_out_an_etcd_leader_failover(etcd3) -> None:  # noqa: F811
    # fleetd's default TTL: an election must not look like a partition.
    harness = Harness(list(etcd3.endpoints), "/failover/", ttl=10.0, stagger=0.2)
    try:
        for name in ("a", "b", "c"):
            harness.add(name)
        harness.wait(lambda s: len(s.machines) == 3)
        harness.submit({f"web@{i}.service": unit_text() for i in range(6)})
        before = harness.wait(lambda s: len(s.states) == 6)
        owners = {u: o.machine_id for u, o in before.owners.items()}
        leader = etcd3.leader_index()
        assert leader is not None
        etcd3.kill_member(leader)
        # The cluster keeps working: a new unit is placed through the surviving members, and no
        # machine lost its lease or its units on the way.
        harness.submit({"after-failover.service": unit_text()})
        after = harness.wait(lambda s: len(s.states) == 7, timeout=30)
        assert {u: after.owners[u].machine_id for u in owners} == owners
        assert len(after.machines) == 3
        running = harness.running()
        assert sum(len(units) for units in running.values()) == 7
    finally:
        harness.stop_all()


def test_fleetctl_fails_over_to_a_live_etcd_member(etcd3, tmp_path) -> None:  # noqa: F811
    import subprocess
    import sys
    from pathlib import Path

    fleetctl = Path(sys.executable).with_name("fleetctl")
    etcd3.kill_member(0)
    # The dead member is named first: every command must still go through on the others.
    endpoints = ",".join(etcd3.endpoints)
    unit = tmp_path / "ha.service"
    unit.write_text(unit_text())
    for _ in range(5):
        result = subprocess.run(
            [str(fleetctl), "--endpoint", endpoints, "--etcd-key-prefix", "/ha/",
             "start", "--no-block", str(unit)],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert result.returncode == 0, result.stderr
        listing = subprocess.run(
            [str(fleetctl), "--endpoint", endpoints, "--etcd-key-prefix", "/ha/",
             "list-unit-files", "--no-legend", "--fields", "unit,dstate"],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert listing.returncode == 0, listing.stderr
        assert listing.stdout.split() == ["ha.service", "launched"]


def test_unit_ignoring_sigterm_moved_by_replaces_never_runs_twice(etcd, etcd_prefix) -> None:  # noqa: F811
    """The old machine's stop takes long (the unit ignores SIGTERM): the owner key stays until
    systemd there reports the unit stopped, so the new machine starts it only after."""
    harness = Harness(list(etcd.endpoints), etcd_prefix, ttl=3.0, stagger=0.2)
    try:
        harness.add("m0")
        harness.add("m1")
        harness.wait(lambda s: len(s.machines) == 2)
        harness.submit({"slow.service": unit_text("slow")})
        snap = harness.wait(lambda s: "slow.service" in s.states)
        home = harness.machine_name(snap.owners["slow.service"].machine_id)
        other = "m1" if home == "m0" else "m0"
        harness.nodes[home].manager.slow_stop.add("slow.service")
        sampler = Sampler(harness, ["m0", "m1"], "slow.service")
        harness.submit({"new.service": unit_text("new", "Replaces=slow.service")})

        def stopping_here(s: Snapshot) -> bool:
            state = s.states.get("slow.service", {}).get(harness.nodes[home].agent.me)
            return state is not None and state.active == "deactivating"

        during = harness.wait(stopping_here)
        assert during.owner_of("slow.service") == harness.nodes[home].agent.me
        assert "Replaces=slow.service" in during.states["slow.service"][
            harness.nodes[home].agent.me
        ].reason
        time.sleep(1.0)  # a few rounds: still not released while it stops
        assert harness.snapshot().owner_of("slow.service") == harness.nodes[home].agent.me
        harness.nodes[home].manager.finish_stop("slow.service")
        harness.wait(
            lambda s: s.owner_of("slow.service") == harness.nodes[other].agent.me
            and _active(harness, other, "slow.service")
        )
        sampler.stop()
        assert sampler.overlaps() == []
    finally:
        harness.stop_all()
