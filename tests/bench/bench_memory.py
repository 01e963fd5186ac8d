"""The memory of one fleetd with a large registry; prints figures, asserts nothing.

    .venv/bin/python tests/bench/bench_memory.py [--units 10000] [--machines 4] [--top 25]

One real etcd (one member, in a temporary directory). A few other machines are simulated by
this process: each holds a lease, its machine key, and for its share of the units the owner key
and a published state bound to that lease, so every unit is placed elsewhere. The units are
`hello@N.service` with the text of `tests.support.agents.unit_text("hello")`, desired launched,
written as fleetctl start writes them.

Then ONE agent runs as its own process: the wiring of `fleetd.cli.build_agent` (the real etcd
adapter, lease keeper, mirror, planner, executor, publisher), with the in-memory unit manager
in place of D-Bus. Once it has read the registry and planned at the revision the writes
reached, and settled for a few seconds, VmRSS and VmHWM are read from /proc/PID/status.
Printed:

- RSS and high-water mark with no unit, with all units placed elsewhere, and per 1,000 units;
- the same with the units waiting (no owner keys, no states): the agent's planner holds its
  window; the agent bids at once only where it ranks first and, with a long claim stagger,
  leaves the rest waiting for the better-ranked (simulated) machines;
- a `tracemalloc` run of the same process with all units placed: the largest allocation sites,
  by line and by file, still held after planning (tracing costs memory of its own, so its RSS
  is not one of the figures above).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "vagrant")]

# The agent's process: argv[1] is "--agent", argv[2] a JSON document of settings. Tracing, when
# asked for, starts before the project is imported so its modules count too.
if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--agent":
    AGENT_SETTINGS: dict[str, Any] = json.loads(sys.argv[2])
    if AGENT_SETTINGS.get("trace"):
        import tracemalloc

        tracemalloc.start(1)
else:
    AGENT_SETTINGS = {}

SETTLE = 3.0  # seconds after the agent planned before memory is read


FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def status_mb(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM and the two parts of VmRSS (anonymous memory: the heap, Python's objects;
    file pages: the code of the interpreter and the libraries), in MB."""
    text = Path(f"/proc/{pid}/status").read_text()
    figures = {}
    for field in FIELDS:
        match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
        figures[field] = int(match.group(1)) / 1024 if match else 0.0
    return figures


def line(label: str, figures: dict[str, float], base: dict[str, float], units: int) -> str:
    text = "  ".join(f"{f} {figures[f]:6.1f} MB" for f in FIELDS)
    if units:
        per = (figures["VmRSS"] - base["VmRSS"]) / units * 1000
        text += f"  ({per:.2f} MB RSS per 1,000 units)"
    return f"{label:<22} {text}"


# ------------------------------------------------------------------------------ the agent side


def run_agent(settings: dict[str, Any]) -> None:
    import logging

    from fleetd.cli import build_agent
    from fleetd.config import Config
    from fleetd.fake_systemd import FakeUnitManager

    logging.basicConfig(level=logging.ERROR)
    config = Config(
        etcd_servers=(settings["endpoint"],),
        etcd_key_prefix=settings["prefix"],
        machine_id=settings["machine_id"],
        public_ip="127.0.0.1",
        hostname="measured",
        units_directory=str(Path(settings["dir"]) / "units"),
        claim_stagger=settings["stagger"],
    )
    agent = build_agent(config, manager=FakeUnitManager())
    threading.Thread(target=agent.run, name="agent", daemon=True).start()
    target = int(settings["revision"])
    while True:
        # The benchmark's only look inside: has the mirror planned at the written revision?
        plan = agent.mirror._plan
        if plan is not None and plan[1].revision >= target:
            break
        time.sleep(0.1)
    time.sleep(SETTLE)
    if settings.get("trace"):
        report_trace(int(settings.get("top", 25)))
    print("ready", flush=True)
    # Stay alive (the caller reads /proc) until stdin closes.
    sys.stdin.read()
    os._exit(0)


def report_trace(top: int) -> None:
    import gc
    import tracemalloc

    gc.collect()
    snap = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )
    total = sum(stat.size for stat in snap.statistics("filename"))
    print(f"traced, still held: {total / 2**20:.1f} MB", flush=True)
    for kind in ("lineno", "filename"):
        print(f"largest by {kind}:")
        for stat in snap.statistics(kind)[:top]:
            frame = stat.traceback[0]
            where = frame.filename.replace(str(ROOT) + "/", "")
            site = f"{where}:{frame.lineno}" if kind == "lineno" else where
            print(f"  {stat.size / 2**20:7.2f} MB {stat.count:8d} blocks  {site}")
    sys.stdout.flush()


# ----------------------------------------------------------------------------- the cluster side


class Machines:
    """The simulated other machines: leases kept alive, machine keys, owners and states."""

    def __init__(self, endpoint: str, prefix: str, count: int) -> None:
        from fleetd.model import Machine
        from fleetd.registry import EtcdRegistry
        from fleetd.snapshot import encode_machine

        self.client = EtcdRegistry([endpoint], prefix)
        self.layout = self.client.layout
        self.ids = [uuid.uuid4().hex for _ in range(count)]
        self.leases = {mid: self.client.grant_lease(60) for mid in self.ids}
        for n, mid in enumerate(self.ids):
            machine = Machine(mid, f"127.0.1.{n + 1}", {}, "bench", f"other-{n + 1}")
            self.client.grpc_client().put(
                self.layout.machine(mid), encode_machine(machine), lease=self.leases[mid]
            )
        self._stop = threading.Event()
        threading.Thread(target=self._keep, name="leases", daemon=True).start()

    def _keep(self) -> None:
        while not self._stop.wait(10):
            for lease in self.leases.values():
                self.client.keepalive(lease)

    def place(self, names: list[str], unit_hash: str) -> None:
        """Owner keys and published running states for the units, round robin."""
        from fleetd.model import PublishedState
        from fleetd.snapshot import encode_owner, encode_state

        raw = self.client.grpc_client()
        tx = raw.transactions
        ops: list[Any] = []
        for n, name in enumerate(names):
            mid = self.ids[n % len(self.ids)]
            lease = self.leases[mid]
            state = PublishedState(mid, "loaded", "active", "running", unit_hash, time.time())
            ops.append(tx.put(self.layout.owner(name), encode_owner(mid), lease=lease))
            ops.append(tx.put(self.layout.state(name, mid), encode_state(state), lease=lease))
            if len(ops) >= 100:
                raw.transaction(compare=[], success=ops, failure=[])
                ops = []
        if ops:
            raw.transaction(compare=[], success=ops, failure=[])

    def revision(self) -> int:
        return self.client.snapshot().revision

    def close(self) -> None:
        self._stop.set()
        for lease in self.leases.values():
            self.client.revoke(lease)
        self.client.close()


def submit(endpoint: str, prefix: str, names: list[str], text: str) -> None:
    """Write the units as fleetctl start does (in transactions of up to 60 units)."""
    from fleetd.model import DesiredState
    from fleetd.registry import EtcdRegistry
    from fleetd.snapshot import UnitRecord
    from fleetd.unitfile import content_hash

    client = EtcdRegistry([endpoint], prefix)
    try:
        records = [UnitRecord(n, text, content_hash(text)) for n in names]
        if not client.write_units(records, DesiredState.LAUNCHED, client.snapshot()):
            raise SystemExit("could not write the units")
    finally:
        client.close()


def measure(
    endpoint: str, tmp: Path, units: int, machines: int, placed: bool,
    trace: bool = False, top: int = 25,
) -> dict[str, float]:
    """Start one agent against a fresh prefix holding `units` units; its memory figures."""
    from fleetd.unitfile import content_hash
    from tests.support.agents import unit_text

    prefix = f"/mem-{uuid.uuid4().hex[:8]}/"
    text = unit_text("hello")
    names = [f"hello@{n}.service" for n in range(1, units + 1)]
    others = Machines(endpoint, prefix, machines)
    try:
        if names:
            submit(endpoint, prefix, names, text)
            if placed:
                others.place(names, content_hash(text))
        settings = {
            "endpoint": endpoint,
            "prefix": prefix,
            "machine_id": uuid.uuid4().hex,
            "dir": str(tmp / prefix.strip("/")),
            "revision": others.revision(),
            # Waiting units stay waiting: the agent bids at once only where it ranks first.
            "stagger": 2.0 if placed else 3600.0,
            "trace": trace,
            "top": top,
        }
        proc = subprocess.Popen(
            [sys.executable, __file__, "--agent", json.dumps(settings)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert proc.stdout is not None and proc.stdin is not None
        try:
            for line in proc.stdout:
                if line.strip() == "ready":
                    break
                print(line, end="")
            figures = status_mb(proc.pid)
        finally:
            proc.stdin.close()
            proc.wait(timeout=30)
        return figures
    finally:
        others.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--units", type=int, default=10000)
    parser.add_argument("--machines", type=int, default=4, help="other (simulated) machines")
    parser.add_argument("--top", type=int, default=25, help="allocation sites to list")
    parser.add_argument("--no-trace", action="store_true", help="skip the tracemalloc run")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from localcluster.etcd import EtcdCluster

    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        etcd = EtcdCluster.start(Path(tmp), members=1)
        endpoint = etcd.endpoints[0]
        try:
            print(f"load average {os.getloadavg()[0]:.1f} at start (2 cores, shared)")
            base = measure(endpoint, Path(tmp), 0, args.machines, placed=True)
            print(line("0 units:", base, base, 0))
            placed = measure(endpoint, Path(tmp), args.units, args.machines, placed=True)
            print(line(f"{args.units} units placed:", placed, base, args.units))
            waiting = measure(endpoint, Path(tmp), args.units, args.machines, placed=False)
            print(line(f"{args.units} units waiting:", waiting, base, args.units))
            if not args.no_trace:
                print(f"tracemalloc, {args.units} units placed:")
                measure(endpoint, Path(tmp), args.units, args.machines, placed=True,
                        trace=True, top=args.top)
        finally:
            etcd.stop()


if __name__ == "__main__":
    if AGENT_SETTINGS:
        run_agent(AGENT_SETTINGS)
    else:
        main()
