"""Container unit benchmarks on a real local cluster: prints figures, asserts nothing.

    .venv/bin/python tests/bench/bench_containers.py [--rounds 3] [--agent-ttl 3]

On vagrant/cluster-6.toml, with the example units httpd@1..3 and httpd-discovery@1:
1. start: `fleetctl start` of the three web servers until all answer HTTP on their machines;
2. failover: power cut of httpd@1's machine until systemd on the other machine of its zone has
   the container unit active (its page served there), and its sidekick active (the etcd entry
   names the new address); times from systemd's own timestamps, so polling adds nothing; each
   round restarts the killed machine afterwards. Compare with the agents' lease TTL;
3. the same failover for a plain unit with the same rule (units/web@.service), for comparison;
4. stop: `fleetctl stop` until the container is gone from its machine's `podman ps -a`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "vagrant" / "local-cluster"
UNITS = ROOT / "units"


class Bench:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET")}
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"

    def lc(self, *args: str) -> str:
        return subprocess.run(
            [sys.executable, str(TOOL), "--dir", str(self.dir), *args],
            capture_output=True, text=True, env=self.env, check=True,
        ).stdout  # fmt: skip

    def fleetctl(self, *args: str) -> str:
        return subprocess.run(
            ["fleetctl", *args], capture_output=True, text=True, env=self.env, check=True
        ).stdout

    def ips(self) -> dict[str, str]:
        data = json.loads(self.lc("status", "--json"))
        return {m["name"]: m["ip"] for m in data["machines"]}

    def where(self, unit: str) -> str | None:
        fields = "unit,machine,active"
        out = self.fleetctl("list-units", "--no-legend", "--full", "--fields", fields)
        for line in out.splitlines():
            name, machine, active = line.split()
            if name == unit and active == "active":
                return machine.split("/")[-1]
        return None

    def active_since(self, machine: str, unit: str) -> float:
        """When the unit last became active on `machine`, on this host's monotonic clock (the
        clock systemd stamps with), so no polling delay counts."""
        out = self.lc("ssh", machine, "--", "systemctl", "--user", "show", "-p",
                      "ActiveEnterTimestampMonotonic", "--value", unit)  # fmt: skip
        return int(out.strip()) / 1e6

    def etcd(self, key: str) -> str:
        return subprocess.run(
            ["etcdctl", f"--endpoints={self.env['FLEETCTL_ENDPOINT']}", "get",
             "--print-value-only", key],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip


def page(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return str(response.read().decode().strip())
    except OSError:
        return ""


def until(predicate: Callable[[], bool], timeout: float = 60) -> float:
    """Seconds until `predicate` holds (polled every 50 ms)."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise SystemExit(f"not within {timeout:.0f}s: {predicate}")
        time.sleep(0.05)
    return time.monotonic() - start


def run(rounds: int, agent_ttl: float) -> None:
    base = Path(tempfile.mkdtemp(prefix="lcb-", dir="/tmp"))
    bench = Bench(base / "c")
    try:
        out = bench.lc(
            "up", "--config", str(ROOT / "vagrant" / "cluster-6.toml"),
            "--agent-ttl", f"{agent_ttl:g}",
        )  # fmt: skip
        bench.env["FLEETCTL_ENDPOINT"] = out.strip().splitlines()[-1].split("=", 1)[1]
        ips = bench.ips()
        by_ip = {ip: name for name, ip in ips.items()}
        webs = [str(UNITS / f"httpd@{i}.service") for i in (1, 2, 3)]
        start = time.monotonic()
        bench.fleetctl("start", "--no-block", *webs, str(UNITS / "httpd-discovery@1.service"))
        for i in (1, 2, 3):
            until(lambda i=i: bool(bench.where(f"httpd@{i}.service")))
            machine = by_ip[str(bench.where(f"httpd@{i}.service"))]
            until(lambda i=i, m=machine: page(f"http://{ips[m]}/") == f"httpd@{i} on {m}")
        print(f"start: 3 web containers answering HTTP {time.monotonic() - start:.2f}s after "
              "`fleetctl start`")  # fmt: skip

        served, announced = [], []
        for _ in range(rounds):
            first = by_ip[str(bench.where("httpd@1.service"))]
            bench.lc("kill", first)
            moved = time.monotonic()  # the kill command returned: the power cut is done
            until(lambda f=first: (bench.where("httpd@1.service") or ips[f]) != ips[f])
            second = by_ip[str(bench.where("httpd@1.service"))]
            until(lambda s=second: page(f"http://{ips[s]}/") == f"httpd@1 on {s}")
            served.append(bench.active_since(second, "httpd@1.service") - moved)
            until(lambda s=second: bench.etcd("/services/web/httpd@1") == f"{ips[s]}:80")
            announced.append(bench.active_since(second, "httpd-discovery@1.service") - moved)
            print(f"failover {first} -> {second}: container up {served[-1]:.2f}s, sidekick "
                  f"up {announced[-1]:.2f}s after the power cut")  # fmt: skip
            bench.lc("start", first)
        print(f"failover over {rounds} rounds (agent_ttl {agent_ttl:g}s): container up median "
              f"{statistics.median(served):.2f}s max {max(served):.2f}s; sidekick up median "
              f"{statistics.median(announced):.2f}s max {max(announced):.2f}s")  # fmt: skip

        # The same power cut for a plain unit with the same rule (units/web@.service), to
        # tell the container's share from fleet's own failover time.
        bench.fleetctl("start", *(str(UNITS / f"web@{i}.service") for i in (1, 2, 3)))
        plain = []
        for _ in range(rounds):
            first = by_ip[str(bench.where("web@1.service"))]
            bench.lc("kill", first)
            moved = time.monotonic()
            until(lambda f=first: (bench.where("web@1.service") or ips[f]) != ips[f])
            second = by_ip[str(bench.where("web@1.service"))]
            plain.append(bench.active_since(second, "web@1.service") - moved)
            bench.lc("start", first)
        print(f"failover of a plain unit (web@1, no container): median "
              f"{statistics.median(plain):.2f}s max {max(plain):.2f}s")  # fmt: skip

        machine = by_ip[str(bench.where("httpd@2.service"))]
        start = time.monotonic()
        bench.fleetctl("stop", "--no-block", "httpd@2.service")
        took = until(
            lambda: "httpd-2" not in bench.lc("ssh", machine, "--", "podman", "ps", "-a",
                                             "--format", "{{.Names}}").split()
        )  # fmt: skip
        print(f"stop: container removed from {machine} {took:.2f}s after `fleetctl stop`")
    finally:
        subprocess.run([sys.executable, str(TOOL), "--dir", str(bench.dir), "destroy"],
                       capture_output=True, check=False)  # fmt: skip
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3, help="power cuts to time")
    parser.add_argument("--agent-ttl", type=float, default=3.0, help="fleetd agent_ttl, seconds")
    args = parser.parse_args()
    run(args.rounds, args.agent_ttl)


if __name__ == "__main__":
    main()
