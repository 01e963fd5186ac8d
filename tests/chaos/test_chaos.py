"""Chaos on a 5-machine local cluster with 3 etcd members: random machine kills, graceful halts,
partitions, paused agents, fleetd restarts and etcd member kills, while units that ignore SIGTERM
and units with rules (Conflicts, MachineOf, MaxPerMachine) run. Then everything is healed and the
whole recorded history is checked (tests/support/history.py): zero violations.

The run is seeded; the seed is printed and `FLEET_CHAOS_SEED=N` replays the same choices (the
timing of a loaded machine still varies). `FLEET_CHAOS_SECONDS` sets how long faults are thrown
(default 75 s, so the whole test stays within about three minutes on a busy 2-core machine).
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.functional.conftest import (  # noqa: F401  (fixtures used by name)
    SETTLE,
    Cluster,
    cluster,
    fleet,
    unit_dir,
    wait_until,
)
from tests.support.history import Action

pytestmark = [pytest.mark.functional, pytest.mark.chaos]

CLUSTER_CONFIG = Path(__file__).with_name("cluster-5.toml")
ETCD_MEMBERS = 3
AGENT_TTL = 4.0
STOP_TIMEOUT = 6
DURATION = float(os.environ.get("FLEET_CHAOS_SECONDS", "75"))
MAX_MACHINES_DOWN = 2

SLOW = (
    "[Service]\nExecStart=/bin/sh -c 'trap \"\" TERM; while true; do sleep 1; done'\n"
    f"TimeoutStopSec={STOP_TIMEOUT}\n"
)
PLAIN = "[Service]\nExecStart=/bin/sleep 100000\n"


def chaos_units() -> dict[str, str]:
    units = {f"slow{i}.service": SLOW for i in range(4)}
    units["db.service"] = SLOW
    units["app.service"] = PLAIN + "\n[X-Fleet]\nMachineOf=db.service\n"
    for i in range(1, 4):
        units[f"web@{i}.service"] = SLOW + "\n[X-Fleet]\nConflicts=web@*.service\n"
    for i in range(1, 4):
        units[f"worker@{i}.service"] = PLAIN + "\n[X-Fleet]\nMaxPerMachine=1\n"
    for i in range(3):
        units[f"plain{i}.service"] = PLAIN
    return units


@dataclass
class Fault:
    kind: str
    target: str  # a machine name, or an etcd member number
    heal_at: float
    action: Action


def test_chaos(fleet: Cluster, unit_dir: Path) -> None:  # noqa: F811
    seed = int(os.environ.get("FLEET_CHAOS_SEED") or random.SystemRandom().randrange(10**6))
    print(f"chaos seed {seed} (replay with FLEET_CHAOS_SEED={seed})")
    rng = random.Random(seed)
    units = chaos_units()
    paths = []
    for name, text in units.items():
        path = unit_dir / name
        path.write_text(text)
        paths.append(path)
    fleet.fleetctl("start", *paths, timeout=180)
    machines = list(fleet.baseline)
    counts: Counter[str] = Counter()
    active: list[Fault] = []
    history = fleet.history(interval=0.15).start()
    try:
        end = time.monotonic() + DURATION
        while time.monotonic() < end:
            now = time.monotonic()
            for fault in [f for f in active if f.heal_at <= now]:
                heal(fleet, fault)
                active.remove(fault)
            down = {f.target for f in active if f.kind != "etcd-kill"}
            etcd_down = any(f.kind == "etcd-kill" for f in active)
            kinds = ["restart", "restart --kill", "etcd-kill"]
            if len(down) < MAX_MACHINES_DOWN:
                kinds += ["kill", "halt", "partition", "pause"]
            kind = rng.choice(kinds)
            candidates = [m for m in machines if m not in down]
            if kind == "etcd-kill" and etcd_down:
                kind = "restart"
            target = rng.choice(candidates)
            hold = rng.uniform(1.0, 3.0 * AGENT_TTL)
            if kind == "etcd-kill":
                member = fleet.lc("etcd-kill", str(rng.randrange(3))).stdout.split()[2]
                action = history.action(kind, disruptive=False)
                active.append(Fault(kind, member, time.monotonic() + hold, action))
            elif kind.startswith("restart"):
                action = history.action(kind, machine=target, disruptive=False)
                fleet.lc("restart", target, *kind.split()[1:])
                action.finish()
            else:
                action = history.action(kind, machine=target)
                fleet.lc(kind, target)
                active.append(Fault(kind, target, time.monotonic() + hold, action))
            counts[kind] += 1
            time.sleep(rng.uniform(0.5, 3.0))
        for fault in active:
            heal(fleet, fault)
        wait_until(
            lambda: fleet.machines_up() == set(machines),
            AGENT_TTL + SETTLE,
            "every machine back",
        )
        # Every unit runs again, once settled with the rules holding that may lag while units
        # move (MachineOf, Conflicts, MaxPerMachine); nothing may run twice on the way. Not a
        # single look after a pause: published states can lag what runs (a machine cut off
        # from etcd publishes what its fencing did only once it is back, then starts its units
        # again), so "all running" one moment need not be the settled placement.
        deadline = time.monotonic() + STOP_TIMEOUT + 2 * SETTLE
        while broken := unsettled(fleet.where(), units):
            assert time.monotonic() < deadline, f"not settled: {broken}"
            time.sleep(0.2)
    finally:
        history.stop()
    report = history.check(grace=2 * AGENT_TTL + STOP_TIMEOUT + 5)
    faults = ", ".join(f"{k} {n}" for k, n in sorted(counts.items()))
    print(f"chaos: seed {seed}, {sum(counts.values())} faults ({faults})")
    print(report.summary())
    assert report.violations == [], f"seed {seed}:\n" + "\n".join(report.violations)


def unsettled(where: dict[str, str], units: Iterable[str]) -> list[str]:
    """What keeps the final placement from being settled: units not running, rules broken."""
    missing = sorted(set(units) - set(where))
    if missing:
        return [f"not running: {', '.join(missing)}"]
    broken: list[str] = []
    if where["app.service"] != where["db.service"]:
        broken.append(f"MachineOf: app on {where['app.service']}, db on {where['db.service']}")
    for group in ("web", "worker"):
        placed = {f"{group}@{i}.service": where[f"{group}@{i}.service"] for i in range(1, 4)}
        if len(set(placed.values())) != 3:
            broken.append(f"{group}@ units share a machine: {placed}")
    return broken


def heal(fleet: Cluster, fault: Fault) -> None:  # noqa: F811
    if fault.kind == "etcd-kill":
        fleet.lc("etcd-start", fault.target)
    elif fault.kind in ("kill", "halt"):
        fleet.lc("start", fault.target)
    elif fault.kind == "partition":
        fleet.lc("heal", fault.target)
    elif fault.kind == "pause":
        fleet.lc("resume", fault.target)
    fault.action.finish()
