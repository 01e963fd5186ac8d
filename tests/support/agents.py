"""A harness that runs many real `Agent` loops in one process against a real etcd, each with an
in-memory unit manager: the component tier, and the base of the race tests and the scale
benchmark.

Each agent has its own `EtcdRegistry` (its own connection, lease and watch), exactly as separate
fleetd processes would; only systemd is replaced, by the fake that shares its contract suite with
the D-Bus adapter.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fleetd.agent import Agent, ExitMode
from fleetd.agent.lease import LeaseFile
from fleetd.agent.mirror import Mirror
from fleetd.config import Config
from fleetd.fake_systemd import FakeUnitManager
from fleetd.model import DesiredState
from fleetd.registry import EtcdRegistry
from fleetd.snapshot import Snapshot, UnitRecord
from fleetd.unitfile import content_hash


@dataclass
class Node:
    name: str
    agent: Agent
    manager: FakeUnitManager
    thread: threading.Thread


@dataclass
class Harness:
    endpoints: list[str]
    prefix: str
    ttl: float = 10.0
    # One etcd client (one connection, one multiplexed watch stream) for every agent: how the
    # scale benchmark fits hundreds of simulated machines in one process.
    shared_client: bool = False
    # With a shared client, also one mirror (one watch, one snapshot, one incremental planner)
    # for every agent: hollow machines, each still with its own lease, claims and units.
    shared_mirror: bool = False
    stagger: float = 0.2
    # (user, password) of the agents and of `client()` on an etcd with authentication.
    agent_login: tuple[str, str] | None = None
    client_login: tuple[str, str] | None = None
    nodes: dict[str, Node] = field(default_factory=dict)
    _shared: EtcdRegistry | None = None
    mirror: Mirror | None = None

    def add(self, name: str, metadata: Mapping[str, str] | None = None,
            machine_id: str | None = None, endpoints: list[str] | None = None,
            manager: FakeUnitManager | None = None, lease_file: Path | None = None) -> Node:
        config = Config(
            etcd_servers=tuple(endpoints or self.endpoints),
            etcd_key_prefix=self.prefix,
            machine_id=machine_id or uuid.uuid4().hex,
            public_ip="127.0.0.1",
            metadata=dict(metadata or {}),
            agent_ttl=self.ttl,
            hostname=name,
            claim_stagger=self.stagger,
        )
        if self.shared_client and endpoints is None:
            if self._shared is None:
                self._shared = EtcdRegistry(self.endpoints, self.prefix, timeout=3.0)
            registry = self._shared
        else:
            registry = EtcdRegistry(
                config.etcd_servers, config.etcd_key_prefix, timeout=3.0, **_login(self.agent_login)
            )
        manager = manager or FakeUnitManager()
        if self.shared_mirror and registry is self._shared and self.mirror is None:
            self.mirror = Mirror(registry, lambda: None)
        agent = Agent(
            config,
            registry,
            manager,
            owns_registry=registry is not self._shared,
            lease_file=LeaseFile(lease_file) if lease_file else None,
            mirror=self.mirror if registry is self._shared else None,
        )
        thread = threading.Thread(target=agent.run, name=f"agent-{name}", daemon=True)
        node = Node(name, agent, manager, thread)
        self.nodes[name] = node
        thread.start()
        return node

    def client(self) -> EtcdRegistry:
        return EtcdRegistry(self.endpoints, self.prefix, timeout=3.0, **_login(self.client_login))

    def submit(
        self, units: Mapping[str, str], desired: DesiredState = DesiredState.LAUNCHED
    ) -> None:
        client = self.client()
        try:
            for _ in range(10):
                seen = client.snapshot()
                records = [UnitRecord(n, t, content_hash(t)) for n, t in units.items()]
                if client.write_units(records, desired, seen):
                    return
            raise AssertionError("could not write units")
        finally:
            client.close()

    def snapshot(self) -> Snapshot:
        client = self.client()
        try:
            return client.snapshot()
        finally:
            client.close()

    def wait(self, predicate: Callable[[Snapshot], bool], timeout: float = 20.0) -> Snapshot:
        deadline = time.monotonic() + timeout
        snap = self.snapshot()
        while not predicate(snap):
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not reached in {timeout}s; owners={snap.owners}")
            time.sleep(0.1)
            snap = self.snapshot()
        return snap

    def halt(self, name: str) -> None:
        node = self.nodes.pop(name)
        node.agent.stop()
        node.thread.join(30)

    def restart(self, name: str) -> None:
        """fleetd exits for a restart (SIGUSR2): units keep running, the lease stays."""
        node = self.nodes.pop(name)
        node.agent.stop(mode=ExitMode.RESTART)
        node.thread.join(30)

    def kill(self, name: str) -> None:
        """A power cut: the loops stop without releasing anything; the lease runs out."""
        node = self.nodes.pop(name)
        node.agent.stop(leave=False)
        node.thread.join(30)

    def stop_all(self) -> None:
        for name in list(self.nodes):
            self.halt(name)
        if self.mirror is not None:
            self.mirror.close()
            self.mirror = None
        if self._shared is not None:
            self._shared.close()
            self._shared = None

    def running(self) -> dict[str, set[str]]:
        """machine name -> units its (fake) systemd runs."""
        out: dict[str, set[str]] = {}
        for name, node in self.nodes.items():
            loaded = node.manager.loaded_units()
            states = node.manager.states(loaded)
            out[name] = {u for u, s in states.items() if s.active == "active"}
        return out

    def machine_name(self, machine_id: str) -> str:
        for name, node in self.nodes.items():
            if node.agent.me == machine_id:
                return name
        return machine_id


def _login(login: tuple[str, str] | None) -> dict[str, str]:
    return {"username": login[0], "password": login[1]} if login else {}


def ids(nodes: Iterable[Node]) -> dict[str, str]:
    return {n.agent.me: n.name for n in nodes}


def unit_text(description: str = "test unit", xfleet: str = "") -> str:
    text = f"[Unit]\nDescription={description}\n\n[Service]\nExecStart=/bin/sh -c 'sleep 1000'\n"
    if xfleet:
        text += f"\n[X-Fleet]\n{xfleet}\n"
    return text


__all__ = ["Harness", "Node", "ids", "unit_text"]
