"""Scheduling benchmarks: prints figures, asserts nothing (speed goals are read, not enforced).

    .venv/bin/python tests/bench/bench_scheduling.py [--agents 20] [--units 200]

1. Pure planning cost: `plan_placements` over U pending units and M machines with zone rules.
2. End to end with real etcd: M real agents (each its own etcd client, lease and watch; fake
   systemd) place U units; time until every unit is owned and published active, and the number of
   etcd revisions it took (a proxy for write load on etcd).
3. Failover: one machine halts gracefully; time until its units run elsewhere.
4. With --real N: the same on a local cluster of N machines, each a real fleetd process and a
   real systemd user manager, driven by fleetctl: placement time, spread, and failover after a
   graceful halt and after a power cut (kill).

All agents of 2. share one Python process, so on a small machine they compete for one
interpreter lock: its times and spread are a pessimistic bound; 4. measures the real thing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "vagrant")]

from localcluster.etcd import EtcdCluster  # noqa: E402

from fleetd.model import DesiredState, Machine  # noqa: E402
from fleetd.placement import plan_placements  # noqa: E402
from fleetd.snapshot import Desired, Snapshot, UnitRecord  # noqa: E402
from fleetd.unitfile import content_hash  # noqa: E402
from tests.support.agents import Harness, unit_text  # noqa: E402


def bench_plan(units: int, machines: int) -> None:
    snap = Snapshot()
    for i in range(machines):
        mid = uuid.uuid4().hex
        snap.machines[mid] = Machine(mid, metadata={"zone": f"z{i % 4}", "region": "r1"})
    for i in range(units):
        name = f"web@{i}.service"
        text = unit_text(xfleet="MaxPerZone=50" if i % 2 else "Conflicts=web@*.service")
        snap.units[name] = UnitRecord(name, text, content_hash(text))
        snap.desired[name] = Desired(DesiredState.LAUNCHED)
    plan_placements(snap)  # warm the parse caches, as a running agent has them
    rounds = 5
    start = time.perf_counter()
    for _ in range(rounds):
        plan_placements(snap)
    per = (time.perf_counter() - start) / rounds
    print(f"plan_placements: {units} units x {machines} machines: {per * 1000:.1f} ms per pass")


def bench_cluster(agents: int, units: int, stagger: float, shared: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-etcd-") as tmp:
        cluster = EtcdCluster.start(Path(tmp), members=1)
        try:
            harness = Harness(
                list(cluster.endpoints),
                f"/bench-{uuid.uuid4().hex[:6]}/",
                stagger=stagger,
                shared_client=shared,
            )
            for i in range(agents):
                harness.add(f"m{i:02d}", {"zone": f"z{i % 4}"})
            harness.wait(lambda s: len(s.machines) == agents, timeout=60)
            before = harness.snapshot().revision
            start = time.perf_counter()
            harness.submit({f"hello@{i}.service": unit_text() for i in range(units)})
            done = harness.wait(
                lambda s: len(s.owners) == units
                and all(
                    any(st.active == "active" for st in s.states.get(u, {}).values())
                    for u in s.owners
                ),
                timeout=300,
            )
            took = time.perf_counter() - start
            loads = {}
            for owner in done.owners.values():
                loads[owner.machine_id] = loads.get(owner.machine_id, 0) + 1
            print(
                f"placement: {units} units on {agents} agents: {took:.2f} s to all active, "
                f"{done.revision - before} etcd revisions, load max-min "
                f"{max(loads.values()) - min(loads.values())}"
            )
            victim = sorted(harness.nodes)[0]
            victim_id = harness.nodes[victim].agent.me
            moved = [u for u, o in done.owners.items() if o.machine_id == victim_id]
            start = time.perf_counter()
            harness.halt(victim)
            harness.wait(
                lambda s: all(
                    u in s.owners
                    and any(st.active == "active" for st in s.states.get(u, {}).values())
                    for u in moved
                ),
                timeout=120,
            )
            print(f"failover: {len(moved)} units of a halted machine active elsewhere in "
                  f"{time.perf_counter() - start:.2f} s")
            harness.stop_all()
        finally:
            cluster.stop()


def _lc(directory: str, *args: str) -> str:
    cmd = [sys.executable, str(ROOT / "vagrant" / "local-cluster"), "--dir", directory, *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def _fleetctl(env: dict[str, str], *args: str) -> str:
    fleetctl = str(Path(sys.executable).with_name("fleetctl"))
    return subprocess.run(
        [fleetctl, *args], check=True, capture_output=True, text=True, env=env
    ).stdout


def _wait_all_active(
    env: dict[str, str], units: int, timeout: float, gone: str = "-"
) -> dict[str, int]:
    """Wait until `units` units are active on machines other than `gone` (an address whose
    published states linger until its lease runs out)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = _fleetctl(env, "list-units", "--no-legend", "--fields", "unit,machine,active")
        active = [
            r.split() for r in rows.splitlines() if r.endswith("active") and f"/{gone}\t" not in r
        ]
        if len(active) >= units:
            loads: dict[str, int] = {}
            for _unit, machine, _state in active:
                loads[machine] = loads.get(machine, 0) + 1
            return loads
        if time.monotonic() > deadline:
            raise SystemExit(f"only {len(active)} of {units} units active after {timeout}s")
        time.sleep(0.1)


def bench_real(machines: int, units: int) -> None:
    directory = tempfile.mkdtemp(prefix="lcb-", dir="/tmp")
    cluster = Path(directory + ".toml")
    cluster.write_text(
        "".join(
            f'[[machine]]\nname = "m{i:02d}"\n'
            f'metadata = {{ region = "r{i % 2}", zone = "z{i % 4}" }}\n\n'
            for i in range(machines)
        )
    )
    try:
        start = time.perf_counter()
        _lc(directory, "up", "--config", str(cluster))
        print(f"real cluster: {machines} machines up in {time.perf_counter() - start:.1f} s")
        endpoint = _lc(directory, "env").splitlines()[-1].split("=", 1)[1]
        env = {**os.environ, "FLEETCTL_ENDPOINT": endpoint}
        template = Path(directory) / "bench@.service"
        template.write_text("[Service]\nExecStart=/bin/sleep 100000\n")
        files = [str(template.with_name(f"bench@{i}.service")) for i in range(units)]
        start = time.perf_counter()
        _fleetctl(env, "start", "--no-block", *files)
        loads = _wait_all_active(env, units, 600)
        print(
            f"real placement: {units} units on {machines} fleetd: "
            f"{time.perf_counter() - start:.2f} s to all active, "
            f"load max-min {max(loads.values()) - min(loads.values())}"
        )
        # The local cluster gives machine i the address 127.0.0.(10+i).
        for verb, victim, address in (("halt", "m00", "127.0.0.10"), ("kill", "m01", "127.0.0.11")):
            start = time.perf_counter()
            _lc(directory, verb, victim)
            _wait_all_active(env, units, 600, gone=address)
            print(f"real failover after {verb}: all {units} units active again in "
                  f"{time.perf_counter() - start:.2f} s")
    finally:
        subprocess.run(
            [sys.executable, str(ROOT / "vagrant" / "local-cluster"), "--dir", directory,
             "destroy"], capture_output=True, check=False,
        )
        cluster.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--units", type=int, default=200)
    parser.add_argument("--shared-client", action="store_true",
                        help="in-process agents share one etcd connection (for many agents)")
    parser.add_argument("--real", type=int, default=0, metavar="N",
                        help="also measure a local cluster of N real machines")
    parser.add_argument("--stagger", type=float, default=2.0, help="claim_stagger of the agents")
    args = parser.parse_args()
    bench_plan(args.units, args.agents)
    bench_cluster(args.agents, args.units, args.stagger, args.shared_client)
    if args.real:
        bench_real(args.real, args.units)


if __name__ == "__main__":
    main()
