"""The scale run of issue 9: many hollow machines against one real etcd; prints figures, asserts
nothing.

    .venv/bin/python tests/bench/bench_scale.py [--machines 200] [--units 10000] [--ttl 10]

A hollow machine is the real agent (lease keeper, fencer, executor, publisher, reconciler) with
the in-memory unit manager. All of them live in this one process and share one etcd connection,
one watch, one registry snapshot and one incremental planner (the honest part to share: it is
what every agent would compute alike from the same registry); each keeps its own lease, owner
keys, claims and published states. Printed, in one run:

- the raw ceiling: compare-and-create transactions per second of one etcd client, sequential;
- seconds until all units are claimed and until all are published active; placements per second
  and their ratio to the ceiling;
- planning time per planning pass (each pass takes in one batch of watch events): p50 and p99,
  and (unit, machine) evaluations per pass; per watch event (an incremental pass's time over
  the keys it took in), with the passes that planned from the whole picture shown apart;
- claims won and lost, and how long the turns of the hollow machines waited for the shared
  watch to show the claims won before them (see tests/support/hollow.py);
- etcd proposals per placement (etcd's proposals_committed counter over the placement);
- balance: units per machine, max - min;
- memory: the process's RSS growth per hollow machine, and RSS with every unit in the snapshot;
- seconds until the units of one killed hollow machine run elsewhere (its lease must expire);
- `fleetctl list-units` and `list-unit-files` latency with all units in the registry (median of
  three runs of the real command).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "vagrant")]

from localcluster.etcd import EtcdCluster  # noqa: E402

from fleetd.model import DesiredState  # noqa: E402
from fleetd.registry import EtcdRegistry  # noqa: E402
from fleetd.snapshot import Snapshot, UnitRecord  # noqa: E402
from fleetd.unitfile import content_hash  # noqa: E402
from tests.support.agents import unit_text  # noqa: E402
from tests.support.hollow import HollowHost  # noqa: E402

FLEETCTL = str(Path(sys.executable).with_name("fleetctl"))


def rss_mb() -> float:
    text = Path("/proc/self/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) / 1024 if match else 0.0


def proposals(endpoint: str) -> int:
    with urllib.request.urlopen(endpoint + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    match = re.search(r"^etcd_server_proposals_committed_total (\S+)$", text, re.M)
    return int(float(match.group(1))) if match else 0


def raw_ceiling(endpoint: str, seconds: float = 3.0) -> float:
    """Compare-and-create transactions per second of one client, one after another."""
    client = EtcdRegistry([endpoint], f"/ceiling-{uuid.uuid4().hex[:6]}/")
    raw = client.grpc_client()
    tx = raw.transactions
    count = 0
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        key = f"{client.layout.prefix}k{count}"
        raw.transaction(compare=[tx.create(key) == 0], success=[tx.put(key, "x")], failure=[])
        count += 1
    rate = count / (time.monotonic() - start)
    raw.delete_prefix(client.layout.prefix)
    client.close()
    return rate


def submit(endpoint: str, prefix: str, units: dict[str, str]) -> None:
    """Write the units as fleetctl start does (in transactions of up to 60 units)."""
    client = EtcdRegistry([endpoint], prefix)
    try:
        records = [UnitRecord(n, t, content_hash(t)) for n, t in units.items()]
        if not client.write_units(records, DesiredState.LAUNCHED, client.snapshot()):
            raise SystemExit("could not write the units")
    finally:
        client.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def fleetctl_latency(endpoint: str, prefix: str, verb: str) -> float:
    """Median of 3 whole processes, with fleetctl's bytecode cached as an installed one has it
    (an unmeasured first run fills a cache of its own, PYTHONDONTWRITEBYTECODE or not)."""
    with tempfile.TemporaryDirectory(prefix="bench-scale-pyc-") as cache:
        env = {**os.environ, "FLEETCTL_ENDPOINT": endpoint, "FLEETCTL_ETCD_KEY_PREFIX": prefix,
               "PYTHONPYCACHEPREFIX": cache}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        times = []
        for run in range(4):
            start = time.monotonic()
            subprocess.run([FLEETCTL, verb, "--no-legend"], check=True, capture_output=True,
                           env=env)
            if run:
                times.append(time.monotonic() - start)
    return statistics.median(times)


def wait_for(
    snapshot: Callable[[], Snapshot], predicate: Callable[[Snapshot], bool], timeout: float
) -> float:
    start = time.monotonic()
    while not predicate(snapshot()):
        if time.monotonic() - start > timeout:
            raise SystemExit(f"not reached in {timeout:.0f} s")
        time.sleep(0.2)
    return time.monotonic() - start


def all_active(snap: Snapshot, names: set[str], skip: str = "") -> bool:
    for name in names:
        owner = snap.owners.get(name)
        if owner is None or owner.machine_id == skip:
            return False
        state = snap.states.get(name, {}).get(owner.machine_id)
        if state is None or state.active != "active":
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--machines", type=int, default=200)
    parser.add_argument("--units", type=int, default=10000)
    parser.add_argument("--ttl", type=float, default=10.0, help="agent_ttl of the hollow machines")
    parser.add_argument("--zones", type=int, default=4)
    args = parser.parse_args()
    # A SIGTERM (timeout, kill) still stops the etcd this run started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # Hundreds of agents log every claim and stop: keep the figures readable.
    logging.getLogger("fleetd").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        etcd = EtcdCluster.start(Path(tmp), members=1)
        endpoint = etcd.endpoints[0]
        try:
            print(f"load average {os.getloadavg()[0]:.1f} at start (2 cores, shared)")
            ceiling = raw_ceiling(endpoint)
            print(f"raw ceiling: {ceiling:.0f} compare-and-create txns/s (one client, sequential)")
            prefix = f"/scale-{uuid.uuid4().hex[:6]}/"
            host = HollowHost([endpoint], prefix, ttl=args.ttl, stagger=1.0)
            base_rss = rss_mb()
            start = time.monotonic()
            for i in range(args.machines):
                host.add(f"h{i:03d}", {"zone": f"z{i % args.zones}"} if args.zones else {})
            host.start()
            mirror = host.mirror
            wait_for(mirror.copy, lambda s: len(s.machines) == args.machines, 300)
            print(f"{args.machines} hollow machines joined in {time.monotonic() - start:.1f} s; "
                  f"RSS {rss_mb() - base_rss:.1f} MB for all, "
                  f"{(rss_mb() - base_rss) / args.machines * 1024:.0f} kB each")

            names = {f"hello@{i}.service" for i in range(args.units)}
            text = unit_text("hello")
            before = proposals(endpoint)
            mirror.plan_passes(clear=True)
            start = time.monotonic()
            submit(endpoint, prefix, {n: text for n in sorted(names)})
            submitted = time.monotonic() - start
            wait_for(
                mirror.copy, lambda s: sum(1 for n in names if n in s.owners) == len(names), 1800
            )
            claimed = time.monotonic() - start
            wait_for(mirror.copy, lambda s: all_active(s, names), 1800)
            active = time.monotonic() - start
            written = proposals(endpoint) - before
            snap = mirror.copy()
            loads: dict[str, int] = {m: 0 for m in snap.machines}
            for name in names:
                loads[snap.owners[name].machine_id] += 1
            passes = mirror.plan_passes()
            times = [p.seconds * 1000 for p in passes]
            evaluations = [p.evaluations for p in passes]
            # Per watch event: the passes that planned from the changes they took in; a pass
            # that planned from the whole picture (the first, or one starting over) took in no
            # batch of events, and is shown on its own below.
            per_event = [p.seconds * 1000 / max(1, p.events) for p in passes if not p.full]
            full = [p.seconds * 1000 for p in passes if p.full]
            print(f"placement: {args.units} units on {args.machines} hollow machines: "
                  f"submitted in {submitted:.1f} s, all claimed at {claimed:.1f} s, "
                  f"all active at {active:.1f} s")
            rate = args.units / claimed
            print(f"placements/s: {rate:.0f} ({rate / ceiling:.0%} of the raw ceiling)")
            print(f"planning per pass: p50 {percentile(times, 0.5):.1f} ms, "
                  f"p99 {percentile(times, 0.99):.1f} ms, max {max(times, default=0):.1f} ms "
                  f"over {len(times)} passes; evaluations per pass p50 "
                  f"{percentile([float(e) for e in evaluations], 0.5):.0f}")
            print(f"planning per watch event (an incremental pass's time over the changed keys "
                  f"it took in): p50 {percentile(per_event, 0.5):.2f} ms, "
                  f"p99 {percentile(per_event, 0.99):.2f} ms, max {max(per_event, default=0):.2f}"
                  f" ms over {len(per_event)} passes; passes from the whole picture: "
                  + (", ".join(f"{t:.0f} ms" for t in full) or "none"))
            slowest = sorted(range(len(times)), key=lambda i: -times[i])[:3]
            print("slowest passes: " + ", ".join(
                f"#{i + 1} {times[i]:.0f} ms ({evaluations[i]} evaluations, "
                f"{passes[i].events} keys{', whole picture' if passes[i].full else ''})"
                for i in slowest
            ))
            claims = host.claims
            print(f"claims: {claims.won} won, {claims.lost} lost "
                  f"({claims.lost / max(1, claims.won + claims.lost):.1%} of claim transactions)")
            waits = [w * 1000 for w in host.catch_up_waits]
            print(f"hollow turns that waited for the shared watch to show earlier claims: "
                  f"{len(waits)}, p50 {percentile(waits, 0.5):.0f} ms, "
                  f"max {max(waits, default=0):.0f} ms")
            print(f"etcd proposals per placement: {written / args.units:.2f} "
                  "(unit writes, claims and published states)")
            low, high = min(loads.values()), max(loads.values())
            print(f"balance: units per machine min {low} max {high} (max-min {high - low})")
            print(f"memory: RSS {rss_mb():.0f} MB for the process with {args.units} units in its "
                  f"snapshot, {(rss_mb() - base_rss) / args.machines * 1024:.0f} kB growth per "
                  "hollow machine")

            victim = sorted(host.machines)[0]
            victim_id = host.machines[victim].agent.me
            moved = {n for n, o in snap.owners.items() if o.machine_id == victim_id}
            start = time.monotonic()
            host.kill(victim)
            # The lease runs out a TTL after the victim's last keep-alive, which may be up to a
            # keep-alive interval before the kill: time the takeover from the expiry itself.
            expired = wait_for(mirror.copy, lambda s: victim_id not in s.machines, 600)
            took = wait_for(mirror.copy, lambda s: all_active(s, moved, skip=victim_id), 600)
            print(f"kill: the {len(moved)} units of a killed hollow machine active elsewhere "
                  f"{expired + took:.2f} s after the kill: its lease ran out at {expired:.2f} s "
                  f"(agent_ttl {args.ttl:g} s), the takeover took {took:.2f} s more")
            for verb in ("list-units", "list-unit-files"):
                print(f"fleetctl {verb} with {args.units} units: "
                      f"{fleetctl_latency(endpoint, prefix, verb):.2f} s (median of 3)")
            print(f"load average {os.getloadavg()[0]:.1f} at the end")
            host.stop()
        finally:
            etcd.stop()


if __name__ == "__main__":
    main()
