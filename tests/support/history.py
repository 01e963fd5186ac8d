"""Replays the full history of owner keys from etcd and checks hard rules at every revision.

Written independently of fleetd.placement on purpose: a test that reused the checkers under test
could not catch them being wrong. It understands the rules it checks in their plainest form.
"""

from __future__ import annotations

import fnmatch
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from fleetd.keys import KeyLayout, Kind
from fleetd.registry import EtcdRegistry, WatchEvent


@dataclass(frozen=True)
class Rules:
    conflicts: Mapping[str, tuple[str, ...]]  # unit -> Conflicts patterns
    zone_conflicts: Mapping[str, tuple[str, ...]]
    max_per_zone: Mapping[str, tuple[str, int]]  # unit -> (group, limit)
    zone: Mapping[str, str]  # machine id -> zone


def owner_events(registry: EtcdRegistry, start_revision: int, end_revision: int,
                 timeout: float = 10.0) -> list[WatchEvent]:
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


def violations(events: list[WatchEvent], layout: KeyLayout, rules: Rules,
               decode: Callable[[bytes], str]) -> list[str]:
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
        for b in units[i + 1:]:
            same_machine = owners[a] == owners[b]
            za, zb = rules.zone.get(owners[a]), rules.zone.get(owners[b])
            if same_machine and (
                any(fnmatch.fnmatchcase(b, p) for p in rules.conflicts.get(a, ()))
                or any(fnmatch.fnmatchcase(a, p) for p in rules.conflicts.get(b, ()))
            ):
                out.append(f"{a} and {b} conflict but both run on {owners[a]}")
            if za is not None and za == zb and (
                any(fnmatch.fnmatchcase(b, p) for p in rules.zone_conflicts.get(a, ()))
                or any(fnmatch.fnmatchcase(a, p) for p in rules.zone_conflicts.get(b, ()))
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
