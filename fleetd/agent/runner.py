"""The agent of one machine: wires the lease keeper, the fencer, the registry mirror, the
executor, the publisher and the reconciler, runs their loops, and ends them the way it was asked.

Threads, each the one owner of its state:
- lease: takes, renews and registers the lease (`LeaseKeeper`), publishing a read-only view;
- fence: stops, then kills, every unit when that view says the lease may expire, and pings
  systemd's watchdog while the reconcile thread makes progress;
- the registry client's watch thread feeds the mirror;
- reconcile (the caller of `run()`): rounds of plan and act, the only one to drive the executor.

Three ways out (`ExitMode`), chosen by a signal in `fleetd.cli`:
- DRAIN (SIGTERM, SIGINT): stop every unit (SIGKILL after the drain timeout), unload them, revoke
  the lease: other machines take the units over at once. Exit 0.
- RESTART (SIGUSR2): exit at once leaving the units running and the lease alive; its id and
  deadline stay in the runtime directory. A fleetd started within the lease's TTL re-attaches
  and adopts the units (same MainPID); otherwise the guard stops them before the lease expires.
- VANISH (tests' power cut): nothing is stopped, released or written.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Sequence

from fleetd import __version__
from fleetd.agent.executor import Executor
from fleetd.agent.fence import STOPPED, Fencer, kill_units, stop_units
from fleetd.agent.lease import LeaseFile, LeaseKeeper, LeaseView
from fleetd.agent.mirror import Mirror
from fleetd.agent.publish import Publisher
from fleetd.agent.reconcile import CLAIM_WAIT, Reconciler
from fleetd.clock import Clock
from fleetd.config import Config
from fleetd.errors import RegistryUnavailable, SystemdError
from fleetd.metrics import Metrics
from fleetd.model import Machine
from fleetd.ports import Registry, UnitManager
from fleetd.sdnotify import Notifier

log = logging.getLogger("fleetd")


class ExitMode(enum.Enum):
    DRAIN = "drain"
    RESTART = "restart"
    VANISH = "vanish"


def guard_unit_name(machine_id: str) -> str:
    return f"fleet-guard-{machine_id[:12]}.service"


class Agent:
    """One machine. `run()` blocks until `stop()`."""

    COALESCE = 0.05  # seconds to let a burst of watch events land before planning

    def __init__(
        self,
        config: Config,
        registry: Registry,
        manager: UnitManager,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
        notifier: Notifier | None = None,
        owns_registry: bool = True,
        lease_file: LeaseFile | None = None,
        guard_argv: Sequence[str] | None = None,
        settle: float = 0.3,
        metrics: Metrics | None = None,
        mirror: Mirror | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.registry = registry
        self.manager = manager
        self.clock = clock
        self.me = config.machine_id
        self.margin = config.margin
        self.notifier = notifier or Notifier()
        self.guard_argv = list(guard_argv) if guard_argv else None
        # A simulator may hand one client (one connection, one watch stream) to many agents.
        self._owns_registry = owns_registry
        self._wake = threading.Event()
        self._fence_wake = threading.Event()
        self._stopping = threading.Event()
        self._done = threading.Event()
        self._threads: list[threading.Thread] = []
        self._mode = ExitMode.DRAIN
        self._progress_at = clock()
        self._ready = False
        self._lease_seen: int | None = None
        # Reads begun before this join (lease) began do not count as reading afresh.
        self._join_token: int | None = None

        self.keeper = LeaseKeeper(
            registry, config.agent_ttl, self.margin, clock, self.machine, lease_file,
            on_change=self._lease_changed, metrics=self.metrics,
        )
        # A simulator may also share one mirror (watch, snapshot, planner) among its agents.
        self.mirror = (
            mirror.share(self._wake.set) if mirror is not None else Mirror(registry, self._wake.set)
        )
        self.fencer = Fencer(
            manager, self.keeper.view, self._fence_units, self.margin, clock,
            on_fence=self.metrics.fenced,
        )
        self.executor = Executor(
            manager,
            registry,
            self.me,
            may_start=lambda: self.keeper.view().may_start(clock(), self.margin),
            fence_epoch=lambda: self.fencer.epoch,
            clock=clock,
            progress=self._progress,
            settle=settle,
        )
        self.publisher = Publisher(registry, self.me, wall)
        self.reconciler = Reconciler(
            self.me, registry, manager, self.mirror, self.executor, self.publisher,
            self.keeper.view, self.margin, clock, lambda: self.config.claim_stagger,
            self._wake.set, metrics=self.metrics,
            # Agents sharing a mirror each act on their claims in their next turn: one that
            # waited would have the mirror build a View of each agent's own revision.
            claim_wait=CLAIM_WAIT if mirror is None else 0.0,
        )
        self.metrics.health_source(self._why_not_ready)

    # ------------------------------------------------------------------------------ identity

    def machine(self) -> Machine:
        return Machine(
            self.me,
            self.config.public_ip,
            dict(self.config.metadata),
            __version__,
            self.config.hostname,
        )

    def lease(self) -> LeaseView:
        return self.keeper.view()

    def update_config(self, config: Config) -> None:
        """SIGHUP: new metadata takes effect at once; units that may no longer run here are
        stopped, and released once stopped, by the next rounds."""
        self.config = config
        view = self.keeper.view()
        # Once shutting down, the lease is about to be (or has been) given back.
        if view.registered and view.lease_id is not None and not self._stopping.is_set():
            try:
                self.registry.update_machine(self.machine(), view.lease_id)
            except RegistryUnavailable as exc:
                log.warning("could not publish new metadata: %s", exc)
        log.info("configuration reloaded: metadata %s", dict(config.metadata))
        self._wake.set()

    # ----------------------------------------------------------------------------- the loops

    def run(self) -> None:
        try:
            # A lease left by the previous run keeps its units alive (adopted if etcd still
            # holds it); without one, units still loaded belong to nobody we know of and are
            # stopped before we join (the fencer sees "no lease").
            self.start_up()
            self._spawn("lease", self._lease_loop)
            self._spawn("fence", self._fence_loop)
            self._reconcile_loop()
        finally:
            self._shutdown()

    def start_up(self) -> None:
        if self.keeper.restore():
            # Re-attach before the fencer looks: the successor of a restart is usually close to
            # the fencing point of the lease it inherits.
            self.keeper.tick()
        else:
            self.fencer.take_down_leftovers()
        self.fencer.tick()

    def step(self) -> bool:
        """One turn of the reconcile loop; True when a unit is still stopping. Deterministic
        tests drive the agent with this, `keeper.tick()` and `fencer.tick()` and a fake clock."""
        view = self.keeper.view()
        if not view.registered:
            return False
        if view.lease_id != self._lease_seen:
            self._joined(view)
        token = self.mirror.reads()
        if self.mirror.needs_sync:
            self.mirror.sync(newer_than=token)
        return self.reconciler.round()

    def _spawn(self, name: str, loop: Callable[[], None]) -> None:
        thread = threading.Thread(target=loop, name=f"{name}-{self.me[:8]}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _join_loops(self) -> None:
        """Wait for the lease and fence loops to leave their current step: closing the registry
        under a call still in flight crashes the gRPC runtime, not just the call. A step ends
        within one request timeout (etcd) or one systemd timeout (D-Bus)."""
        self._done.set()
        self._fence_wake.set()
        bound = self.config.request_timeout + self.config.systemd_timeout + 1.0
        for thread in self._threads:
            if thread is threading.current_thread():
                continue
            thread.join(bound)
            if thread.is_alive():
                log.warning("%s loop still busy after %.0fs; closing anyway", thread.name, bound)

    def _guarded_step(self, what: str, step: Callable[[], float]) -> float:
        """One step of a loop; an unexpected error is logged and the loop goes on."""
        try:
            return step()
        except Exception:
            log.exception("%s loop: unexpected error, going on", what)
            return 0.5

    def _lease_loop(self) -> None:
        while not self._done.is_set():
            pause = self._guarded_step("lease", self.keeper.tick)
            self._done.wait(pause)

    def _fence_loop(self) -> None:
        ping_every = (self.notifier.watchdog_interval or 0) / 2
        last_ping = 0.0
        while not self._done.is_set():
            pause = min(0.5, self._guarded_step("fence", self.fencer.tick))
            now = self.clock()
            if ping_every:
                # Ping only while the reconcile thread makes progress: a thread stuck for the
                # whole watchdog interval gets this process killed and restarted.
                if now - last_ping >= ping_every and now - self._progress_at < 2 * ping_every:
                    self.notifier.send("WATCHDOG=1")
                    last_ping = now
                pause = min(pause, ping_every)
            if self._fence_wake.wait(max(0.01, pause)):
                self._fence_wake.clear()

    def _reconcile_loop(self) -> None:
        backoff = 0.5
        while not self._stopping.is_set():
            self._progress()
            stopping_units = False
            try:
                if not self.keeper.view().registered:
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                stopping_units = self.step()
                backoff = 0.5
            except Exception as exc:
                if isinstance(exc, RegistryUnavailable | SystemdError):
                    log.warning("round failed, retrying in %.1fs: %s", backoff, exc)
                else:
                    log.exception("round failed, retrying in %.1fs", backoff)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            timeout = 0.1 if stopping_units else 1.0
            next_wake = self.reconciler.next_wake
            if next_wake is not None:
                timeout = max(0.01, min(timeout, next_wake - self.clock()))
            if self._wake.wait(timeout):
                # Events come in bursts (a batch of claims, a machine's units vanishing at
                # once): let the burst land and plan once for all of it.
                self._stopping.wait(self.COALESCE)
            self._wake.clear()

    def _joined(self, view: LeaseView) -> None:
        """A new lease (first join, or again after losing one): read everything afresh. Runs
        again on the next round if any step of it fails."""
        self.publisher.forget()
        if self._join_token is None:
            self._join_token = self.mirror.reads()
        self.mirror.sync(newer_than=self._join_token)
        if self.guard_argv is not None:
            try:
                self.manager.start_guard(guard_unit_name(self.me), self.guard_argv)
            except SystemdError as exc:
                log.error("could not start the guard (units would outlive a dead fleetd past "
                          "its lease): %s", exc)
        if not self._ready:
            self.notifier.send("READY=1")
            self._ready = True
        self._lease_seen = view.lease_id
        self._join_token = None

    def _lease_changed(self) -> None:
        self._wake.set()
        self._fence_wake.set()

    def _progress(self) -> None:
        self._progress_at = self.clock()
        self.metrics.loop_turned()

    def _why_not_ready(self) -> str:
        """For /health: "" while this agent may run units, else why not."""
        if self._stopping.is_set():
            return "shutting down"
        view = self.keeper.view()
        if not view.registered:
            return "not joined the cluster: no registered lease"
        if not view.may_run(self.clock(), self.margin):
            return "fenced: the lease could not be renewed and may expire; units are stopped"
        if view.lease_id != self._lease_seen:
            return "joining: reading the registry"
        return ""

    def _fence_units(self) -> set[str]:
        names = set(self.executor.known_units)
        try:
            names |= set(self.manager.loaded_units())
        except SystemdError as exc:
            log.error("fencing: cannot list the units: %s", exc)
        return names

    # --------------------------------------------------------------------------- shutdown

    def stop(self, leave: bool = True, mode: ExitMode | None = None) -> None:
        """End the loops. DRAIN by default; leave=False is VANISH (a power cut: nothing is
        stopped or released and the lease runs out by itself, used by failure tests)."""
        self._mode = mode or (ExitMode.DRAIN if leave else ExitMode.VANISH)
        self._stopping.set()
        self._wake.set()

    def shutdown(self) -> None:
        """The way out `stop()` chose; `run()` calls it, deterministic tests call it directly."""
        self._shutdown()

    def _shutdown(self) -> None:
        self.mirror.close()
        self.notifier.send("STOPPING=1")
        mode = self._mode
        try:
            if mode is ExitMode.DRAIN:
                self._drain()
            elif mode is ExitMode.RESTART:
                # One last keep-alive: the successor gets a whole TTL (minus the margin) to
                # come back and re-attach, counted from now.
                self._guarded_step("lease", self.keeper.tick)
                view = self.keeper.view()
                log.info(
                    "exiting for a restart: units keep running; lease %s stays until a new "
                    "fleetd renews it (else the guard stops them in %.1fs)",
                    f"{view.lease_id:x}" if view.lease_id else "(none)",
                    max(0.0, view.deadline - self.margin - self.clock()),
                )
            else:
                log.info("vanishing without leaving the cluster")
        finally:
            self._join_loops()
            if self._owns_registry:
                self.registry.close()
        log.info("stopped")

    def _drain(self) -> None:
        """Stop our units, revoke the lease once none runs (ownership, published states and
        presence vanish in one step and the other machines race for the units at once), then
        unload them. The lease keeps being renewed meanwhile, and nothing is released while a
        unit still runs; unloading stopped units needs no lease, so the others need not wait
        for it."""
        log.info("shutting down: stopping units and leaving the cluster")
        try:
            names = self._fence_units()
            stop_units(self.manager, names, "fleetd is shutting down")
            if not self._wait_stopped(names, max(5.0, self.config.agent_ttl)):
                kill_units(self.manager, names, "did not stop within the drain timeout")
                if not self._wait_stopped(names, 5.0):
                    raise SystemdError("units still run after SIGKILL")
        except SystemdError as exc:
            log.error("could not take every unit down, keeping the lease to expire by itself "
                      "after the guard stops them: %s", exc)
            return
        # The lease loop must not join again with a new lease once this one is given back.
        self._join_loops()
        self.keeper.revoke()
        try:
            loaded = self.manager.loaded_units()
            failures = self.manager.unload_many(sorted(loaded)) if loaded else {}
            if loaded:
                self.manager.reload()
        except SystemdError as exc:
            failures = {"": exc}
        if failures:
            # Stopped and no longer ours: a later fleetd unloads what is left at start-up.
            name, error = min(failures.items())
            log.warning("could not unload every stopped unit (%d failed, %s first): %s",
                        len(failures), name or "all", error)

    def _wait_stopped(self, names: set[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while names:
            try:
                states = self.manager.states(names)
                if all(s.active in STOPPED for s in states.values()):
                    return True
            except SystemdError as exc:
                # A manager busy taking a hundred units down answers a state read late: that
                # is no reason to give up the drain while there is time left.
                log.info("reading the stopping units' states failed, asking again: %s", exc)
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True
