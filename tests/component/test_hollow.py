"""The hollow machines the scale benchmark runs on, against a real etcd: they must place and run
units as real agents do, or the benchmark measures nothing (a round that fails on every turn
would leave every unit waiting while the benchmark waits with it)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import pytest

from fleetd.model import DesiredState
from fleetd.registry import EtcdRegistry
from fleetd.snapshot import Snapshot, UnitRecord
from fleetd.unitfile import content_hash
from tests.support.agents import unit_text
from tests.support.etcd_fixtures import etcd, etcd_prefix  # noqa: F401
from tests.support.hollow import HollowHost

pytestmark = pytest.mark.component


@pytest.fixture
def host(etcd, etcd_prefix) -> Iterator[HollowHost]:  # type: ignore[no-untyped-def]  # noqa: F811
    h = HollowHost(list(etcd.endpoints), etcd_prefix, ttl=3.0, stagger=0.2)
    yield h
    h.stop()


def wait(
    host: HollowHost, predicate: Callable[[Snapshot], bool], timeout: float = 30.0
) -> Snapshot:
    deadline = time.monotonic() + timeout
    while True:
        snap = host.mirror.copy()
        if predicate(snap):
            return snap
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {timeout}s")
        time.sleep(0.05)


def active_once(snap: Snapshot, names: set[str], skip: str = "") -> bool:
    for name in names:
        owner = snap.owners.get(name)
        if owner is None or owner.machine_id == skip:
            return False
        per = snap.states.get(name, {})
        if set(per) != {owner.machine_id} or per[owner.machine_id].active != "active":
            return False
    return True


def test_hollow_machines_place_balance_and_take_over(
    host: HollowHost, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="fleetd")
    for i in range(6):
        host.add(f"h{i}", {"zone": f"z{i % 2}"})
    host.start()
    wait(host, lambda s: len(s.machines) == 6)
    names = {f"hello@{i}.service" for i in range(60)}
    text = unit_text("hello")
    client = EtcdRegistry(host.endpoints, host.prefix)
    try:
        records = [UnitRecord(n, text, content_hash(text)) for n in sorted(names)]
        assert client.write_units(records, DesiredState.LAUNCHED, client.snapshot())
    finally:
        client.close()
    snap = wait(host, lambda s: active_once(s, names))
    loads = {m: 0 for m in snap.machines}
    for name in names:
        loads[snap.owners[name].machine_id] += 1
    assert max(loads.values()) - min(loads.values()) <= 1, loads
    # The turns after the claims waited for the shared picture to show them, as each real
    # machine's own watch would show its own.
    assert host.catch_up_waits
    # A power cut: the lease runs out and the others take the units over.
    victim = sorted(host.machines)[0]
    victim_id = host.machines[victim].agent.me
    host.kill(victim)
    wait(host, lambda s: active_once(s, names, skip=victim_id), timeout=30)
    # No round may have failed for a reason other than a registry or systemd fault.
    bugs = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not bugs, [r.getMessage() for r in bugs]
