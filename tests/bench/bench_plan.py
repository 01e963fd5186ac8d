"""Planning cost alone, no I/O; prints figures, asserts nothing.

    .venv/bin/python tests/bench/bench_plan.py [--events 40]

1. The full pass (`plan_placements`, every pending unit against every machine): CPU seconds per
   pass, median of 3, for template instances on 20 machines (500, 1,000, 2,000 units) and for
   issue 9's mixed workload (half Conflicts=web@*, half MaxPerZone; 1,000 x 20, 3,000 x 100,
   10,000 x 200, 4 zones).
2. The incremental planner at 10,000 template instances on 200 machines (with and without zone
   metadata), fed random batches of 1-8 claims of planned units as agents would make them: CPU
   milliseconds per planning pass, p50 / p99, and (unit, machine) verdicts evaluated per pass.
   The agents' plan window applies (fleetd.agent.reconcile.plan_window, plain units counting
   1/PLAIN_SHARE each).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fleetd.agent.reconcile import PLAIN_SHARE, plan_window  # noqa: E402
from fleetd.incremental import IncrementalPlanner  # noqa: E402
from fleetd.keys import Kind  # noqa: E402
from fleetd.model import DesiredState, Machine, Owner  # noqa: E402
from fleetd.placement import plan_placements  # noqa: E402
from fleetd.planner import BID_DEPTH  # noqa: E402
from fleetd.snapshot import Desired, Snapshot, UnitRecord  # noqa: E402
from fleetd.unitfile import content_hash  # noqa: E402
from tests.support.agents import unit_text  # noqa: E402


def cluster(units: int, machines: int, zones: int, mixed: bool) -> Snapshot:
    snap = Snapshot()
    for i in range(machines):
        machine_id = f"{i:032x}"
        metadata = {"zone": f"z{i % zones}", "region": "r1"} if zones else {}
        snap.machines[machine_id] = Machine(machine_id, metadata=metadata)
    for i in range(units):
        name = f"web@{i}.service"
        xfleet = ("MaxPerZone=100000" if i % 2 else "Conflicts=web@*.service") if mixed else ""
        text = unit_text(xfleet=xfleet)
        snap.units[name] = UnitRecord(name, text, content_hash(text))
        snap.desired[name] = Desired(DesiredState.LAUNCHED)
    return snap


def full_pass(units: int, machines: int, zones: int, mixed: bool) -> float:
    snap = cluster(units, machines, zones, mixed)
    plan_placements(snap)  # warm the parse caches, as a running agent has them
    times = []
    for _ in range(3):
        start = time.process_time()
        plan_placements(snap)
        times.append(time.process_time() - start)
    return statistics.median(times)


def incremental(units: int, machines: int, zones: int, events: int) -> None:
    snap = cluster(units, machines, zones, mixed=False)
    limit = plan_window(snap)
    start = time.process_time()
    planner = IncrementalPlanner(snap.copy())
    plan = planner.plan(limit, BID_DEPTH, PLAIN_SHARE)
    first = time.process_time() - start
    rng = random.Random(1)
    times: list[float] = []
    evaluated: list[int] = []
    revision = 10
    for _ in range(events):
        ranked = [p for p in plan.values() if p.ranked]
        if not ranked:
            break
        changes: set[tuple[Kind, str]] = set()
        for placement in rng.sample(ranked, min(len(ranked), rng.randint(1, 8))):
            revision += 1
            snap.owners[placement.unit] = Owner(placement.ranked[0], revision, revision)
            changes.add((Kind.OWNER, placement.unit))
        before = planner.evaluations
        start = time.process_time()
        planner.update(snap.copy(), changes)
        plan = planner.plan(limit, BID_DEPTH, PLAIN_SHARE)
        times.append(time.process_time() - start)
        evaluated.append(planner.evaluations - before)
    times.sort()
    p50 = times[len(times) // 2]
    p99 = times[min(len(times) - 1, int(0.99 * len(times)))]
    where = f"{zones} zones" if zones else "no zones"
    print(f"incremental, {units} x {machines} ({where}), window {limit} "
          f"({limit * PLAIN_SHARE} plain): first pass "
          f"{first:.2f} s; per pass after a batch of claims p50 {p50 * 1000:.1f} "
          f"ms, p99 {p99 * 1000:.1f} ms over {len(times)} passes; verdicts evaluated per pass "
          f"p50 {statistics.median(evaluated):.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--events", type=int, default=40)
    args = parser.parse_args()
    for units in (500, 1000, 2000):
        seconds = full_pass(units, 20, 4, mixed=False)
        print(f"full pass, {units} template instances x 20 machines: {seconds * 1000:.0f} ms")
    for units, machines in ((1000, 20), (3000, 100), (10000, 200)):
        seconds = full_pass(units, machines, 4, mixed=True)
        print(f"full pass, mixed rules, {units} x {machines}: {seconds * 1000:.0f} ms")
    incremental(10000, 200, 4, args.events)
    incremental(10000, 200, 0, args.events)


if __name__ == "__main__":
    main()
