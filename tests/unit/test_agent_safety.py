"""The agent's safety promise, driven step by step with a fake registry, fake systemd managers
and a fake clock: no thread, no sleep, every instant chosen by the test.

- fencing: units get SIGTERM at deadline - margin and SIGKILL half a margin before the deadline,
  measured from the *send* time of the last keep-alive, and nothing starts while fenced;
- release ordering: a unit that moves (Replaces, metadata, destroy) is released only once its
  manager reports it stopped, and says "deactivating" with the reason meanwhile;
- restart adoption: a fleetd that exits for a restart (or is killed) leaves its units running; a
  successor within the lease adopts them with the same MainPID, else the guard stops them before
  the lease expires;
- isolation: bad registry entries and failing units never stop a round.

At every step the tests check that no unit runs on two machines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from fleetd.agent import Agent, ExitMode
from fleetd.agent.lease import LeaseFile
from fleetd.agent.reconcile import CLAIM_SETTLE, CLAIM_TURNS, SETTLE_WINDOW
from fleetd.clock import FakeClock
from fleetd.config import Config
from fleetd.errors import RegistryUnavailable, SystemdError
from fleetd.fake_registry import FakeRegistry
from fleetd.fake_systemd import FakeUnitManager
from fleetd.guard import Guard
from fleetd.model import DesiredState, Machine, PublishedState, SystemdState
from fleetd.snapshot import UnitRecord
from fleetd.unitfile import content_hash

TTL = 10.0
MARGIN = 3.0  # Config's automatic margin for a 10 s TTL


def unit(description: str = "u", xfleet: str = "") -> str:
    text = f"[Unit]\nDescription={description}\n\n[Service]\nExecStart=/bin/sleep 1000\n"
    return text + (f"\n[X-Fleet]\n{xfleet}\n" if xfleet else "")


class Cluster:
    """Agents on one fake registry and one fake clock; `settle()` turns every agent a few times
    and checks after every single step that no unit runs on two machines."""

    def __init__(self, tmp_path: Path) -> None:
        self.clock = FakeClock()
        self.registry = FakeRegistry(clock=self.clock)
        self.tmp_path = tmp_path
        self.agents: dict[str, Agent] = {}
        self.managers: dict[str, FakeUnitManager] = {}

    def add(
        self,
        name: str,
        metadata: dict[str, str] | None = None,
        manager: FakeUnitManager | None = None,
        join: bool = True,
    ) -> Agent:
        machine_id = (name * 32)[:32].encode().hex()[:32]
        config = Config(
            machine_id=machine_id,
            hostname=name,
            agent_ttl=TTL,
            claim_stagger=0.0,
            metadata=metadata or {},
        )
        manager = manager or self.managers.get(name) or FakeUnitManager()
        agent = Agent(
            config,
            self.registry,
            manager,
            clock=self.clock,
            wall=self.clock,
            owns_registry=False,
            lease_file=LeaseFile(self.tmp_path / name / "lease.json"),
            guard_argv=["guard", name],
            settle=0.0,
        )
        self.agents[name] = agent
        self.managers[name] = manager
        if join:
            agent.start_up()
            agent.keeper.tick()
            self.step(name)
        return agent

    def step(self, name: str) -> None:
        self.agents[name].step()
        self.check()

    def settle(self, rounds: int = 4) -> None:
        for _ in range(rounds):
            for name in list(self.agents):
                self.step(name)

    def submit(self, units: dict[str, str]) -> None:
        records = [UnitRecord(n, t, content_hash(t)) for n, t in units.items()]
        assert self.registry.write_units(records, DesiredState.LAUNCHED, self.registry.snapshot())

    def running(self, unit_name: str) -> set[str]:
        """Machines whose manager runs the unit (a stopping unit still runs)."""
        out = set()
        for name, manager in self.managers.items():
            state = manager.states([unit_name])[unit_name]
            if state.active in ("active", "activating", "deactivating"):
                out.add(name)
        return out

    def check(self) -> None:
        names = {n for m in self.managers.values() for n in m.loaded_units()}
        names |= set(self.registry.snapshot().units)
        for name in names:
            assert len(self.running(name)) <= 1, f"{name} runs on {self.running(name)}"

    def owner(self, unit_name: str) -> str | None:
        owner = self.registry.snapshot().owner_of(unit_name)
        for name, agent in self.agents.items():
            if agent.me == owner:
                return name
        return owner

    def published(self, unit_name: str, machine: str) -> PublishedState | None:
        states = self.registry.snapshot().states.get(unit_name, {})
        return states.get(self.agents[machine].me)


@pytest.fixture
def cluster(tmp_path: Path) -> Cluster:
    return Cluster(tmp_path)


def advance_to(cluster: Cluster, instant: float) -> None:
    cluster.clock.advance(max(0.0, instant - cluster.clock()))


# ----------------------------------------------------------------------------------- fencing


def test_fencing_stops_then_kills_before_the_deadline_counted_from_the_send_time(
    cluster: Cluster,
) -> None:
    a = cluster.add("a")
    cluster.managers["a"].slow_stop.add("u.service")  # ignores SIGTERM
    cluster.submit({"u.service": unit()})
    cluster.settle()
    assert cluster.running("u.service") == {"a"}

    # The keep-alive is sent at t0, its answer takes 2 s: the deadline is t0 + TTL.
    sent = cluster.clock()
    slow = cluster.registry.keepalive

    def late_answer(lease_id: int) -> float:
        remaining = slow(lease_id)
        cluster.clock.advance(2.0)
        return remaining

    cluster.registry.keepalive = late_answer  # type: ignore[method-assign]
    a.keeper.tick()
    cluster.registry.keepalive = slow  # type: ignore[method-assign]
    deadline = a.lease().deadline
    assert deadline == sent + TTL

    cluster.registry.unavailable = True  # partitioned from etcd from now on
    advance_to(cluster, deadline - MARGIN - 0.01)
    a.keeper.tick()
    a.fencer.tick()
    assert cluster.managers["a"].states(["u.service"])["u.service"].active == "active"

    advance_to(cluster, deadline - MARGIN)
    a.fencer.tick()
    assert cluster.managers["a"].states(["u.service"])["u.service"].active == "deactivating"
    # Nothing starts while fenced, whatever the registry says.
    a.step()
    assert cluster.managers["a"].kills == []

    advance_to(cluster, deadline - MARGIN / 2)
    a.fencer.tick()
    assert cluster.managers["a"].kills == ["u.service"]
    assert cluster.running("u.service") == set()
    assert cluster.clock() < deadline

    # The lease runs out in etcd; another machine takes the unit, and the healed machine joins
    # again with a new lease without taking it back.
    cluster.registry.unavailable = False
    advance_to(cluster, deadline + 0.01)
    cluster.registry.expire()
    cluster.add("b")
    cluster.settle()
    assert cluster.running("u.service") == {"b"}
    a.keeper.tick()  # finds its lease gone
    a.keeper.tick()  # takes a new one and registers
    assert a.lease().registered
    cluster.settle()
    assert cluster.running("u.service") == {"b"}


def test_rounds_wait_patiently_for_states_but_the_fencer_never_does(cluster: Cluster) -> None:
    """A manager busy forking a batch of just-started units answers a state read only when it
    is done: the reconcile round waits the full call timeout for it (it failed after the short
    one, then waited a backoff), while every read of the fencer keeps the short timeout."""
    a = cluster.add("a")
    manager = cluster.managers["a"]
    real_states = manager.states
    reads: list[bool] = []
    recording = False

    def states(names: Iterable[str], patient: bool = False) -> dict[str, SystemdState]:
        if recording:  # the agent's reads, not the test's own checks
            reads.append(patient)
        return real_states(names, patient)

    manager.states = states  # type: ignore[method-assign]
    cluster.submit({"u.service": unit(), "v.service": unit()})
    recording = True
    for _ in range(3):
        a.step()
    recording = False
    assert cluster.running("u.service") == {"a"}
    assert reads and all(reads)
    reads.clear()
    cluster.registry.unavailable = True
    advance_to(cluster, a.lease().deadline - MARGIN)
    recording = True
    a.fencer.tick()
    recording = False
    assert cluster.running("u.service") == set()
    assert reads and not any(reads)


def test_a_start_racing_with_fencing_is_stopped_again(cluster: Cluster) -> None:
    a = cluster.add("a")
    manager = cluster.managers["a"]
    real_start = manager.start

    def start_then_lose_the_lease(name: str) -> None:
        real_start(name)
        cluster.clock.advance(TTL)  # the start call took "forever": fencing is due

    manager.start = start_then_lose_the_lease  # type: ignore[method-assign]
    cluster.submit({"u.service": unit()})
    with pytest.raises(RegistryUnavailable):
        # The round that wins the claim starts the unit; the lease expired meanwhile, so
        # publishing the state fails and the loop retries.
        a.step()
    assert manager.states(["u.service"])["u.service"].active == "inactive"


def test_the_round_that_wins_a_claim_starts_the_unit(cluster: Cluster) -> None:
    """The watch shows a won claim within milliseconds: the round that won it waits for that
    and acts on the new picture, rather than leaving the load and start to a round one wake and
    one planning pass later."""
    a = cluster.add("a")
    cluster.submit({"u.service": unit(), "v.service": unit()})
    cluster.step("a")
    assert cluster.owner("u.service") == cluster.owner("v.service") == "a"
    assert cluster.running("u.service") == cluster.running("v.service") == {"a"}
    published = cluster.published("u.service", "a")
    assert published is not None and published.active == "active"
    assert a.reconciler.claim_wait > 0


def test_claims_the_watch_does_not_show_yet_are_acted_on_next_time(cluster: Cluster) -> None:
    """Level-triggered all the same: a round acts only on what the picture holds. When the
    watch lags behind the claims, the round waits a bounded while, starts nothing, and the round
    after the watch caught up starts the units."""
    a = cluster.add("a")
    a.reconciler.claim_wait = 0.01  # real seconds: the wait is on the watch thread, not a clock
    cluster.submit({"u.service": unit(), "v.service": unit()})
    cluster.registry.hold_watch()
    cluster.step("a")
    assert cluster.owner("u.service") == cluster.owner("v.service") == "a"
    assert cluster.running("u.service") == cluster.running("v.service") == set()
    cluster.registry.release_watch()
    cluster.step("a")
    assert cluster.running("u.service") == cluster.running("v.service") == {"a"}


def land_during_claims(cluster: Cluster, parts: list[dict[str, str]]) -> list[list[str]]:
    """Write the next of `parts` while each claim transaction is on its way (the rest of a
    submission landing after the agent planned); returns the units of every claim sent."""
    sent: list[list[str]] = []
    real_many = cluster.registry.claim_many

    def claim_many(units: Mapping[str, int], *args: Any) -> dict[str, bool]:
        sent.append(sorted(units))
        won = real_many(units, *args)
        if parts:
            cluster.submit(parts.pop(0))
        return won

    cluster.registry.claim_many = claim_many  # type: ignore[method-assign]
    return sent


def test_units_that_land_while_a_round_claims_are_claimed_before_it_acts(
    cluster: Cluster,
) -> None:
    """A submission is several transactions, and a round may plan when only the first landed:
    it bids again on the picture that shows its claims before it loads and starts anything, so
    the rest is claimed then and loaded and started with the first share in one batch, not one
    load-and-start later."""
    a = cluster.add("a")
    manager = cluster.managers["a"]
    batches: list[list[str]] = []
    real_load_many = manager.load_many

    def load_many(units: Mapping[str, str]) -> dict[str, Exception]:
        batches.append(sorted(units))
        return real_load_many(units)

    manager.load_many = load_many  # type: ignore[method-assign]
    first = {f"w@{i}.service": unit(f"w{i}") for i in range(3)}
    rest = {f"w@{i}.service": unit(f"w{i}") for i in range(3, 6)}
    sent = land_during_claims(cluster, [rest])
    cluster.submit(first)
    a.step()
    assert sent == [sorted(first), sorted(rest)]
    assert batches == [sorted(first | rest)]
    for name in first | rest:
        assert cluster.owner(name) == "a" and cluster.running(name) == {"a"}


def test_a_round_whose_wait_brought_only_its_claims_acts_without_planning_again(
    cluster: Cluster,
) -> None:
    """The common case: nothing but claims landed while the round waited for its own, so it
    loads and starts at once instead of planning a picture that holds no new unit."""
    a = cluster.add("a")
    passes: list[int] = []
    real_plan = a.mirror.plan

    def plan(*args: Any, **kwargs: Any) -> Any:
        passes.append(1)
        return real_plan(*args, **kwargs)

    a.mirror.plan = plan  # type: ignore[method-assign]
    cluster.submit({f"w@{i}.service": unit(f"w{i}") for i in range(3)})
    a.step()
    assert len(passes) == 1
    for i in range(3):
        assert cluster.running(f"w@{i}.service") == {"a"}


def test_a_stream_of_new_units_does_not_hold_a_rounds_starts_back(cluster: Cluster) -> None:
    """Bidding again is bounded: with units landing during every claim, the round acts after
    CLAIM_TURNS turns on what it holds, and the next round claims the rest."""
    a = cluster.add("a")
    parts = [{f"w@{p}{i}.service": unit(f"w{p}{i}") for i in range(2)} for p in range(6)]
    sent = land_during_claims(cluster, parts[1:])
    cluster.submit(parts[0])
    a.step()
    assert len(sent) == CLAIM_TURNS
    claimed = {name for batch in sent for name in batch}
    for name in claimed:
        assert cluster.running(name) == {"a"}
    waiting = {name for part in parts for name in part} - claimed
    assert waiting and all(cluster.owner(name) is None for name in waiting)
    cluster.settle()
    for part in parts:
        for name in part:
            assert cluster.running(name) == {"a"}


def test_a_round_with_nothing_to_do_reads_systemd_once(cluster: Cluster) -> None:
    """The states a round read before its tasks are what it publishes when no task ran; after
    tasks it reads them back, so what it publishes is systemd's word, not its intent."""
    a = cluster.add("a")
    manager = cluster.managers["a"]
    reads: list[list[str]] = []
    real_states = manager.states

    def counted(names: Iterable[str], patient: bool = False) -> dict[str, SystemdState]:
        wanted = list(names)
        reads.append(wanted)
        return real_states(wanted, patient)

    manager.states = counted  # type: ignore[method-assign]
    cluster.submit({"u.service": unit()})
    a.step()  # claims, loads and starts: a read before the tasks, one after
    assert len(reads) == 2
    assert real_states(["u.service"])["u.service"].active == "active"
    reads.clear()
    manager.kill("u.service")  # systemd's news (the process died), no task of ours
    a.step()
    assert reads == [["u.service"]]
    published = cluster.published("u.service", "a")
    assert published is not None and published.active == "failed"


def test_agents_sharing_a_mirror_act_on_claims_in_their_next_round(tmp_path: Path) -> None:
    """A simulator's agents share one mirror: one that waited for its claims would have the
    mirror build a picture of each agent's own revision."""
    registry = FakeRegistry(clock=FakeClock())
    own = Agent(Config(machine_id="a" * 32), registry, FakeUnitManager(), owns_registry=False,
                lease_file=LeaseFile(tmp_path / "a.json"))
    shared = Agent(Config(machine_id="b" * 32), registry, FakeUnitManager(), owns_registry=False,
                   mirror=own.mirror, lease_file=LeaseFile(tmp_path / "b.json"))
    assert own.reconciler.claim_wait > 0
    assert shared.reconciler.claim_wait == 0


def test_a_batch_of_starts_racing_with_fencing_is_stopped_again(cluster: Cluster) -> None:
    """The starts of a round go to systemd together; when fencing began while they were on their
    way, every unit of the batch that started is taken down again in the same round."""
    a = cluster.add("a")
    manager = cluster.managers["a"]
    started: list[list[str]] = []
    real_start_many = manager.start_many

    def start_many_then_lose_the_lease(names: Sequence[str]) -> dict[str, Exception]:
        started.append(list(names))
        failures = real_start_many(names)
        cluster.clock.advance(TTL)  # the calls took "forever": fencing is due
        return failures

    manager.start_many = start_many_then_lose_the_lease  # type: ignore[method-assign]
    cluster.submit({"u.service": unit(), "v.service": unit()})
    with pytest.raises(RegistryUnavailable):
        a.step()  # claims, then starts both
    assert started == [["u.service", "v.service"]]
    states = manager.states(["u.service", "v.service"])
    assert {s.active for s in states.values()} == {"inactive"}


def test_hung_systemd_call_does_not_block_fencing(cluster: Cluster) -> None:
    a = cluster.add("a")
    manager = cluster.managers["a"]
    cluster.submit({"steady.service": unit("steady", f"MachineID={a.me}")})
    cluster.settle()
    assert cluster.running("steady.service") == {"a"}
    release = threading.Event()
    entered = threading.Event()
    real_start = manager.start

    def hanging_start(name: str) -> None:
        if name == "hang.service":
            entered.set()
            release.wait(30)
        real_start(name)

    manager.start = hanging_start  # type: ignore[method-assign]
    cluster.submit({"hang.service": unit("hang", f"MachineID={a.me}")})
    a.step()  # the claim

    def one_round() -> None:
        with contextlib.suppress(RegistryUnavailable):  # partitioned by the time it publishes
            a.step()

    round_thread = threading.Thread(target=one_round, daemon=True)
    round_thread.start()
    assert entered.wait(10)
    try:
        cluster.registry.unavailable = True
        advance_to(cluster, a.lease().deadline - MARGIN)
        fencing = threading.Thread(target=a.fencer.tick, daemon=True)
        fencing.start()
        fencing.join(10)
        assert not fencing.is_alive(), "fencing waited for the hung start"
        assert manager.states(["steady.service"])["steady.service"].active == "inactive"
    finally:
        release.set()
        round_thread.join(10)


# --------------------------------------------------------------------------- release order


def test_replaced_unit_is_released_only_after_it_stopped(cluster: Cluster) -> None:
    cluster.add("a")
    cluster.add("b")
    cluster.submit({"old.service": unit("old")})
    cluster.settle()
    home = cluster.owner("old.service")
    assert home is not None and cluster.running("old.service") == {home}
    cluster.managers[home].slow_stop.add("old.service")
    cluster.submit({"new.service": unit("new", "Replaces=old.service")})
    cluster.settle()
    # Stopping, not released: the other machine cannot claim it yet.
    assert cluster.owner("old.service") == home
    assert cluster.running("old.service") == {home}
    state = cluster.published("old.service", home)
    assert state is not None and state.active == "deactivating"
    assert "replaced by new.service" in state.reason
    # The replacing unit waits too: the two never run side by side.
    assert cluster.owner("new.service") == home
    assert cluster.running("new.service") == set()
    cluster.settle()
    assert cluster.owner("old.service") == home
    # The stop completes (the unit's own stop timeout ran out): released, started elsewhere.
    cluster.managers[home].finish_stop("old.service")
    cluster.settle()
    other = ({"a", "b"} - {home}).pop()
    assert cluster.owner("old.service") == other
    assert cluster.running("old.service") == {other}
    assert cluster.running("new.service") == {home}


@pytest.mark.parametrize("move", ["metadata", "destroy", "rebalance"])
def test_moves_wait_for_the_stop(cluster: Cluster, move: str) -> None:
    cluster.add("a", {"disk": "ssd"})
    cluster.add("b", {"disk": "ssd"})
    cluster.submit({"s.service": unit("s", "MachineMetadata=disk=ssd")})
    cluster.settle()
    home = cluster.owner("s.service")
    assert home is not None
    other = ({"a", "b"} - {home}).pop()
    cluster.managers[home].slow_stop.add("s.service")
    agent = cluster.agents[home]
    if move == "metadata":
        agent.update_config(dataclasses.replace(agent.config, metadata={"disk": "hdd"}))
    elif move == "destroy":
        cluster.registry.destroy(["s.service"])
    else:
        cluster.registry.request_move("s.service", cluster.agents[other].me)
    cluster.settle()
    assert cluster.running("s.service") == {home}
    assert cluster.owner("s.service") == home
    state = cluster.published("s.service", home)
    assert state is not None and state.active == "deactivating" and state.reason
    cluster.managers[home].finish_stop("s.service")
    cluster.settle()
    if move == "destroy":
        assert cluster.owner("s.service") is None
        assert cluster.running("s.service") == set()
    else:
        assert cluster.running("s.service") == {other}
    assert "s.service" not in cluster.managers[home].loaded_units()


# -------------------------------------------------------------------------- restart adoption


@pytest.mark.parametrize("how", ["sigusr2", "sigkill"])
def test_successor_within_the_lease_adopts_the_units_without_restarting_them(
    cluster: Cluster, how: str
) -> None:
    a = cluster.add("a")
    cluster.submit({f"u{i}.service": unit(f"u{i}") for i in range(3)})
    cluster.settle()
    manager = cluster.managers["a"]
    names = [f"u{i}.service" for i in range(3)]
    pids = manager.main_pids(names)
    assert all(pids.values())
    owners = {n: cluster.registry.snapshot().owners[n].revision for n in names}
    lease = a.lease().lease_id
    if how == "sigusr2":
        a.stop(mode=ExitMode.RESTART)
        a.shutdown()
    # (sigkill: the process is simply gone; its last lease file stays.)
    cluster.clock.advance(TTL - MARGIN - 1.0)  # back before fencing would be due
    calls: list[str] = []
    for method in ("start", "stop", "kill", "unload"):
        real = getattr(manager, method)

        def record(name: str, _real: Callable[[str], None] = real, _m: str = method) -> None:
            calls.append(f"{_m} {name}")
            _real(name)

        setattr(manager, method, record)
    seen: list[str] = []
    cancel = cluster.registry.watch(
        cluster.registry.snapshot().revision + 1,
        lambda batch: seen.extend(e.key for e in batch) if isinstance(batch, list) else None,
    )
    successor = cluster.add("a")
    cancel()
    assert successor.lease().lease_id == lease
    # The machine announces itself again (a new version may have come with the restart).
    assert cluster.registry.layout.machine(a.me) in seen
    cluster.settle()
    assert calls == []
    assert manager.main_pids(names) == pids
    snap = cluster.registry.snapshot()
    assert {n: snap.owners[n].revision for n in names} == owners
    assert all(snap.states[n][successor.me].active == "active" for n in names)


def test_without_a_successor_the_guard_stops_the_units_before_the_lease_expires(
    cluster: Cluster,
) -> None:
    a = cluster.add("a")
    manager = cluster.managers["a"]
    manager.slow_stop.add("u.service")
    cluster.submit({"u.service": unit()})
    cluster.settle()
    assert list(manager.guards.values()) == [["guard", "a"]]
    deadline = a.lease().deadline
    a.stop(mode=ExitMode.RESTART)
    a.shutdown()
    guard = Guard(LeaseFile(cluster.tmp_path / "a" / "lease.json"), manager, MARGIN, cluster.clock)
    advance_to(cluster, deadline - MARGIN - 0.01)
    assert guard.tick()
    assert cluster.running("u.service") == {"a"}
    advance_to(cluster, deadline - MARGIN)
    assert guard.tick()
    assert manager.states(["u.service"])["u.service"].active == "deactivating"
    advance_to(cluster, deadline - MARGIN / 2)
    assert guard.tick()
    assert cluster.running("u.service") == set()
    assert cluster.clock() < deadline
    advance_to(cluster, deadline + 0.01)
    assert not guard.tick()  # that lease is over: nothing left to guard
    cluster.registry.expire()
    cluster.add("b")
    cluster.settle()
    assert cluster.running("u.service") == {"b"}
    # The machine's fleetd comes back late: new lease, the unit stays where it is.
    del cluster.agents["a"]
    late = cluster.add("a")
    assert late.lease().lease_id != a.lease().lease_id
    cluster.settle()
    assert cluster.running("u.service") == {"b"}


def test_drain_releases_everything_and_removes_the_lease_file(cluster: Cluster) -> None:
    a = cluster.add("a")
    cluster.submit({"u.service": unit()})
    cluster.settle()
    a.stop(mode=ExitMode.DRAIN)
    a.shutdown()
    snap = cluster.registry.snapshot()
    assert a.me not in snap.machines and "u.service" not in snap.owners
    assert cluster.managers["a"].loaded_units() == {}
    assert not (cluster.tmp_path / "a" / "lease.json").exists()


def test_a_drain_reads_the_stopping_units_again_when_a_state_read_times_out(
    cluster: Cluster,
) -> None:
    """A manager busy taking many units down may answer a state read late: the drain asks
    again rather than give up and leave the lease to expire (the others would wait a TTL)."""
    a = cluster.add("a")
    manager = cluster.managers["a"]
    cluster.submit({"u.service": unit(), "v.service": unit()})
    cluster.settle()
    real_states = manager.states
    late: list[int] = []
    stopped: list[str] = []

    def states(names: Iterable[str]) -> dict[str, SystemdState]:
        wanted = list(names)
        if stopped and not late:
            late.append(len(wanted))
            raise SystemdError("systemd could not read the state of 2 units: Timeout was reached")
        return real_states(wanted)

    real_stop_many = manager.stop_many

    def stop_many(names: Sequence[str]) -> dict[str, Exception]:
        stopped.extend(names)
        return real_stop_many(names)

    manager.states = states  # type: ignore[method-assign]
    manager.stop_many = stop_many  # type: ignore[method-assign]
    a.stop(mode=ExitMode.DRAIN)
    a.shutdown()
    assert late == [2]
    snap = cluster.registry.snapshot()
    assert a.me not in snap.machines and not snap.owners
    assert manager.loaded_units() == {}


def test_units_of_an_earlier_run_without_a_lease_are_stopped_before_joining(
    cluster: Cluster,
) -> None:
    manager = FakeUnitManager()
    manager.load("orphan.service", unit("orphan"))
    manager.start("orphan.service")
    a = cluster.add("a", manager=manager, join=False)
    a.start_up()
    assert manager.states(["orphan.service"])["orphan.service"].active == "inactive"


def test_leftovers_ignoring_sigterm_are_killed_even_once_a_new_lease_is_held(
    cluster: Cluster,
) -> None:
    """Their old lease (and when it expires) is unknown: a new lease of this run does not make
    them ours, so they are killed half a margin after start-up."""
    manager = FakeUnitManager()
    manager.slow_stop.add("orphan.service")
    manager.load("orphan.service", unit("orphan"))
    manager.start("orphan.service")
    a = cluster.add("a", manager=manager, join=False)
    a.start_up()
    assert manager.states(["orphan.service"])["orphan.service"].active == "deactivating"
    a.keeper.tick()  # a new lease: units may run here, but not these
    assert a.lease().registered
    cluster.clock.advance(MARGIN / 2)
    a.fencer.tick()
    assert manager.kills == ["orphan.service"]
    assert cluster.running("orphan.service") == set()


# ----------------------------------------------------------------------------------- isolation


def test_invalid_registry_entries_are_refused_once_and_never_stop_a_round(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fleetd")
    prefix = cluster.registry.layout.prefix
    good_json = json.dumps({"name": "x", "text": unit(), "hash": content_hash(unit())})
    cluster.registry.put_raw(prefix + "unit/.x.service", good_json.encode())
    cluster.registry.put_raw(prefix + "desired/.x.service", b"launched")
    cluster.add("a")
    bad = {
        prefix + "unit/junk.service": bytes(range(256)),
        prefix + "unit/list.service": b"[1, 2]",
        prefix + "desired/other.service": b"bogus",
        prefix + "owner/a b.service": b'{"machine_id": "x"}',
        prefix + "no-such-kind/foo": b"1",
        prefix + "state/u.service": b"{}",
    }
    for key, value in bad.items():
        cluster.registry.put_raw(key, value)
    # Names systemd accepts run, however unusual (a:b.service was once accepted and never run).
    cluster.submit({"ok.service": unit("ok"), "a:b.service": unit("colon")})
    cluster.settle()
    assert cluster.running("ok.service") == {"a"}
    assert cluster.running("a:b.service") == {"a"}
    refused = cluster.agents["a"].mirror.copy().refused
    assert set(refused) == {prefix + "unit/.x.service", prefix + "desired/.x.service", *bad}
    assert "must not start with '.'" in refused[prefix + "unit/.x.service"]
    assert "undecodable" in refused[prefix + "unit/junk.service"]
    ignoring = [r.message for r in caplog.records if "ignoring registry entry" in r.message]
    assert len(ignoring) == len(refused)  # one line each, not one per round


def test_one_failing_unit_does_not_stop_the_others_and_is_retried_with_backoff(
    cluster: Cluster,
) -> None:
    a = cluster.add("a")
    manager = cluster.managers["a"]
    attempts: list[str] = []
    real_start = manager.start

    def start(name: str) -> None:
        attempts.append(name)
        if name == "bad.service":
            raise RuntimeError("an unexpected bug in one unit's path")
        real_start(name)

    manager.start = start  # type: ignore[method-assign]
    pin = f"MachineID={a.me}"
    cluster.submit({"bad.service": unit("bad", pin), "good.service": unit("good", pin)})
    cluster.settle(2)
    assert cluster.running("good.service") == {"a"}
    # The round's batch of starts raised, so each unit was tried on its own: twice in it.
    assert attempts.count("bad.service") == 2
    cluster.settle(2)
    assert attempts.count("bad.service") == 2  # backing off: no new try in later rounds
    cluster.clock.advance(1.1)
    cluster.settle(1)
    assert attempts.count("bad.service") == 3


def test_a_write_under_a_lost_lease_fails_instead_of_writing_without_one(
    cluster: Cluster,
) -> None:
    a = cluster.add("a")
    lease = a.lease().lease_id
    assert lease is not None
    cluster.registry.revoke(lease)
    with pytest.raises(RegistryUnavailable):
        state = PublishedState(a.me, "loaded", "active", "running", "h", 0.0)
        cluster.registry.publish_states(a.me, lease, {"u.service": state})
    with pytest.raises(RegistryUnavailable):
        cluster.registry.update_machine(Machine(a.me), lease)
    assert cluster.registry.snapshot().machines == {}


def test_liveness_is_recorded_after_every_step_not_once_per_round(cluster: Cluster) -> None:
    """systemd's watchdog is pinged while the reconcile thread makes progress: a round that runs
    many tasks must show progress task by task (a batch of calls counts as one step: its calls
    run side by side, each within the adapter's timeout)."""
    a = cluster.add("a")
    marks: list[float] = []
    a.executor.progress = lambda: marks.append(cluster.clock())
    manager = cluster.managers["a"]
    pin = f"MachineID={a.me}"
    units = {f"p{i}.service": unit(f"p{i}", pin) for i in range(5)}
    cluster.submit(units)
    a.step()  # claims, then the five loads in one call (then each load task), the starts
    # (fresh units: no reload needed)
    assert len(marks) == 1 + 5 + 1
    assert all(cluster.running(name) == {"a"} for name in units)
    real_stop = manager.stop

    def slow_stop(name: str) -> None:
        cluster.clock.advance(1.0)  # each stop takes a second of (fake) time
        real_stop(name)

    manager.stop = slow_stop  # type: ignore[method-assign]
    records = [UnitRecord(n, t, content_hash(t)) for n, t in units.items()]
    snap = cluster.registry.snapshot()
    assert cluster.registry.write_units(records, DesiredState.LOADED, snap)
    marks.clear()
    a.step()  # five stops, one task each
    assert len(marks) == 5
    gaps = [later - earlier for earlier, later in itertools.pairwise(marks)]
    assert max(gaps) <= 1.0


def test_a_lease_file_of_another_machine_or_boot_is_not_adopted(cluster: Cluster) -> None:
    a = cluster.add("a")
    path = cluster.tmp_path / "a" / "lease.json"
    original = json.loads(path.read_text())
    assert original["lease_id"] == a.lease().lease_id
    assert cluster.add("a", join=False).keeper.restore()
    for field, value in (("machine_id", "f" * 32), ("boot_id", "another-boot")):
        path.write_text(json.dumps(original | {field: value}))
        assert not cluster.add("a", join=False).keeper.restore()
    path.write_text("not json")
    assert not cluster.add("a", join=False).keeper.restore()


def test_a_failed_first_read_of_the_registry_is_read_again(cluster: Cluster) -> None:
    a = cluster.add("a", join=False)
    a.start_up()
    a.keeper.tick()
    cluster.registry.unavailable = True
    with pytest.raises(RegistryUnavailable):
        a.step()
    cluster.registry.unavailable = False
    cluster.submit({"u.service": unit()})
    cluster.settle()
    assert cluster.running("u.service") == {"a"}
    assert list(cluster.managers["a"].guards) == ["fleet-guard-616161616161.service"]


def test_a_unit_in_transition_brings_the_next_round_soon_but_not_forever(
    cluster: Cluster,
) -> None:
    """A unit just started (activating) or stopping is published as soon as systemd settles it:
    the round asks to come again soon. One that stays in a transition (a start that hangs) is
    left to the ordinary pace after the settle window, so it cannot keep the loop spinning."""
    reconciler = cluster.add("a").reconciler
    up = {"u.service": SystemdState("loaded", "active", "running")}
    starting = {"u.service": SystemdState("loaded", "activating", "start")}
    assert not reconciler._settling(up)
    assert reconciler._settling(starting)
    cluster.clock.advance(SETTLE_WINDOW - 0.5)
    assert reconciler._settling(starting)
    cluster.clock.advance(1.0)
    assert not reconciler._settling(starting)
    # Back to steady, then a new transition: watched closely again.
    assert not reconciler._settling(up)
    assert reconciler._settling({"u.service": SystemdState("loaded", "deactivating", "stop")})


def test_a_rounds_loads_go_in_one_call_after_the_stops_and_unloads_before_them(
    cluster: Cluster,
) -> None:
    """A changed unit is stopped and unloaded before its new text is loaded, in the same round
    as the other units' loads, which all go to the manager in one call."""
    a = cluster.add("a")
    manager = cluster.managers["a"]
    calls: list[tuple[str, tuple[str, ...]]] = []
    real_load_many, real_unload = manager.load_many, manager.unload

    def load_many(units: Mapping[str, str]) -> dict[str, Exception]:
        calls.append(("load_many", tuple(sorted(units))))
        return real_load_many(units)

    def unload(name: str) -> None:
        calls.append(("unload", (name,)))
        real_unload(name)

    manager.load_many = load_many  # type: ignore[method-assign]
    manager.unload = unload  # type: ignore[method-assign]
    pin = f"MachineID={a.me}"
    cluster.submit({f"p{i}.service": unit(f"p{i}", pin) for i in range(3)})
    cluster.settle()
    assert calls == [("load_many", ("p0.service", "p1.service", "p2.service"))]
    calls.clear()
    cluster.submit({"p0.service": unit("p0 v2", pin), "p1.service": unit("p1 v2", pin)})
    cluster.settle()
    assert calls == [
        ("unload", ("p0.service",)),
        ("unload", ("p1.service",)),
        ("load_many", ("p0.service", "p1.service")),
    ]
    assert manager.loaded_units()["p0.service"] == content_hash(unit("p0 v2", pin))
    assert cluster.running("p0.service") == {"a"} and cluster.running("p1.service") == {"a"}


def test_an_agent_does_not_bid_again_before_its_picture_shows_its_won_claims(
    cluster: Cluster,
) -> None:
    """With the watch lagging, a machine's picture shows it fewer units than it won: bids from
    it go for units it holds already, or for more than its share. It sends none until its
    claims show (or CLAIM_SETTLE passed: a watch that never catches up only delays it)."""
    a, b = cluster.add("a"), cluster.add("b")
    for agent in (a, b):
        # Only the favourite bids at first, as in a real cluster.
        agent.config = dataclasses.replace(agent.config, claim_stagger=60.0)
    sent: list[str] = []
    real_claim, real_many = cluster.registry.claim, cluster.registry.claim_many

    def claim(unit: str, *args: Any) -> bool:
        sent.append(unit)
        return real_claim(unit, *args)

    def claim_many(units: Mapping[str, int], *args: Any) -> dict[str, bool]:
        sent.extend(units)
        return real_many(units, *args)

    cluster.registry.claim = claim  # type: ignore[method-assign]
    cluster.registry.claim_many = claim_many  # type: ignore[method-assign]
    cluster.submit({f"w@{i}.service": unit(f"w{i}") for i in range(8)})
    cluster.registry.hold_watch()
    cluster.step("a")
    first = {n for n, o in cluster.registry.snapshot().owners.items() if o.machine_id == a.me}
    assert first and set(sent) == first
    assert a.reconciler.awaiting() == first and b.reconciler.awaiting() == frozenset()
    sent.clear()
    cluster.step("a")  # the same stale picture
    assert sent == []
    cluster.clock.advance(CLAIM_SETTLE + 0.1)
    assert a.reconciler.awaiting() == frozenset()
    for agent in (a, b):
        cluster.registry.keepalive(agent.lease().lease_id or 0)
    cluster.step("a")  # still stale, but waited long enough: bids again (and loses them)
    assert set(sent) == first
    cluster.registry.release_watch()
    cluster.settle()
    owners = cluster.registry.snapshot().owners
    counts = {m: sum(1 for o in owners.values() if o.machine_id == m) for m in (a.me, b.me)}
    assert sum(counts.values()) == 8 and max(counts.values()) - min(counts.values()) <= 1
