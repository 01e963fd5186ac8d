"""How long fleetctl's listings take with a large registry; prints figures, asserts nothing.

    .venv/bin/python tests/bench/bench_listing.py [--units 10000] [--machines 200] [--runs 5]

Starts a one-member etcd in a temporary directory and fills one prefix the way `bench_scale.py`
leaves it once every unit runs: `--units` instances `hello@N.service` of one template (desired
launched), `--machines` machines each on a lease of its own, every unit claimed by one machine
(round robin) and published active by it. Units, leases and machines are written through
`EtcdRegistry`'s own methods; owner keys and states in batched transactions of the keys
(`registry.layout`) and values (`fleetd.snapshot` encoders) the agents write. Then it prints,
each the median of `--runs` runs of a whole process (wall time, as an operator waits for it, and
CPU time, steadier on a shared machine):

- `python -c 'import fleetctl.main'`: the floor every fleetctl command pays before any work;
- `fleetctl list-units --no-legend` and `fleetctl list-unit-files --no-legend`;
- the same two with `-o json`.

Python's bytecode of the project's modules is written to a cache under the temporary directory
(`PYTHONPYCACHEPREFIX`; an unmeasured first run fills it), as an installed fleetctl has it;
`--no-bytecode` measures with `PYTHONDONTWRITEBYTECODE=1` instead, every module compiled from
source in every run.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "vagrant")]

from localcluster.etcd import EtcdCluster  # noqa: E402

from fleetd.model import DesiredState, Machine, PublishedState  # noqa: E402
from fleetd.registry import MAX_TXN_OPS, EtcdRegistry  # noqa: E402
from fleetd.snapshot import UnitRecord, encode_owner, encode_state  # noqa: E402
from fleetd.unitfile import content_hash  # noqa: E402
from tests.support.agents import unit_text  # noqa: E402

PREFIX = "/bench-listing/"
FLEETCTL = str(Path(sys.executable).with_name("fleetctl"))


def machine_id(index: int) -> str:
    return f"{index:08x}" + "ab" * 12


def fill(endpoint: str, units: int, machines: int) -> None:
    registry = EtcdRegistry([endpoint], PREFIX, timeout=30.0)
    try:
        text = unit_text("hello")
        digest = content_hash(text)
        names = [f"hello@{n}.service" for n in range(1, units + 1)]
        records = [UnitRecord(name, text, digest) for name in names]
        if not registry.write_units(records, DesiredState.LAUNCHED, registry.snapshot()):
            raise SystemExit("could not write the units")
        leases: list[int] = []
        for index in range(machines):
            lease = registry.grant_lease(3600)
            machine = Machine(
                machine_id(index), f"10.0.{index // 250}.{index % 250 + 1}",
                {"zone": f"z{index % 4}"}, "0.1.0", f"hollow-{index:03d}",
            )
            if not registry.register_machine(machine, lease):
                raise SystemExit(f"could not register machine {index}")
            leases.append(lease)
        # One claim and one publish per unit would take minutes: the owner keys and states go
        # in transactions of MAX_TXN_OPS puts instead, each on its machine's lease, with the
        # keys and values the agents write.
        raw = registry.grpc_client()
        tx = raw.transactions
        layout = registry.layout
        now = time.time()
        ops = []
        for index, name in enumerate(names):
            slot = index % machines
            owner = machine_id(slot)
            state = PublishedState(owner, "loaded", "active", "running", digest, now)
            ops.append(tx.put(layout.owner(name), encode_owner(owner), lease=leases[slot]))
            ops.append(
                tx.put(layout.state(name, owner), encode_state(state), lease=leases[slot])
            )
        batches = [ops[i : i + MAX_TXN_OPS] for i in range(0, len(ops), MAX_TXN_OPS)]

        def write(batch: list[Any]) -> None:
            raw.transaction(compare=[], success=batch, failure=[])

        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(write, batches))
    finally:
        registry.close()


def median_seconds(argv: list[str], env: dict[str, str], runs: int) -> tuple[float, float, int]:
    """Median wall time and median CPU time (user + system) of `runs` runs, and the bytes the
    last one wrote to stdout. CPU time varies less than wall time on a shared machine."""
    walls: list[float] = []
    cpus: list[float] = []
    size = 0
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.monotonic()
        done = subprocess.run(argv, check=True, capture_output=True, env=env)
        walls.append(time.monotonic() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        size = len(done.stdout)
    return statistics.median(walls), statistics.median(cpus), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=10_000)
    parser.add_argument("--machines", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-bytecode", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-listing-") as tmp:
        cluster = EtcdCluster.start(Path(tmp) / "etcd", members=1)
        try:
            endpoint = cluster.endpoints[0]
            start = time.monotonic()
            fill(endpoint, args.units, args.machines)
            print(f"registry of {args.units} units on {args.machines} machines written in "
                  f"{time.monotonic() - start:.1f} s")
            env = {
                **os.environ,
                "PYTHONPATH": str(ROOT),
                "FLEETCTL_ENDPOINT": endpoint,
                "FLEETCTL_ETCD_KEY_PREFIX": PREFIX,
            }
            if args.no_bytecode:
                env["PYTHONDONTWRITEBYTECODE"] = "1"
            else:
                env.pop("PYTHONDONTWRITEBYTECODE", None)
                env["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
                for verb in ("list-units", "list-unit-files"):
                    subprocess.run([FLEETCTL, verb], check=True, capture_output=True, env=env)
            floor, floor_cpu, _ = median_seconds(
                [sys.executable, "-c", "import fleetctl.main"], env, args.runs
            )
            print(f"import fleetctl.main: {floor:.3f} s, CPU {floor_cpu:.3f} s "
                  f"(medians of {args.runs})")
            for verb in ("list-units", "list-unit-files"):
                for extra in (["--no-legend"], ["-o", "json"]):
                    wall, cpu, size = median_seconds([FLEETCTL, verb, *extra], env, args.runs)
                    print(f"fleetctl {verb} {' '.join(extra)}: {wall:.3f} s, CPU {cpu:.3f} s "
                          f"(medians of {args.runs}; {size} bytes out)")
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
