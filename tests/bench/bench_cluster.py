"""The local-cluster workloads of issue 9, measured on real fleetd processes and systemd managers;
prints figures, asserts nothing.

    .venv/bin/python tests/bench/bench_cluster.py [--units 300] [--idle 60] [--ttl 4] [--rounds 3]

On a fresh local cluster (vagrant/cluster.toml: three machines, agent_ttl 4 s) with the template
units/hello@.service (a shell loop):

- W1: `fleetctl start --no-block hello@1..N`, until `fleetctl list-units` (polled every 0.25 s:
  a poll starts every 0.25 s, or at once after one that took longer) shows all N active; etcd
  proposals per placed unit (etcd's proposals_committed counter, all of fleetctl's and every
  agent's writes included); balance max - min; the CPU seconds all fleetd processes used
  meanwhile.
- idle: etcd proposals per minute while the N units run and nothing changes.
- W3: `local-cluster kill` of a machine holding N/3 units, until all N run elsewhere, timed from
  the moment its fleetd died (and from the verb's start; the verb itself runs on in the
  background meanwhile).
- W4: the killed machine back, then `local-cluster halt` of a machine holding N/2 units, until
  all N run elsewhere.
- the floor: the same N units started directly on the same managers, one process per manager
  (no etcd, no fleet; unit files on a tmpfs inside the machine, as fleetd's), timed the same
  way (the processes poll their units' states every 0.25 s), twice: with the batch calls fleetd
  makes (one LinkUnitFiles, one Reload, the StartUnit calls sent together), which W1 is held
  against, and with one call per unit.
- fleetctl runs with its bytecode cached (a cache of the benchmark's own, filled before the
  first figure), as an installed fleetctl has it.
- rounds: the batched floor and W1 run in turn `--rounds` times (the units destroyed between
  rounds), each W1 held against the floor just before it; the median of those ratios is the
  figure to quote, since the same floor varies by a third from one minute to the next here.
- where the machine's CPU went during each floor and each W1 (the managers, fleetd, etcd,
  journald, the fleetctl processes, the floor's processes, the rest): the floor keeps the two
  cores busy on its own, so what fleet's processes use comes on top of it.
- where W1's time goes, from the agents' logs: time to the last claim, to the last start call;
  from systemd's own ActiveEnterTimestampMonotonic of every unit, read afterwards: when the
  last unit became active (for the floor too); then publication and the listing's polling;
  and the claims made by a machine not ranked first (a unit its favourite left unclaimed for a
  stagger, which delays its start).
- the listing's share: W1 once more with its 0.25 s poll done by this process (one registry
  read each) instead of by a fleetctl process each, against a floor of its own: what the
  fleetctl processes' CPU, competing with the managers for the cores, adds to W1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
LC = [sys.executable, str(ROOT / "vagrant" / "local-cluster")]
FLEETCTL = str(Path(sys.executable).with_name("fleetctl"))
POLL = 0.25


def lc(directory: str, *args: str) -> str:
    return subprocess.run(
        [*LC, "--dir", directory, *args], check=True, capture_output=True, text=True
    ).stdout


class Verb:
    """A local-cluster verb run in the background; `wait()` gives the seconds it took."""

    def __init__(self, directory: str, *args: str) -> None:
        self.args = args
        self.start = time.monotonic()
        self.took = 0.0
        self.proc = subprocess.Popen(
            [*LC, "--dir", directory, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )
        self._waiter = threading.Thread(target=self._wait, daemon=True)
        self._waiter.start()

    def _wait(self) -> None:
        self.proc.wait()
        self.took = time.monotonic() - self.start

    def wait(self) -> float:
        self._waiter.join(120)
        _, err = self.proc.communicate(timeout=10)
        if self.proc.returncode != 0:
            raise SystemExit(f"local-cluster {' '.join(self.args)} failed: {err}")
        return self.took


class Death:
    """When a machine's fleetd died (gone, or a zombie), seen by polling /proc every 2 ms: the
    moment of the power cut, without the `local-cluster` verb's own start-up before it."""

    def __init__(self, directory: str, machine: str) -> None:
        info = json.loads((Path(directory) / "m" / machine / "fleetd.json").read_text())
        self.stat = Path(f"/proc/{int(info['pid'])}/stat")
        self.at: float | None = None
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                state = self.stat.read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                state = "gone"
            if state in ("Z", "X", "gone"):
                self.at = time.monotonic()
                return
            time.sleep(0.002)


def fleetctl(env: dict[str, str], *args: str) -> str:
    return subprocess.run(
        [FLEETCTL, *args], check=True, capture_output=True, text=True, env=env
    ).stdout


def _classify(comm: str, words: list[str], directory: str) -> str:
    """The process class a CPU account puts a process in (see CpuWindow)."""
    line = " ".join(words)
    if any(w.endswith("/fleetd") for w in words) or "fleetd.guard" in line:
        return "fleetd" if directory in line else "other"
    if "floor_worker.py" in line:
        return "floor processes"
    if comm.startswith("systemd-journal"):
        return "journald"
    if comm == "systemd" and "--user" in words:
        return "systemd managers"
    if comm == "etcd":
        return "etcd"
    if comm.startswith("dbus"):
        return "dbus"
    return "other"


def _processes(directory: str) -> dict[tuple[int, int], tuple[str, float]]:
    """(pid, start time) -> (class, CPU seconds so far) of every process now alive."""
    found: dict[tuple[int, int], tuple[str, float]] = {}
    ticks = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        words = [a.decode(errors="replace") for a in argv if a]
        found[(int(entry.name), int(fields[19]))] = (
            _classify(comm, words, directory), (int(fields[11]) + int(fields[12])) / ticks
        )
    return found


def _busy() -> float:
    """CPU seconds the whole machine has been busy (all cores; idle and iowait left out)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


class CpuWindow:
    """Where the machine's CPU went between `__init__` and `close()`, by process class: the
    managers, fleetd (agents and guards), etcd, journald, the D-Bus daemons, the floor's own
    processes, the fleetctl processes this benchmark started and reaped meanwhile (their
    rusage), this benchmark itself, and the rest (the units' own processes, the kernel, and
    whatever began and ended inside the window)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        # Readings at the start of the window; close() turns them into what it used.
        self._started = time.monotonic()
        self._busy_at = _busy()
        self._children_at = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._own_at = time.process_time()
        self._before = _processes(directory)
        self.used: dict[str, float] = {}
        self.busy = 0.0  # CPU seconds the whole machine was busy in the window
        self.seconds = 0.0

    def close(self) -> CpuWindow:
        after = _processes(self.directory)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.seconds = time.monotonic() - self._started
        self.busy = _busy() - self._busy_at
        used: dict[str, float] = {}
        for key, (kind, cpu) in after.items():
            start = self._before.get(key, (kind, 0.0))[1]
            used[kind] = used.get(kind, 0.0) + cpu - start
        used["fleetctl processes"] = (
            children.ru_utime + children.ru_stime
            - self._children_at.ru_utime - self._children_at.ru_stime
        )
        used["this benchmark"] = time.process_time() - self._own_at
        # Live processes of no class count in the rest, with what no reading could see.
        tracked = sum(v for k, v in used.items() if k != "other")
        used["other"] = max(0.0, self.busy - tracked)
        self.used = used
        return self

    def fleetd(self) -> float:
        return self.used.get("fleetd", 0.0)

    def describe(self) -> str:
        cores = os.cpu_count() or 1
        parts = sorted(((v, k) for k, v in self.used.items() if v >= 0.005), reverse=True)
        named = [f"{k} {v:.2f}" for v, k in parts if k != "other"]
        return (f"the machine busy {self.busy:.2f} CPU-s of {cores * self.seconds:.2f} "
                f"({cores} cores x {self.seconds:.2f} s): {', '.join(named)}, the rest (the "
                f"units' processes, the kernel, processes begun and ended meanwhile) "
                f"{self.used.get('other', 0.0):.2f}")


def proposals(endpoint: str) -> int:
    with urllib.request.urlopen(endpoint + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    match = re.search(r"^etcd_server_proposals_committed_total (\S+)$", text, re.M)
    assert match is not None, "etcd exposes no proposals_committed counter"
    return int(float(match.group(1)))


def active_by_machine(env: dict[str, str], skip: str = "") -> dict[str, int]:
    """machine address -> units list-units shows active there (skipping one address whose
    published states linger until its lease runs out)."""
    rows = fleetctl(env, "list-units", "--no-legend", "--fields", "unit,machine,active")
    loads: dict[str, int] = {}
    for row in rows.splitlines():
        parts = row.split()
        if len(parts) != 3 or parts[2] != "active":
            continue
        address = parts[1].split("/", 1)[-1]
        if skip and address == skip:
            continue
        loads[address] = loads.get(address, 0) + 1
    return loads


def wait_active(env: dict[str, str], units: int, timeout: float, skip: str = "") -> dict[str, int]:
    """Poll `list-units` every POLL seconds until `units` are active; machine address -> units
    active there."""
    return poll_until(lambda: active_by_machine(env, skip), units, timeout)


def poll_until(read: Callable[[], dict[str, int]], units: int, timeout: float) -> dict[str, int]:
    """Call `read` (where -> units active there) until it counts `units`: a poll starts every
    POLL seconds (the next at once when one took longer), rather than POLL seconds after the
    last one ended."""
    deadline = time.monotonic() + timeout
    due = time.monotonic()
    while True:
        loads = read()
        if sum(loads.values()) >= units:
            return loads
        if time.monotonic() > deadline:
            raise SystemExit(f"only {sum(loads.values())} of {units} active after {timeout:.0f} s")
        due = max(due + POLL, time.monotonic())
        time.sleep(max(0.0, due - time.monotonic()))


def machine_addresses() -> dict[str, str]:
    """machine name -> address: the local cluster gives the i-th machine of its cluster file
    the address 127.0.0.(10+i)."""
    names = re.findall(r'^name = "([^"]+)"', (ROOT / "vagrant" / "cluster.toml").read_text(), re.M)
    return {name: f"127.0.0.{10 + i}" for i, name in enumerate(names)}


def listed_addresses(env: dict[str, str]) -> set[str]:
    out = fleetctl(env, "list-machines", "--no-legend", "--fields", "ip")
    return {line.strip() for line in out.splitlines() if line.strip()}


def log_lines(directory: Path, pattern: str, since: float) -> list[tuple[float, str]]:
    """(epoch seconds, line) of every agent log line matching `pattern`, logged after `since`."""
    found: list[tuple[float, str]] = []
    for log in directory.rglob("fleetd.log"):
        for line in log.read_text(errors="replace").splitlines():
            if pattern not in line:
                continue
            match = re.match(r"(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d[,.]\d+)", line)
            if match is None:
                continue
            stamp = datetime.fromisoformat(match.group(1).replace(",", ".")).timestamp()
            if stamp >= since:
                found.append((stamp, line))
    return sorted(found)


def log_times(directory: Path, pattern: str, since: float) -> list[float]:
    """Epoch seconds of every agent log line matching `pattern`, logged after `since`."""
    return [stamp for stamp, _ in log_lines(directory, pattern, since)]


def fallback_claims(directory: Path, since: float) -> str:
    """The claims made by a machine not ranked first (a favourite did not claim in time), which
    put a unit's start a stagger later: their count and the latest one's log line."""
    late = [(t, line) for t, line in log_lines(directory, "claimed hello@", since)
            if "ranked first" not in line]
    if not late:
        return "none"
    return f"{len(late)}, the latest {late[-1][0] - since:.2f} s in: {late[-1][1].strip()}"


def start_calls(directory: Path, since: float) -> list[float]:
    """When the agents sent start calls: each single start, and the end of each batch (its
    calls all sent, every reply in)."""
    return log_times(directory, "start hello@", since) + log_times(directory, "start jobs of",
                                                                   since)


def systemd_ran(directory: str, machines: list[str], names: list[str], start: float) -> float:
    """Seconds from `start` until systemd itself made the last of `names` active, on whichever
    machine runs it: the units' ActiveEnterTimestampMonotonic, read once afterwards (systemd's
    monotonic clock is this process's), so the reading adds no load while the units start."""
    last = 0.0
    for machine in machines:
        out = lc(directory, "ssh", machine, "--", "systemctl", "--user", "show", "-p",
                 "ActiveEnterTimestampMonotonic", "--value", *names)
        for line in out.split():
            if line.isdigit() and int(line):
                last = max(last, int(line) / 1e6)
    return last - start if last else float("nan")


def since(published: PublishedActive, start: float) -> str:
    return "-" if published.reached is None else f"{published.reached - start:.2f} s"


def takeover(directory: Path, label: str, wall: float, total: float, published: str) -> None:
    """Where a takeover's time went, from the survivors' logs: when the first claim landed
    (the dead machine's keys seen gone), the last claim, the last start call."""
    claims = log_times(directory, "claimed hello@", wall)
    starts = start_calls(directory, wall)
    if claims and starts:
        print(f"{label} breakdown: first claim at {min(claims) - wall:.2f} s; last claim at "
              f"{max(claims) - wall:.2f} s; last start call at {max(starts) - wall:.2f} s; all "
              f"published active in etcd at {published}; all seen active by the 0.25 s listing "
              f"poll at {total:.2f} s")


class PublishedActive:
    """When etcd first held an active published state for all of the units (the listing's
    polling aside): the registry's states read once, then followed by one watch."""

    def __init__(self, endpoint: str) -> None:
        from fleetd.keys import Kind
        from fleetd.registry import EtcdRegistry

        self._kind = Kind.STATE
        self.registry = EtcdRegistry([endpoint])
        snap = self.registry.snapshot()
        self._lock = threading.Lock()
        self._active = {
            (name, machine)
            for name, per in snap.states.items()
            for machine, state in per.items()
            if state.active == "active"
        }
        self._want = 0
        self._skip = ""
        self.reached: float | None = None
        self._cancel = self.registry.watch(snap.revision + 1, self._events)

    def machine_id(self, address: str) -> str:
        snap = self.registry.snapshot()
        return next((m.id for m in snap.machines.values() if m.public_ip == address), "")

    def expect(self, units: int, skip_machine: str = "") -> None:
        with self._lock:
            self._want, self._skip, self.reached = units, skip_machine, None
            self._check()

    def _events(self, events: Any) -> None:
        if isinstance(events, BaseException):
            return
        with self._lock:
            for event in events:
                split = self.registry.layout.split(event.key)
                if split is None or split[0] is not self._kind:
                    continue
                pair = (split[1], split[2])
                active = event.value is not None and json.loads(event.value).get("active")
                if active == "active":
                    self._active.add(pair)
                else:
                    self._active.discard(pair)
            self._check()

    def _check(self) -> None:
        if self._want and self.reached is None:
            units = {name for name, machine in self._active if machine != self._skip}
            if len(units) >= self._want:
                self.reached = time.monotonic()

    def close(self) -> None:
        self._cancel()
        self.registry.close()


FLOOR_WORKER = r"""
import subprocess, sys, time
from pathlib import Path
from fleetd.systemd import DbusUnitManager
first, count, directory = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
batched = sys.argv[5] == "batched"
directory.mkdir(parents=True, exist_ok=True)
# Inside the machine: a tmpfs of its own, as fleetd's units directory is.
subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", str(directory)], check=True)
manager = DbusUnitManager(directory, user=True, timeout=30.0)
manager.fast_timeout = 10.0  # a manager busy with 100 stops answers state reads late
text = Path(sys.argv[4]).read_text()
names = [f"floor@{i}.service" for i in range(first, first + count)]
print("ready", flush=True)
sys.stdin.readline()
start = time.monotonic()
if batched:
    assert not manager.load_many({name: text for name in names})
    manager.reload()
    assert not manager.start_many(names)
else:
    for name in names:
        manager.load(name, text)
    manager.reload()
    for name in names:
        manager.start(name)
due = time.monotonic()
while True:
    states = manager.states(names)
    if all(s.active == "active" for s in states.values()):
        break
    due = max(due + 0.25, time.monotonic())
    time.sleep(max(0.0, due - time.monotonic()))
print(f"done {time.monotonic() - start:.3f}", flush=True)
sys.stdin.readline()
manager.stop_many(names)
while not all(s.active in ("inactive", "failed") for s in manager.states(names).values()):
    time.sleep(0.1)
manager.unload_many(names)
manager.reload()
manager.close()
subprocess.run(["umount", str(directory)], check=True)
"""


def floor(
    directory: str, machines: list[str], units: int, mode: str
) -> tuple[float, float, CpuWindow]:
    """Seconds to start `units` units directly over D-Bus, split over the machines' managers:
    with the adapter's batch calls ("batched": one LinkUnitFiles, the StartUnit calls sent
    together, as fleetd does) or one call per unit ("single"); and the seconds until systemd
    made the last of them active (the rest is the floor's own 0.25 s polling), and where the
    machine's CPU went meanwhile."""
    worker = Path(directory) / "floor_worker.py"
    worker.write_text(FLOOR_WORKER)
    template = ROOT / "units" / "hello@.service"
    per = units // len(machines)
    procs = []
    for i, machine in enumerate(machines):
        count = per if i < len(machines) - 1 else units - per * (len(machines) - 1)
        cmd = [
            *LC, "--dir", directory, "ssh", machine, "--", sys.executable, str(worker),
            str(i * per), str(count), str(Path(directory) / machine / "floor-units"), str(template),
            mode,
        ]
        procs.append(
            subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        )
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    cpu = CpuWindow(directory)
    start = time.monotonic()
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in procs:
        assert proc.stdout is not None
        proc.stdout.readline()
    took = time.monotonic() - start
    cpu.close()
    ran = systemd_ran(directory, machines, [f"floor@{i}.service" for i in range(units)], start)
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("clean\n")
        proc.stdin.flush()
        proc.wait(120)
    return took, ran, cpu


def active_in_registry(registry: Any) -> dict[str, int]:
    """The listing read by this process (one registry read) rather than by a fleetctl process:
    machine id -> units active there."""
    loads: dict[str, int] = {}
    for per in registry.snapshot().states.values():
        for machine, state in per.items():
            if state.active == "active":
                loads[machine] = loads.get(machine, 0) + 1
    return loads


def w1_round(
    directory: str, env: dict[str, str], endpoint: str, published: PublishedActive,
    files: list[str], machines: list[str], in_process: Any = None,
) -> float:
    """W1 once, with where its time went; its seconds. With `in_process` (a registry) the
    listing is polled by this process instead of by fleetctl processes."""
    n = len(files)
    published.expect(n)
    before = proposals(endpoint)
    cpu = CpuWindow(directory)
    wall = time.time()
    start = time.monotonic()
    fleetctl(env, "start", "--no-block", *files)
    submitted = time.monotonic() - start
    if in_process is None:
        loads = wait_active(env, n, 600)
    else:
        loads = poll_until(lambda: active_in_registry(in_process), n, 600)
    w1 = time.monotonic() - start
    cpu.close()
    written = proposals(endpoint) - before
    ran = systemd_ran(directory, machines, [Path(f).name for f in files], start)
    claims = log_times(Path(directory), "claimed hello@", wall)
    starts = start_calls(Path(directory), wall)
    label = "W1" if in_process is None else "W1, listing read in-process"
    print(f"{label}: {n} units all active in {w1:.2f} s; "
          f"{written / n:.2f} etcd proposals per placed unit; "
          f"balance max-min {max(loads.values()) - min(loads.values())}; "
          f"{cpu.fleetd():.2f} CPU-seconds of all fleetd processes")
    if claims and starts:
        print(f"{label} breakdown: fleetctl submit {submitted:.2f} s; last claim at "
              f"{max(claims) - wall:.2f} s; last start call at {max(starts) - wall:.2f} s; "
              f"systemd made the last unit active at {ran:.2f} s; "
              f"all published active in etcd at {since(published, start)}; "
              f"all seen active by the 0.25 s listing poll at {w1:.2f} s; claims not by "
              f"the machine ranked first: {fallback_claims(Path(directory), wall)}")
    print(f"{label} CPU: {cpu.describe()}")
    return w1


def clear(env: dict[str, str], units: int) -> None:
    """Destroy the W1 units and wait until no machine lists one (each agent has stopped and
    unloaded them), and a moment more for the managers to go quiet."""
    fleetctl(env, "destroy", *(f"hello@{i}.service" for i in range(1, units + 1)))
    deadline = time.monotonic() + 120
    while fleetctl(env, "list-units", "--no-legend").strip():
        if time.monotonic() > deadline:
            raise SystemExit("the W1 units were still listed 120 s after their destroy")
        time.sleep(0.5)
    time.sleep(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--units", type=int, default=300)
    parser.add_argument("--idle", type=float, default=60.0, help="seconds to count idle writes")
    parser.add_argument("--ttl", type=float, default=4.0, help="agent_ttl of the cluster")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the floor then W1")
    args = parser.parse_args()
    n = args.units
    directory = tempfile.mkdtemp(prefix="lcw-", dir="/tmp")
    try:
        lc(directory, "up", "--agent-ttl", f"{args.ttl:g}")
        endpoint = lc(directory, "env").strip().splitlines()[-1].split("=", 1)[1].split(",")[0]
        # fleetctl with its modules' bytecode cached, as an installed one has it (pip compiles
        # it at install time): with PYTHONDONTWRITEBYTECODE set, every poll of W1 would compile
        # the modules changed since the checkout's last cached build, some 9 ms of CPU each.
        env = {**os.environ, "FLEETCTL_ENDPOINT": endpoint,
               "PYTHONPYCACHEPREFIX": str(Path(directory) / "pycache")}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        for verb in ("list-units", "list-unit-files", "list-machines"):
            fleetctl(env, verb)
        names = machine_addresses()
        machines = sorted(names)
        print(f"local cluster: {len(machines)} machines, agent_ttl {args.ttl:g} s, "
              f"load average {os.getloadavg()[0]:.1f} at start")

        # Rounds of the floor then W1 on the same managers, held against each other pair by
        # pair: the machine's speed drifts between rounds far more than within one. The floor
        # first, on idle managers, as W1 finds them; W1 is held against the batched one, the
        # calls fleetd itself makes. The units of the last W1 (listing read in-process) stay
        # for the workloads after it.
        from fleetd.registry import EtcdRegistry

        files = [str(ROOT / "units" / f"hello@{i}.service") for i in range(1, n + 1)]
        published = PublishedActive(endpoint)
        ratios: list[float] = []
        for round in range(1, args.rounds + 1):
            if round == 1:
                single, _, _ = floor(directory, machines, n, "single")
            took, ran, cpu = floor(directory, machines, n, "batched")
            print(f"floor{f' (round {round})' if args.rounds > 1 else ''}: {n} units over D-Bus "
                  f"directly, one process per manager: {took:.2f} s with batched calls (one "
                  f"LinkUnitFiles, the StartUnit calls sent together; systemd made the last "
                  f"active at {ran:.2f} s)"
                  + (f", {single:.2f} s with one call per unit" if round == 1 else ""))
            print(f"floor CPU: {cpu.describe()}")
            ratios.append(w1_round(directory, env, endpoint, published, files, machines) / took)
            clear(env, n)
        if len(ratios) > 1:
            middle = sorted(ratios)[len(ratios) // 2]
            print(f"W1 against the floor of its round, over {len(ratios)} rounds: median "
                  f"{middle:.2f}x ({', '.join(f'{r:.2f}x' for r in ratios)})")
        # Where the rest goes: once more with the listing read by this process, so the
        # fleetctl processes the 0.25 s poll starts (some 0.1 CPU-seconds each) no longer
        # compete with the managers for the two cores while they start the units.
        took, ran, _ = floor(directory, machines, n, "batched")
        reader = EtcdRegistry([endpoint], transport="http")
        try:
            inproc = w1_round(directory, env, endpoint, published, files, machines, reader)
        finally:
            reader.close()
        print(f"W1 with the listing read in-process: {inproc / took:.2f}x the floor just before "
              f"it ({took:.2f} s; systemd made the last active at {ran:.2f} s)")

        time.sleep(3)
        before = proposals(endpoint)
        time.sleep(args.idle)
        idle = (proposals(endpoint) - before) * 60 / args.idle
        print(f"idle: {idle:.0f} etcd proposals per minute with {n} units running "
              f"(counted over {args.idle:g} s)")

        holding = active_by_machine(env)
        victim = max(machines, key=lambda m: holding.get(names[m], 0))
        wall = time.time()
        start = time.monotonic()
        # Timed until the units run elsewhere, not until the tool returns: the machine may
        # still be finishing its own exit meanwhile.
        published.expect(n, published.machine_id(names[victim]))
        death = Death(directory, victim)
        fault = Verb(directory, "kill", victim)
        wait_active(env, n, 600, skip=names[victim])
        done = time.monotonic()
        w3 = done - start
        fault.wait()
        # The goal is held against the kill itself: the verb's start-up (a Python process)
        # comes before it and is no part of the failover.
        killed = "-" if death.at is None else f"{done - death.at:.2f} s"
        after = "" if death.at is None else f" = TTL {done - death.at - args.ttl:+.2f} s"
        print(f"W3: kill {victim} holding {holding.get(names[victim], 0)} units: all {n} active "
              f"elsewhere {killed} after its fleetd died{after} ({w3:.2f} s from the verb's "
              f"start, TTL {w3 - args.ttl:+.2f} s; the kill came "
              f"{'-' if death.at is None else f'{death.at - start:.2f} s'} into the verb)")
        takeover(Path(directory), "W3", wall, w3, since(published, start))

        lc(directory, "start", victim)
        deadline = time.monotonic() + 60
        while names[victim] not in listed_addresses(env) and time.monotonic() < deadline:
            time.sleep(0.2)
        holding = active_by_machine(env, skip=names[victim])
        second = max((m for m in machines if m != victim), key=lambda m: holding.get(names[m], 0))
        wall = time.time()
        start = time.monotonic()
        published.expect(n, published.machine_id(names[second]))
        fault = Verb(directory, "halt", second)
        wait_active(env, n, 600, skip=names[second])
        w4 = time.monotonic() - start
        halted = fault.wait()
        print(f"W4: halt {second} holding {holding.get(names[second], 0)} units: all {n} active "
              f"elsewhere in {w4:.2f} s (its fleetd had exited after {halted:.2f} s)")
        takeover(Path(directory), "W4", wall, w4, since(published, start))
        published.close()
        print(f"load average {os.getloadavg()[0]:.1f} at the end (2 cores, shared)")
    finally:
        subprocess.run([*LC, "--dir", directory, "destroy"], capture_output=True, check=False)


if __name__ == "__main__":
    main()
