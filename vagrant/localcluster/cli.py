"""`local-cluster`: a Vagrant-like front end that runs a whole fleet cluster on this host.

It owns the cluster directory layout and the lifecycle of each simulated machine's `fleetd`:

    <dir>/cluster.json         the machines (from the cluster file plus `add`) and settings
    <dir>/etcd/                etcd data, logs and etcd.json (see localcluster.etcd)
    <dir>/m/<name>/            one machine: machine-id, fleet.toml, fleetd.log, fleetd.json,
                               units/ (a tmpfs inside the machine, as /run is on a host),
                               the systemd user manager's state and journal
                               (localcluster.manager), its container host set-up
                               (localcluster.containers), ssh/ with its sshd (localcluster.sshd)
    <dir>/m/<name>/proxy.*     the machine's network to etcd: a relay process (localcluster.proxy)
                               with one port per etcd member; fleetd talks to etcd only through it
    <dir>/ssh/                 the operator's ssh key and the machines' known_hosts
    <dir>/images/              the demo container image, shared read-only by every machine

Every verb finds running processes again through these files, so each invocation is short-lived
and several clusters can live side by side in different directories.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from localcluster import auth, containers
from localcluster.containers import ContainerHostError
from localcluster.etcd import EtcdCluster, EtcdError, pid_alive, wait_pid_gone
from localcluster.manager import ManagerError, ManagerHandle, cgroup_name, start_manager
from localcluster.proxy import MODES
from localcluster.sshd import Sshd, SshdError, generate_key, pick_port, write_known_hosts

PROG = "local-cluster"
VAGRANT_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = VAGRANT_DIR.parent
DEFAULT_CONFIG = VAGRANT_DIR / "cluster.toml"
KEY_PREFIX = "/fleet/"
DEFAULT_AGENT_TTL = 10.0  # fleetd's own default
STATE_FILE = "cluster.json"
MACHINES_DIR = "m"
FIRST_HOST_OCTET = 10
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
META_RE = re.compile(r"^[A-Za-z0-9_-]+$")  # what fleetd accepts as a metadata key

# Variables a fleetd or `ssh` command must never inherit from the caller: they would point it at
# some other systemd manager or etcd than its machine's.
_FOREIGN_ENV = ("DBUS_SESSION_BUS_ADDRESS", "XDG_RUNTIME_DIR", "FLEETCTL_ENDPOINT")


class UserError(Exception):
    """Something the user can fix; reported as one line, exit status 1."""


# -- cluster state ------------------------------------------------------------------------------


@dataclass
class MachineSpec:
    name: str
    index: int
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class ClusterState:
    dir: Path
    agent_ttl: float
    etcd_members: int
    fast_elections: bool
    machines: list[MachineSpec]
    ssh_port: int = 22
    metrics_port: int = 0  # 0: fleetd serves no metrics
    # etcd authentication on (`up --auth`): fleetd and fleetctl then log in (localcluster.auth).
    auth: bool = False

    @classmethod
    def load(cls, dir: Path) -> ClusterState | None:
        try:
            raw = json.loads((dir / STATE_FILE).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise UserError(f"{dir / STATE_FILE} is unreadable ({exc}); run `destroy`") from exc
        return cls(
            dir=dir,
            agent_ttl=float(raw["agent_ttl"]),
            etcd_members=int(raw["etcd_members"]),
            fast_elections=bool(raw["fast_elections"]),
            ssh_port=int(raw.get("ssh_port", 22)),
            metrics_port=int(raw.get("metrics_port", 0)),
            machines=[
                MachineSpec(m["name"], int(m["index"]), dict(m["metadata"]))
                for m in raw["machines"]
            ],
            auth=bool(raw.get("auth", False)),
        )

    def save(self) -> None:
        data = {
            "agent_ttl": self.agent_ttl,
            "etcd_members": self.etcd_members,
            "fast_elections": self.fast_elections,
            "ssh_port": self.ssh_port,
            "metrics_port": self.metrics_port,
            "auth": self.auth,
            "machines": [
                {"name": m.name, "index": m.index, "metadata": m.metadata} for m in self.machines
            ],
        }
        tmp = self.dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.dir / STATE_FILE)

    def machine(self, name: str) -> MachineSpec:
        for spec in self.machines:
            if spec.name == name:
                return spec
        known = ", ".join(m.name for m in self.machines) or "none"
        raise UserError(f"no machine named {name!r} in {self.dir} (machines: {known})")

    def add(self, name: str, metadata: dict[str, str]) -> MachineSpec:
        spec = MachineSpec(name, max((m.index for m in self.machines), default=-1) + 1, metadata)
        if FIRST_HOST_OCTET + spec.index > 254:
            raise UserError("no loopback address left for another machine")
        self.machines.append(spec)
        return spec


def load_cluster_file(path: Path) -> list[tuple[str, dict[str, str]]]:
    """The machines of a cluster file: `[[machine]]` tables with `name` and `metadata`."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise UserError(f"cluster file {path} not found; pass --config FILE") from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"bad cluster file {path}: {exc}") from exc
    tables = raw.get("machine")
    if not isinstance(tables, list) or not tables:
        raise UserError(f"bad cluster file {path}: it needs at least one [[machine]] table")
    machines: list[tuple[str, dict[str, str]]] = []
    for number, table in enumerate(tables, start=1):
        name = table.get("name") if isinstance(table, dict) else None
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise UserError(
                f'bad cluster file {path}: machine #{number} needs name = "..." '
                "(letters, digits, '.', '_', '-')"
            )
        if any(existing == name for existing, _ in machines):
            raise UserError(f"bad cluster file {path}: machine {name!r} appears twice")
        metadata = table.get("metadata", {})
        if not isinstance(metadata, dict) or not all(
            isinstance(v, str) and META_RE.match(k) for k, v in metadata.items()
        ):
            raise UserError(
                f"bad cluster file {path}: metadata of {name!r} must be a table of strings"
            )
        machines.append((name, dict(metadata)))
    return machines


def parse_metadata(text: str) -> dict[str, str]:
    metadata: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not META_RE.match(key.strip()) or not value.strip():
            raise UserError(f"bad metadata {item!r}: use --metadata key=value,key2=value2")
        metadata[key.strip()] = value.strip()
    return metadata


# -- one machine --------------------------------------------------------------------------------


def _toml_string(value: str) -> str:
    # JSON string escapes are a subset of TOML basic-string escapes.
    return json.dumps(value)


class Machine:
    """One simulated host: its directory, its systemd user manager and its fleetd."""

    def __init__(self, cluster: ClusterState, spec: MachineSpec) -> None:
        self.cluster = cluster
        self.spec = spec
        self.dir = cluster.dir / MACHINES_DIR / spec.name

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def ip(self) -> str:
        return f"127.0.0.{FIRST_HOST_OCTET + self.spec.index}"

    @property
    def metrics_address(self) -> str:
        return f"{self.ip}:{self.cluster.metrics_port}" if self.cluster.metrics_port else ""

    @property
    def config_path(self) -> Path:
        return self.dir / "fleet.toml"

    @property
    def log_path(self) -> Path:
        return self.dir / "fleetd.log"

    @property
    def machine_id(self) -> str:
        """Random once, then kept for the machine's life (across halt, kill and start)."""
        path = self.dir / "machine-id"
        with contextlib.suppress(FileNotFoundError):
            return path.read_text().strip()
        self.dir.mkdir(parents=True, exist_ok=True)
        machine_id = secrets.token_hex(16)
        path.write_text(machine_id + "\n")
        return machine_id

    # sshd

    def sshd(self) -> Sshd:
        return Sshd(self.dir, self.name, self.ip, self.cluster.ssh_port, ssh_dir(self.cluster.dir))

    # manager

    def manager(self) -> ManagerHandle | None:
        return ManagerHandle.load(self.dir)

    def manager_running(self) -> bool:
        handle = self.manager()
        return handle is not None and handle.is_running()

    def ensure_manager(
        self, endpoints: Sequence[str], image_store: Path | None = None
    ) -> ManagerHandle:
        """The machine's running manager, booted first if need be; with an image store the
        machine boots as a container host of its own (see localcluster.containers)."""
        handle = self.manager()
        if handle is not None and handle.is_running():
            return handle
        self.dir.mkdir(parents=True, exist_ok=True)
        setup = None
        if image_store is not None:
            setup = containers.prepare_machine(
                self.dir, cgroup_name(self.name, self.dir), self.ip, endpoints, image_store
            )
        # The units directory is a tmpfs of the machine's own, as fleetd's default
        # /run/fleet/units is on a real host: on the shared disk, every file fleetd wrote
        # waited behind etcd's fsyncs (100 unit files took 0.1-0.3 s instead of 2 ms).
        return start_manager(self.name, self.dir, setup=setup, tmpfs=self.units_dir)

    # fleetd

    def fleetd_pid(self) -> int:
        try:
            return int(json.loads((self.dir / "fleetd.json").read_text())["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def fleetd_running(self) -> bool:
        return pid_alive(self.fleetd_pid(), str(self.config_path))

    @property
    def units_dir(self) -> Path:
        return self.dir / "units"

    def write_config(self, endpoints: Sequence[str]) -> None:
        units = self.units_dir
        units.mkdir(parents=True, exist_ok=True)
        lines = [
            f"etcd_servers = [{', '.join(_toml_string(e) for e in endpoints)}]",
            f"etcd_key_prefix = {_toml_string(KEY_PREFIX)}",
            f"machine_id = {_toml_string(self.machine_id)}",
            f"public_ip = {_toml_string(self.ip)}",
            f"hostname = {_toml_string(self.spec.name)}",
            f"agent_ttl = {self.cluster.agent_ttl:g}",
            f"units_directory = {_toml_string(str(units))}",
            "systemd_user = true",
            *(
                [f"metrics_address = {_toml_string(self.metrics_address)}"]
                if self.cluster.metrics_port
                else []
            ),
            *(
                [
                    f"etcd_username = {_toml_string(auth.AGENT_USER)}",
                    "etcd_password_file = "
                    + _toml_string(str(auth.password_file(self.cluster.dir, auth.AGENT_USER))),
                ]
                if self.cluster.auth
                else []
            ),
            "",
            "[metadata]",
            *(f"{_toml_string(k)} = {_toml_string(v)}" for k, v in self.spec.metadata.items()),
        ]
        self.config_path.write_text("\n".join(lines) + "\n")

    def start_fleetd(
        self, handle: ManagerHandle, endpoints: Sequence[str], notify_socket: str = ""
    ) -> None:
        self.write_config(endpoints)
        # fleetd reads FLEET_* variables as configuration: only fleet.toml may configure it.
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in _FOREIGN_ENV and not k.startswith("FLEET_")
        }
        env.update(handle.env())
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("NOTIFY_SOCKET", None)
        if notify_socket:
            env["NOTIFY_SOCKET"] = notify_socket
        with self.log_path.open("ab") as log:
            # Inside the machine's namespaces, as on a real host: fleetd sees the machine's
            # podman (container ids for `fleetctl status`). nsenter execs, so the pid is fleetd's.
            proc = subprocess.Popen(
                handle.enter([find_fleetd(), "--config", str(self.config_path)], self.dir),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                env=env,
                cwd=self.dir,
            )
        (self.dir / "fleetd.json").write_text(json.dumps({"pid": proc.pid}) + "\n")
        try:
            handle.add_process(proc.pid)
        except ManagerError:
            # A fleetd outside the machine's cgroup would survive `kill`: do not leave it running.
            proc.kill()
            proc.wait()
            raise

    # network: the relay between this machine's fleetd and etcd

    @property
    def proxy_state_path(self) -> Path:
        return self.dir / "proxy.json"

    def proxy_state(self) -> dict[str, object] | None:
        """The relay's own report (pid, ports, mode, seq) if it runs, else None."""
        try:
            state = json.loads(self.proxy_state_path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(state, dict) or not pid_alive(int(state.get("pid", 0)), "proxy.py"):
            return None
        return state

    def ensure_proxy(self, etcd_endpoints: Sequence[str], timeout: float = 10) -> list[str]:
        """Start the relay if it is not running; return the endpoints fleetd must use."""
        state = self.proxy_state()
        if state is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                self.proxy_state_path.unlink()
            (self.dir / "proxy.ctl").write_text(json.dumps({"mode": "open", "seq": 0}) + "\n")
            argv = [
                sys.executable,
                str(Path(__file__).with_name("proxy.py")),
                "--state",
                str(self.proxy_state_path),
                "--control",
                str(self.dir / "proxy.ctl"),
            ]
            for endpoint in etcd_endpoints:
                argv += ["--target", endpoint.removeprefix("http://")]
            with (self.dir / "proxy.log").open("ab") as log:
                subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                    cwd=self.dir,
                )
            deadline = time.monotonic() + timeout
            while (state := self.proxy_state()) is None:
                if time.monotonic() > deadline:
                    raise UserError(
                        f"the etcd relay of {self.name} did not start; see {self.dir / 'proxy.log'}"
                    )
                time.sleep(0.02)
        ports = state.get("ports")
        assert isinstance(ports, list)
        return [f"http://127.0.0.1:{port}" for port in ports]

    def proxy_mode(self) -> str:
        state = self.proxy_state()
        return str(state["mode"]) if state else "down"

    def set_proxy_mode(self, mode: str, timeout: float = 10) -> None:
        """Hand the relay a new mode and wait until it acknowledged it."""
        state = self.proxy_state()
        if state is None:
            raise UserError(
                f"the etcd relay of {self.name} is not running; run `{PROG} start {self.name}`"
            )
        seq = int(str(state.get("seq", 0))) + 1
        (self.dir / "proxy.ctl").write_text(json.dumps({"mode": mode, "seq": seq}) + "\n")
        os.kill(int(str(state["pid"])), signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while True:
            state = self.proxy_state()
            if state is not None and int(str(state.get("seq", 0))) >= seq:
                return
            if time.monotonic() > deadline:
                raise UserError(
                    f"the etcd relay of {self.name} did not switch to {mode} "
                    f"within {timeout:.0f}s; see {self.dir / 'proxy.log'}"
                )
            time.sleep(0.01)

    def stop_proxy(self) -> None:
        state = self.proxy_state()
        if state is None:
            return
        pid = int(str(state["pid"]))
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not wait_pid_gone(pid, 5, "proxy.py"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def fleetd_paused(self) -> bool:
        pid = self.fleetd_pid()
        if not pid_alive(pid, str(self.config_path)):
            return False
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")

    def stop_fleetd(self, timeout: float = 30) -> bool:
        """SIGTERM fleetd and wait: it stops and releases its units itself. False if it had to
        be killed."""
        pid = self.fleetd_pid()
        marker = str(self.config_path)
        if not pid_alive(pid, marker):
            return True
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            # A paused fleetd would hold the SIGTERM until resumed.
            os.kill(pid, signal.SIGCONT)
        if wait_pid_gone(pid, timeout, marker):
            return True
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_pid_gone(pid, 5, marker)
        return False

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "    (no fleetd.log)"
        return "\n".join("    " + line for line in text.splitlines()[-lines:]) or "    (empty)"


def find_fleetd() -> str:
    beside = Path(sys.executable).parent / "fleetd"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("fleetd")
    if found is None:
        raise UserError("fleetd is not beside this Python nor on PATH; run scripts/setup")
    return found


# -- etcd helpers -------------------------------------------------------------------------------


def registered(
    endpoints: Sequence[str], login: tuple[str, str] | None = None
) -> dict[str, int] | None:
    """Machine ids present under the key prefix with their keys' mod revisions, or None if no
    endpoint answered. `login` is (user, password) on a cluster with etcd authentication."""
    import pyetcd
    from pyetcd import etcdrpc

    prefix = f"{KEY_PREFIX}machine/"
    for endpoint in endpoints:
        host, _, port = endpoint.removeprefix("http://").partition(":")
        client = pyetcd.client(host=host, port=int(port), timeout=2)
        try:
            if login is not None:
                # The token goes in the call metadata: the library's own login needs TLS.
                request = etcdrpc.AuthenticateRequest(name=login[0], password=login[1])
                client.metadata = (("token", client.authstub.Authenticate(request, 2).token),)
            found = client.get_prefix(prefix, keys_only=True)
            return {meta.key.decode()[len(prefix) :]: meta.mod_revision for _, meta in found}
        except Exception:  # any failure of this member: ask the next one
            continue
        finally:
            client.close()
    return None


def wait_registered(
    machines: Sequence[Machine],
    endpoints: Sequence[str],
    timeout: float,
    baseline: Mapping[str, int] | None = None,
) -> None:
    """Return when every machine's key is in etcd; fail early, with its log, if a fleetd dies.

    A machine id in `baseline` must have been written after that mod revision: a killed machine's
    key outlives it by up to one agent TTL, and must not pass for the new fleetd's announcement.
    """
    baseline = baseline or {}
    deadline = time.monotonic() + timeout
    pending = {m.machine_id: m for m in machines}
    login = _viewer_login(machines[0].cluster) if machines else None
    while pending:
        present = registered(endpoints, login) or {}
        for machine_id in list(pending):
            if present.get(machine_id, 0) > baseline.get(machine_id, 0):
                del pending[machine_id]
        if not pending:
            return
        for machine in pending.values():
            if not machine.fleetd_running():
                raise UserError(
                    f"fleetd of {machine.name} exited; tail of {machine.log_path}:\n"
                    f"{machine.log_tail()}"
                )
        if time.monotonic() > deadline:
            machine = next(iter(pending.values()))
            raise UserError(
                f"fleetd of {machine.name} did not register {KEY_PREFIX}machine/"
                f"{machine.machine_id} within {timeout:.0f}s; tail of {machine.log_path}:\n"
                f"{machine.log_tail()}"
            )
        time.sleep(0.05)


# -- verbs --------------------------------------------------------------------------------------


def default_dir() -> Path:
    return Path(os.environ.get("FLEET_LOCAL_DIR") or REPO_DIR / ".local-cluster")


@contextlib.contextmanager
def locked(dir: Path, create: bool = False) -> Iterator[None]:
    """Serialise mutating verbs on one cluster dir; only `up` may create the dir."""
    if create:
        dir.mkdir(parents=True, exist_ok=True)
    elif not dir.is_dir():
        raise UserError(f"no cluster in {dir}; run `{PROG} up --dir {dir}` first")
    with (dir / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def require_cluster(dir: Path) -> ClusterState:
    state = ClusterState.load(dir)
    if state is None:
        raise UserError(f"no cluster in {dir}; run `{PROG} up --dir {dir}` first")
    return state


def require_etcd(state: ClusterState) -> EtcdCluster:
    etcd = EtcdCluster.load(state.dir / "etcd")
    if etcd is None:
        raise UserError(f"no etcd recorded in {state.dir}; run `{PROG} up --dir {state.dir}`")
    # etcd as a whole is brought back (after a reboot, say), but a member killed on purpose with
    # `etcd-kill` stays down until `etcd-start`: the fault belongs to whoever made it.
    if not any(etcd.member_running(i) for i in range(len(etcd.members))):
        etcd.ensure_running()
    return etcd


def ssh_dir(dir: Path) -> Path:
    return dir / "ssh"


def all_machines(state: ClusterState) -> list[Machine]:
    return [Machine(state, spec) for spec in state.machines]


def ensure_operator_key(state: ClusterState) -> Path:
    """The cluster's operator key, and the authorized_keys every machine's sshd reads."""
    key = generate_key(ssh_dir(state.dir) / "id_ed25519", f"local-cluster {state.dir}")
    authorized = ssh_dir(state.dir) / "authorized_keys"
    authorized.write_text(key.with_suffix(".pub").read_text())
    return key


def ssh_exports(state: ClusterState) -> list[str]:
    """What fleetctl needs to reach this cluster's machines over ssh."""
    return [
        "export FLEETCTL_SSH_USERNAME=root",
        f"export FLEETCTL_SSH_PORT={state.ssh_port}",
        f"export FLEETCTL_SSH_IDENTITY_FILE={ssh_dir(state.dir) / 'id_ed25519'}",
        f"export FLEETCTL_KNOWN_HOSTS_FILE={ssh_dir(state.dir) / 'known_hosts'}",
    ]
def _viewer_login(state: ClusterState) -> tuple[str, str] | None:
    if not state.auth:
        return None
    return auth.VIEWER_USER, auth.password(state.dir, auth.VIEWER_USER)


def bring_up(machines: Sequence[Machine], etcd: EtcdCluster, timeout: float) -> list[str]:
    """Start what is not running of each machine, then wait for all to register."""
    to_start = [m for m in machines if not m.fleetd_running()]
    login = _viewer_login(machines[0].cluster) if machines else None
    before = (registered(etcd.endpoints, login) or {}) if to_start else {}
    baseline = {m.machine_id: before[m.machine_id] for m in to_start if m.machine_id in before}

    # Built (or found up to date) once per cluster; every machine lists it read-only.
    image_store = (
        containers.ensure_image_store(machines[0].cluster.dir)
        if machines and containers.available()
        else None
    )

    def boot(machine: Machine) -> None:
        handle = machine.ensure_manager(etcd.endpoints, image_store)
        machine.sshd().start(handle)
        endpoints = machine.ensure_proxy(etcd.endpoints)
        if machine in to_start:
            machine.start_fleetd(handle, endpoints)

    # Managers take ~0.2 s each to come up and fleetd spends most of its startup importing:
    # booting machines side by side lets those overlap.
    with ThreadPoolExecutor(max_workers=8) as pool:
        for future in [pool.submit(boot, machine) for machine in machines]:
            future.result()
    write_known_hosts(
        ssh_dir(machines[0].cluster.dir) / "known_hosts",
        [(m.ip, m.cluster.ssh_port, m.sshd().host_key) for m in all_machines(machines[0].cluster)],
    )
    wait_registered(machines, etcd.endpoints, timeout, baseline)
    return [m.name for m in to_start]


def cmd_up(args: argparse.Namespace) -> int:
    dir: Path = args.dir
    if ClusterState.load(dir) is None:
        # Parse the cluster file before creating anything, so a typo leaves no directory behind.
        load_cluster_file(Path(args.config) if args.config else DEFAULT_CONFIG)
    with locked(dir, create=True):
        state = ClusterState.load(dir)
        if state is None:
            config = Path(args.config) if args.config else DEFAULT_CONFIG
            machines = load_cluster_file(config)
            state = ClusterState(
                dir=dir,
                agent_ttl=args.agent_ttl if args.agent_ttl is not None else DEFAULT_AGENT_TTL,
                etcd_members=args.etcd_members or 1,
                fast_elections=args.fast_elections,
                machines=[],
                auth=args.auth,
            )
            for name, metadata in machines:
                state.add(name, metadata)
            ips = [Machine(state, spec).ip for spec in state.machines]
            state.ssh_port = pick_port(ips, args.ssh_port)
            # Every machine serves /metrics and /health on its address, on a port of this cluster.
            state.metrics_port = pick_port(ips, 0) if args.metrics else 0
        else:
            if args.etcd_members and args.etcd_members != state.etcd_members:
                raise UserError(
                    f"cluster in {dir} has {state.etcd_members} etcd member(s); "
                    "`destroy` it to change that"
                )
            if args.config:
                for name, metadata in load_cluster_file(Path(args.config)):
                    if name not in {m.name for m in state.machines}:
                        state.add(name, metadata)
            if args.agent_ttl is not None:
                state.agent_ttl = args.agent_ttl
            if args.ssh_port is not None and args.ssh_port != state.ssh_port:
                raise UserError(
                    f"cluster in {dir} has its sshd on port {state.ssh_port}; "
                    "`destroy` it to change that"
                )
            if args.auth and not state.auth:
                raise UserError(f"cluster in {dir} runs without --auth; `destroy` it first")
        state.save()
        ensure_operator_key(state)
        t0 = time.monotonic()
        etcd = EtcdCluster.start(
            dir / "etcd", members=state.etcd_members, fast=state.fast_elections
        )
        if state.auth:
            auth.setup(etcd.endpoints, dir, KEY_PREFIX)
        machines_ = [Machine(state, spec) for spec in state.machines]
        started = bring_up(machines_, etcd, args.timeout)
        took = time.monotonic() - t0
    print(
        f"cluster up in {dir}: {len(machines_)} machine(s), "
        f"{len(started)} fleetd started, {took:.1f}s"
    )
    print_env(state, etcd)
    return 0


def print_env(state: ClusterState, etcd: EtcdCluster) -> None:
    """The variables fleetctl needs; the endpoint line comes last (scripts read it)."""
    print("\n".join(ssh_exports(state)))
    if state.auth:
        print(f"export FLEETCTL_USERNAME={auth.ADMIN_USER}")
        print(f"export FLEETCTL_PASSWORD={auth.password(state.dir, auth.ADMIN_USER)}")
    print(f"export FLEETCTL_ENDPOINT={','.join(etcd.endpoints)}")


def cmd_env(args: argparse.Namespace) -> int:
    state = require_cluster(args.dir)
    etcd = EtcdCluster.load(state.dir / "etcd")
    if etcd is None:
        raise UserError(f"no etcd recorded in {state.dir}; run `{PROG} up --dir {state.dir}`")
    print_env(state, etcd)
    return 0


_NETWORK = {"open": "connected", "down": "no-relay"}


def _word(running: bool) -> str:
    return "running" if running else "stopped"


def cmd_status(args: argparse.Namespace) -> int:
    state = require_cluster(args.dir)
    rows = []
    for spec in state.machines:
        machine = Machine(state, spec)
        rows.append(
            {
                "name": machine.name,
                "machine_id": machine.machine_id,
                "ip": machine.ip,
                "metadata": spec.metadata,
                "ssh": f"{machine.ip}:{state.ssh_port}",
                "metrics": machine.metrics_address or None,
                "fleetd": "paused" if machine.fleetd_paused() else _word(machine.fleetd_running()),
                "manager": _word(machine.manager_running()),
                "network": _NETWORK.get(machine.proxy_mode(), "partitioned"),
            }
        )
    if args.json:
        etcd = EtcdCluster.load(state.dir / "etcd")
        status = {
            "dir": str(state.dir),
            "etcd": {
                "endpoints": etcd.endpoints if etcd else [],
                "running": [etcd.member_running(i) for i in range(len(etcd.members))]
                if etcd
                else [],
            },
            "machines": rows,
        }
        print(json.dumps(status, indent=2))
        return 0
    table = [
        [
            str(r["name"]),
            str(r["machine_id"]),
            str(r["ip"]),
            _format_metadata(spec.metadata) or "-",
            f"fleetd={r['fleetd']}",
            f"manager={r['manager']}",
            f"etcd={r['network']}",
        ]
        for r, spec in zip(rows, state.machines, strict=True)
    ]
    if not args.no_legend:
        table.insert(0, ["MACHINE", "ID", "IP", "METADATA", "FLEETD", "MANAGER", "NETWORK"])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _format_metadata(metadata: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in metadata.items())


def cmd_halt(args: argparse.Namespace) -> int:
    with locked(args.dir):
        state = require_cluster(args.dir)
        machine = Machine(state, state.machine(args.machine))
        if not machine.fleetd_running():
            print(f"{machine.name}: fleetd is not running")
            return 0
        clean = machine.stop_fleetd(timeout=args.timeout)
    if not clean:
        print(
            f"{machine.name}: fleetd did not exit within {args.timeout:.0f}s of SIGTERM and was "
            f"killed; see {machine.log_path}",
            file=sys.stderr,
        )
        return 1
    print(f"{machine.name}: halted")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    with locked(args.dir):
        state = require_cluster(args.dir)
        machine = Machine(state, state.machine(args.machine))
        etcd = require_etcd(state)
        started = bring_up([machine], etcd, args.timeout)
    print(f"{machine.name}: {'started' if started else 'already running'}")
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    with locked(args.dir):
        state = require_cluster(args.dir)
        machine = Machine(state, state.machine(args.machine))
        kill_machine(machine)
    print(f"{machine.name}: killed")
    return 0


def kill_machine(machine: Machine) -> None:
    """Power cut: everything in the machine's cgroup dies at once, fleetd included."""
    handle = machine.manager()
    if handle is not None:
        handle.kill()
        handle.cleanup()
    # Normally fleetd died with the cgroup; this covers one that never made it in.
    pid = machine.fleetd_pid()
    if pid_alive(pid, str(machine.config_path)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_pid_gone(pid, 5, str(machine.config_path))


def _machine(args: argparse.Namespace) -> tuple[ClusterState, Machine]:
    state = require_cluster(args.dir)
    return state, Machine(state, state.machine(args.machine))


def cmd_partition(args: argparse.Namespace) -> int:
    with locked(args.dir):
        _, machine = _machine(args)
        mode = machine.proxy_mode()
        if mode == "down":
            raise UserError(
                f"{machine.name} has no etcd relay running; run `{PROG} start {machine.name}` first"
            )
        if mode != "open":
            raise UserError(
                f"{machine.name} is already partitioned ({mode}); "
                f"`{PROG} heal {machine.name}` first"
            )
        machine.set_proxy_mode(args.mode)
    print(f"{machine.name}: partitioned from etcd ({args.mode})")
    return 0


def cmd_heal(args: argparse.Namespace) -> int:
    with locked(args.dir):
        _, machine = _machine(args)
        mode = machine.proxy_mode()
        if mode in ("open", "down"):
            raise UserError(f"{machine.name} is not partitioned; nothing to heal")
        machine.set_proxy_mode("open")
    print(f"{machine.name}: healed")
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    with locked(args.dir):
        _, machine = _machine(args)
        if not machine.fleetd_running():
            raise UserError(f"fleetd of {machine.name} is not running; nothing to pause")
        if machine.fleetd_paused():
            raise UserError(
                f"fleetd of {machine.name} is already paused; `{PROG} resume {machine.name}` first"
            )
        os.kill(machine.fleetd_pid(), signal.SIGSTOP)
        _wait_for(lambda: machine.fleetd_paused(), 5, f"fleetd of {machine.name} to stop")
    print(f"{machine.name}: fleetd paused (SIGSTOP)")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    with locked(args.dir):
        _, machine = _machine(args)
        if not machine.fleetd_paused():
            raise UserError(f"fleetd of {machine.name} is not paused; nothing to resume")
        os.kill(machine.fleetd_pid(), signal.SIGCONT)
        _wait_for(lambda: not machine.fleetd_paused(), 5, f"fleetd of {machine.name} to continue")
    print(f"{machine.name}: fleetd resumed (SIGCONT)")
    return 0


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise UserError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.01)


def _member(etcd: EtcdCluster, text: str, allow_leader: bool) -> int:
    if allow_leader and text == "leader":
        leader = etcd.leader_index()
        if leader is None:
            raise UserError("no etcd member reports a leader now; name the member by number")
        return leader
    count = len(etcd.members)
    try:
        index = int(text)
    except ValueError:
        index = -1
    if not 0 <= index < count:
        choices = f"0..{count - 1}" + (" or leader" if allow_leader else "")
        raise UserError(f"no etcd member {text!r}: this cluster has {count} (use {choices})")
    return index


def cmd_etcd_kill(args: argparse.Namespace) -> int:
    with locked(args.dir):
        state = require_cluster(args.dir)
        etcd = EtcdCluster.load(state.dir / "etcd")
        if etcd is None:
            raise UserError(f"no etcd recorded in {state.dir}")
        index = _member(etcd, args.member, allow_leader=True)
        if not etcd.member_running(index):
            raise UserError(
                f"etcd member {index} is not running; `{PROG} etcd-start {index}` brings it back"
            )
        etcd.kill_member(index)
    print(f"etcd member {index} ({etcd.members[index].name}): killed")
    return 0


def cmd_etcd_start(args: argparse.Namespace) -> int:
    with locked(args.dir):
        state = require_cluster(args.dir)
        etcd = EtcdCluster.load(state.dir / "etcd")
        if etcd is None:
            raise UserError(f"no etcd recorded in {state.dir}")
        index = _member(etcd, args.member, allow_leader=False)
        if etcd.member_running(index):
            raise UserError(f"etcd member {index} is already running")
        etcd.restart_member(index, timeout=args.timeout)
    print(f"etcd member {index} ({etcd.members[index].name}): started")
    return 0


def cmd_restart(args: argparse.Namespace) -> int:
    """Restart fleetd alone: its units keep running for the next fleetd to adopt."""
    with locked(args.dir):
        state, machine = _machine(args)
        handle = machine.manager()
        if handle is None or not handle.is_running():
            raise UserError(f"{machine.name} is down; run `{PROG} start {machine.name}`")
        if not machine.fleetd_running():
            raise UserError(
                f"fleetd of {machine.name} is not running; run `{PROG} start {machine.name}`"
            )
        etcd = require_etcd(state)
        pid = machine.fleetd_pid()
        marker = str(machine.config_path)
        signal_name = "SIGKILL" if args.kill else "SIGUSR2"
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL if args.kill else signal.SIGUSR2)
            os.kill(pid, signal.SIGCONT)  # a paused fleetd must see the signal now
        if not wait_pid_gone(pid, args.timeout, marker):
            raise UserError(
                f"fleetd of {machine.name} (pid {pid}) did not exit within "
                f"{args.timeout:.0f}s of {signal_name}; see {machine.log_path}"
            )
        if args.down_for > 0:
            time.sleep(args.down_for)
        endpoints = machine.ensure_proxy(etcd.endpoints)
        start_ready(machine, handle, endpoints, args.timeout)
    how = "killed (SIGKILL)" if args.kill else "stopped for restart (SIGUSR2)"
    print(f"{machine.name}: fleetd {how} and started again")
    return 0


def start_ready(
    machine: Machine, handle: ManagerHandle, endpoints: Sequence[str], timeout: float
) -> None:
    """Start fleetd and wait for its READY=1 (sd_notify): a restarted fleetd may keep its lease
    and machine key, so a new registration is no sign that it is up."""
    path = machine.dir / "notify.sock"
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        try:
            machine.start_fleetd(handle, endpoints, notify_socket=str(path))
            deadline = time.monotonic() + timeout
            while True:
                sock.settimeout(0.2)
                with contextlib.suppress(TimeoutError):
                    if b"READY=1" in sock.recv(4096).split(b"\n"):
                        return
                if not machine.fleetd_running():
                    raise UserError(
                        f"fleetd of {machine.name} exited; tail of "
                        f"{machine.log_path}:\n{machine.log_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise UserError(
                        f"fleetd of {machine.name} was not ready within "
                        f"{timeout:.0f}s; tail of {machine.log_path}:\n"
                        f"{machine.log_tail()}"
                    )
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def cmd_ssh(args: argparse.Namespace) -> int:
    state = require_cluster(args.dir)
    machine = Machine(state, state.machine(args.machine))
    command = list(args.command)
    if not command:
        raise UserError(f"no command given: use `{PROG} ssh {machine.name} -- CMD ...`")
    handle = machine.manager()
    if handle is None or not handle.is_running():
        raise UserError(f"{machine.name} is down; run `{PROG} start {machine.name}` first")
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_ENV}
    env.update(handle.env())
    etcd = EtcdCluster.load(state.dir / "etcd")
    if etcd is not None:
        env["FLEETCTL_ENDPOINT"] = ",".join(etcd.endpoints)
    if shutil.which(command[0], path=env.get("PATH")) is None and "/" not in command[0]:
        raise UserError(f"{command[0]}: command not found")
    # In the machine's namespaces and cgroup, as a login there would be: its /run/systemd,
    # journal, podman and mounts, and a power cut (`kill`) ends the session and whatever it
    # started (conmon of a container run by hand included). The child moves itself before exec,
    # so nothing it forks escapes.
    return subprocess.run(
        handle.enter(command, machine.dir),
        env=env,
        check=False,
        preexec_fn=lambda: handle.add_process(os.getpid()),
    ).returncode


def cmd_add(args: argparse.Namespace) -> int:
    if not NAME_RE.match(args.name):
        raise UserError(f"bad machine name {args.name!r}: use letters, digits, '.', '_', '-'")
    metadata = parse_metadata(args.metadata or "")
    with locked(args.dir):
        state = require_cluster(args.dir)
        if any(m.name == args.name for m in state.machines):
            raise UserError(f"machine {args.name!r} already exists in {state.dir}")
        etcd = require_etcd(state)
        spec = state.add(args.name, metadata)
        state.save()
        machine = Machine(state, spec)
        bring_up([machine], etcd, args.timeout)
    print(f"{machine.name}: added as {machine.machine_id} at {machine.ip}")
    return 0


def cmd_destroy(args: argparse.Namespace) -> int:
    dir: Path = args.dir
    if not dir.is_dir():
        raise UserError(f"no cluster in {dir}: nothing to destroy")
    state = ClusterState.load(dir)
    if state is None and EtcdCluster.load(dir / "etcd") is None:
        raise UserError(f"{dir} holds no cluster: refusing to delete it")
    with locked(dir):
        problems = destroy(dir, state)
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"destroyed {dir}")
    return 1 if problems else 0


def destroy(dir: Path, state: ClusterState | None) -> list[str]:
    """Tear everything down, fleetd first while etcd is still there for them to release units."""
    problems: list[str] = []
    machine_dirs = sorted(p for p in (dir / MACHINES_DIR).glob("*") if p.is_dir())
    machines = (
        []
        if state is None
        else [
            Machine(state, spec)
            for spec in state.machines
            if (dir / MACHINES_DIR / spec.name).is_dir()
        ]
    )
    known = {m.dir for m in machines}
    orphans = [p for p in machine_dirs if p not in known]
    # Heal first: a partitioned fleetd could not give its units back.
    for machine in machines:
        if machine.proxy_mode() not in ("open", "down"):
            with contextlib.suppress(UserError, OSError):
                machine.set_proxy_mode("open")
    # SIGTERM every fleetd at once: they stop their units in parallel.
    for machine in machines:
        pid = machine.fleetd_pid()
        if pid_alive(pid, str(machine.config_path)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    for machine in machines:
        if not machine.stop_fleetd(timeout=30):
            # The log goes with the cluster's directory: what it said last goes with the news.
            problems.append(
                f"{machine.name}: fleetd ignored SIGTERM and was killed; its log ended:\n"
                f"{machine.log_tail(40)}"
            )
    for machine_dir in [m.dir for m in machines] + orphans:
        try:
            handle = ManagerHandle.load(machine_dir)
            if handle is not None:
                handle.stop()
                handle.cleanup()
        except ManagerError as exc:
            problems.append(f"{machine_dir.name}: {exc}")
    for machine in machines:
        machine.stop_proxy()
    etcd = EtcdCluster.load(dir / "etcd")
    if etcd is not None:
        etcd.stop()
    shutil.rmtree(dir, ignore_errors=True)
    return problems


# -- argument parsing ---------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(1, f"{self.prog}: error: {message} (see --help)\n")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0-65535)")
    return port


def build_parser() -> argparse.ArgumentParser:
    dir_opt = _Parser(add_help=False)
    dir_opt.add_argument(
        "--dir",
        type=Path,
        default=argparse.SUPPRESS,
        help="cluster directory (default: $FLEET_LOCAL_DIR or <repo>/.local-cluster)",
    )
    wait_opt = _Parser(add_help=False)
    wait_opt.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds to wait for machines to register in etcd (default 60)",
    )
    parser = _Parser(
        prog=PROG,
        description="Run a fleet cluster on this host: etcd, and per machine a systemd user "
        "manager and a fleetd.",
        parents=[dir_opt],
    )
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    up = verbs.add_parser("up", parents=[dir_opt, wait_opt], help="start the cluster")
    up.add_argument("--config", help=f"cluster file (default {DEFAULT_CONFIG})")
    up.add_argument(
        "--agent-ttl", type=float, help=f"fleetd agent TTL, seconds (default {DEFAULT_AGENT_TTL:g})"
    )
    up.add_argument("--etcd-members", type=int, choices=(1, 3), help="etcd members (default 1)")
    up.add_argument(
        "--no-metrics",
        dest="metrics",
        action="store_false",
        help="fleetd serves no /metrics and /health (default: each on a free port of the cluster)",
    )
    up.add_argument(
        "--ssh-port",
        type=_port,
        help="TCP port of every machine's sshd (default 22 if free on every machine address, "
        "else a free one; 0: always a free one)",
    )
    up.add_argument(
        "--fast-elections",
        action="store_true",
        help="etcd heartbeat 20 ms, election timeout 200 ms (quick failover)",
    )
    up.add_argument(
        "--auth",
        action="store_true",
        help="etcd authentication: root, fleet's roles and users, then auth enable "
        "(passwords in <dir>/auth/)",
    )
    up.set_defaults(func=cmd_up)

    verbs.add_parser("env", parents=[dir_opt], help="print FLEETCTL_ENDPOINT").set_defaults(
        func=cmd_env
    )

    status = verbs.add_parser("status", parents=[dir_opt], help="one line per machine")
    status.add_argument("--no-legend", action="store_true", help="omit the header line")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)

    halt = verbs.add_parser("halt", parents=[dir_opt], help="stop a machine's fleetd cleanly")
    halt.add_argument("machine")
    halt.add_argument("--timeout", type=float, default=30.0, help="seconds before SIGKILL")
    halt.set_defaults(func=cmd_halt)

    start = verbs.add_parser("start", parents=[dir_opt, wait_opt], help="bring a machine back")
    start.add_argument("machine")
    start.set_defaults(func=cmd_start)

    kill = verbs.add_parser("kill", parents=[dir_opt], help="power-cut a machine")
    kill.add_argument("machine")
    kill.set_defaults(func=cmd_kill)

    partition = verbs.add_parser(
        "partition", parents=[dir_opt], help="cut a machine's fleetd off from etcd"
    )
    partition.add_argument("machine")
    partition.add_argument(
        "--mode",
        choices=[m for m in MODES if m != "open"],
        default="blackhole",
        help="new connections: blackhole (accepted, never answered; default) or refuse (reset)",
    )
    partition.set_defaults(func=cmd_partition)

    heal = verbs.add_parser("heal", parents=[dir_opt], help="reconnect a partitioned machine")
    heal.add_argument("machine")
    heal.set_defaults(func=cmd_heal)

    pause = verbs.add_parser("pause", parents=[dir_opt], help="SIGSTOP a machine's fleetd")
    pause.add_argument("machine")
    pause.set_defaults(func=cmd_pause)

    resume = verbs.add_parser("resume", parents=[dir_opt], help="SIGCONT a paused fleetd")
    resume.add_argument("machine")
    resume.set_defaults(func=cmd_resume)

    etcd_kill = verbs.add_parser("etcd-kill", parents=[dir_opt], help="SIGKILL an etcd member")
    etcd_kill.add_argument("member", help="member number (0, 1, 2) or leader")
    etcd_kill.set_defaults(func=cmd_etcd_kill)

    etcd_start = verbs.add_parser(
        "etcd-start", parents=[dir_opt], help="start a killed etcd member again"
    )
    etcd_start.add_argument("member", help="member number (0, 1, 2)")
    etcd_start.add_argument("--timeout", type=float, default=30.0, help="seconds to wait")
    etcd_start.set_defaults(func=cmd_etcd_start)

    restart = verbs.add_parser(
        "restart", parents=[dir_opt], help="restart a machine's fleetd, its units untouched"
    )
    restart.add_argument("machine")
    restart.add_argument(
        "--kill", action="store_true", help="SIGKILL fleetd instead of SIGUSR2 (a crash)"
    )
    restart.add_argument(
        "--down-for", type=float, default=0.0, help="seconds to stay down before starting again"
    )
    restart.add_argument("--timeout", type=float, default=60.0, help="seconds to wait")
    restart.set_defaults(func=cmd_restart)

    ssh = verbs.add_parser("ssh", parents=[dir_opt], help="run a command on a machine")
    ssh.add_argument("machine")
    ssh.add_argument("command", nargs="*", help="-- CMD [ARGS...]")
    ssh.set_defaults(func=cmd_ssh)

    add = verbs.add_parser("add", parents=[dir_opt, wait_opt], help="add a machine")
    add.add_argument("name")
    add.add_argument("--metadata", help="key=value,key2=value2")
    add.set_defaults(func=cmd_add)

    destroy_ = verbs.add_parser("destroy", parents=[dir_opt], help="remove everything")
    destroy_.set_defaults(func=cmd_destroy)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first "--" is the command of `ssh`, so options may come before it in
    # any order (`ssh core-01 --dir D -- systemctl --user ...`).
    command: list[str] | None = None
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1 :]
    args = build_parser().parse_args(argv)
    if command is not None:
        if args.verb != "ssh":
            print(f"{PROG}: error: only ssh takes a command after -- (see --help)", file=sys.stderr)
            return 1
        args.command = list(args.command) + command
    args.dir = Path(getattr(args, "dir", None) or default_dir()).absolute()
    try:
        return int(args.func(args))
    except UserError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except (EtcdError, ManagerError, SshdError, ContainerHostError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`status | head`): not an error worth a traceback.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
