"""Histories of a cluster and the checks of the promise over them.

`owner_events` / `violations` replay the owner keys of etcd revision by revision and check the
hard rules in their plainest form, written independently of fleetd.placement on purpose: the
race tests use them to catch the placement checkers being wrong.

`ClusterHistory` records a whole local cluster while a scenario runs (an etcd watch started
before it, and each machine's processes, sampled) and checks what issue 7 promises: at most one
running copy of every non-global unit at every instant, no Conflicts or limit broken at any
instant (with the core's own checkers: here the question is what ran, not whether the checkers are
right), and no unit stopped or restarted but by a declared fault or operator action.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fleetd.keys import KeyLayout, Kind
from fleetd.model import Machine, Owner
from fleetd.placement import (
    View,
    check_conflicts,
    check_limits,
    check_region_conflicts,
    check_zone_conflicts,
)
from fleetd.registry import EtcdRegistry, WatchEvent
from fleetd.snapshot import Snapshot
from fleetd.unitfile import Requirements


@dataclass(frozen=True)
class Rules:
    conflicts: Mapping[str, tuple[str, ...]]  # unit -> Conflicts patterns
    zone_conflicts: Mapping[str, tuple[str, ...]]
    max_per_zone: Mapping[str, tuple[str, int]]  # unit -> (group, limit)
    zone: Mapping[str, str]  # machine id -> zone


def owner_events(
    registry: EtcdRegistry, start_revision: int, end_revision: int, timeout: float = 10.0
) -> list[WatchEvent]:
    """Every owner-key event in [start_revision, end_revision], from etcd's own history."""
    events: list[WatchEvent] = []
    done = threading.Event()
    layout: KeyLayout = registry.layout
    owner_prefix = layout.kind_prefix(Kind.OWNER)

    def collect(batch: list[WatchEvent] | BaseException) -> None:
        if isinstance(batch, BaseException):
            done.set()
            return
        for event in batch:
            if event.mod_revision > end_revision:
                done.set()
                return
            if event.key.startswith(owner_prefix):
                events.append(event)
            if event.mod_revision >= end_revision:
                done.set()

    cancel = registry.watch(start_revision, collect)
    deadline = time.monotonic() + timeout
    while not done.is_set() and time.monotonic() < deadline:
        time.sleep(0.05)
    cancel()
    return events


def violations(
    events: list[WatchEvent], layout: KeyLayout, rules: Rules, decode: Callable[[bytes], str]
) -> list[str]:
    """Apply events revision by revision; report every rule broken after any revision."""
    owners: dict[str, str] = {}
    found: list[str] = []
    by_revision: dict[int, list[WatchEvent]] = {}
    for event in events:
        by_revision.setdefault(event.mod_revision, []).append(event)
    for revision in sorted(by_revision):
        for event in by_revision[revision]:
            parsed = layout.parse(event.key)
            assert parsed is not None
            if event.value is None:
                owners.pop(parsed.name, None)
            else:
                owners[parsed.name] = decode(event.value)
        found.extend(f"r{revision}: {v}" for v in _check(owners, rules))
    return found


def _check(owners: Mapping[str, str], rules: Rules) -> list[str]:
    out: list[str] = []
    units = sorted(owners)
    for i, a in enumerate(units):
        for b in units[i + 1 :]:
            same_machine = owners[a] == owners[b]
            za, zb = rules.zone.get(owners[a]), rules.zone.get(owners[b])
            if same_machine and (
                any(fnmatch.fnmatchcase(b, p) for p in rules.conflicts.get(a, ()))
                or any(fnmatch.fnmatchcase(a, p) for p in rules.conflicts.get(b, ()))
            ):
                out.append(f"{a} and {b} conflict but both run on {owners[a]}")
            if (
                za is not None
                and za == zb
                and (
                    any(fnmatch.fnmatchcase(b, p) for p in rules.zone_conflicts.get(a, ()))
                    or any(fnmatch.fnmatchcase(a, p) for p in rules.zone_conflicts.get(b, ()))
                )
            ):
                out.append(f"{a} and {b} zone-conflict but both run in zone {za}")
    counts: dict[tuple[str, str], int] = {}
    limits: dict[str, int] = {}
    for unit, machine in owners.items():
        if unit in rules.max_per_zone:
            group, limit = rules.max_per_zone[unit]
            zone = rules.zone.get(machine, "?")
            counts[(group, zone)] = counts.get((group, zone), 0) + 1
            limits[group] = limit
    for (group, zone), count in counts.items():
        if count > limits[group]:
            out.append(f"{count} units of {group} in zone {zone}, limit {limits[group]}")
    return out


# ------------------------------------------------------------------------------------------------
# The whole history of a local cluster: owners from an etcd watch, running copies from each
# machine's own process tree, and the faults and operator actions the test declares.
# ------------------------------------------------------------------------------------------------

CGROUP_TOPS = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))
# Dependencies a unit follows: when the unit it names moves, it moves too, and that is no restart.
_FOLLOWS = ("machine_of", "zone_of", "region_of")


@dataclass
class Action:
    """A fault or operator action the test declares; it may stop or move units of `machine`
    (or, with no machine, of `unit`, or of the whole cluster) from `start` until `end` plus the
    checker's grace."""

    kind: str
    start: float
    machine: str | None = None  # a machine name
    unit: str | None = None
    end: float | None = None
    disruptive: bool = True

    def finish(self) -> None:
        self.end = time.monotonic()


@dataclass
class Copy:
    """One running copy of a unit on one machine: seen continuously from `first` to `last`."""

    unit: str
    machine: str
    first: float
    last: float
    roots: frozenset[int]  # the processes of the unit whose parent is outside it (MainPID)
    gone: float | None = None  # first sample that saw it no longer running

    def overlaps(self, other: Copy) -> bool:
        return self.first <= other.last and other.first <= self.last


@dataclass
class Report:
    violations: list[str]
    samples: int
    copies: int
    checks: int
    actions: int

    def summary(self) -> str:
        return (
            f"history: {self.samples} samples, {self.copies} running copies, "
            f"{self.checks} rule checks, {self.actions} declared actions, "
            f"{len(self.violations)} violations"
        )


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _parent(pid: int) -> int:
    stat = _read(Path(f"/proc/{pid}/stat"))
    if not stat:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])


class ClusterHistory:
    """Records a local cluster (the `--dir` of vagrant/local-cluster) while a scenario runs.

    A copy is running while any process is in its unit's cgroup on that machine: a unit that is
    `deactivating` with its process alive is running, whatever ActiveState says. Samples of the
    machines are taken one after the other; two copies overlap only if each was seen running
    after the other was first seen, so the order of reads never invents an overlap.
    """

    def __init__(
        self,
        cluster_dir: Path,
        endpoints: Sequence[str],
        interval: float = 0.1,
        prefix: str = "/fleet/",
    ) -> None:
        self.dir = cluster_dir
        self.endpoints = list(endpoints)
        self.interval = interval
        self.layout = KeyLayout(prefix)
        self.actions: list[Action] = []
        self.copies: list[Copy] = []
        self.samples = 0
        self.etcd_log: list[tuple[float, str, bytes | None]] = []  # (time, key, value)
        self._open: dict[tuple[str, str], Copy] = {}
        self._roots_cache: dict[tuple[str, str], tuple[frozenset[int], frozenset[int]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watch_error: str = ""

    # -- declaring what the test does

    def action(
        self,
        kind: str,
        machine: str | None = None,
        unit: str | None = None,
        disruptive: bool = True,
    ) -> Action:
        """Declare an action taken now; call `finish()` on it when the fault is healed."""
        act = Action(kind, time.monotonic(), machine, unit, disruptive=disruptive)
        with self._lock:
            self.actions.append(act)
        return act

    # -- recording

    def start(self) -> ClusterHistory:
        revision = self._initial()
        for target, name in ((self._watch, "history-watch"), (self._sample, "history-sample")):
            thread = threading.Thread(
                target=target,
                args=(revision,) if name.endswith("watch") else (),
                name=name,
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    def __enter__(self) -> ClusterHistory:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _client(self, index: int) -> Any:
        import pyetcd

        parts = urlsplit(self.endpoints[index % len(self.endpoints)])
        return pyetcd.client(host=parts.hostname, port=parts.port or 2379, timeout=3)

    def _initial(self) -> int:
        for index in range(len(self.endpoints)):
            client = self._client(index)
            try:
                response = client.get_prefix_response(self.layout.prefix)
            except Exception:  # this member is down: ask the next
                continue
            finally:
                client.close()
            now = time.monotonic()
            for kv in response.kvs:
                self.etcd_log.append((now, kv.key.decode(), kv.value))
            return int(response.header.revision)
        raise AssertionError(f"no etcd endpoint of {self.endpoints} answered")

    def _watch(self, revision: int) -> None:
        """Follow every key under the prefix; when a member dies, go on from the next one at the
        revision after the last event seen, so nothing is missed."""
        import pyetcd

        next_revision = revision + 1
        index = 0
        while not self._stop.is_set():
            client = self._client(index)
            broken = threading.Event()

            def on_response(response: Any, broken: threading.Event = broken) -> None:
                nonlocal next_revision
                if isinstance(response, BaseException):
                    broken.set()
                    return
                now = time.monotonic()
                with self._lock:
                    for event in response.events:
                        value = event.value if isinstance(event, pyetcd.events.PutEvent) else None
                        self.etcd_log.append((now, event.key.decode(), value))
                        next_revision = max(next_revision, event.mod_revision + 1)

            try:
                watch_id = client.add_watch_prefix_callback(
                    self.layout.prefix, on_response, start_revision=next_revision
                )
            except Exception:
                client.close()
                index += 1
                self._stop.wait(0.2)
                continue
            while not self._stop.is_set() and not broken.is_set():
                self._stop.wait(0.2)
            with contextlib.suppress(Exception):
                client.cancel_watch(watch_id)
            client.close()
            if broken.is_set():
                index += 1

    def _machines(self) -> dict[str, list[Path]]:
        """Machine name -> its manager's cgroup directories (machines may be added later)."""
        out: dict[str, list[Path]] = {}
        for handle in sorted((self.dir / "m").glob("*/manager.json")):
            try:
                cgroup = json.loads(handle.read_text())["cgroup"]
            except (OSError, ValueError, KeyError):
                continue
            out[handle.parent.name] = [top / cgroup for top in CGROUP_TOPS if top.is_dir()][:1]
        return out

    def running_now(self, machine_cgroups: list[Path]) -> dict[str, frozenset[int]]:
        """Unit -> the processes in its cgroup, for every unit with at least one process."""
        found: dict[str, frozenset[int]] = {}
        for top in machine_cgroups:
            for dirpath, dirs, _files in os.walk(top):
                if dirpath == str(top):
                    dirs[:] = [d for d in dirs if d != "added"]  # fleetd itself lives there
                name = os.path.basename(dirpath)
                if "." not in name or name.endswith((".slice", ".scope")):
                    continue
                pids = frozenset(int(p) for p in _read(Path(dirpath) / "cgroup.procs").split())
                if pids:
                    found[name.lstrip("_")] = pids
        return found

    def _roots(self, machine: str, unit: str, pids: frozenset[int]) -> frozenset[int]:
        cached = self._roots_cache.get((machine, unit))
        if cached is not None and cached[0] == pids:
            return cached[1]
        roots = frozenset(p for p in pids if _parent(p) not in pids)
        self._roots_cache[(machine, unit)] = (pids, roots)
        return roots

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.sample_once()
            self._stop.wait(self.interval)

    def sample_once(self) -> None:
        for machine, cgroups in self._machines().items():
            seen = self.running_now(cgroups)
            now = time.monotonic()
            with self._lock:
                for unit, pids in seen.items():
                    roots = self._roots(machine, unit, pids)
                    copy = self._open.get((machine, unit))
                    if copy is not None and roots and copy.roots and not roots & copy.roots:
                        # Its main process changed between two samples: a restart in place.
                        copy.gone = now
                        self.copies.append(copy)
                        copy = None
                    if copy is None:
                        copy = Copy(unit, machine, now, now, roots)
                        self._open[(machine, unit)] = copy
                    copy.last = now
                    if roots:
                        copy.roots = roots
                for key in [k for k in self._open if k[0] == machine and k[1] not in seen]:
                    copy = self._open.pop(key)
                    copy.gone = now
                    self.copies.append(copy)
        self.samples += 1

    # -- reading the history

    def all_copies(self) -> list[Copy]:
        with self._lock:
            return sorted([*self.copies, *self._open.values()], key=lambda c: c.first)

    def copies_of(self, unit: str) -> list[Copy]:
        return [c for c in self.all_copies() if c.unit == unit]

    def registry_at(self, when: float) -> Snapshot:
        """The registry as the watch saw it at `when` (machines: every one seen until then,
        living or not, so a copy on a machine whose lease is gone still has its metadata)."""
        snapshot = Snapshot()
        machines: dict[str, Machine] = {}
        with self._lock:
            log = list(self.etcd_log)
        for t, key, value in log:
            if t > when:
                break
            snapshot.apply(self.layout, key, value, 0)
            machines.update(snapshot.machines)
        snapshot.machines = machines
        return snapshot

    def machine_ids(self) -> dict[str, str]:
        return {p.parent.name: _read(p).strip() for p in (self.dir / "m").glob("*/machine-id")}

    def lease_lost(self, machine: str) -> list[float]:
        """When the machine's presence key vanished (its lease expired or it left)."""
        key = self.layout.machine(self.machine_ids().get(machine, "?"))
        with self._lock:
            return [t for t, k, v in self.etcd_log if k == key and v is None]

    def check(self, grace: float = 20.0) -> Report:
        """Every violation of the promise in the recorded history."""
        copies = self.all_copies()
        final = self.registry_at(float("inf"))
        found: list[str] = []
        checks = 0
        t0 = min((c.first for c in copies), default=0.0)

        def at(t: float) -> str:
            return f"t+{t - t0:.2f}s"

        def requirements(unit: str) -> Requirements | None:
            record = final.units.get(unit)
            if record is None:
                for _, key, value in reversed(self.etcd_log):
                    parsed = self.layout.parse(key)
                    if (
                        value is not None
                        and parsed
                        and parsed.kind is Kind.UNIT
                        and parsed.name == unit
                    ):
                        snap = Snapshot()
                        snap.apply(self.layout, key, value, 0)
                        record = snap.units.get(unit)
                        break
            return record.requirements if record is not None else None

        # 1. At most one running copy of a non-global unit at any instant.
        by_unit: dict[str, list[Copy]] = {}
        for copy in copies:
            by_unit.setdefault(copy.unit, []).append(copy)
        for unit, mine in sorted(by_unit.items()):
            req = requirements(unit)
            if req is None or req.global_:
                continue  # not a unit of the registry (or on every machine by design)
            for i, a in enumerate(mine):
                for b in mine[i + 1 :]:
                    checks += 1
                    if a.machine != b.machine and a.overlaps(b):
                        found.append(
                            f"{unit} ran twice: on {a.machine} {at(a.first)}..{at(a.last)} and "
                            f"on {b.machine} {at(b.first)}..{at(b.last)}"
                        )

        # 2. No Conflicts or limit broken at any instant: whenever a copy starts, every copy
        # running then is checked with the core's own checkers against the others.
        ids = self.machine_ids()
        for start in sorted({c.first for c in copies}):
            live = [c for c in copies if c.first <= start <= c.last]
            snap = self.registry_at(start)
            snap.owners = {}
            for copy in live:
                req = requirements(copy.unit)
                if req is not None and not req.global_ and copy.machine in ids:
                    snap.owners[copy.unit] = Owner(ids[copy.machine], 1)
            view = View(snap)
            for unit, machine_id in view.location.items():
                machine = view.machines.get(machine_id)
                req = view.requirements.get(unit)
                if machine is None or req is None:
                    continue
                for checker in (
                    check_conflicts,
                    check_zone_conflicts,
                    check_region_conflicts,
                    check_limits,
                ):
                    checks += 1
                    verdict = checker(unit, req, machine, view, None)
                    if not verdict.ok:
                        found.append(f"{at(start)}: {unit} on {machine.label}: {verdict.reason}")

        # 3. No copy ends but by a declared fault or operator action, or because a unit it
        # follows moved.
        with self._lock:
            actions = list(self.actions)
        explained: dict[int, bool] = {}

        def explain(copy: Copy, depth: int = 0) -> bool:
            assert copy.gone is not None
            for act in actions:
                if not act.disruptive or act.start > copy.gone:
                    continue
                if (act.end if act.end is not None else act.start) + grace < copy.gone:
                    continue
                if act.machine not in (None, copy.machine):
                    continue
                if act.unit is not None and act.unit != copy.unit and act.machine is None:
                    continue
                return True
            req = requirements(copy.unit)
            if req is not None and depth < 5:
                followed = {u for attr in _FOLLOWS for u in getattr(req, attr)}
                for other in copies:
                    if (
                        other.unit in followed
                        and other.gone is not None
                        and copy.gone - grace <= other.gone <= copy.gone + 1.0
                        and explain(other, depth + 1)
                    ):
                        return True
            return False

        for copy in copies:
            if copy.gone is None:
                continue
            req = requirements(copy.unit)
            if req is None:
                continue
            checks += 1
            if not explained.setdefault(id(copy), explain(copy)):
                lost = [t for t in self.lease_lost(copy.machine) if t <= copy.gone + 1]
                why = f" (its machine's lease vanished {at(lost[-1])})" if lost else ""
                found.append(
                    f"{copy.unit} stopped on {copy.machine} at {at(copy.gone)} with no fault "
                    f"or operator action to explain it{why}"
                )
        return Report(found, self.samples, len(copies), checks, len(actions))
