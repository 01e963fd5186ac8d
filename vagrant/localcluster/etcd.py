"""A real etcd (one or three members) on loopback, owned by a directory.

Members run detached (own session, output to a log file) so a short-lived CLI can start them and a
later invocation can find them again through ``<dir>/etcd.json``. Ports are picked free by binding,
readiness is an HTTP health request that is polled, never a fixed sleep.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

STATE_FILE = "etcd.json"
HOST = "127.0.0.1"
ETCD_BINARY = "etcd"

# Election timeouts that make a leader loss cost ~0.4 s instead of ~2 s; leases shorter than about
# 1.5 x the election timeout are refused by etcd, so the fast setting also allows short agent TTLs.
FAST_TIMING = ["--heartbeat-interval", "20", "--election-timeout", "200"]


class EtcdError(RuntimeError):
    """etcd could not be started, found or reached."""


@dataclass
class Member:
    """One etcd process as recorded in the state file."""

    name: str
    client_port: int
    peer_port: int
    data_dir: str
    log: str
    pid: int = 0

    @property
    def client_url(self) -> str:
        return f"http://{HOST}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{HOST}:{self.peer_port}"


def _port_is_free(port: int) -> bool:
    # SO_REUSEADDR mirrors what etcd's Go listener does, so TIME_WAIT leftovers do not count as busy
    # while a socket still held by a dying process does.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def _free_ports(count: int) -> list[int]:
    """Ports the kernel handed out as unused just now; distinct from each other."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port not in ports and _port_is_free(port):
            ports.append(port)
    return ports


def _reap(pid: int) -> None:
    """Collect the exit status of our own dead child, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def pid_alive(pid: int, marker: str = "") -> bool:
    """True while `pid` runs (zombies count as dead) and, if given, its command line has `marker`.

    The marker guards against pid reuse after a reboot or a long time between CLI invocations.
    """
    if pid <= 0:
        return False
    _reap(pid)
    # A process caught in the middle of exec shows an empty command line for a moment.
    for _ in range(100):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        # The state field follows the parenthesised command name, which may contain spaces.
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False
        if cmdline or not marker:
            break
        time.sleep(0.002)
    return not marker or marker.encode() in cmdline


def wait_pid_gone(pid: int, timeout: float, marker: str = "") -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid, marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _request(url: str, body: bytes | None = None, timeout: float = 1.0) -> dict[str, object]:
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        payload = json.loads(resp.read() or b"{}")
    if not isinstance(payload, dict):
        raise EtcdError(f"unexpected answer from {url}: {payload!r}")
    return payload


def member_healthy(client_url: str, timeout: float = 1.0) -> bool:
    """etcd answers /health with "true" only once it has a leader and serves a linearizable read."""
    try:
        return _request(f"{client_url}/health", timeout=timeout).get("health") == "true"
    except (OSError, ValueError, EtcdError):
        return False


def _log_tail(path: str, lines: int = 15) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class EtcdCluster:
    """One or three etcd members whose data, logs and state file live under `dir`."""

    def __init__(
        self,
        dir: Path,
        members: list[Member],
        token: str,
        fast: bool,
        extra: Sequence[str] = (),
    ) -> None:
        self.dir = dir
        self.members = members
        self.token = token
        self.fast = fast
        # More etcd flags for every member (tests: a short --auth-token-ttl).
        self.extra = list(extra)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        dir: Path,
        members: int = 1,
        fast: bool = False,
        timeout: float = 20,
        extra: Sequence[str] = (),
    ) -> EtcdCluster:
        """Start a new cluster in `dir`, or bring back the dead members of the one in there."""
        dir = Path(dir).resolve()
        existing = cls.load(dir)
        if existing is not None:
            existing.ensure_running(timeout=timeout)
            return existing
        if members not in (1, 3):
            raise EtcdError(f"etcd members must be 1 or 3, not {members}")
        dir.mkdir(parents=True, exist_ok=True)
        last_error: EtcdError | None = None
        # Another process can grab a port between our bind test and etcd's bind: pick anew then.
        for _ in range(3):
            cluster = cls._fresh(dir, members, fast)
            cluster.extra = list(extra)
            try:
                cluster._launch_all(timeout)
            except EtcdError as exc:
                last_error = exc
                cluster.stop()
                cluster._forget()
                continue
            return cluster
        assert last_error is not None
        raise last_error

    @classmethod
    def _fresh(cls, dir: Path, count: int, fast: bool) -> EtcdCluster:
        ports = _free_ports(2 * count)
        token = "local-" + secrets.token_hex(6)
        members = [
            Member(
                name=f"etcd{i}",
                client_port=ports[2 * i],
                peer_port=ports[2 * i + 1],
                data_dir=str(dir / f"etcd{i}.data"),
                log=str(dir / f"etcd{i}.log"),
            )
            for i in range(count)
        ]
        return cls(dir, members, token, fast)

    @classmethod
    def load(cls, dir: Path) -> EtcdCluster | None:
        """The cluster recorded in `dir`, running or not; None if there is none."""
        dir = Path(dir).resolve()
        try:
            raw = json.loads((dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return None
        members = [Member(**m) for m in raw["members"]]
        extra = [str(a) for a in raw.get("extra", [])]
        return cls(dir, members, str(raw["token"]), bool(raw["fast"]), extra)

    # -- queries --------------------------------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def member_running(self, index: int) -> bool:
        member = self.members[index]
        return pid_alive(member.pid, member.data_dir)

    def is_running(self) -> bool:
        """True if every member process is alive."""
        return all(self.member_running(i) for i in range(len(self.members)))

    def is_healthy(self) -> bool:
        return any(member_healthy(url) for url in self._live_urls())

    def leader_index(self) -> int | None:
        """Index of the member that currently leads, as the live members report it."""
        ids: dict[str, int] = {}
        leader = ""
        for index, member in enumerate(self.members):
            if not self.member_running(index):
                continue
            try:
                status = _request(f"{member.client_url}/v3/maintenance/status", b"{}")
            except (OSError, ValueError, EtcdError):
                continue
            header = status.get("header")
            if isinstance(header, dict):
                ids[str(header.get("member_id"))] = index
            if status.get("leader"):
                leader = str(status["leader"])
        return ids.get(leader)

    def wait_healthy(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not self.is_healthy():
            if time.monotonic() > deadline:
                raise EtcdError(f"etcd in {self.dir} not healthy after {timeout:.0f}s")
            time.sleep(0.02)

    # -- lifecycle ------------------------------------------------------------------------------

    def ensure_running(self, timeout: float = 20) -> None:
        """Start every member that is not running, then wait until they serve."""
        dead = [i for i in range(len(self.members)) if not self.member_running(i)]
        for index in dead:
            self._wait_ports_free(index, timeout)
            self._spawn(index)
        self._save()
        self._wait_ready(dead, timeout)

    def kill_member(self, index: int) -> None:
        """SIGKILL one member and wait until its process is gone."""
        member = self.members[index]
        if self.member_running(index):
            with contextlib.suppress(ProcessLookupError):
                os.kill(member.pid, signal.SIGKILL)
            if not wait_pid_gone(member.pid, 10, member.data_dir):
                raise EtcdError(f"etcd member {index} (pid {member.pid}) survived SIGKILL")

    def restart_member(self, index: int, timeout: float = 20) -> None:
        """Start a stopped or killed member again with its data; kills it first if it still runs."""
        self.kill_member(index)
        self._wait_ports_free(index, timeout)
        self._spawn(index)
        self._save()
        self._wait_ready([index], timeout)

    def stop(self, timeout: float = 10, graceful: bool = True) -> None:
        """Stop every member: SIGTERM, then SIGKILL whatever is left after `timeout`.

        `graceful=False` kills at once, for throwaway data where a clean shutdown buys nothing.
        """
        if not graceful:
            for index in range(len(self.members)):
                self.kill_member(index)
            return
        # Measured: a leader stops in ~0.1 s while a follower is up to take over, but a lone
        # member left without quorum can take 5+ s. So always stop the current leader next.
        while True:
            running = [i for i in range(len(self.members)) if self.member_running(i)]
            if not running:
                return
            leader = self.leader_index()
            index = leader if leader in running else running[0]
            member = self.members[index]
            with contextlib.suppress(ProcessLookupError):
                os.kill(member.pid, signal.SIGTERM)
            if not wait_pid_gone(member.pid, timeout, member.data_dir):
                self.kill_member(index)

    # -- internals ------------------------------------------------------------------------------

    def _launch_all(self, timeout: float) -> None:
        # Members of a new multi-member cluster only become healthy together, so spawn all first.
        for index in range(len(self.members)):
            self._spawn(index)
        self._save()
        self._wait_ready(list(range(len(self.members))), timeout)

    def _command(self, member: Member) -> list[str]:
        cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        cmd = [
            ETCD_BINARY,
            "--name", member.name,
            "--data-dir", member.data_dir,
            "--listen-client-urls", member.client_url,
            "--advertise-client-urls", member.client_url,
            "--listen-peer-urls", member.peer_url,
            "--initial-advertise-peer-urls", member.peer_url,
            "--initial-cluster", cluster,
            "--initial-cluster-token", self.token,
            "--initial-cluster-state", "new",
            "--logger", "zap",
            "--log-outputs", "stderr",
        ]  # fmt: skip
        if self.fast:
            cmd += FAST_TIMING
        return cmd + self.extra

    def _spawn(self, index: int) -> None:
        member = self.members[index]
        # etcd reads ETCD_* variables as flags and refuses a flag given twice.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        with open(member.log, "ab") as log:
            try:
                proc = subprocess.Popen(
                    self._command(member),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env=env,
                    cwd=self.dir,
                )
            except FileNotFoundError as exc:
                raise EtcdError(
                    f"`{ETCD_BINARY}` not found: install etcd-server (scripts/setup)"
                ) from exc
        member.pid = proc.pid

    def _wait_ready(self, indexes: list[int], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = list(indexes)
        while pending:
            for index in list(pending):
                member = self.members[index]
                if not self.member_running(index):
                    raise EtcdError(
                        f"etcd member {member.name} (pid {member.pid}) exited during startup; "
                        f"log {member.log}:\n{_log_tail(member.log)}"
                    )
                if member_healthy(member.client_url, timeout=0.5):
                    pending.remove(index)
            if not pending:
                return
            if time.monotonic() > deadline:
                names = ", ".join(self.members[i].name for i in pending)
                log = self.members[pending[0]].log
                raise EtcdError(
                    f"etcd member(s) {names} not ready after {timeout:.0f}s; "
                    f"log {log}:\n{_log_tail(log)}"
                )
            time.sleep(0.02)

    def _wait_ports_free(self, index: int, timeout: float) -> None:
        member = self.members[index]
        deadline = time.monotonic() + timeout
        while not (_port_is_free(member.client_port) and _port_is_free(member.peer_port)):
            if time.monotonic() > deadline:
                raise EtcdError(
                    f"ports {member.client_port}/{member.peer_port} of {member.name} still busy"
                )
            time.sleep(0.05)

    def _live_urls(self) -> Iterator[str]:
        for index, member in enumerate(self.members):
            if self.member_running(index):
                yield member.client_url

    def _save(self) -> None:
        state = {
            "token": self.token,
            "fast": self.fast,
            "extra": self.extra,
            "members": [asdict(m) for m in self.members],
        }
        tmp = self.dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.dir / STATE_FILE)

    def _forget(self) -> None:
        with contextlib.suppress(OSError):
            (self.dir / STATE_FILE).unlink()
        for member in self.members:
            shutil.rmtree(member.data_dir, ignore_errors=True)
