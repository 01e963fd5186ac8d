"""The executor: the only code that changes systemd or gives ownership back, task by task (a
round's loads, and each run of consecutive starts, go to systemd as one batch of calls).

Two refusals make the safety promise hold whatever the planner asked for:
- LOAD and START are refused while the lease view does not allow new units (not joined, or the
  fencing margin reached); a START that raced with fencing is stopped again at once;
- UNLOAD and RELEASE wait until systemd itself reports the unit inactive or failed on this
  machine: a stop job being queued is not a stopped unit, and another machine may start the unit
  as soon as the owner key is gone. A unit still stopping keeps its file (so its "deactivating"
  state stays published, with the reason) and the rest of its tasks wait for a later round.

Each task is isolated: an error (any exception) is logged, that unit waits with a growing
backoff, and the other units' tasks go on. Progress is recorded after every step for the
systemd watchdog, so a long round is not mistaken for a frozen agent.

The set of units this agent started (so a unit that failed is not restarted in a loop) is owned
by the reconcile thread alone; fencing only bumps an epoch, which empties it on the next round.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fleetd.agent.fence import STOPPED
from fleetd.clock import Clock
from fleetd.planner import Task, TaskKind
from fleetd.ports import Registry, UnitManager

log = logging.getLogger("fleetd")

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
SETTLE_POLL = 0.02


@dataclass(frozen=True)
class _Backoff:
    failures: int
    retry_at: float


class Executor:
    def __init__(
        self,
        manager: UnitManager,
        registry: Registry,
        me: str,
        may_start: Callable[[], bool],
        fence_epoch: Callable[[], int],
        clock: Clock,
        progress: Callable[[], None] = lambda: None,
        settle: float = 0.3,
    ) -> None:
        self.manager = manager
        self.registry = registry
        self.me = me
        self.may_start = may_start
        self.fence_epoch = fence_epoch
        self.clock = clock
        self.progress = progress
        self.settle = settle  # seconds a stop may take before its unit waits for a later round
        self._deferred: set[str] = set()
        self._started: set[tuple[str, str]] = set()
        self._epoch = 0
        self._backoff: dict[str, _Backoff] = {}
        # Every unit this run may have running, for the fencer (read from its thread: only ever
        # replaced, never changed in place).
        self.known_units: frozenset[str] = frozenset()

    # ------------------------------------------------------------------------- started units

    def started(self, launched: Iterable[str]) -> frozenset[tuple[str, str]]:
        """The (unit, hash) pairs started and still wanted launched. "Started already" only
        holds while the operator keeps asking for launched, and not across a fencing."""
        epoch = self.fence_epoch()
        if epoch != self._epoch:
            self._epoch = epoch
            self._started.clear()
        keep = set(launched)
        self._started = {s for s in self._started if s[0] in keep}
        return frozenset(self._started)

    def note_units(self, names: Iterable[str]) -> None:
        self.known_units = frozenset(names)

    # --------------------------------------------------------------------------------- tasks

    def waiting(self, unit: str) -> bool:
        entry = self._backoff.get(unit)
        return entry is not None and self.clock() < entry.retry_at

    def run(
        self, tasks: Iterable[Task], excludes: Callable[[str, str], bool] = lambda a, b: False
    ) -> bool:
        """Execute the tasks in order; True when some unit is still stopping (run again soon).

        `excludes(a, b)`: units a and b must not run on one machine at once (Conflicts,
        Replaces); a START waits while a unit it excludes is still stopping here.
        """
        failed: set[str] = set()
        self._deferred = set()
        tasks = list(tasks)
        loads: dict[str, Exception | None] | None = None
        # The STARTs of one run of consecutive START tasks go to systemd together, when the run
        # ends: a START's checks below depend on no other START's outcome, only on the tasks
        # before the run, so holding them back decides nothing differently.
        starts: list[Task] = []
        for index, task in enumerate(tasks):
            if starts and task.kind is not TaskKind.START:
                self._start_all(starts, failed)
                starts = []
            if task.unit in failed or task.unit in self._deferred:
                continue
            if task.kind is TaskKind.LOAD and loads is None:
                # Linking is most of what loading a hundred units costs: the LOAD tasks from
                # here on go in one call, at the place of the first (after every stop and
                # unload before it), less those whose unit failed or waits this round.
                loads = self._load_all(
                    t for t in tasks[index:]
                    if t.kind is TaskKind.LOAD
                    and t.unit not in failed
                    and t.unit not in self._deferred
                )
            if task.kind is TaskKind.START and any(
                excludes(task.unit, other) for other in self._deferred
            ):
                log.info("%s waits: a unit it may not run beside is still stopping here", task)
                self._deferred.add(task.unit)
                continue
            if task.kind in (TaskKind.LOAD, TaskKind.START) and self.waiting(task.unit):
                # Backoff delays bringing a failing unit up again, never taking one down.
                continue
            if task.kind is TaskKind.START and "" in failed:
                continue  # the daemon-reload failed: the manager may not see the new file
            if task.kind is TaskKind.START:
                starts.append(task)
                continue
            self._run_one(task, loads, failed)
        if starts:
            self._start_all(starts, failed)
        return bool(self._deferred)

    def _run_one(
        self, task: Task, loads: dict[str, Exception | None] | None, failed: set[str]
    ) -> None:
        try:
            if task.kind is TaskKind.LOAD and loads and task.unit in loads:
                # Done in the batch (or failed there, raised here as its own error).
                error = loads[task.unit]
                if error is not None:
                    raise error
            else:
                self._execute(task)
            self._backoff.pop(task.unit, None)
        except Exception as exc:
            self._fail(task, exc, failed)
        finally:
            self.progress()

    def _fail(self, task: Task, exc: BaseException, failed: set[str]) -> None:
        failed.add(task.unit)
        entry = self._backoff.get(task.unit)
        failures = entry.failures + 1 if entry else 1
        pause = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (failures - 1))
        self._backoff[task.unit] = _Backoff(failures, self.clock() + pause)
        log.error("%s failed (retrying in %.0fs): %s", task, pause, _one_line(exc))

    def _start_all(self, tasks: list[Task], failed: set[str]) -> None:
        """Start the units of these START tasks with one batch of calls (a single one as its
        own task); each that fails backs off on its own, as its own task would."""
        if len(tasks) == 1:
            self._run_one(tasks[0], None, failed)
            return
        if not self.may_start():
            log.warning("refused to start %d units (%s, ...): the lease does not allow new "
                        "units now", len(tasks), tasks[0].unit)
            return
        for task in tasks:
            log.info("%s (in a batch of %d)", task, len(tasks))
        began = time.monotonic()
        try:
            errors = self.manager.start_many([t.unit for t in tasks])
        except Exception as exc:
            # Not one unit's error: each task then starts its unit on its own (a start of a
            # unit the batch started already changes nothing).
            log.warning("starting %d units at once failed, one by one now: %s",
                        len(tasks), _one_line(exc))
            for task in tasks:
                self._run_one(task, None, failed)
            return
        finally:
            self.progress()
        log.info("start jobs of %d units queued in %.2f s (%s, ...)",
                 len(tasks) - len(errors), time.monotonic() - began, tasks[0].unit)
        for task in tasks:
            error = errors.get(task.unit)
            if error is not None:
                self._fail(task, error, failed)
                continue
            self._started.add((task.unit, task.hash))
            self._backoff.pop(task.unit, None)
        if not self.may_start():
            # Fencing began while the starts were on their way: the fencer may have looked
            # before these units ran, so take them down here.
            up = [t.unit for t in tasks if t.unit not in errors]
            log.warning("stop %d units (%s, ...): fencing began while they were starting",
                        len(up), up[0] if up else "")
            for unit, error in self.manager.stop_many(up).items():
                log.error("stop %s failed: %s", unit, _one_line(error))

    def _load_all(self, tasks: Iterable[Task]) -> dict[str, Exception | None]:
        """Load every unit of these LOAD tasks that may load now, in one call: unit -> its
        error, or None once loaded. Units backing off, or refused by the lease, are left to
        their own task (which skips or refuses them as one task would)."""
        batch = {t.unit: t.text for t in tasks if not self.waiting(t.unit)}
        if len(batch) < 2 or not self.may_start():
            return {}
        for unit in batch:
            log.info("load %s: in a batch of %d", unit, len(batch))
        try:
            failures = self.manager.load_many(batch)
        except Exception as exc:
            # Not one unit's error: each task then loads its unit on its own.
            log.warning("loading %d units at once failed, one by one now: %s",
                        len(batch), _one_line(exc))
            return {}
        finally:
            self.progress()
        return {unit: failures.get(unit) for unit in batch}

    def _execute(self, task: Task) -> None:
        kind = task.kind
        if kind in (TaskKind.LOAD, TaskKind.START) and not self.may_start():
            log.warning("refused to %s %s: the lease does not allow new units now",
                        kind.value, task.unit)
            return
        if kind in (TaskKind.UNLOAD, TaskKind.RELEASE) and not self._stopped(task):
            self._deferred.add(task.unit)
            return
        log.info("%s", task)
        if kind is TaskKind.STOP:
            self.manager.stop(task.unit)
            self._forget(task.unit)
        elif kind is TaskKind.UNLOAD:
            self.manager.unload(task.unit)
            self._forget(task.unit)
        elif kind is TaskKind.LOAD:
            self.manager.load(task.unit, task.text)
        elif kind is TaskKind.RELOAD:
            self.manager.reload()
        elif kind is TaskKind.START:
            self.manager.start(task.unit)
            self._started.add((task.unit, task.hash))
            if not self.may_start():
                # Fencing began while the start was on its way: the fencer may have looked
                # before this unit ran, so take it down here.
                log.warning("stop %s: fencing began while it was starting", task.unit)
                self.manager.stop(task.unit)
        elif kind is TaskKind.RELEASE:
            self.registry.release(task.unit, self.me)

    def _stopped(self, task: Task) -> bool:
        """Read back from systemd that the unit is down, giving a stop just queued a moment."""
        polls = int(self.settle / SETTLE_POLL)
        active = "running"
        for poll in range(polls + 1):
            state = self.manager.states([task.unit]).get(task.unit)
            if state is None or state.active in STOPPED:
                return True
            active = state.active
            if poll < polls:
                time.sleep(SETTLE_POLL)
        log.info("%s waits: the unit is still %s here", task, active)
        return False

    def _forget(self, unit: str) -> None:
        self._started = {s for s in self._started if s[0] != unit}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
