"""Fencing: every unit of this machine is dead before its lease can expire.

The choice made here (see README, "The safety promise"): units get SIGTERM (a stop job) when
the lease's deadline is `margin` away, and whatever still runs half a margin before the deadline
gets SIGKILL through systemd's KillUnit. A unit's own `TimeoutStopSec=` cannot delay that, so the
margin does not depend on what units the operator writes.

The fencer runs in its own thread and shares no lock with the reconcile thread: a systemd call
that hangs there (until its D-Bus timeout) cannot delay fencing. The stop and kill helpers are
shared with the guard process (`fleetd.guard`), which does the same when fleetd itself is gone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from fleetd.agent.lease import LeaseView
from fleetd.clock import Clock
from fleetd.errors import SystemdError
from fleetd.ports import UnitManager

log = logging.getLogger("fleetd")

RUNNING = frozenset({"active", "activating", "reloading", "deactivating"})
STOPPED = frozenset({"inactive", "failed"})


def stop_units(manager: UnitManager, names: Iterable[str], reason: str) -> set[str]:
    """Queue a stop for every unit that runs; returns the units still not stopped."""
    wanted = sorted(set(names))
    if not wanted:
        return set()
    states = manager.states(wanted)
    running: set[str] = set()
    stopping: list[str] = []
    for name in wanted:
        state = states.get(name)
        if state is None or state.active in STOPPED:
            continue
        running.add(name)
        if state.active == "deactivating":
            continue  # a stop job runs already
        log.warning("stop %s: %s", name, reason)
        stopping.append(name)
    # All the stop calls at once: a machine leaving with 150 units should not queue its stops
    # one round trip after another while the others wait for them.
    try:
        failures = manager.stop_many(stopping) if stopping else {}
    except SystemdError as error:
        failures = {name: error for name in stopping}
    for name, failure in sorted(failures.items()):
        log.error("stop %s failed: %s", name, failure)
    return running


def kill_units(manager: UnitManager, names: Iterable[str], reason: str) -> set[str]:
    """SIGKILL every unit that still runs; returns those that did (before the kill)."""
    wanted = sorted(set(names))
    if not wanted:
        return set()
    states = manager.states(wanted)
    running = {n for n in wanted if (s := states.get(n)) is not None and s.active not in STOPPED}
    for name in sorted(running):
        log.error("kill %s (SIGKILL): %s", name, reason)
        try:
            manager.kill(name)
        except SystemdError as exc:
            log.error("kill %s failed: %s", name, exc)
    return running


class Fencer:
    """Stops (then kills) every unit while the lease view says units may not run."""

    RETRY = 0.25  # seconds between stop/kill passes while fenced

    def __init__(
        self,
        manager: UnitManager,
        view: Callable[[], LeaseView],
        units: Callable[[], Iterable[str]],
        margin: float,
        clock: Clock,
        on_fence: Callable[[], None] = lambda: None,
    ) -> None:
        self.manager = manager
        self.on_fence = on_fence  # each fencing of a lease in doubt (for the metrics)
        self.view = view
        self.units = units
        self.margin = margin
        self.clock = clock
        self.epoch = 0  # bumped at each fencing: units started before it are not "started" now
        self._fenced_at: float | None = None
        self._kill_at = 0.0
        self._deadline = 0.0
        self._reason = ""
        self._next_pass = 0.0
        self._clear = False  # nothing ran at the last pass
        self._leftovers: set[str] = set()
        self._leftover_kill_at = 0.0

    @property
    def fenced(self) -> bool:
        return self._fenced_at is not None

    def take_down_leftovers(self) -> None:
        """At start-up without a lease to adopt: the units still running here belong to an
        earlier run whose lease (and deadline) we do not know. They are stopped now and killed
        half a margin later, whatever lease this run gets meanwhile."""
        now = self.clock()
        self._leftovers = set(self.units())
        self._leftover_kill_at = now + self.margin / 2
        self._leftover_pass(now)

    def _leftover_pass(self, now: float) -> None:
        reason = "left from an earlier run of the agent (its lease is unknown)"
        try:
            if now >= self._leftover_kill_at:
                running = kill_units(self.manager, self._leftovers, reason)
            else:
                running = stop_units(self.manager, self._leftovers, reason)
        except SystemdError as exc:
            log.error("stopping units left from an earlier run: systemd did not answer: %s", exc)
            return
        if not running and now >= self._leftover_kill_at:
            self._leftovers = set()

    def tick(self) -> float:
        """One check; returns seconds until the next is useful."""
        now = self.clock()
        if self._leftovers:
            self._leftover_pass(now)
            if self._leftovers:
                return self.RETRY
        view = self.view()
        if view.may_run(now, self.margin):
            if self._fenced_at is not None:
                if self._reason.startswith("fenced"):
                    log.info("lease renewed: units may run here again")
                self._fenced_at = None
            return max(0.01, view.deadline - self.margin - now)
        if self._fenced_at is not None and view.deadline != self._deadline:
            # The lease was renewed (or replaced) and ran short again between two looks: a new
            # fencing, with its own kill time.
            self._fenced_at = None
        if self._fenced_at is None:
            self._fenced_at = now
            self._deadline = view.deadline
            self.epoch += 1
            self._clear = False
            # SIGKILL half a margin before the deadline; with no lease at all (units left by an
            # earlier run) half a margin from now.
            base = view.deadline if view.deadline > now else now + self.margin
            self._kill_at = base - self.margin / 2
            self._next_pass = now
            if view.lease_id is None and not view.registered:
                self._reason = "no lease"
            else:
                self._reason = "fenced: the lease could not be renewed and may expire"
                log.error("%s; stopping every unit here", self._reason)
                self.on_fence()
        if now < self._next_pass or self._clear:
            return self.RETRY
        self._next_pass = now + self.RETRY
        names = list(self.units())
        try:
            if now >= self._kill_at:
                running = kill_units(self.manager, names, f"{self._reason}; still running")
            else:
                running = stop_units(self.manager, names, self._reason)
        except SystemdError as exc:
            log.error("fencing: systemd did not answer: %s", exc)
            return self.RETRY
        self._clear = not running and now >= self._kill_at
        return self.RETRY
