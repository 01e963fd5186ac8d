"""The fleetd agent: one machine's loops around the pure planners.

- The watcher applies each etcd watch event to an in-memory `Snapshot` and wakes the reconciler;
  it never re-reads the registry per event. A broken watch (endpoint failover, compaction) is the
  only reason to read everything again.
- The heartbeat keeps the machine's lease alive well inside its TTL. If it cannot for longer than
  the TTL minus a safety margin, the agent fences itself: it stops its units before etcd can hand
  them to another machine, so a partition never leaves a unit running twice.
- The reconciler is level-triggered: each round copies the snapshot, plans with
  `fleetd.planner`, then acts (claims, systemd tasks, releases, published states). Events only
  wake it; it also wakes at least once a second to publish systemd state changes and when a
  staggered bid falls due.

All loops share one stop signal; SIGTERM stops the units, gives their ownership back at once by
revoking the lease, and exits 0.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping

from fleetd import __version__
from fleetd.config import Config
from fleetd.errors import RegistryUnavailable, SystemdError
from fleetd.model import DesiredState, Machine, PublishedState, SystemdState
from fleetd.placement import Placement, View, claim_guards, plan_placements
from fleetd.planner import Task, TaskKind, plan_claims, plan_local
from fleetd.ports import UnitManager
from fleetd.registry import EtcdRegistry, WatchEvent
from fleetd.sdnotify import Notifier
from fleetd.snapshot import Snapshot

log = logging.getLogger("fleetd")

Clock = Callable[[], float]


class _PlanCache:
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


_shared_plan = _PlanCache()


class Agent:
    """One machine. `run()` blocks until `stop()`."""

    COALESCE = 0.05  # seconds to let a burst of watch events land before planning

    def __init__(
        self,
        config: Config,
        registry: EtcdRegistry,
        manager: UnitManager,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
        notifier: Notifier | None = None,
        owns_registry: bool = True,
    ) -> None:
        self.config = config
        self.registry = registry
        self.manager = manager
        self.clock = clock
        self.wall = wall
        self.me = config.machine_id
        self._lock = threading.Lock()
        self._snapshot = Snapshot()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._resync = threading.Event()
        self._lease: int | None = None
        self._registered = False
        self._fenced = False
        self._last_keepalive = clock()
        self._cancel_watch: Callable[[], None] | None = None
        self._synced_at = 0
        self._first_seen: dict[str, float] = {}
        self._next_wake: float | None = None
        self._started: set[tuple[str, str]] = set()
        self._published: dict[str, PublishedState] = {}
        self._since: dict[str, tuple[str, float]] = {}
        self._heartbeat: threading.Thread | None = None
        self._leave = True
        self._systemd = threading.RLock()
        self.notifier = notifier or Notifier()
        # A simulator may hand one client (one connection, one watch stream) to many agents.
        self._owns_registry = owns_registry
        self._last_loop = clock()
        self._ready = False

    # ------------------------------------------------------------------------------ identity

    def machine(self) -> Machine:
        return Machine(
            self.me,
            self.config.public_ip,
            dict(self.config.metadata),
            __version__,
            self.config.hostname,
        )

    def update_config(self, config: Config) -> None:
        """SIGHUP: new metadata takes effect at once; units that may no longer run here are
        stopped and released by the next round's re-check."""
        self.config = config
        if self._registered and self._lease is not None:
            try:
                self.registry.update_machine(self.machine(), self._lease)
            except RegistryUnavailable as exc:
                log.warning("could not publish new metadata: %s", exc)
        log.info("configuration reloaded: metadata %s", dict(config.metadata))
        self._wake.set()

    # ------------------------------------------------------------------------- registration

    def _register(self) -> bool:
        """Take a lease and announce the machine, unless a live agent holds this id."""
        if self._lease is None:
            self._lease = self.registry.grant_lease(self.config.agent_ttl)
            self._last_keepalive = self.clock()
        if self.registry.register_machine(self.machine(), self._lease):
            self._registered = True
            self._fenced = False
            log.info(
                "joined the cluster as machine %s (%s), lease ttl %ss",
                self.me,
                self.config.public_ip or "no public ip",
                self.config.agent_ttl,
            )
            return True
        log.error(
            "machine id %s is already held by a live agent: not joining; check machine_id "
            "(/etc/machine-id) is unique, retrying",
            self.me,
        )
        return False

    # --------------------------------------------------------------------------- the watch

    def _sync(self) -> None:
        """Read everything once and watch from there."""
        if self._cancel_watch is not None:
            self._cancel_watch()
            self._cancel_watch = None
        snap = self.registry.snapshot()
        with self._lock:
            self._snapshot = snap
            self._synced_at = snap.revision
        self._resync.clear()
        self._cancel_watch = self.registry.watch(snap.revision + 1, self._on_watch)
        self._wake.set()

    def _on_watch(self, batch: list[WatchEvent] | BaseException) -> None:
        if isinstance(batch, BaseException):
            log.warning("registry watch ended (%s): reading the registry again", batch or "closed")
            self._resync.set()
            self._wake.set()
            return
        with self._lock:
            for event in batch:
                if event.mod_revision <= self._synced_at:
                    # A late event of a cancelled watch: the fresh read already has newer data.
                    continue
                self._snapshot.apply(
                    self.registry.layout,
                    event.key,
                    event.value,
                    event.mod_revision,
                    event.create_revision,
                )
        self._wake.set()

    # ----------------------------------------------------------------------- the heartbeat

    def fence_after(self) -> float:
        """Seconds without a successful keep-alive after which the agent stops its units: early
        enough that they are down before the lease can expire and another machine claims them
        (etcd counts the TTL from a refresh that happened before we saw its answer)."""
        ttl = self.config.agent_ttl
        return ttl - min(2.0, ttl / 4)

    def _watchdog_loop(self) -> None:
        """Fence on time alone. It must not wait for a keep-alive call to fail: a call into a
        partition can hang for the whole request timeout, longer than the margin we have."""
        pause = 0.05
        ping_every = (self.notifier.watchdog_interval or 0) / 2
        last_ping = 0.0
        while not self._stopping.wait(pause):
            pause = 0.05
            now = self.clock()
            # Ping systemd's watchdog only while the reconcile loop itself still turns: a loop
            # stuck for the whole watchdog interval gets this process killed and restarted.
            if ping_every and now - last_ping >= ping_every:
                if now - self._last_loop < 2 * ping_every:
                    self.notifier.send("WATCHDOG=1")
                last_ping = now
            if self._fenced or not self._registered:
                continue
            silent = self.clock() - self._last_keepalive
            if silent < self.fence_after():
                # Sleep until fencing could first be due; a keep-alive meanwhile moves it on.
                pause = max(0.05, self.fence_after() - silent)
                if ping_every:
                    pause = min(pause, ping_every)
                continue
            log.error("no lease keep-alive for %.1fs: stopping every unit here", silent)
            self._fenced = True
            self._stop_everything("fenced: etcd unreachable, the lease may expire")
            self._wake.set()

    def _heartbeat_loop(self) -> None:
        interval = max(0.2, self.config.agent_ttl / 4)
        while not self._stopping.wait(interval):
            lease = self._lease
            if lease is None:
                continue
            try:
                remaining = self.registry.keepalive(lease)
            except RegistryUnavailable as exc:
                silent = self.clock() - self._last_keepalive
                log.warning("lease keep-alive failed for %.1fs: %s", silent, exc)
                continue
            if remaining <= 0:
                log.error("lease expired: every unit here lost its owner; joining again")
                self._lease = None
                self._registered = False
                self._fenced = True
            else:
                self._last_keepalive = self.clock()
                if self._fenced and self._registered:
                    log.info("etcd reachable again and the lease held: resuming")
                    self._fenced = False
            self._wake.set()

    # -------------------------------------------------------------------------- reconcile

    def run(self) -> None:
        self._heartbeat = threading.Thread(
            target=self._guarded(self._heartbeat_loop), name="heartbeat", daemon=True
        )
        self._heartbeat.start()
        threading.Thread(
            target=self._guarded(self._watchdog_loop), name="watchdog", daemon=True
        ).start()
        # Units still loaded from an earlier run of this agent (it crashed; systemd kept them)
        # are owned by nobody we know of: their lease dies with that run and another machine
        # may already run them. Stop them before anything else; if they are ours, the first
        # round loads and starts them again.
        self._stop_everything("left over from a previous run of the agent")
        backoff = 0.5
        while not self._stopping.is_set():
            self._last_loop = self.clock()
            try:
                if self._fenced:
                    # Only systemd is touched here: etcd may be the thing that is unreachable.
                    self._stop_everything("fenced: etcd unreachable or lease lost")
                if not self._registered:
                    if not self._register():
                        self._stopping.wait(2.0)
                        continue
                    self._sync()
                    if not self._ready:
                        self.notifier.send("READY=1")
                        self._ready = True
                if self._resync.is_set():
                    self._sync()
                self.reconcile_once()
                backoff = 0.5
            except (RegistryUnavailable, SystemdError) as exc:
                log.warning("round failed, retrying in %.1fs: %s", backoff, exc)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            timeout = 1.0
            if self._next_wake is not None:
                timeout = max(0.01, min(timeout, self._next_wake - self.clock()))
            if self._wake.wait(timeout):
                # Events come in bursts (a batch of claims, a machine's units vanishing at
                # once): let the burst land and plan once for all of it.
                self._stopping.wait(self.COALESCE)
            self._wake.clear()
        self._shutdown()

    def _guarded(self, loop: Callable[[], None]) -> Callable[[], None]:
        """A crashed loop is logged and takes the agent down, never dies silently."""

        def run() -> None:
            try:
                loop()
            except Exception:
                log.exception(
                    "loop %s crashed: stopping the agent", threading.current_thread().name
                )
                self.stop()

        return run

    def reconcile_once(self) -> None:
        with self._lock:
            snap = self._snapshot.copy()
        if self._fenced:
            return
        now = self.clock()
        placements = _shared_plan(
            (tuple(self.registry.endpoints), self.registry.layout.prefix, snap.revision),
            lambda: plan_placements(snap, limit=self.plan_window(snap)),
        )
        claim_plan = plan_claims(
            placements, self.me, self._first_seen, now, self.config.claim_stagger
        )
        self._first_seen = dict(claim_plan.first_seen)
        self._next_wake = claim_plan.next_wake
        claimed = False
        for task in claim_plan.claims:
            desired = snap.desired.get(task.unit)
            ok = self.registry.claim(
                task.unit,
                self.me,
                self._require_lease(),
                snap.revision,
                desired.revision if desired else 0,
                claim_guards(snap, task.unit),
            )
            if ok:
                claimed = True
                log.info("claimed %s: %s", task.unit, task.reason)
            else:
                log.debug(
                    "claim of %s lost: the registry changed since revision %s",
                    task.unit,
                    snap.revision,
                )
        if claimed:
            # Act on our own claims as soon as the watch shows them.
            self._wake.set()
        self._act(snap)

    @staticmethod
    def plan_window(snap: Snapshot) -> int:
        """How many placeable units one pass plans: enough for every machine to claim a couple
        at once, few enough that a pass stays cheap with thousands of waiting units."""
        return max(32, 2 * len(snap.machines))

    def _require_lease(self) -> int:
        if self._lease is None:
            raise RegistryUnavailable("no lease: the agent is not registered")
        return self._lease

    def _act(self, snap: Snapshot) -> None:
        # "Started already" only holds while the operator keeps asking for launched: after a
        # stop (even of a unit that had failed and so needed no StopUnit) a new start must
        # start it again.
        self._started = {
            (name, digest)
            for name, digest in self._started
            if snap.desired_state(name) is DesiredState.LAUNCHED
        }
        loaded = self.manager.loaded_units()
        states = self.manager.states(loaded)
        tasks = plan_local(snap, self.me, View(snap), loaded, states, frozenset(self._started))
        for task in tasks:
            if self._fenced:
                # The watchdog fenced us mid-round: the plan is void, start nothing.
                return
            log.info("%s", task)
            try:
                self._execute(task)
            except SystemdError as exc:
                # fleet's rule: stop at the first failure; the next round plans again.
                log.error("%s failed: %s", task, exc)
                break
        self._publish(snap)

    def _execute(self, task: Task) -> None:
        # The watchdog thread may fence (and stop everything) at any moment: each systemd call
        # and the fenced check before it are one step under this lock.
        with self._systemd:
            if self._fenced and task.kind in (TaskKind.LOAD, TaskKind.START):
                return
            self._execute_locked(task)

    def _execute_locked(self, task: Task) -> None:
        if task.kind is TaskKind.STOP:
            self.manager.stop(task.unit)
            self._started = {s for s in self._started if s[0] != task.unit}
        elif task.kind is TaskKind.UNLOAD:
            self.manager.unload(task.unit)
            self._started = {s for s in self._started if s[0] != task.unit}
        elif task.kind is TaskKind.LOAD:
            self.manager.load(task.unit, task.text)
        elif task.kind is TaskKind.RELOAD:
            self.manager.reload()
        elif task.kind is TaskKind.START:
            self.manager.start(task.unit)
            self._started.add((task.unit, task.hash))
        elif task.kind is TaskKind.RELEASE:
            self.registry.release(task.unit, self.me)

    def _publish(self, snap: Snapshot) -> None:
        """Publish the systemd state of every unit we have loaded; withdraw the rest."""
        if self._lease is None:
            return
        loaded = self.manager.loaded_units()
        states: dict[str, SystemdState] = self.manager.states(loaded) if loaded else {}
        now = self.wall()
        for name, digest in loaded.items():
            state = states.get(name)
            if state is None:
                continue
            last_active, since = self._since.get(name, ("", now))
            if last_active != state.active:
                since = now
            self._since[name] = (state.active, since)
            current = PublishedState(
                self.me, state.load, state.active, state.sub, digest, since, state.container
            )
            if self._published.get(name) != current:
                self.registry.publish_state(name, current, self._lease)
                self._published[name] = current
        stale = {n for n, per in snap.states.items() if self.me in per} | set(self._published)
        for name in stale - set(loaded):
            self.registry.delete_state(name, self.me)
            self._published.pop(name, None)
            self._since.pop(name, None)

    def _stop_everything(self, reason: str) -> None:
        with self._systemd:
            self._stop_everything_locked(reason)

    def _stop_everything_locked(self, reason: str) -> None:
        loaded = self.manager.loaded_units()
        if not loaded:
            return
        states = self.manager.states(loaded)
        for name in sorted(loaded):
            state = states.get(name)
            if state is not None and state.active in ("active", "activating", "reloading"):
                log.warning("stop %s: %s", name, reason)
                try:
                    self.manager.stop(name)
                except SystemdError as exc:
                    log.error("stop %s failed: %s", name, exc)
        self._started.clear()

    # --------------------------------------------------------------------------- shutdown

    def stop(self, leave: bool = True) -> None:
        """End the loops. With leave=False the agent just vanishes, as in a power cut: nothing is
        stopped or released and the lease runs out by itself (used by failure tests)."""
        self._leave = leave
        self._stopping.set()
        self._wake.set()

    def _shutdown(self) -> None:
        """Stop and unload our units, then revoke the lease: ownership, published states and
        presence vanish in one step and the other machines race for the units at once."""
        if self._cancel_watch is not None:
            self._cancel_watch()
        self.notifier.send("STOPPING=1")
        if not self._leave:
            log.info("vanishing without leaving the cluster")
            self._close_registry()
            return
        log.info("shutting down: stopping units and leaving the cluster")
        try:
            loaded = self.manager.loaded_units()
            states = self.manager.states(loaded) if loaded else {}
            for name in sorted(loaded):
                state = states.get(name)
                if state is not None and state.active in ("active", "activating", "reloading"):
                    self.manager.stop(name)
            self._wait_stopped(set(loaded), timeout=max(5.0, self.config.agent_ttl))
            for name in sorted(loaded):
                self.manager.unload(name)
            if loaded:
                self.manager.reload()
        except SystemdError as exc:
            log.error("could not take every unit down: %s", exc)
        if self._lease is not None:
            try:
                self.registry.revoke(self._lease)
            except RegistryUnavailable as exc:
                log.warning("could not revoke the lease (it expires by itself): %s", exc)
        self._close_registry()
        log.info("stopped")

    def _close_registry(self) -> None:
        if self._owns_registry:
            self.registry.close()

    def _wait_stopped(self, names: set[str], timeout: float) -> None:
        deadline = self.clock() + timeout
        while names and self.clock() < deadline:
            states = self.manager.states(names)
            if all(s.active in ("inactive", "failed") for s in states.values()):
                return
            time.sleep(0.1)
