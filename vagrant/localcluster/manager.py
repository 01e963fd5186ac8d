"""One simulated machine's init system: a real `systemd --user` manager, launched, found again,
stopped and killed.

Each manager runs in a private mount namespace (so it can have a /run/systemd/system of its own,
which makes systemd believe it booted under systemd) and UTS namespace (its host name is the
machine's name, so `%H` in a unit names the machine), with a private XDG runtime dir holding its
session bus, and in a cgroup subtree of its own: without that, units of the same name on two
managers share one cgroup and stopping one kills the other's processes. A caller may hand in a
script that sets up more of the namespace (mounts) before systemd starts.

The launch is detached (own session, output to a log file) and described by a JSON file in the
machine's state dir, so a later process can find the manager again with `ManagerHandle.load`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

SYSTEMD = "/lib/systemd/systemd"
JOURNALD = "/lib/systemd/systemd-journald"
JOURNALD_CONF_TARGET = Path("/etc/systemd/journald.conf")
UNSHARE = "/usr/bin/unshare"
NSENTER = "/usr/bin/nsenter"
CGROUP_ROOT = Path("/sys/fs/cgroup")

HANDLE_FILE = "manager.json"
LOG_FILE = "manager.log"
RUNTIME_DIR = "run"
# Processes moved in with add_process live in a leaf of their own: on a pure cgroup v2 layout a
# cgroup whose children have controllers enabled cannot hold processes itself.
EXTRA_CGROUP = "added"
# The manager sits one level below the machine's top cgroup, in a cgroup named like a real user
# manager's: journald derives _SYSTEMD_USER_UNIT (what `journalctl --user-unit` matches) only from
# paths of the form [<slices>/]user@<uid>.service/..., so the top is a slice name.
MANAGER_CGROUP = "user@0.service"
JOURNAL_UNIT = "fleet-local-journald.service"
# What the machine's journald may keep: the machine's journal lives in a tmpfs of its own.
_JOURNALD_CONF = """# Written by local-cluster: the journal of one simulated machine.
[Journal]
Storage=volatile
RuntimeMaxUse=16M
ReadKMsg=no
Audit=no
ForwardToSyslog=no
ForwardToKMsg=no
ForwardToConsole=no
ForwardToWall=no
"""
# Ordered before basic.target, so the manager counts as running only once its journal listens and
# every later unit's stdout (StandardOutput=journal, the default) reaches it.
_JOURNAL_UNIT_TEXT = f"""[Unit]
Description=Journal of this simulated machine
DefaultDependencies=no
Before=basic.target

[Service]
Type=notify
ExecStart={JOURNALD}
StandardOutput=null
Restart=on-failure
# journald hands every stdout stream it accepts to the manager's fd store, as a host's
# systemd-journald.service allows (4224): without room the manager warns once per unit start on
# /dev/console, a serial line here, and answered D-Bus calls ~0.1 s after each batch of starts.
FileDescriptorStoreMax=4224

[Install]
WantedBy=basic.target
"""

# sockaddr_un.sun_path is 108 bytes; systemd puts "systemd/private" and deeper paths in the
# runtime dir, so leave room for them.
_MAX_RUNTIME_DIR = 80

# The launcher joins the manager's cgroup, then builds the machine's private /run/systemd, the
# tmpfs of its own it was asked for (if any) and, when a journal is wanted, its private /run/log,
# /var/log/journal and journald.conf, all in the mount namespace `unshare` gave it, before it
# becomes the manager.
_LAUNCH_SCRIPT = """
set -e
systemd_binary=$1
host_name=$2
setup=$3
journal_dir=$4
journald_conf=$5
tmpfs_dir=$6
shift 6
for procs in "$@"; do echo $$ > "$procs"; done
mkdir -p /run/systemd
mount -t tmpfs -o mode=755 tmpfs /run/systemd
mkdir -p /run/systemd/system
if [ -n "$tmpfs_dir" ]; then
    mkdir -p "$tmpfs_dir"
    mount -t tmpfs -o mode=755,size=128m tmpfs "$tmpfs_dir"
fi
if [ -n "$journal_dir" ]; then
    mkdir -p /run/log /var/log/journal
    mount -t tmpfs -o mode=755,size=64m tmpfs /run/log
    mount --bind "$journal_dir" /var/log/journal
    mount --bind "$journald_conf" /etc/systemd/journald.conf
fi
hostname "$host_name"
if [ -n "$setup" ]; then /bin/sh "$setup"; fi
exec "$systemd_binary" --user
"""

_ENTER_SCRIPT = """
set -e
while [ "$1" != "--" ]; do echo $$ > "$1"; shift; done
shift
exec "$@"
"""

_PR_SET_CHILD_SUBREAPER = 36
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ManagerError(RuntimeError):
    """A manager could not be started, stopped or cleaned up; the message says which and why."""


def cgroup_hierarchies() -> list[Path]:
    """The mounted cgroup hierarchies a manager's subtree must exist in.

    Hybrid layout (this project's hosts): the named v1 "systemd" hierarchy systemd tracks units
    in, plus the v2 "unified" one it mirrors them into. Pure v2: the one hierarchy at the root.
    """
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return [CGROUP_ROOT]
    found = [
        CGROUP_ROOT / sub
        for sub in ("systemd", "unified")
        if (CGROUP_ROOT / sub / "cgroup.procs").exists()
    ]
    if not found:
        raise ManagerError(f"no systemd cgroup hierarchy mounted under {CGROUP_ROOT}")
    return found


def all_hierarchies() -> list[Path]:
    """Every mounted cgroup hierarchy. Containers a machine runs (podman with the cgroupfs
    manager) get cgroups in each v1 controller hierarchy too, under the machine's cgroup name;
    cleaning up must reach them all."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return [CGROUP_ROOT]
    return sorted(sub for sub in CGROUP_ROOT.iterdir() if (sub / "cgroup.procs").exists())


def cgroup_name(name: str, state_dir: Path) -> str:
    """A cgroup name unique per state dir (so per cluster and machine) yet readable in ps."""
    digest = hashlib.sha1(str(state_dir.resolve()).encode()).hexdigest()[:10]
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return f"fleet-local-{digest}-{safe}.slice"


def become_subreaper() -> None:
    """Adopt orphaned descendants of this process instead of leaving them to PID 1.

    When a manager is killed its units' processes are orphaned; on hosts whose PID 1 never
    reaps, they would stay zombies forever. A caller that starts and kills managers itself
    (test fixtures) calls this once so that `kill` can reap them.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@dataclass
class ManagerHandle:
    """A launched manager as recorded in its state dir."""

    name: str
    state_dir: Path
    runtime_dir: Path
    bus_address: str
    pid: int
    cgroup: str
    journal: bool = False

    @classmethod
    def load(cls, state_dir: Path) -> ManagerHandle | None:
        """The handle `start_manager` recorded in state_dir, or None if there is none."""
        try:
            raw = json.loads((state_dir / HANDLE_FILE).read_text())
        except FileNotFoundError:
            return None
        try:
            return cls(
                name=str(raw["name"]),
                state_dir=Path(raw["state_dir"]),
                runtime_dir=Path(raw["runtime_dir"]),
                bus_address=str(raw["bus_address"]),
                pid=int(raw["pid"]),
                cgroup=str(raw["cgroup"]),
                journal=bool(raw.get("journal", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ManagerError(f"{state_dir / HANDLE_FILE} is malformed: {exc}") from exc

    def save(self) -> None:
        data = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}
        tmp = self.state_dir / f".{HANDLE_FILE}.tmp"
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.state_dir / HANDLE_FILE)

    def env(self) -> dict[str, str]:
        """What a client (systemctl --user, fleetd) needs in its environment to reach this
        manager rather than whatever session the caller inherited."""
        return {
            "XDG_RUNTIME_DIR": str(self.runtime_dir),
            "DBUS_SESSION_BUS_ADDRESS": self.bus_address,
        }

    def enter(self, command: Sequence[str], cwd: Path) -> list[str]:
        """`command` run inside this machine's mount and UTS namespaces (its podman, its
        /etc/containers, its host name), starting in `cwd`."""
        return [NSENTER, "-t", str(self.pid), "--mount", "--uts", f"--wd={cwd}", "--", *command]

    def cgroup_dirs(self) -> list[Path]:
        return [h / self.cgroup for h in cgroup_hierarchies()]

    def all_cgroup_dirs(self) -> list[Path]:
        return [h / self.cgroup for h in all_hierarchies()]

    def is_running(self) -> bool:
        """Whether the manager process is alive. A pid recycled by an unrelated process does
        not count: the process must still sit in this manager's cgroup."""
        _reap(self.pid)
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
            cgroups = Path(f"/proc/{self.pid}/cgroup").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return False
        # The state letter follows the parenthesised command name, which may contain spaces.
        if stat.rpartition(")")[2].split()[0] in ("Z", "X"):
            return False
        return any(
            line.split(":", 2)[2].startswith(f"/{self.cgroup}/")
            or line.split(":", 2)[2] == f"/{self.cgroup}"
            for line in cgroups.splitlines()
            if line.count(":") >= 2
        )

    def processes(self) -> dict[int, int]:
        """Every live process in the manager's cgroup subtree: pid -> parent pid."""
        found: dict[int, int] = {}
        for top in self.all_cgroup_dirs():
            if not top.is_dir():
                continue
            for dirpath, _dirs, _files in os.walk(top):
                try:
                    text = (Path(dirpath) / "cgroup.procs").read_text()
                except FileNotFoundError:
                    continue
                for token in text.split():
                    pid = int(token)
                    if pid not in found:
                        found[pid] = _parent_of(pid)
        return found

    def stop(self, timeout: float = 10) -> None:
        """Shut the machine down cleanly: the manager stops its units in order as on logout and
        added processes (fleetd) get SIGTERM; whatever is left after `timeout` seconds is
        killed."""
        added = self._added_processes()
        targets = ([self.pid] if self.is_running() else []) + added
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        # Zombies leave cgroup.procs, so an added process that exited counts as gone even if
        # whoever spawned it has not collected it yet.
        while time.monotonic() < deadline and (self.is_running() or self._added_processes()):
            time.sleep(0.02)
        self.kill()

    def _added_processes(self) -> list[int]:
        found = {
            int(token)
            for top in self.cgroup_dirs()
            for token in _read_or_empty(top / EXTRA_CGROUP / "cgroup.procs").split()
        }
        return sorted(found)

    def kill(self) -> None:
        """Power cut: SIGKILL every process in the subtree (manager, units, added processes)
        and wait until the subtree is empty."""
        seen: dict[int, int] = {}
        me = os.getpid()
        deadline = time.monotonic() + 10
        while True:
            procs = self.processes()
            if not procs:
                break
            if time.monotonic() > deadline:
                raise ManagerError(
                    f"processes {sorted(procs)} of machine {self.name} survived SIGKILL"
                )
            seen.update({pid: ppid for pid, ppid in procs.items() if pid not in seen})
            # cgroup.kill (v2, Linux 5.14+) also catches processes forked while we iterate.
            for top in self.cgroup_dirs():
                with contextlib.suppress(OSError):
                    (top / "cgroup.kill").write_text("1")
            for pid in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.005)
        # A process leaves its cgroup before its children are handed to a reaper, so wait for
        # the manager to be a zombie (or gone) before reaping the orphans this process adopted.
        while _is_alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.005)
        _reap(self.pid)
        for pid, ppid in seen.items():
            # Our own direct children belong to whoever spawned them (a Popen object would
            # lose their exit status); only orphans we adopted as subreaper are ours to reap.
            if ppid != me:
                _reap(pid)

    def add_process(self, pid: int) -> None:
        """Move another process (that machine's fleetd) into the machine, so `kill` takes it
        down with the manager as a power cut would."""
        for top in self.cgroup_dirs():
            leaf = top / EXTRA_CGROUP
            leaf.mkdir(exist_ok=True)
            try:
                (leaf / "cgroup.procs").write_text(str(pid))
            except OSError as exc:
                raise ManagerError(
                    f"cannot move pid {pid} into machine {self.name} ({leaf}): {exc}"
                ) from exc

    def spawn_inside(self, argv: list[str], log: Path, env: dict[str, str]) -> int:
        """Start a detached process inside the machine: in its cgroup subtree (so `kill` takes it
        down) and its mount namespace (so it sees the machine's /run/systemd, journal and
        mounts). It joins the cgroup before it execs, so nothing it forks escapes."""
        procs = []
        for top in self.cgroup_dirs():
            leaf = top / EXTRA_CGROUP
            leaf.mkdir(exist_ok=True)
            procs.append(str(leaf / "cgroup.procs"))
        full = [
            "/bin/sh", "-c", _ENTER_SCRIPT, "fleet-local-enter", *procs, "--",
            NSENTER, "-t", str(self.pid), "--mount", "--uts", "--", *argv,
        ]  # fmt: skip
        return os.posix_spawn(
            "/bin/sh",
            full,
            env,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, str(log), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
                (os.POSIX_SPAWN_DUP2, 1, 2),
            ],
            setsid=True,
        )

    def cleanup(self) -> None:
        """Remove what the manager leaves behind: processes (killed if any remain), its cgroup
        directories (deepest first, as the kernel requires), its runtime dir and handle file.
        The tmpfs on /run/systemd dies with the last process of its mount namespace."""
        if self.processes() or self.is_running():
            self.kill()
        for top in self.all_cgroup_dirs():
            _remove_cgroup_tree(top)
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / HANDLE_FILE).unlink()


def start_manager(
    name: str,
    state_dir: Path,
    timeout: float = 10,
    journal: bool = True,
    setup: Path | None = None,
    tmpfs: Path | None = None,
) -> ManagerHandle:
    """Launch a detached user manager for machine `name` with its state in `state_dir`, with a
    journald of its own when `journal` is set and this host has systemd-journald.

    `setup`, if given, is a shell script run as root inside the machine's new namespaces just
    before systemd starts (mounts that make the machine a host of its own).

    `tmpfs`, if given, is a directory that gets a tmpfs of its own inside the machine's mount
    namespace, as /run is on a real host: seen by the manager and by whatever enters the
    machine, empty again after the machine is killed, invisible from outside.

    Returns once the manager answers on its session bus with SystemState running or degraded.
    Raises ManagerError (after cleaning up) if it dies or is not ready within `timeout`.
    """
    if os.geteuid() != 0:
        raise ManagerError("starting a systemd manager with its own cgroup needs root")
    if not Path(SYSTEMD).exists():
        raise ManagerError(f"{SYSTEMD} is missing: install systemd")
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    runtime_dir = state_dir / RUNTIME_DIR
    if len(str(runtime_dir)) > _MAX_RUNTIME_DIR:
        raise ManagerError(
            f"state dir {state_dir} is too long: unix socket paths under it would exceed the "
            "108-byte limit; use a shorter path"
        )

    previous = ManagerHandle.load(state_dir)
    if previous is not None:
        if previous.is_running():
            raise ManagerError(
                f"machine {name} already has a manager running (pid {previous.pid}); stop it first"
            )
        previous.cleanup()

    cgroup = cgroup_name(name, state_dir)
    handle = ManagerHandle(
        name=name,
        state_dir=state_dir,
        runtime_dir=runtime_dir,
        bus_address=f"unix:path={runtime_dir}/bus",
        pid=0,
        cgroup=cgroup,
    )
    # Leftovers of a manager that was killed without cleanup would confuse the new one.
    for top in handle.all_cgroup_dirs():
        if top.is_dir():
            _kill_tree(top)
            _remove_cgroup_tree(top)
    for top in handle.cgroup_dirs():
        top.mkdir()
        (top / MANAGER_CGROUP).mkdir()
    shutil.rmtree(runtime_dir, ignore_errors=True)
    runtime_dir.mkdir(mode=0o700)
    os.chmod(runtime_dir, 0o700)  # mkdir's mode is filtered through the umask
    for sub in ("config", "data", "state", "cache"):
        (state_dir / sub).mkdir(exist_ok=True)
    handle.journal = journal and _prepare_journal(state_dir)

    handle.pid = _spawn(handle, setup, tmpfs)
    handle.save()
    try:
        _wait_ready(handle, timeout)
    except BaseException:
        handle.kill()
        handle.cleanup()
        raise
    return handle


def _prepare_journal(state_dir: Path) -> bool:
    """Files the machine's journald needs: its config, an empty directory to hide the host's
    /var/log/journal, and the user unit that runs it (enabled for basic.target). False when this
    host cannot run one (then units' output to the journal is lost, as without journald)."""
    if not (Path(JOURNALD).exists() and JOURNALD_CONF_TARGET.exists()):
        return False
    (state_dir / "journal").mkdir(exist_ok=True)
    (state_dir / "journald.conf").write_text(_JOURNALD_CONF)
    units = state_dir / "config" / "systemd" / "user"
    wants = units / "basic.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (units / JOURNAL_UNIT).write_text(_JOURNAL_UNIT_TEXT)
    link = wants / JOURNAL_UNIT
    if not link.is_symlink():
        link.symlink_to(units / JOURNAL_UNIT)
    return True


def _manager_env(handle: ManagerHandle) -> dict[str, str]:
    # Built from scratch: an inherited DBUS_SESSION_BUS_ADDRESS would make this manager register
    # on another manager's bus, and XDG_* from the caller would make managers share unit dirs.
    env = {
        "PATH": os.environ.get("PATH", _DEFAULT_PATH),
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "XDG_CONFIG_HOME": str(handle.state_dir / "config"),
        "XDG_DATA_HOME": str(handle.state_dir / "data"),
        "XDG_STATE_HOME": str(handle.state_dir / "state"),
        "XDG_CACHE_HOME": str(handle.state_dir / "cache"),
    }
    env.update(handle.env())
    return env


def _spawn(handle: ManagerHandle, setup: Path | None, tmpfs: Path | None) -> int:
    log = handle.state_dir / LOG_FILE
    argv = [
        UNSHARE, "--mount", "--uts", "--propagation", "private", "--",
        "/bin/sh", "-c", _LAUNCH_SCRIPT, "fleet-local-launch", SYSTEMD, handle.name,
        str(setup) if setup else "",
        str(handle.state_dir / "journal") if handle.journal else "",
        str(handle.state_dir / "journald.conf"),
        str(tmpfs) if tmpfs else "",
        *(str(top / MANAGER_CGROUP / "cgroup.procs") for top in handle.cgroup_dirs()),
    ]  # fmt: skip
    # posix_spawn rather than Popen: the manager outlives this call and maybe this process, and
    # a Popen object would complain when collected while its child still runs. unshare execs sh
    # which execs systemd, so the spawned pid is the manager's pid.
    return os.posix_spawn(
        UNSHARE,
        argv,
        _manager_env(handle),
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, str(log), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ],
        setsid=True,
    )


def _wait_ready(handle: ManagerHandle, timeout: float) -> None:
    # Asking over the session bus (not systemctl's private socket) proves both that the manager
    # is up and that the bus clients such as fleetd will use answers.
    query = [
        "busctl", "--user", "get-property", "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager", "SystemState",
    ]  # fmt: skip
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **handle.env()}
    deadline = time.monotonic() + timeout
    state = "no answer"
    while time.monotonic() < deadline:
        # Not is_running(): the launcher joins the cgroup only a moment after the spawn.
        _reap(handle.pid)
        if not _is_alive(handle.pid):
            raise ManagerError(
                f"manager of machine {handle.name} exited during startup: {_log_tail(handle)}"
            )
        if (handle.runtime_dir / "bus").exists():
            result = subprocess.run(
                query, env=env, capture_output=True, text=True, timeout=max(1.0, timeout)
            )
            if result.returncode == 0:
                # busctl prints a property as its signature and value: s "running"
                state = result.stdout.strip().removeprefix("s ").strip('"')
                if state in ("running", "degraded"):
                    return
        time.sleep(0.02)
    raise ManagerError(
        f"manager of machine {handle.name} not ready after {timeout}s (last state: {state}); "
        f"see {handle.state_dir / LOG_FILE}"
    )


def _log_tail(handle: ManagerHandle) -> str:
    try:
        lines = (handle.state_dir / LOG_FILE).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "no log"
    return " | ".join(lines[-5:]) or "empty log"


def _parent_of(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return int(stat.rpartition(")")[2].split()[1])


def _is_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _reap(pid: int) -> None:
    """Collect `pid` if it is a dead child of this process; anything else is left alone."""
    if pid <= 0:
        return
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _kill_tree(top: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pids = [
            int(token)
            for dirpath, _dirs, _files in os.walk(top)
            for token in _read_or_empty(Path(dirpath) / "cgroup.procs").split()
        ]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.005)
    raise ManagerError(f"processes in {top} survived SIGKILL")


def _read_or_empty(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _remove_cgroup_tree(top: Path) -> None:
    if not top.is_dir():
        return
    deadline = time.monotonic() + 5
    # cgroup dirs hold only kernel control files, which rmdir ignores; children must go first.
    for dirpath, _dirs, _files in os.walk(top, topdown=False):
        while True:
            try:
                os.rmdir(dirpath)
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                # EBUSY while the last process's exit is still being accounted for.
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise ManagerError(f"cannot remove cgroup {dirpath}: {exc}") from exc
                time.sleep(0.01)
