"""Agents' life cycle against a real etcd: several real `Agent` loops (each with its own
connection, lease and watch) and in-memory systemd managers. Machines leave gracefully or vanish,
units change, move, follow, replace each other and run everywhere; every test waits, with a
bound, for an outcome in the registry and in the fake systemd managers."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator

import pytest

from fleetd.model import DesiredState
from fleetd.snapshot import Snapshot
from tests.support.agents import Harness, Node, unit_text
from tests.support.etcd_fixtures import etcd, etcd_prefix  # noqa: F401

pytestmark = pytest.mark.component


@pytest.fixture
def harness(etcd, etcd_prefix) -> Iterator[Harness]:  # type: ignore[no-untyped-def]  # noqa: F811
    h = Harness(list(etcd.endpoints), etcd_prefix, ttl=3, stagger=0.2)
    yield h
    h.stop_all()


def runs_once(snap: Snapshot, unit: str) -> bool:
    """The unit has an owner that published it active, and no other machine publishes it."""
    owner = snap.owner_of(unit)
    per = snap.states.get(unit, {})
    return owner is not None and set(per) == {owner} and per[owner].active == "active"


def all_run(units: list[str]) -> Callable[[Snapshot], bool]:
    return lambda snap: all(runs_once(snap, u) for u in units)


def start_cluster(harness: Harness, count: int, metadata: dict[str, str] | None = None) -> None:
    for i in range(count):
        harness.add(f"m{i}", metadata)
    harness.wait(lambda s: len(s.machines) == count)


def node_of(harness: Harness, snap: Snapshot, unit: str) -> Node:
    owner = snap.owner_of(unit)
    assert owner is not None, unit
    return harness.nodes[harness.machine_name(owner)]


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached in {timeout}s")
        time.sleep(0.05)


# ---------------------------------------------------------------------------- leaving


def test_halt_moves_only_that_machines_units_and_leaves_at_once(harness: Harness) -> None:
    start_cluster(harness, 3)
    units = [f"u{i}.service" for i in range(6)]
    harness.submit({u: unit_text(u) for u in units})
    before = harness.wait(all_run(units))
    leaving = node_of(harness, before, units[0])
    leaving_id = leaving.agent.me
    moved = {u for u in units if before.owner_of(u) == leaving_id}
    stayed = {u: before.owners[u] for u in units if u not in moved}
    harness.halt(leaving.name)
    # A graceful stop revokes the lease: presence and ownership are gone when halt returns,
    # long before a TTL could run out.
    right_after = harness.snapshot()
    assert leaving_id not in right_after.machines
    assert all(o.machine_id != leaving_id for o in right_after.owners.values())
    assert leaving.manager.loaded_units() == {}
    after = harness.wait(all_run(units))
    for unit, owner in stayed.items():
        # Same owner key, never re-created: the other machines' units did not move.
        assert after.owners[unit].revision == owner.revision
    for unit in moved:
        assert after.owner_of(unit) in {n.agent.me for n in harness.nodes.values()}
    running = harness.running()
    assert sorted(u for per in running.values() for u in per) == sorted(units)


def test_killed_machine_loses_its_units_when_the_lease_runs_out(harness: Harness) -> None:
    start_cluster(harness, 3)
    units = [f"k{i}.service" for i in range(4)]
    harness.submit({u: unit_text(u) for u in units})
    before = harness.wait(all_run(units))
    victim = node_of(harness, before, units[0])
    victim_id = victim.agent.me
    moved = [u for u in units if before.owner_of(u) == victim_id]
    harness.kill(victim.name)
    # Nothing was released: the keys stay until the lease expires.
    assert victim_id in harness.snapshot().machines
    after = harness.wait(lambda s: victim_id not in s.machines and all_run(units)(s), timeout=20)
    for unit in moved:
        assert after.owner_of(unit) != victim_id


def test_second_agent_with_the_same_machine_id_does_not_join(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="fleetd")
    first = harness.add("first")
    harness.add("other")
    harness.wait(lambda s: len(s.machines) == 2)
    second = harness.add("second", machine_id=first.agent.me)
    wait_until(lambda: any("already held by a live agent" in r.message for r in caplog.records))
    units = [f"d{i}.service" for i in range(4)]
    harness.submit({u: unit_text(u, "MachineID=" + first.agent.me) for u in units})
    harness.wait(all_run(units))
    assert set(first.manager.loaded_units()) == set(units)
    assert second.manager.loaded_units() == {}
    assert harness.snapshot().machines[first.agent.me].name == "first"
    # Once the first leaves, the second joins under the id and takes the units over.
    harness.halt("first")
    harness.wait(lambda s: all_run(units)(s) and s.machines[second.agent.me].name == "second")
    wait_until(lambda: set(second.manager.loaded_units()) == set(units))


# ------------------------------------------------------------------------- unit changes


def test_changed_content_is_restarted_by_its_owner(harness: Harness) -> None:
    start_cluster(harness, 2)
    old, new = unit_text("version 1"), unit_text("version 2")
    harness.submit({"c.service": old})
    snap = harness.wait(all_run(["c.service"]))
    owner = node_of(harness, snap, "c.service")
    assert owner.manager.running_text("c.service") == old
    harness.submit({"c.service": new})
    wait_until(lambda: owner.manager.running_text("c.service") == new)
    after = harness.wait(
        lambda s: (
            runs_once(s, "c.service")
            and s.states["c.service"][s.owners["c.service"].machine_id].hash
            == s.units["c.service"].hash
        )
    )
    assert after.owner_of("c.service") == owner.agent.me
    others = [n for n in harness.nodes.values() if n is not owner]
    assert all(n.manager.loaded_units() == {} for n in others)


def test_desired_state_transitions(harness: Harness) -> None:
    start_cluster(harness, 2)
    harness.submit({"t.service": unit_text("t")})
    snap = harness.wait(all_run(["t.service"]))
    owner = node_of(harness, snap, "t.service")
    client = harness.client()
    try:
        client.set_desired(["t.service"], DesiredState.LOADED)

        def loaded_not_running(s: Snapshot) -> bool:
            per = s.states.get("t.service", {})
            state = per.get(owner.agent.me)
            return state is not None and state.load == "loaded" and state.active == "inactive"

        after = harness.wait(loaded_not_running)
        assert after.owner_of("t.service") == owner.agent.me
        assert "t.service" in owner.manager.loaded_units()
        assert owner.manager.running_text("t.service") is None

        client.set_desired(["t.service"], DesiredState.LAUNCHED)
        harness.wait(lambda s: runs_once(s, "t.service"))
        assert owner.manager.running_text("t.service") is not None

        client.set_desired(["t.service"], DesiredState.INACTIVE)
        harness.wait(lambda s: "t.service" not in s.owners and "t.service" not in s.states)
        wait_until(lambda: all(n.manager.loaded_units() == {} for n in harness.nodes.values()))
    finally:
        client.close()


def test_destroy_stops_unloads_and_clears_the_registry(harness: Harness) -> None:
    start_cluster(harness, 2)
    units = ["x.service", "y.service"]
    harness.submit({u: unit_text(u) for u in units})
    harness.wait(all_run(units))
    client = harness.client()
    try:
        client.destroy(["x.service"])
    finally:
        client.close()
    after = harness.wait(lambda s: "x.service" not in s.owners and "x.service" not in s.states)
    assert "x.service" not in after.units and "x.service" not in after.desired
    assert runs_once(after, "y.service")
    wait_until(
        lambda: all("x.service" not in n.manager.loaded_units() for n in harness.nodes.values())
    )
    assert all(n.manager.running_text("x.service") is None for n in harness.nodes.values())


def test_failed_unit_is_started_again_after_stop_and_start(harness: Harness) -> None:
    node = harness.add("m0")
    harness.wait(lambda s: len(s.machines) == 1)
    starts: list[str] = []
    real_start = node.manager.start

    def counting_start(name: str) -> None:
        starts.append(name)
        real_start(name)

    node.manager.start = counting_start  # type: ignore[method-assign]
    text = "[Unit]\nDescription=fails\n\n[Service]\nExecStart=/bin/false\n"
    harness.submit({"f.service": text})
    harness.wait(
        lambda s: (
            s.states.get("f.service", {}).get(node.agent.me) is not None
            and s.states["f.service"][node.agent.me].active == "failed"
        )
    )
    assert starts == ["f.service"]
    client = harness.client()
    try:
        client.set_desired(["f.service"], DesiredState.LOADED)
        # Let the agent see and act on the stop before asking for the start again.
        wait_until(
            lambda: node.agent.mirror.copy().desired_state("f.service") is DesiredState.LOADED
        )
        harness.submit({"g.service": unit_text("g")})
        wait_until(lambda: "g.service" in node.manager.loaded_units())
        client.set_desired(["f.service"], DesiredState.LAUNCHED)
        wait_until(lambda: starts.count("f.service") == 2, timeout=8)
    finally:
        client.close()


# ----------------------------------------------------------------------- placement rules


def test_machine_of_pair_moves_together(harness: Harness) -> None:
    start_cluster(harness, 3)
    pair = ["lead.service", "side.service"]
    harness.submit(
        {
            "lead.service": unit_text("lead"),
            "side.service": unit_text("side", "MachineOf=lead.service"),
        }
    )
    before = harness.wait(
        lambda s: all_run(pair)(s) and s.owner_of("lead.service") == s.owner_of("side.service")
    )
    leaving = node_of(harness, before, "lead.service")
    harness.halt(leaving.name)
    after = harness.wait(
        lambda s: (
            all_run(pair)(s)
            and s.owner_of("lead.service") == s.owner_of("side.service")
            and s.owner_of("lead.service") != leaving.agent.me
        )
    )
    host = node_of(harness, after, "lead.service")
    assert {"lead.service", "side.service"} <= harness.running()[host.name]


def test_global_unit_runs_on_every_machine_and_follows_membership(harness: Harness) -> None:
    start_cluster(harness, 3, {"role": "web"})
    harness.add("db", {"role": "db"})
    harness.wait(lambda s: len(s.machines) == 4)
    harness.submit({"g.service": unit_text("g", "Global=true\nMachineMetadata=role=web")})
    web = {n.agent.me for n in harness.nodes.values() if n.name != "db"}

    def published_by(ids: set[str]) -> Callable[[Snapshot], bool]:
        def check(s: Snapshot) -> bool:
            per = s.states.get("g.service", {})
            return set(per) == ids and all(p.active == "active" for p in per.values())

        return check

    snap = harness.wait(published_by(web))
    assert "g.service" not in snap.owners
    assert harness.running()["db"] == set()
    harness.halt("m1")
    web = {n.agent.me for n in harness.nodes.values() if n.name != "db"}
    harness.wait(published_by(web))
    newcomer = harness.add("m9", {"role": "web"})
    harness.wait(published_by(web | {newcomer.agent.me}))
    wait_until(lambda: newcomer.manager.running_text("g.service") is not None)


def test_replacing_unit_takes_the_machine_and_pushes_the_old_one_away(harness: Harness) -> None:
    start_cluster(harness, 3)
    harness.submit({"old.service": unit_text("old")})
    before = harness.wait(all_run(["old.service"]))
    home = before.owner_of("old.service")
    harness.submit({"new.service": unit_text("new", "Replaces=old.service")})
    after = harness.wait(
        lambda s: (
            all_run(["old.service", "new.service"])(s)
            and s.owner_of("new.service") == home
            and s.owner_of("old.service") != home
        )
    )
    assert after.owner_of("old.service") in {n.agent.me for n in harness.nodes.values()}
    home_node = harness.nodes[harness.machine_name(home)]
    wait_until(lambda: "old.service" not in home_node.manager.loaded_units())


def test_metadata_change_moves_a_unit_that_no_longer_matches(harness: Harness) -> None:
    start_cluster(harness, 3, {"disk": "ssd"})
    harness.submit({"s.service": unit_text("s", "MachineMetadata=disk=ssd")})
    before = harness.wait(all_run(["s.service"]))
    owner = node_of(harness, before, "s.service")
    config = dataclasses.replace(owner.agent.config, metadata={"disk": "hdd"})
    owner.agent.update_config(config)
    after = harness.wait(
        lambda s: runs_once(s, "s.service") and s.owner_of("s.service") != owner.agent.me
    )
    assert after.machines[owner.agent.me].metadata == {"disk": "hdd"}
    wait_until(lambda: owner.manager.loaded_units() == {})


def test_units_left_by_a_crashed_run_are_stopped_at_start(etcd, etcd_prefix) -> None:  # noqa: F811
    """A unit still running in systemd when fleetd starts belongs to nobody we know of: the
    crashed run's lease still holds the machine id, so the new run cannot even join yet, and by
    the time that lease expires another machine may claim the unit. It is stopped at once."""
    import threading
    import uuid

    from fleetd.agent import Agent
    from fleetd.config import Config
    from fleetd.fake_systemd import FakeUnitManager
    from fleetd.model import Machine
    from fleetd.registry import EtcdRegistry

    machine_id = uuid.uuid4().hex
    crashed = EtcdRegistry(list(etcd.endpoints), etcd_prefix)
    old_lease = crashed.grant_lease(30)
    assert crashed.register_machine(Machine(machine_id), old_lease)
    manager = FakeUnitManager()
    manager.load("orphan.service", "[Service]\nExecStart=/bin/sleep 1000\n")
    manager.reload()
    manager.start("orphan.service")
    config = Config(
        etcd_servers=tuple(etcd.endpoints),
        etcd_key_prefix=etcd_prefix,
        machine_id=machine_id,
        agent_ttl=3.0,
    )
    agent = Agent(config, EtcdRegistry(config.etcd_servers, etcd_prefix), manager)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20  # generous: a loaded machine, not a speed goal
        while (
            manager.states(["orphan.service"])["orphan.service"].active == "active"
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        assert manager.states(["orphan.service"])["orphan.service"].active != "active"
        # ... while the machine id is still held by the old lease: the agent has not joined.
        assert crashed.snapshot().machines[machine_id] == Machine(machine_id)
    finally:
        agent.stop()
        thread.join(30)
        crashed.revoke(old_lease)
        crashed.close()


def test_agent_tells_systemd_ready_pings_its_watchdog_and_says_stopping(
    etcd, etcd_prefix, tmp_path  # noqa: F811
) -> None:
    """Type=notify and WatchdogSec=: READY=1 once joined, WATCHDOG=1 while the loop turns,
    STOPPING=1 on the way out."""
    import socket
    import threading
    import uuid

    from fleetd.agent import Agent
    from fleetd.config import Config
    from fleetd.fake_systemd import FakeUnitManager
    from fleetd.registry import EtcdRegistry
    from fleetd.sdnotify import Notifier

    path = tmp_path / "notify"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(5)
    config = Config(etcd_servers=tuple(etcd.endpoints), etcd_key_prefix=etcd_prefix,
                    machine_id=uuid.uuid4().hex, agent_ttl=3.0)
    agent = Agent(config, EtcdRegistry(config.etcd_servers, etcd_prefix), FakeUnitManager(),
                  notifier=Notifier(str(path), watchdog_interval=0.2))
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        received = [server.recv(100).decode() for _ in range(6)]
        assert "READY=1" in received
        assert received.count("WATCHDOG=1") >= 3
    finally:
        agent.stop()
        thread.join(30)
    rest = []
    server.settimeout(0.5)
    with contextlib.suppress(TimeoutError):
        while True:
            rest.append(server.recv(100).decode())
    server.close()
    assert "STOPPING=1" in rest


def test_restarted_agent_adopts_its_units_on_the_same_lease(harness: Harness, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SIGUSR2 then a new fleetd within the TTL: same lease, same owner keys, same processes."""
    node = harness.add("m0", lease_file=tmp_path / "lease.json")
    harness.wait(lambda s: len(s.machines) == 1)
    units = [f"keep{i}.service" for i in range(3)]
    harness.submit({u: unit_text(u) for u in units})
    before = harness.wait(all_run(units))
    pids = node.manager.main_pids(units)
    lease = node.agent.lease().lease_id
    harness.restart("m0")
    successor = harness.add(
        "m0", machine_id=node.agent.me, manager=node.manager, lease_file=tmp_path / "lease.json"
    )
    wait_until(lambda: successor.agent.lease().registered)
    assert successor.agent.lease().lease_id == lease
    after = harness.wait(all_run(units))
    assert {u: after.owners[u].revision for u in units} == {
        u: before.owners[u].revision for u in units
    }
    assert node.manager.main_pids(units) == pids
