"""An in-memory Registry with etcd's semantics as far as fleet relies on them, for deterministic
tests: revisions, create/mod revisions per key, leases that expire by an injected clock and take
their keys with them, guarded transactions, and an ordered watch.

It shares the contract suite in tests/contract/test_registry.py with `fleetd.registry.
EtcdRegistry` against a real etcd, which pins down the behaviour it mirrors. Differences that
tests may rely on, on purpose:

* Watch events are delivered synchronously, in the thread that made the change, after the change
  is committed; lease expiry happens when any call (or `expire()`) notices the clock passed it.
* `unavailable = True` makes every call raise `RegistryUnavailable`, as a partition does.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

from fleetd.clock import Clock
from fleetd.errors import RegistryUnavailable
from fleetd.keys import KeyLayout, Kind
from fleetd.model import DesiredState, Machine, PublishedState
from fleetd.placement import Guards, moves_units_changed
from fleetd.ports import WatchCallback, WatchEvent
from fleetd.snapshot import (
    Snapshot,
    UnitRecord,
    encode_machine,
    encode_owner,
    encode_state,
    encode_unit,
)


@dataclass
class _Value:
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


@dataclass
class _Lease:
    ttl: float
    expires: float


_instances = itertools.count(1)

# One write of a transaction: (key, value or None for a delete, lease or 0).
_Op = tuple[str, bytes | None, int]


class FakeRegistry:
    """An in-memory registry; see the module docstring."""

    def __init__(self, prefix: str = "/fleet/", clock: Clock = time.monotonic) -> None:
        self.layout = KeyLayout(prefix)
        # Unique per instance: agents of one process share placement plans per (endpoints,
        # prefix, revision), and two fakes reach the same revision numbers.
        self.endpoints = [f"fake://registry-{next(_instances)}"]
        self.clock = clock
        self.unavailable = False
        self._lock = threading.RLock()
        self._revision = 1
        self._data: dict[str, _Value] = {}
        self._leases: dict[int, _Lease] = {}
        self._next_lease = 7000
        self._history: list[WatchEvent] = []
        self._watchers: dict[int, WatchCallback] = {}
        self._next_watch = 0
        self._held: list[WatchEvent] | None = None

    # ------------------------------------------------------------------------------ plumbing

    def close(self) -> None:
        with self._lock:
            self._watchers.clear()

    def _reachable(self) -> None:
        if self.unavailable:
            raise RegistryUnavailable("cannot reach etcd at fake://registry: unreachable")
        self.expire()

    def expire(self) -> None:
        """Drop every lease whose TTL ran out, with its keys (one revision per lease, as etcd)."""
        with self._lock:
            now = self.clock()
            dead = sorted(i for i, lease in self._leases.items() if lease.expires <= now)
        for lease_id in dead:
            self._drop_lease(lease_id)

    def _drop_lease(self, lease_id: int) -> None:
        with self._lock:
            if self._leases.pop(lease_id, None) is None:
                return
            keys = [k for k, v in self._data.items() if v.lease == lease_id]
            events = self._commit([(k, None, 0) for k in keys]) if keys else []
        self._deliver(events)

    def _commit(self, ops: list[_Op]) -> list[WatchEvent]:
        """Apply writes at one new revision; the caller holds the lock and delivers the events."""
        for _, value, lease in ops:
            if value is not None and lease and lease not in self._leases:
                raise RegistryUnavailable(
                    "cannot reach etcd at fake://registry: requested lease not found"
                )
        self._revision += 1
        events: list[WatchEvent] = []
        for key, value, lease in ops:
            old = self._data.get(key)
            if value is None:
                if old is None:
                    continue
                del self._data[key]
                events.append(WatchEvent(key, None, self._revision, 0))
            else:
                create = old.create_revision if old else self._revision
                self._data[key] = _Value(value, create, self._revision, lease)
                events.append(WatchEvent(key, value, self._revision, create))
        self._history.extend(events)
        return events

    def hold_watch(self) -> None:
        """Keep watch events back until `release_watch` (a watch that lags behind writes)."""
        with self._lock:
            self._held = []

    def release_watch(self) -> None:
        with self._lock:
            held, self._held = self._held or [], None
        self._deliver(held)

    def _deliver(self, events: list[WatchEvent]) -> None:
        if not events:
            return
        with self._lock:
            if self._held is not None:
                self._held.extend(events)
                return
            watchers = list(self._watchers.values())
        for callback in watchers:
            callback(list(events))

    def _write(self, ops: list[_Op], compare: Callable[[], bool] = lambda: True) -> bool:
        self._reachable()
        with self._lock:
            if not compare():
                return False
            events = self._commit(ops)
        self._deliver(events)
        return True

    def _mod(self, key: str) -> int:
        value = self._data.get(key)
        return value.mod_revision if value else 0

    def _max_mod(self, prefix: str) -> int:
        revisions = (v.mod_revision for k, v in self._data.items() if k.startswith(prefix))
        return max(revisions, default=0)

    # ---------------------------------------------------------------------------------- reads

    def snapshot(self, kinds: Collection[Kind] | None = None) -> Snapshot:
        self._reachable()
        # By key prefix, as etcd's ranges read them: a malformed key under a kind's prefix is
        # read (and refused by `apply`) there too.
        wanted = None if kinds is None else tuple(self.layout.kind_prefix(k) for k in kinds)
        with self._lock:
            snap = Snapshot(journal=False)  # as the etcd registry reads a whole picture
            for key in sorted(self._data):
                if wanted is not None and not key.startswith(wanted):
                    continue
                v = self._data[key]
                snap.apply(self.layout, key, v.value, v.mod_revision, v.create_revision)
            snap.revision = self._revision
            snap.journal = True
            return snap

    def watch(self, start_revision: int, callback: WatchCallback) -> Callable[[], None]:
        self._reachable()
        with self._lock:
            backlog = [e for e in self._history if e.mod_revision >= start_revision]
            self._next_watch += 1
            watch_id = self._next_watch
            self._watchers[watch_id] = callback
        if backlog:
            callback(backlog)

        def cancel() -> None:
            with self._lock:
                self._watchers.pop(watch_id, None)

        return cancel

    def put_raw(self, key: str, value: bytes) -> None:
        """Write any bytes under any key, as a foreign or broken client could."""
        self._write([(key, value, 0)])

    # ------------------------------------------------------------------------ leases, presence

    def grant_lease(self, ttl: float) -> int:
        self._reachable()
        with self._lock:
            self._next_lease += 1
            ttl = float(max(1, round(ttl)))
            self._leases[self._next_lease] = _Lease(ttl, self.clock() + ttl)
            return self._next_lease

    def keepalive(self, lease_id: int) -> float:
        self._reachable()
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None:
                return 0.0
            lease.expires = self.clock() + lease.ttl
            return lease.ttl

    def revoke(self, lease_id: int) -> None:
        self._reachable()
        self._drop_lease(lease_id)

    def register_machine(self, machine: Machine, lease_id: int) -> bool:
        key = self.layout.machine(machine.id)
        if self._write(
            [(key, encode_machine(machine).encode(), lease_id)], lambda: key not in self._data
        ):
            return True
        with self._lock:
            held = self._data.get(key)
            return held is not None and held.lease == lease_id

    def update_machine(self, machine: Machine, lease_id: int) -> None:
        self._write([(self.layout.machine(machine.id), encode_machine(machine).encode(), lease_id)])

    # ------------------------------------------------------------------ ownership and states

    def claim(
        self,
        unit: str,
        machine_id: str,
        lease_id: int,
        snapshot_revision: int,
        desired_revision: int,
        guards: Guards,
    ) -> bool:
        owner = self.layout.owner(unit)
        owners = self.layout.kind_prefix(Kind.OWNER)

        def holds() -> bool:
            return (
                owner not in self._data
                and self._mod(self.layout.desired(unit)) == desired_revision
                and self.layout.machine(machine_id) in self._data
                and self._mod(self.layout.units_changed()) <= snapshot_revision
                and all(self._max_mod(owners + p) <= snapshot_revision for p in guards.prefixes)
                and all(
                    self._mod(self.layout.owner(n)) == rev for n, rev in guards.exact.items()
                )
            )

        return self._write([(owner, encode_owner(machine_id).encode(), lease_id)], holds)

    def claim_many(
        self,
        units: Mapping[str, int],
        machine_id: str,
        lease_id: int,
        snapshot_revision: int,
    ) -> dict[str, bool]:
        self._reachable()
        with self._lock:
            # Every claim judged against the state before any of them, as etcd's nested
            # transactions are; then the won ones committed together.
            won = {
                unit: self._data.get(self.layout.owner(unit)) is None
                and self._mod(self.layout.desired(unit)) == desired
                and self.layout.machine(machine_id) in self._data
                and self._mod(self.layout.units_changed()) <= snapshot_revision
                for unit, desired in sorted(units.items())
            }
            ops: list[_Op] = [
                (self.layout.owner(u), encode_owner(machine_id).encode(), lease_id)
                for u, ok in won.items()
                if ok
            ]
            events = self._commit(ops) if ops else []
        self._deliver(events)
        return won

    def release(self, unit: str, machine_id: str) -> bool:
        owner = self.layout.owner(unit)
        mine = encode_owner(machine_id).encode()

        def holds() -> bool:
            held = self._data.get(owner)
            return held is not None and held.value == mine

        return self._write([(owner, None, 0)], holds)

    def publish_states(
        self,
        machine_id: str,
        lease_id: int,
        states: Mapping[str, PublishedState],
        withdrawn: Iterable[str] = (),
    ) -> None:
        ops: list[_Op] = [
            (self.layout.state(unit, machine_id), encode_state(state).encode(), lease_id)
            for unit, state in sorted(states.items())
        ]
        ops += [(self.layout.state(unit, machine_id), None, 0) for unit in sorted(withdrawn)]
        if ops:
            self._write(ops)

    # ------------------------------------------------------------------------ fleetctl writes

    def write_units(
        self, records: Iterable[UnitRecord], desired: DesiredState | None, seen: Snapshot
    ) -> bool:
        ops: list[_Op] = []
        guards: dict[str, int] = {}
        mark = False
        for record in records:
            key = self.layout.unit(record.name)
            old = seen.units.get(record.name)
            mine: list[_Op] = []
            if old is None or old.hash != record.hash:
                mine.append((key, encode_unit(record).encode(), 0))
                mark = mark or moves_units_changed(record, old)
            current = seen.desired.get(record.name)
            state = desired or (current.state if current else DesiredState.INACTIVE)
            if current is None or current.state is not state:
                mine.append((self.layout.desired(record.name), state.value.encode(), 0))
            if mine:
                ops += mine
                guards[key] = old.revision if old else 0
        if mark:
            ops.append((self.layout.units_changed(), b"", 0))
        return self._write(ops, lambda: all(self._mod(k) == r for k, r in guards.items()))

    def set_desired(self, names: Iterable[str], state: DesiredState) -> None:
        self._write([(self.layout.desired(n), state.value.encode(), 0) for n in names])

    def destroy(self, names: Iterable[str]) -> None:
        ops: list[_Op] = []
        for name in names:
            ops += [
                (self.layout.unit(name), None, 0),
                (self.layout.desired(name), None, 0),
                (self.layout.move(name), None, 0),
            ]
        self._write(ops)

    def request_move(self, unit: str, machine_id: str) -> None:
        self._write([(self.layout.move(unit), machine_id.encode(), 0)])

    def clear_move(self, unit: str) -> None:
        self._write([(self.layout.move(unit), None, 0)])
