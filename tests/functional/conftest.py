"""Shared machinery of the fleet scenario tests: one real local cluster per module (real etcd, one
`systemd --user` manager and one fleetd per machine, built by `vagrant/local-cluster`), fleetctl
run as a user would run it, and a registry emptied between tests.

A module picks its machines with a `CLUSTER_CONFIG` attribute (default `vagrant/cluster.toml`),
and may set `ETCD_MEMBERS = 3` (then etcd elects quickly: `--fast-elections`) and its own
`AGENT_TTL`.
Tests take the function-scoped `fleet` fixture: it hands over the module's cluster with no unit
in the registry, nothing running and every machine of the cluster file up, and restores that
state afterwards (machines a test halted or killed come back, machines it added are halted).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

from fleetd.registry import EtcdRegistry
from fleetd.snapshot import Snapshot
from tests.support.history import ClusterHistory

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "vagrant" / "local-cluster"
VENV_BIN = REPO / ".venv" / "bin"
DEFAULT_CONFIG = REPO / "vagrant" / "cluster.toml"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
UNITS = REPO / "units"

# The agents' lease TTL in these tests: a killed machine is forgotten after this long.
AGENT_TTL = 3.0
# Generous bound for anything the agents do on their own (claim, start, stop, move).
SETTLE = 20.0

T = TypeVar("T")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "FLEETCTL_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def wait_until(predicate: Callable[[], T], timeout: float = SETTLE, what: str = "") -> T:
    """Poll `predicate` until it returns something truthy and return that; fail after
    `timeout` seconds naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f}s: {what or predicate}")
        time.sleep(0.2)


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a command that failed as a user error should (exit 1)."""
    assert proc.returncode == 1, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def registry_picture(snapshot: Snapshot) -> tuple[object, ...]:
    """What a command may write: unit texts, desired states and owners (no revisions)."""
    return (
        {n: (r.text, r.hash) for n, r in snapshot.units.items()},
        {n: d.state for n, d in snapshot.desired.items()},
        {n: o.machine_id for n, o in snapshot.owners.items()},
    )


@dataclass
class Cluster:
    """One local cluster and the ways a test drives and reads it."""

    dir: Path
    config: Path
    agent_ttl: float = AGENT_TTL
    etcd_members: int = 1
    endpoint: str = ""
    ids: dict[str, str] = field(default_factory=dict)  # machine name -> machine id
    baseline: list[str] = field(default_factory=list)  # the machines of the cluster file
    env: dict[str, str] = field(default_factory=_env)
    _registry: EtcdRegistry | None = None

    # -- the local-cluster tool

    def lc(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, str(TOOL), "--dir", str(self.dir), *map(str, args)],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=120,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"local-cluster {' '.join(map(str, args))} exited {proc.returncode}\n"
                f"{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def up(self) -> None:
        extra = ["--etcd-members", "3", "--fast-elections"] if self.etcd_members == 3 else []
        # --ssh-port 0: clusters of parallel runs share the machines' addresses, not a port.
        out = self.lc(
            "up", "--config", self.config, "--agent-ttl", f"{self.agent_ttl:g}",
            "--ssh-port", "0", *extra,
        ).stdout  # fmt: skip
        # `up` prints what fleetctl needs (etcd endpoint, ssh user, port, key, known hosts).
        for line in out.splitlines():
            key, sep, value = line.removeprefix("export ").partition("=")
            if line.startswith("export ") and sep:
                self.env[key] = value
        self.endpoint = self.env["FLEETCTL_ENDPOINT"]
        self.refresh()
        self.baseline = list(self.ids)

    def status(self) -> dict[str, dict[str, object]]:
        data = json.loads(self.lc("status", "--json").stdout)
        return {str(m["name"]): m for m in data["machines"]}

    def refresh(self) -> None:
        self.ids = {name: str(m["machine_id"]) for name, m in self.status().items()}

    def name_of(self, machine_id: str) -> str:
        for name, mid in self.ids.items():
            if mid == machine_id:
                return name
        self.refresh()
        return next(name for name, mid in self.ids.items() if mid == machine_id)

    def halt(self, machine: str) -> None:
        self.lc("halt", machine)

    def kill(self, machine: str) -> None:
        self.lc("kill", machine)

    def start(self, machine: str) -> None:
        self.lc("start", machine)

    def add(self, machine: str, metadata: str) -> None:
        self.lc("add", machine, "--metadata", metadata)
        self.refresh()

    def ssh(self, machine: str, *command: str) -> subprocess.CompletedProcess[str]:
        return self.lc("ssh", machine, "--", *command, check=False)

    def is_active_on(self, machine: str, unit: str) -> str:
        """What the machine's own systemd manager says of the unit (`is-active`)."""
        return self.ssh(machine, "systemctl", "--user", "is-active", unit).stdout.strip()

    # -- fleetctl

    def fleetctl(
        self, *args: str | Path, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["fleetctl", *map(str, args)],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"fleetctl {' '.join(map(str, args))} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def rows(self, command: str, fields: str) -> list[list[str]]:
        """A listing's rows (no legend, full ids), split into cells."""
        out = self.fleetctl(command, "--no-legend", "--full", "--fields", fields).stdout
        return [line.split() for line in out.splitlines() if line.strip()]

    # -- the registry, read directly

    @property
    def registry(self) -> EtcdRegistry:
        if self._registry is None:
            self._registry = EtcdRegistry(self.endpoint, "/fleet/")
        return self._registry

    def snapshot(self) -> Snapshot:
        return self.registry.snapshot()

    def running(self, snapshot: Snapshot | None = None) -> dict[str, list[str]]:
        """Every unit some machine reports active with the registry's content: unit -> sorted
        machine names."""
        snapshot = snapshot or self.snapshot()
        out: dict[str, list[str]] = {}
        for unit, per in snapshot.states.items():
            record = snapshot.units.get(unit)
            for machine_id, state in per.items():
                if state.active == "active" and record is not None and state.hash == record.hash:
                    out.setdefault(unit, []).append(self.name_of(machine_id))
        return {unit: sorted(machines) for unit, machines in sorted(out.items())}

    def where(self) -> dict[str, str]:
        """Non-global running units -> the one machine each runs on."""
        placed = {}
        for unit, machines in self.running().items():
            assert len(machines) == 1, f"{unit} runs on {machines}"
            placed[unit] = machines[0]
        return placed

    def wait_running(self, units: list[str], timeout: float = SETTLE) -> dict[str, list[str]]:
        """Wait until every unit runs somewhere; return the whole running map then."""

        def check() -> dict[str, list[str]] | None:
            running = self.running()
            return running if all(u in running for u in units) else None

        return wait_until(check, timeout, f"{units} running")

    def machines_up(self) -> set[str]:
        return {self.name_of(m) for m in self.snapshot().machines}

    # -- between tests

    def reset(self) -> None:
        """Every baseline machine up and connected, added machines halted, no unit anywhere."""
        etcd = json.loads(self.lc("status", "--json").stdout)["etcd"]
        for index, running in enumerate(etcd["running"]):
            if not running:
                self.lc("etcd-start", str(index))
        status = self.status()
        for name, machine in status.items():
            if machine.get("network") == "partitioned":
                self.lc("heal", name)
            if machine["fleetd"] == "paused":
                self.lc("resume", name)
        status = self.status()
        for name, machine in status.items():
            running = machine["fleetd"] == "running" and machine["manager"] == "running"
            if name in self.baseline and not running:
                self.start(name)
            elif name not in self.baseline and machine["fleetd"] == "running":
                self.halt(name)
        wanted = {self.ids[n] for n in self.baseline}
        wait_until(
            lambda: set(self.snapshot().machines) == wanted,
            self.agent_ttl + SETTLE,
            f"exactly {self.baseline} registered",
        )
        names = sorted(self.snapshot().units)
        if names:
            self.fleetctl("destroy", *names)

        def empty() -> bool:
            snap = self.snapshot()
            return not (snap.units or snap.owners or snap.states or snap.desired)

        wait_until(empty, SETTLE, "registry empty and nothing running")

    def history(self, interval: float = 0.1) -> ClusterHistory:
        """A recorder of this cluster's history (tests/support/history.py), not yet started."""
        return ClusterHistory(self.dir, self.endpoint.split(","), interval=interval)

    def close(self) -> None:
        if self._registry is not None:
            self._registry.close()
            self._registry = None


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """The module's cluster, built from its CLUSTER_CONFIG and destroyed even on failure."""
    if os.geteuid() != 0:
        pytest.skip("systemd managers in own cgroups need root")
    if shutil.which("etcd") is None:
        pytest.skip("etcd-server is not installed")
    config = Path(getattr(request.module, "CLUSTER_CONFIG", DEFAULT_CONFIG))
    base = Path(tempfile.mkdtemp(prefix="lc-", dir="/tmp"))
    handle = Cluster(
        base / "c",
        config,
        agent_ttl=float(getattr(request.module, "AGENT_TTL", AGENT_TTL)),
        etcd_members=int(getattr(request.module, "ETCD_MEMBERS", 1)),
    )
    try:
        handle.up()
        yield handle
    finally:
        handle.close()
        if handle.dir.exists():
            handle.lc("destroy", check=False)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def fleet(cluster: Cluster) -> Iterator[Cluster]:
    """The module's cluster, empty and whole before and after the test."""
    cluster.reset()
    yield cluster
    cluster.reset()


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """A directory for the unit files a test writes (fleetctl names units by file name)."""
    path = tmp_path / "units"
    path.mkdir()
    return path


def write_unit(folder: Path, name: str, xfleet: str = "", body: str = "") -> Path:
    """A long-running service unit `name` in `folder`, with an optional [X-Fleet] section."""
    text = (
        f"[Unit]\nDescription=test unit {name}\n\n"
        f"[Service]\nExecStart=/bin/sh -c 'while true; do sleep 1; done'\n{body}"
    )
    if xfleet:
        text += f"\n[X-Fleet]\n{xfleet.strip()}\n"
    path = folder / name
    path.write_text(text)
    return path


def assert_refused(fleet: Cluster, unit_dir: Path, cases: dict[str, tuple[str, str]]) -> None:
    """Each invalid [X-Fleet] body (with {id} for a machine id) is refused by submit and start
    with one line naming the fragment, and the registry does not change."""
    fleet.fleetctl("start", UNITS / "hello.service")
    before = registry_picture(fleet.snapshot())
    for case, (xfleet, fragment) in cases.items():
        path = write_unit(unit_dir, "bad.service", xfleet.format(id=fleet.ids["core-01"]))
        for command in ("submit", "start"):
            line = one_line_error(fleet.fleetctl(command, path, check=False))
            assert line.startswith("fleetctl: bad.service: [X-Fleet]"), (case, line)
            assert fragment in line, (case, line)
            assert registry_picture(fleet.snapshot()) == before, case
