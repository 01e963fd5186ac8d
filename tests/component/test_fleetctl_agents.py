"""fleetctl's blocking commands against real agents (in-memory systemd) over a real etcd: each
command waits until the machines report the state, and prints where the unit got to."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from fleetctl.main import app
from tests.support.agents import Harness, unit_text
from tests.support.etcd_fixtures import EtcdCluster, etcd, etcd_prefix  # noqa: F401

pytestmark = pytest.mark.component

# Enough polls (0.5 s apart) for an agent to claim and start a unit, bounded so a bug fails.
ATTEMPTS = "60"


@pytest.fixture
def harness(
    etcd: EtcdCluster,  # noqa: F811
    etcd_prefix: str,  # noqa: F811
) -> Iterator[Harness]:
    h = Harness(list(etcd.endpoints), etcd_prefix, stagger=0.05)
    yield h
    h.stop_all()


def run(harness: Harness, *args: str) -> Result:
    argv = ["--endpoint", harness.endpoints[0], "--etcd-key-prefix", harness.prefix, *args]
    return CliRunner().invoke(app, argv, catch_exceptions=False)


def test_start_stop_restart_unload_wait_for_the_machines(harness: Harness, tmp_path: Path) -> None:
    node = harness.add("core-01")
    harness.wait(lambda s: len(s.machines) == 1)
    legend = f"{node.agent.me[:8]}.../127.0.0.1"
    path = tmp_path / "hello.service"
    path.write_text(unit_text("Hello"))

    started = run(harness, "start", "--block-attempts", ATTEMPTS, str(path))
    assert started.exit_code == 0, started.stderr
    assert started.stdout == f"Unit hello.service launched on {legend}\n"
    assert harness.running() == {"core-01": {"hello.service"}}

    listed = run(harness, "list-units", "--no-legend")
    assert listed.stdout.split() == ["hello.service", legend, "active", "running"]
    files = run(harness, "list-unit-files", "--no-legend", "--fields", "unit,dstate,state,target")
    assert files.stdout.split() == ["hello.service", "launched", "launched", legend]

    status = run(harness, "status", "hello")
    lines = status.stdout.splitlines()
    assert lines[0] == "● hello.service - Hello"
    assert lines[1] == f"   Machine: {legend} (core-01)"
    assert lines[3].startswith("    Active: active (running) since ")

    stopped = run(harness, "stop", "--block-attempts", ATTEMPTS, "hello.service")
    assert stopped.exit_code == 0, stopped.stderr
    assert stopped.stdout == f"Unit hello.service loaded on {legend}\n"
    assert harness.running() == {"core-01": set()}

    restarted = run(harness, "restart", "--block-attempts", ATTEMPTS, "hello.service")
    assert restarted.exit_code == 0, restarted.stderr
    assert restarted.stdout.splitlines()[-1] == f"Unit hello.service launched on {legend}"

    unloaded = run(harness, "unload", "--block-attempts", ATTEMPTS, "hello.service")
    assert unloaded.exit_code == 0, unloaded.stderr
    assert unloaded.stdout == "Unit hello.service inactive\n"

    destroyed = run(harness, "destroy", "hello.service")
    assert destroyed.stdout == "Destroyed hello.service\n"


def test_global_unit_start_waits_for_every_machine(harness: Harness, tmp_path: Path) -> None:
    for name in ("core-01", "core-02"):
        harness.add(name)
    harness.wait(lambda s: len(s.machines) == 2)
    path = tmp_path / "everywhere.service"
    path.write_text(unit_text("Everywhere", xfleet="Global=true"))

    started = run(harness, "start", "--block-attempts", ATTEMPTS, str(path))
    assert started.exit_code == 0, started.stderr
    assert started.stdout == "Triggered global unit everywhere.service start\n"
    assert harness.running() == {
        "core-01": {"everywhere.service"},
        "core-02": {"everywhere.service"},
    }
    listed = run(harness, "list-units", "--no-legend", "--fields", "unit,active")
    assert listed.stdout.split() == ["everywhere.service", "active"] * 2
