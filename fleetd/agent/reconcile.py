"""One reconcile round: copy the mirror's snapshot, plan with the pure planners, then act
(claims, systemd tasks through the executor, releases, published states).

Level-triggered: watch events only wake the round; each round reads the whole picture again, so
a round that failed half-way is repaired by the next one.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping

from fleetd.agent.executor import Executor
from fleetd.agent.lease import LeaseView
from fleetd.agent.mirror import Mirror
from fleetd.agent.publish import Publisher
from fleetd.clock import Clock
from fleetd.errors import RegistryUnavailable
from fleetd.model import DesiredState
from fleetd.placement import Placement, View, claim_guards, plan_placements
from fleetd.planner import TaskKind, plan_claims, plan_local
from fleetd.ports import Registry, UnitManager
from fleetd.snapshot import Snapshot
from fleetd.unitfile import any_glob_match

log = logging.getLogger("fleetd")


class PlanCache:
    """Placement plans by (cluster, prefix, revision), shared by the agents of one process.

    A plan is a pure function of the registry's content, and the content at one etcd revision is
    the same for every agent that has applied all events up to it. One fleetd per host gains
    nothing; a process simulating many machines (the scale benchmark, the race tests) plans once
    per revision instead of once per machine and revision.
    """

    SIZE = 16

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._plans: OrderedDict[Hashable, Mapping[str, Placement]] = OrderedDict()

    def __call__(
        self, key: Hashable, plan: Callable[[], Mapping[str, Placement]]
    ) -> Mapping[str, Placement]:
        with self._lock:
            found = self._plans.get(key)
            if found is not None:
                self._plans.move_to_end(key)
                return found
        result = plan()
        with self._lock:
            self._plans[key] = result
            while len(self._plans) > self.SIZE:
                self._plans.popitem(last=False)
        return result


shared_plans = PlanCache()


def excludes(snap: Snapshot, a: str, b: str) -> bool:
    """Whether units a and b may not run on one machine at the same time (either one's Conflicts
    or Replaces matches the other)."""
    for one, other in ((a, b), (b, a)):
        record = snap.units.get(one)
        req = record.requirements if record else None
        if req is not None and any_glob_match((*req.conflicts, *req.replaces), other):
            return True
    return False


def plan_window(snap: Snapshot) -> int:
    """How many placeable units one pass plans: enough for every machine to claim a couple
    at once, few enough that a pass stays cheap with thousands of waiting units."""
    return max(32, 2 * len(snap.machines))


class Reconciler:
    def __init__(
        self,
        me: str,
        registry: Registry,
        manager: UnitManager,
        mirror: Mirror,
        executor: Executor,
        publisher: Publisher,
        view: Callable[[], LeaseView],
        margin: float,
        clock: Clock,
        stagger: Callable[[], float],
        wake: Callable[[], None],
    ) -> None:
        self.me = me
        self.registry = registry
        self.manager = manager
        self.mirror = mirror
        self.executor = executor
        self.publisher = publisher
        self.view = view
        self.margin = margin
        self.clock = clock
        self.stagger = stagger
        self.wake = wake
        self._first_seen: dict[str, float] = {}
        self.next_wake: float | None = None

    def round(self) -> bool:
        """One round; True when a unit is still stopping and the round should come again soon."""
        view = self.view()
        if not view.may_start(self.clock(), self.margin):
            return False  # not joined, or fencing: only the fencer touches systemd now
        snap = self.mirror.copy()
        self._claim(snap, view)
        return self._act(snap)

    def _claim(self, snap: Snapshot, view: LeaseView) -> None:
        assert view.lease_id is not None
        now = self.clock()
        placements = shared_plans(
            (tuple(self.registry.endpoints), self.registry.layout.prefix, snap.revision),
            lambda: plan_placements(snap, limit=plan_window(snap)),
        )
        claim_plan = plan_claims(placements, self.me, self._first_seen, now, self.stagger())
        self._first_seen = dict(claim_plan.first_seen)
        self.next_wake = claim_plan.next_wake
        claimed = False
        for task in claim_plan.claims:
            desired = snap.desired.get(task.unit)
            try:
                ok = self.registry.claim(
                    task.unit,
                    self.me,
                    view.lease_id,
                    snap.revision,
                    desired.revision if desired else 0,
                    claim_guards(snap, task.unit),
                )
            except RegistryUnavailable as exc:
                # etcd is out of reach: the other claims would wait as long for nothing, but
                # this round still drives systemd.
                log.warning("claims stopped at %s: %s", task.unit, exc)
                break
            except Exception as exc:
                log.exception("claim of %s failed: %s", task.unit, exc)
                continue
            if ok:
                claimed = True
                log.info("claimed %s: %s", task.unit, task.reason)
            else:
                log.debug("claim of %s lost: the registry changed since revision %s",
                          task.unit, snap.revision)
        if claimed:
            # Act on our own claims as soon as the watch shows them.
            self.wake()

    def _act(self, snap: Snapshot) -> bool:
        view = View(snap)
        loaded = self.manager.loaded_units()
        mine = {n for n, o in snap.owners.items() if o.machine_id == self.me}
        names = set(loaded) | mine
        self.executor.note_units(names | set(self.executor.known_units))
        states = self.manager.states(names) if names else {}
        launched = {n for n in names if snap.desired_state(n) is DesiredState.LAUNCHED}
        started = self.executor.started(launched)
        tasks = plan_local(snap, self.me, view, loaded, states, started)
        # Why each unit is taken down, published with its "deactivating" state.
        reasons = {
            t.unit: t.reason
            for t in tasks
            if t.kind in (TaskKind.STOP, TaskKind.UNLOAD, TaskKind.RELEASE)
        }
        stopping = self.executor.run(tasks, lambda a, b: excludes(snap, a, b))
        # Read back what the tasks did, so published states are systemd's, not our intent.
        loaded = self.manager.loaded_units()
        self.executor.note_units(set(loaded) | mine)
        states = self.manager.states(loaded) if loaded else {}
        self.publisher.publish(self.view(), snap, loaded, states, reasons)
        return stopping
