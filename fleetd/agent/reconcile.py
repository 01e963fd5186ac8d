"""One reconcile round: copy the mirror's snapshot, plan with the pure planners, then act
(claims, systemd tasks through the executor, releases, published states).

Level-triggered: watch events only wake the round; each round reads the whole picture again, so
a round that failed half-way is repaired by the next one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from fleetd.agent.executor import Executor
from fleetd.agent.lease import LeaseView
from fleetd.agent.mirror import Mirror
from fleetd.agent.publish import Publisher
from fleetd.clock import Clock
from fleetd.errors import RegistryUnavailable
from fleetd.metrics import Metrics, count_by
from fleetd.model import SystemdState
from fleetd.placement import NO_GUARDS, Guards, Placement, claim_guards
from fleetd.planner import TaskKind, plan_claims, plan_local, still_started
from fleetd.ports import Registry, UnitManager
from fleetd.snapshot import Snapshot
from fleetd.unitfile import any_glob_match

log = logging.getLogger("fleetd")


def excludes(snap: Snapshot, a: str, b: str) -> bool:
    """Whether units a and b may not run on one machine at the same time (either one's Conflicts
    or Replaces matches the other)."""
    for one, other in ((a, b), (b, a)):
        record = snap.units.get(one)
        req = record.requirements if record else None
        if req is not None and any_glob_match((*req.conflicts, *req.replaces), other):
            return True
    return False


# Seconds a round waits at most for the watch to show its own won claims before bidding again.
CLAIM_SETTLE = 2.0

# Seconds the round that won claims waits for the watch to show them, to load and start those
# units itself rather than one wake, a burst's coalescing and a planning pass later (the watch
# brings them within a few milliseconds; a round that waited in vain acts on the units next time).
CLAIM_WAIT = 0.2

# Claim turns a round takes at most before it acts (see Reconciler._claim_turns).
CLAIM_TURNS = 3

# systemd states between two steady ones, and how long a unit in one is watched closely.
TRANSITIONS = frozenset({"activating", "deactivating", "reloading"})
SETTLE_WINDOW = 5.0

# (unit, machine) pairs a planning pass may evaluate from scratch.
PASS_BUDGET = 20_000

# A plain unit (fleetd.ranking) costs a pass a walk of its class's tree, not a verdict per
# machine: it counts as 1/PLAIN_SHARE of a unit against the window. At 200 machines a pass
# plans 400 units, or 2,000 plain ones: each machine then claims some 10 units per round, in
# one transaction, instead of 2.
PLAIN_SHARE = 5


def plan_window(snap: Snapshot) -> int:
    """How many placeable units one pass plans (plain ones count 1/PLAIN_SHARE each): all
    that fit the pass budget, and never fewer than every machine can claim a couple of at once.
    Small clusters plan every waiting unit in one pass; thousands of units on hundreds of
    machines go a window at a time."""
    machines = max(1, len(snap.machines))
    return max(2 * machines, PASS_BUDGET // machines)


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
        metrics: Metrics | None = None,
        claim_wait: float = CLAIM_WAIT,
    ) -> None:
        self.me = me
        self.claim_wait = claim_wait
        self.metrics = metrics or Metrics()
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
        self._first_seen: dict[str, tuple[str, float]] = {}
        self._moving_since: dict[str, float] = {}
        self._won: dict[str, float] = {}  # claims won, until the picture shows them
        self.next_wake: float | None = None

    def round(self) -> bool:
        """One round; True when a unit is still stopping, or has just been started or stopped
        and not yet reached its state, so the round should come again soon."""
        view = self.view()
        if not view.may_start(self.clock(), self.margin):
            return False  # not joined, or fencing: only the fencer touches systemd now
        return self._act(self._claim_turns(view))

    def _claim_turns(self, view: LeaseView) -> Snapshot:
        """Plan and bid; the picture to act on. A turn that won claims waits for the watch to
        show them and, if anything but claims landed meanwhile, bids again on that picture
        before the round acts: units written after the plan (the rest of a submission sent in
        several transactions) are claimed now, not after this round has loaded and started its
        first share, which takes a second at a hundred units. At most CLAIM_TURNS turns, so a
        stream of new units cannot hold the starts back. Still level-triggered: every turn
        plans, and the round acts, on a picture the watch brought."""
        snap, placements = self.mirror.plan(plan_window, self.metrics.planned, PLAIN_SHARE)
        for turn in range(1, CLAIM_TURNS + 1):
            won = self._claim(snap, placements, view)
            if not won or self.claim_wait <= 0 or not self._shown(won):
                break
            if turn == CLAIM_TURNS or not self.mirror.news_for_bids():
                # Only claims landed since the plan (the common case): nothing new to bid
                # for, and planning again would only delay the loads.
                return self.mirror.copy()
            snap, placements = self.mirror.plan(plan_window, self.metrics.planned, PLAIN_SHARE)
        return snap

    def _shown(self, won: list[str]) -> bool:
        """Wait (at most claim_wait) until the watch shows these won claims."""
        return self.mirror.wait_until(
            lambda live: all(live.owner_of(u) == self.me for u in won), self.claim_wait
        )

    def awaiting(self) -> frozenset[str]:
        """Units this machine won claims for that its picture may not show yet: until it does
        (or CLAIM_SETTLE passed), the next round bids for nothing."""
        now = self.clock()
        return frozenset(u for u, at in self._won.items() if now - at < CLAIM_SETTLE)

    def _claim(
        self, snap: Snapshot, placements: Mapping[str, Placement], view: LeaseView
    ) -> list[str]:
        """Bid for this machine's share of the plan; returns the units whose claims it won."""
        assert view.lease_id is not None
        now = self.clock()
        # A picture that does not show this machine's latest won claims yet plans as if the
        # machine had fewer units than it has, and would make it bid for more than its share:
        # wait for the watch to bring them (it wakes the next round), a bounded while.
        self._won = {
            u: at
            for u, at in self._won.items()
            if now - at < CLAIM_SETTLE and snap.owner_of(u) != self.me
        }
        if self._won:
            self.next_wake = now + 0.05
            return []
        mine = self.mirror.bids(placements, self.me)
        claim_plan = plan_claims(mine, self.me, self._first_seen, now, self.stagger())
        self._first_seen = dict(claim_plan.first_seen)
        self.next_wake = claim_plan.next_wake
        won: list[str] = []
        index = self.mirror.view(snap) if claim_plan.claims else None
        reasons = {task.unit: task.reason for task in claim_plan.claims}
        single: list[tuple[str, Guards]] = []
        free: dict[str, int] = {}
        for task in claim_plan.claims:
            desired = snap.desired.get(task.unit)
            guards = claim_guards(snap, task.unit, index)
            if guards.exact or guards.prefixes:
                single.append((task.unit, guards))
            else:
                free[task.unit] = desired.revision if desired else 0
        results: dict[str, bool] = {}
        try:
            # Claims that guard on no other unit cannot depend on one another: one write.
            if len(free) > 1:
                try:
                    results = self.registry.claim_many(
                        free, self.me, view.lease_id, snap.revision
                    )
                except RegistryUnavailable:
                    raise
                except Exception as exc:
                    # Never expected; the round still drives systemd, the next one bids again.
                    log.exception("claims of %d units failed: %s", len(free), exc)
            else:
                single = [(u, NO_GUARDS) for u in free] + single
            for unit, guards in single:
                desired = snap.desired.get(unit)
                try:
                    results[unit] = self.registry.claim(
                        unit,
                        self.me,
                        view.lease_id,
                        snap.revision,
                        desired.revision if desired else 0,
                        guards,
                    )
                except RegistryUnavailable:
                    raise
                except Exception as exc:
                    log.exception("claim of %s failed: %s", unit, exc)
        except RegistryUnavailable as exc:
            # etcd is out of reach: the other claims would wait as long for nothing, but this
            # round still drives systemd.
            log.warning("claims stopped: %s", exc)
        for unit, ok in results.items():
            self.metrics.claim(won=ok)
            if ok:
                won.append(unit)
                self._won[unit] = now
                log.info("claimed %s: %s", unit, reasons[unit])
            else:
                log.debug("claim of %s lost: the registry changed since revision %s",
                          unit, snap.revision)
        if won:
            # Bid again on a picture that holds these claims (the watch wakes the loop too).
            self.wake()
        return won

    def _act(self, snap: Snapshot) -> bool:
        view = self.mirror.view(snap)
        loaded = self.manager.loaded_units()
        mine = set(view.owned_by.get(self.me, ()))
        names = set(loaded) | mine
        self.executor.note_units(names | set(self.executor.known_units))
        # Patient reads: the round after a batch of starts finds the manager still forking
        # them, and it answers only then; the short timeout is for the fencer's reads.
        states = self.manager.states(names, patient=True) if names else {}
        # Launched by this agent: what the operator wants launched, and what dropped to loaded
        # but still runs (its stop is due). A loaded unit systemd started as a dependency is not.
        launched = still_started(snap, states, names)
        started = self.executor.started(launched)
        tasks = plan_local(snap, self.me, view, loaded, states, started)
        # Why each unit is taken down, published with its "deactivating" state.
        reasons = {
            t.unit: t.reason
            for t in tasks
            if t.kind in (TaskKind.STOP, TaskKind.UNLOAD, TaskKind.RELEASE)
        }
        stopping = self.executor.run(tasks, lambda a, b: excludes(snap, a, b))
        if tasks:
            # Read back what the tasks did, so published states are systemd's, not our intent.
            loaded = self.manager.loaded_units()
            self.executor.note_units(set(loaded) | mine)
            states = self.manager.states(loaded, patient=True) if loaded else {}
        else:
            # Nothing ran: the states read a moment ago are what there is to publish. (A round
            # that watches units settle comes every 0.1 s: a second read of 100 units is 4-5 ms
            # of the manager's and the agent's time on a quiet machine, and more on one busy
            # starting them.)
            states = {name: states[name] for name in loaded}
        self.publisher.publish(self.view(), snap, loaded, states, reasons)
        settling = self._settling(states)
        self.metrics.units(
            count_by(s.active for s in states.values()),
            self.mirror.desired_counts(snap),
        )
        return stopping or settling

    def _settling(self, states: Mapping[str, SystemdState]) -> bool:
        """Whether a unit is on its way up or down, and not for long: the next round then comes
        soon, so its new state is published when systemd reaches it rather than a second later.
        A unit that stays in a transition (a start that hangs, a restart loop) is left to the
        ordinary pace after SETTLE_WINDOW."""
        now = self.clock()
        moving = {n for n, s in states.items() if s.active in TRANSITIONS}
        self._moving_since = {n: self._moving_since.get(n, now) for n in moving}
        return any(now - since < SETTLE_WINDOW for since in self._moving_since.values())
