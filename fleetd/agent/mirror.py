"""The registry mirror: one read of the whole prefix, then one watch keeps an in-memory
`Snapshot` current. It never re-reads the registry per event (the thundering herd that hurt fleet
at scale); a broken watch (endpoint failover, compaction) is the only reason to read everything
again.

The watch callback runs in the registry client's thread; the reconcile thread only ever takes a
copy. Entries the snapshot refuses (invalid names, undecodable values, unknown keys) are logged
once each, when they appear.

The mirror also keeps the placement plan current: an `IncrementalPlanner` takes in the keys each
batch of events changed (the snapshot's journal), so a round re-plans only what those changes can
affect. A copy, its `View` and its plan are made once per registry revision and handed to every
caller: several agents of one process (hollow machines in the scale benchmark) may share one
mirror, and with it one watch, one snapshot and one planner; each keeps its own lease, claims
and units.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from fleetd.incremental import IncrementalPlanner
from fleetd.keys import Kind
from fleetd.memory import release_free_memory
from fleetd.metrics import count_by
from fleetd.placement import Placement, View
from fleetd.planner import BID_DEPTH
from fleetd.ports import Registry, WatchEvent
from fleetd.snapshot import Snapshot

log = logging.getLogger("fleetd")

PLAN_HISTORY = 20_000


@dataclass(frozen=True, slots=True)
class PlanPass:
    """One planning pass: its seconds, the (unit, machine) verdicts it evaluated afresh, the
    changed keys it took in, and whether it planned from the whole picture (a new planner, or
    one that had to start over) rather than from the changes."""

    seconds: float
    evaluations: int
    events: int
    full: bool


class Mirror:
    def __init__(
        self,
        registry: Registry,
        wake: Callable[[], None],
        release_memory: Callable[[], object] = release_free_memory,
    ) -> None:
        self.registry = registry
        # Called after each full planning pass (after a full read, or when machines changed):
        # what the read and the pass needed only for a while goes back to the system.
        self._release_memory = release_memory
        self._wakes = [wake]
        self._users = 1
        self._closed = False  # the last user left: watch news no longer matter
        self._lock = threading.Lock()
        self._applied = threading.Condition(self._lock)  # a batch of watch events landed
        self._snapshot = Snapshot()
        self._synced_at = 0
        self._cancel: Callable[[], None] | None = None
        self._resync = threading.Event()
        self._resync.set()
        self._sync_lock = threading.Lock()
        self._epoch = 0  # counts full reads: a plan or copy of an older one is stale
        self._reads_begun = 0
        self._read_done = 0  # the number of the last read that succeeded
        self._copy: tuple[tuple[int, int], Snapshot] | None = None
        self._view: tuple[Snapshot, View] | None = None
        self._view_lock = threading.Lock()  # one build per copy, however many callers wait
        self._counts: tuple[Snapshot, Mapping[str, int]] | None = None
        self._bids: tuple[Mapping[str, Placement], dict[str, dict[str, Placement]]] | None = None
        self._plan_lock = threading.Lock()
        self._planner: tuple[int, IncrementalPlanner] | None = None
        self._plan: (
            tuple[tuple[int, int, int, int], Snapshot, Mapping[str, Placement]] | None
        ) = None
        # Recent planning passes, for benchmarks. Bounded well below a long-running agent's
        # count of passes: 100,000 held about 8 MB.
        self._passes: deque[PlanPass] = deque(maxlen=PLAN_HISTORY)

    def share(self, wake: Callable[[], None]) -> Mirror:
        """Another agent of this process uses this mirror too; `wake` rouses it on changes."""
        with self._lock:
            self._wakes.append(wake)
            self._users += 1
        return self

    def wake(self) -> None:
        for wake in list(self._wakes):
            wake()

    @property
    def needs_sync(self) -> bool:
        return self._resync.is_set()

    def copy(self) -> Snapshot:
        """A picture of the registry that later events do not change. Callers only read it:
        one copy per revision serves them all."""
        with self._lock:
            return self._copy_locked()

    def _copy_locked(self) -> Snapshot:
        key = (self._epoch, self._snapshot.revision)
        if self._copy is None or self._copy[0] != key:
            self._copy = (key, self._snapshot.copy())
        return self._copy[1]

    def wait_until(self, shows: Callable[[Snapshot], bool], timeout: float) -> bool:
        """Wait (at most `timeout` seconds) until the live picture `shows` something, e.g. the
        claims this machine just won; `shows` only reads, and quickly: it runs under the lock
        the watch thread applies events under."""
        with self._applied:
            return self._applied.wait_for(lambda: shows(self._snapshot), timeout)

    def news_for_bids(self) -> bool:
        """Whether the live picture changed, since the last plan, in a way that can give some
        machine a unit to bid for: anything but owner keys that were written (a claim only
        takes a unit off the plan; a unit, desired state, machine, move hint or released owner
        may put one on it)."""
        with self._lock:
            owners = self._snapshot.owners
            return any(
                kind is not Kind.OWNER or name not in owners
                for kind, name in self._snapshot.changes
            )

    def view(self, snap: Snapshot) -> View:
        """The placement indexes of a copy this mirror handed out, built once per copy."""
        with self._view_lock:
            with self._lock:
                if self._view is not None and self._view[0] is snap:
                    return self._view[1]
            # Built outside the mirror's lock (the watch thread must not wait for it), but
            # under the build lock: agents sharing the mirror that ask at once would otherwise
            # each build the same View (45 ms at 10,000 units), side by side.
            view = View(snap)
            with self._lock:
                self._view = (snap, view)
            return view

    def bids(self, plan: Mapping[str, Placement], me: str) -> Mapping[str, Placement]:
        """The units of `plan` that machine `me` may bid for (it is among their first
        BID_DEPTH), indexed once per plan for every agent of the mirror: a round then costs the
        machine's own bids, not the whole window of the plan."""
        with self._lock:
            if self._bids is None or self._bids[0] is not plan:
                index: dict[str, dict[str, Placement]] = {}
                for unit, placement in plan.items():
                    for machine_id in placement.ranked[:BID_DEPTH]:
                        index.setdefault(machine_id, {})[unit] = placement
                self._bids = (plan, index)
            return self._bids[1].get(me, {})

    def desired_counts(self, snap: Snapshot) -> Mapping[str, int]:
        """The registry's units by desired state (for the metrics), counted once per copy:
        every agent of a shared mirror reports it on every round."""
        with self._lock:
            if self._counts is not None and self._counts[0] is snap:
                return self._counts[1]
        counts = count_by(snap.desired_state(n).value for n in snap.units)
        with self._lock:
            self._counts = (snap, counts)
        return counts

    def plan(
        self,
        window: Callable[[Snapshot], int],
        planned: Callable[[float], None] | None = None,
        plain_share: int = 1,
    ) -> tuple[Snapshot, Mapping[str, Placement]]:
        """The current copy and its placement plan (as `plan_placements(copy, limit=...,
        depth=BID_DEPTH, plain_share=plain_share)` would compute it, `window` giving the limit:
        only the best BID_DEPTH machines of a unit ever bid), planned incrementally once per
        revision.
        `planned` hears the seconds a pass took, only when this call planned (not when it found
        the revision planned already)."""
        with self._plan_lock:
            with self._lock:
                snap = self._copy_locked()
                changes = self._snapshot.take_changes()
                epoch = self._epoch
            limit = window(snap)
            key = (epoch, snap.revision, limit, plain_share)
            if self._plan is not None and self._plan[0] == key:
                return self._plan[1], self._plan[2]
            started = time.perf_counter()
            planner = self._planner[1] if self._planner and self._planner[0] == epoch else None
            if planner is None:
                planner = IncrementalPlanner(snap)
                self._planner = (epoch, planner)
                resets = -1
            else:
                resets = planner.resets
                planner.update(snap, changes)
            evaluated = planner.evaluations
            plan = planner.plan(limit, BID_DEPTH, plain_share)
            took = time.perf_counter() - started
            full = planner.resets != resets
            if full:
                # A full pass: its scratch, and a fresh read's, is free now.
                self._release_memory()
            self._passes.append(
                PlanPass(took, planner.evaluations - evaluated, len(changes), full)
            )
            if planned is not None:
                planned(took)
            self._plan = (key, snap, plan)
            return snap, plan

    def plan_passes(self, clear: bool = False) -> list[PlanPass]:
        """The planning passes recorded since the last clear (oldest first); `clear` starts
        a new record. Taken under the planning lock: a pass is recorded whole or not at all."""
        with self._plan_lock:
            passes = list(self._passes)
            if clear:
                self._passes.clear()
            return passes

    def reads(self) -> int:
        """A token for `sync(newer_than=...)`: how many full reads have begun so far."""
        with self._lock:
            return self._reads_begun

    def sync(self, newer_than: int | None = None) -> None:
        """Read everything once and watch from there. With `newer_than` (a `reads()` token),
        a read that began after the token was taken and succeeded serves: agents of one process
        that join at once share one read instead of one each."""
        with self._sync_lock:
            if newer_than is not None and self._read_done > newer_than:
                return
            with self._lock:
                self._reads_begun += 1
                number = self._reads_begun
            self._cancel_watch()
            self._resync.clear()
            try:
                snap = self.registry.snapshot()
                with self._lock:
                    self._snapshot = snap
                    self._synced_at = snap.revision
                    self._epoch += 1
                self._cancel = self.registry.watch(snap.revision + 1, self._on_watch)
                self._read_done = number
            except BaseException:
                # Not current: the next round reads everything again.
                self._resync.set()
                raise
        for key, reason in sorted(snap.refused.items()):
            log.warning("ignoring registry entry %s: %s", key, reason)
        self.wake()

    def close(self) -> None:
        """One user is done; the watch ends with the last."""
        with self._lock:
            self._users -= 1
            last = self._users <= 0
        if last:
            self._closed = True
            self._cancel_watch()

    def _cancel_watch(self) -> None:
        cancel, self._cancel = self._cancel, None
        if cancel is not None:
            cancel()

    def _on_watch(self, batch: list[WatchEvent] | BaseException) -> None:
        if self._closed:
            # A cancel needs etcd's answer: with etcd out of reach the watch ends only when the
            # client closes, after the mirror's last user left. Nobody reads the registry again.
            return
        if isinstance(batch, BaseException):
            log.warning("registry watch ended (%s): reading the registry again", batch or "closed")
            self._resync.set()
            self.wake()
            return
        refused: list[tuple[str, str]] = []
        try:
            with self._lock:
                for event in batch:
                    if event.mod_revision <= self._synced_at:
                        # A late event of a cancelled watch: the fresh read has newer data.
                        continue
                    reason = self._snapshot.apply(
                        self.registry.layout,
                        event.key,
                        event.value,
                        event.mod_revision,
                        event.create_revision,
                    )
                    if reason is not None:
                        refused.append((event.key, reason))
                self._applied.notify_all()
        except Exception:
            # Never expected (apply refuses what it cannot decode), but a watch thread that dies
            # would freeze the picture: read everything again instead.
            log.exception("applying a registry watch event failed: reading the registry again")
            self._resync.set()
        for key, reason in refused:
            log.warning("ignoring registry entry %s: %s", key, reason)
        self.wake()
