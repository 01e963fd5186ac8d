"""Hollow machines: many real agents in one process, for the scale benchmark.

Each hollow machine is a real `fleetd.agent.Agent` (lease keeper, fencer, mirror, executor,
publisher, reconciler) with the in-memory unit manager, and keeps its own lease, owner keys,
claims and published states. What they share is what is honest to share: one etcd connection,
one watch, one registry snapshot and its incremental plan (one `Mirror`), since every agent would
compute the same from the same registry.

They do not get three threads each (600 threads for 200 machines starve each other of the
interpreter lock until leases expire). Two threads drive them all through the same steps the
agent's own loops call, and the deterministic tests use: one ticks every lease keeper and fencer
when due, so reconcile work can never delay a keep-alive; the other runs a reconcile round of
every machine after each burst of registry changes, or when its staggered bid falls due.

One turn of that thread is one round of every machine (run by a few workers, so that the
machines' claims and writes overlap on the wire as they would from separate hosts), and all of
them plan from the same picture (`HeldMirror`): without it each machine's claims would change
the registry under the next machine, and every round would copy, index and re-plan 10,000
units for itself, 200 times in a row in one process, where real machines do it side by side.
A picture one turn old costs at most lost claims: every claim is checked by its transaction.

Before a turn, the host waits (at most CLAIM_SETTLE) until the picture shows the claims its
machines won in the turns before. One watch applying the events of 200 machines in one
interpreter falls a second or more behind etcd at the height of a placement, where each real
machine's own watch shows its claims within milliseconds (and the real agent waits CLAIM_WAIT for
them). Without the wait, the turns after planned from pictures that lacked those claims: a
favourite that held back its bids until it saw its own claims looked slow to the machines
ranked after it, which took its units (2 of 8 runs ended with a 49-51 balance, one later run
43-57).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fleetd.agent import Agent, ExitMode
from fleetd.agent.mirror import Mirror
from fleetd.agent.reconcile import CLAIM_SETTLE
from fleetd.config import Config
from fleetd.errors import RegistryUnavailable, SystemdError
from fleetd.fake_systemd import FakeUnitManager
from fleetd.metrics import Metrics
from fleetd.placement import Placement
from fleetd.registry import EtcdRegistry
from fleetd.snapshot import Snapshot

log = logging.getLogger("fleetd")

WORKERS = 8  # reconcile rounds run side by side in one turn


class ClaimCounter(Metrics):
    """Claims won and lost by all the hollow machines: the conflict fraction of optimistic,
    leaderless placement (each lost claim is a transaction etcd refused)."""

    def __init__(self) -> None:
        self.won = 0
        self.lost = 0
        self._lock = threading.Lock()

    def claim(self, won: bool) -> None:
        with self._lock:
            if won:
                self.won += 1
            else:
                self.lost += 1


class HeldMirror(Mirror):
    """A mirror whose plan (and with it the copy and View) stays the same while held."""

    def __init__(self, registry: EtcdRegistry, wake: Callable[[], None]) -> None:
        super().__init__(registry, wake)
        self._holding = False
        self._held: tuple[Snapshot, Mapping[str, Placement]] | None = None
        self._hold_lock = threading.Lock()

    def hold(self) -> None:
        self._holding, self._held = True, None

    def release(self) -> None:
        self._holding, self._held = False, None

    def plan(
        self,
        window: Callable[[Snapshot], int],
        planned: Callable[[float], None] | None = None,
        plain_share: int = 1,
    ) -> tuple[Snapshot, Mapping[str, Placement]]:
        with self._hold_lock:
            if self._holding and self._held is not None:
                return self._held
            result = super().plan(window, planned, plain_share)
            if self._holding:
                self._held = result
            return result


@dataclass
class Hollow:
    name: str
    agent: Agent
    manager: FakeUnitManager
    lease_due: float = 0.0
    fence_due: float = 0.0
    step_due: float = 0.0
    # Held while the machine is driven (a lease step, a round) and by halt and kill, which mark
    # it gone: a machine being stopped is driven no more (a keep-alive of its revoked lease
    # would report the lease expired).
    lock: threading.Lock = field(default_factory=threading.Lock)
    gone: bool = False


class HollowHost:
    """Hollow machines against one etcd; `start()` the two driving threads, `stop()` at the end."""

    def __init__(
        self, endpoints: list[str], prefix: str, ttl: float = 10.0, stagger: float = 1.0
    ) -> None:
        self.endpoints = endpoints
        self.prefix = prefix
        self.ttl = ttl
        self.stagger = stagger
        self.registry = EtcdRegistry(endpoints, prefix, timeout=3.0)
        self._changed = threading.Event()
        self.mirror = HeldMirror(self.registry, self._changed.set)
        self.machines: dict[str, Hollow] = {}
        self.claims = ClaimCounter()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._workers = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="hollow")
        self._lease_workers = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="lease")
        # Seconds each turn waited for the picture to show earlier claims (for the benchmark).
        self.catch_up_waits: list[float] = []

    def add(self, name: str, metadata: Mapping[str, str] | None = None) -> Hollow:
        config = Config(
            etcd_servers=tuple(self.endpoints),
            etcd_key_prefix=self.prefix,
            machine_id=uuid.uuid4().hex,
            public_ip="127.0.0.1",
            metadata=dict(metadata or {}),
            agent_ttl=self.ttl,
            hostname=name,
            claim_stagger=self.stagger,
        )
        manager = FakeUnitManager()
        agent = Agent(
            config, self.registry, manager, owns_registry=False, mirror=self.mirror,
            metrics=self.claims,
        )
        agent.start_up()
        hollow = Hollow(name, agent, manager)
        with self._lock:
            self.machines[name] = hollow
        return hollow

    def start(self) -> None:
        for target, name in ((self._lease_loop, "hollow-lease"), (self._step_loop, "hollow-step")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _each(self) -> list[Hollow]:
        with self._lock:
            return list(self.machines.values())

    def _lease_loop(self) -> None:
        while not self._stopping.is_set():
            now = time.monotonic()
            due = [h for h in self._each() if now >= min(h.lease_due, h.fence_due)]
            # Keep-alives are round trips: several at once, as separate hosts would send them.
            for _ in self._lease_workers.map(self._lease_step, due, [now] * len(due)):
                pass
            waits = [min(h.lease_due, h.fence_due) - now for h in self._each()]
            self._stopping.wait(max(0.01, min([0.2, *waits])))

    def _lease_step(self, hollow: Hollow, now: float) -> None:
        with hollow.lock:
            if not hollow.gone:
                self._lease_tick(hollow, now)

    def _lease_tick(self, hollow: Hollow, now: float) -> None:
        agent = hollow.agent
        try:
            if now >= hollow.lease_due:
                hollow.lease_due = now + agent.keeper.tick()
            if now >= hollow.fence_due:
                hollow.fence_due = now + min(0.5, agent.fencer.tick())
        except Exception:
            log.exception("hollow %s: lease step failed", hollow.name)
            hollow.lease_due = now + 0.5

    def _step_loop(self) -> None:
        while not self._stopping.is_set():
            changed = self._changed.wait(0.25)
            if changed:
                # Let a burst of events land, as the agent's own loop does.
                self._stopping.wait(Agent.COALESCE)
                self._changed.clear()
            self._catch_up()
            now = time.monotonic()
            self.mirror.hold()
            try:
                self._turn(changed, now)
            finally:
                self.mirror.release()

    def _catch_up(self) -> None:
        """Wait until the picture shows every claim the machines won and may not see yet."""
        awaiting = [(h.agent.me, u) for h in self._each() for u in h.agent.reconciler.awaiting()]
        if not awaiting:
            return
        started = time.monotonic()
        self.mirror.wait_until(
            lambda live: all(live.owner_of(unit) == me for me, unit in awaiting), CLAIM_SETTLE
        )
        self.catch_up_waits.append(time.monotonic() - started)

    def _turn(self, changed: bool, now: float) -> None:
        due = [h for h in self._each() if changed or now >= h.step_due]
        for _ in self._workers.map(self._round, due, [now] * len(due)):
            pass

    def _round(self, hollow: Hollow, now: float) -> None:
        with hollow.lock:
            if not hollow.gone:
                self._round_of(hollow, now)

    def _round_of(self, hollow: Hollow, now: float) -> None:
        agent = hollow.agent
        try:
            stopping = agent.step()
        except (RegistryUnavailable, SystemdError) as exc:
            log.warning("hollow %s: round failed: %s", hollow.name, exc)
            stopping = True
        except Exception:
            # A bug, not a fault: loud even when the benchmark quiets the agents' logs.
            log.exception("hollow %s: round failed", hollow.name)
            stopping = True
        due = now + (0.25 if stopping else 1.0)
        wake = agent.reconciler.next_wake
        if wake is not None:
            due = min(due, wake)
        hollow.step_due = due

    def halt(self, name: str) -> None:
        """A graceful stop (SIGTERM): units stopped, the lease revoked."""
        with self._lock:
            hollow = self.machines.pop(name)
        with hollow.lock:
            hollow.gone = True
        hollow.agent.stop()
        hollow.agent.shutdown()

    def kill(self, name: str) -> None:
        """A power cut: the machine is no longer driven; its lease runs out by itself."""
        with self._lock:
            hollow = self.machines.pop(name)
        with hollow.lock:
            hollow.gone = True
        hollow.agent.stop(mode=ExitMode.VANISH)

    def stop(self) -> None:
        for name in list(self.machines):
            self.halt(name)
        self._stopping.set()
        for thread in self._threads:
            thread.join(30)
        self._workers.shutdown()
        self._lease_workers.shutdown()
        self.mirror.close()
        self.registry.close()


__all__ = ["ClaimCounter", "Hollow", "HollowHost"]
