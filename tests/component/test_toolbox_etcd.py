"""The operator's tools against a real etcd and real agents (in-memory systemd): completion of unit
names and machine ids from a registry with units, the progress line on a pseudo-terminal, lease
renewal ages, and units near etcd's request limit."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetctl import completion
from fleetctl.client import GlobalOptions
from fleetd.model import DesiredState
from fleetd.registry import EtcdRegistry
from fleetd.snapshot import MAX_UNIT_VALUE_BYTES, UnitRecord, unit_value_size
from fleetd.unitfile import content_hash
from tests.support.agents import Harness, unit_text
from tests.support.etcd_fixtures import EtcdCluster, etcd, etcd_prefix  # noqa: F401

pytestmark = pytest.mark.component

REPO = Path(__file__).resolve().parents[2]
FLEETCTL = [sys.executable, "-c", "from fleetctl.main import main; main()"]


@pytest.fixture
def harness(
    etcd: EtcdCluster,  # noqa: F811
    etcd_prefix: str,  # noqa: F811
) -> Iterator[Harness]:
    h = Harness(list(etcd.endpoints), etcd_prefix, stagger=0.05)
    yield h
    h.stop_all()


def env_for(harness: Harness, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETCTL_")}
    env.update(FLEETCTL_ENDPOINT=harness.endpoints[0], FLEETCTL_ETCD_KEY_PREFIX=harness.prefix)
    env.update(extra)
    return env


def complete_bash(harness: Harness, line: str, cwd: Path = REPO) -> list[str]:
    """What bash would offer for the last word of `line` (the script's protocol)."""
    words = line.split(" ")
    env = env_for(
        harness,
        _FLEETCTL_COMPLETE="complete_bash",
        COMP_WORDS=line,
        COMP_CWORD=str(len(words) - 1),
    )
    proc = subprocess.run(
        FLEETCTL, env=env, capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return proc.stdout.split()


def complete_other(harness: Harness, shell: str, line: str) -> str:
    """zsh's and fish's protocol: the command line so far in _TYPER_COMPLETE_ARGS."""
    env = env_for(harness, _FLEETCTL_COMPLETE=f"complete_{shell}", _TYPER_COMPLETE_ARGS=line)
    if shell == "fish":
        env["_TYPER_COMPLETE_FISH_ACTION"] = "get-args"
    proc = subprocess.run(
        FLEETCTL, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_completion_offers_registry_units_and_machines(harness: Harness, tmp_path: Path) -> None:
    node = harness.add("core-01")
    harness.wait(lambda s: len(s.machines) == 1)
    harness.submit(
        {"web@1.service": unit_text(), "web@2.service": unit_text(), "db.service": unit_text()},
        DesiredState.INACTIVE,
    )
    assert complete_bash(harness, "fleetctl status web") == ["web@1.service", "web@2.service"]
    assert complete_other(harness, "fish", "fleetctl cat web@") == "web@1.service\nweb@2.service\n"
    zsh = complete_other(harness, "zsh", "fleetctl stop d")
    assert zsh.strip() == "_arguments '*: :((\"db.service\"))'"
    assert complete_bash(harness, "fleetctl destroy ") == [
        "db.service", "web@1.service", "web@2.service",
    ]  # fmt: skip
    (tmp_path / "local.service").write_text(unit_text())
    (tmp_path / "notes.txt").write_text("")
    assert complete_bash(harness, "fleetctl start ", cwd=tmp_path) == [
        "db.service", "local.service", "web@1.service", "web@2.service",
    ]  # fmt: skip
    assert sorted(complete_bash(harness, "fleetctl li")) == [
        "list-machines", "list-unit-files", "list-units",
    ]  # fmt: skip
    # A --endpoint typed on the command line wins over the environment.
    dead = complete_bash(harness, "fleetctl --endpoint http://127.0.0.1:9 status web")
    assert dead == []

    options = GlobalOptions(endpoint=harness.endpoints[0], etcd_key_prefix=harness.prefix)

    class Root:
        params = vars(options)

    class Ctx:
        def find_root(self) -> Root:
            return Root()

    machines = completion.complete_machine_ids(Ctx(), node.agent.me[:4])  # type: ignore[arg-type]
    assert machines == [(node.agent.me, "core-01")]
    assert completion.complete_machine_or_unit(Ctx(), "") == sorted(  # type: ignore[arg-type]
        [node.agent.me, "core-01", "db.service", "web@1.service", "web@2.service"]
    )


def read_pty(fd: int, proc: subprocess.Popen[bytes], timeout: float = 120) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the other side closed
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    return out


def test_progress_line_on_a_pseudo_terminal(harness: Harness, tmp_path: Path) -> None:
    harness.add("core-01")
    harness.wait(lambda s: len(s.machines) == 1)
    # Four units, the last of which no machine can take: the wait reports it as the slowest.
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"p{i}.service")
        paths[-1].write_text(unit_text(f"p{i}"))
    stuck = tmp_path / "stuck.service"
    stuck.write_text(unit_text("stuck", "MachineMetadata=zone=nowhere"))
    args = [*FLEETCTL, "start", "--block-attempts", "6", *map(str, paths), str(stuck)]

    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdout=slave, stderr=subprocess.PIPE, env=env_for(harness))
    os.close(slave)
    try:
        shown = read_pty(master, proc).decode()
    finally:
        os.close(master)
    proc.wait(60)
    assert proc.returncode == 1
    assert proc.stderr is not None
    error = proc.stderr.read().decode()
    assert error.startswith("fleetctl: Unit stuck.service not launched:")
    assert "\r\x1b[K[3/4 done] waiting for stuck.service: no machine can run it" in shown
    # What stays on the screen once each line is complete is the plain output.
    final = [line.split("\r\x1b[K")[-1] for line in shown.replace("\r\n", "\n").split("\n")]
    assert sorted(line.split(" launched")[0] for line in final if line) == [
        f"Unit p{i}.service" for i in range(3)
    ]

    # The same command into a pipe prints no progress at all.
    for path in paths:
        path.write_text(unit_text(f"again {path.stem}"))
    piped = subprocess.run(
        [*FLEETCTL, "destroy", *[p.stem + ".service" for p in paths]],
        capture_output=True, env=env_for(harness), timeout=120, check=False,
    )  # fmt: skip
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.decode() == "".join(f"Destroyed p{i}.service\n" for i in range(3))


def test_lease_ages_come_from_the_lease(harness: Harness) -> None:
    node = harness.add("core-01")
    harness.wait(lambda s: len(s.machines) == 1)
    client = harness.client()
    try:
        ages = client.lease_ages([node.agent.me, "0" * 32])
        assert set(ages) == {node.agent.me}
        # Keep-alives go every ttl/4: the last one is never older than that (plus slack).
        assert 0 <= ages[node.agent.me] <= harness.ttl / 4 + 2
    finally:
        client.close()


def test_units_near_the_limit_are_stored_and_read_back(
    etcd: EtcdCluster,  # noqa: F811
    etcd_prefix: str,  # noqa: F811
) -> None:
    registry = EtcdRegistry(list(etcd.endpoints), etcd_prefix)
    try:
        records = []
        for i in range(4):
            name = f"big{i}.service"
            empty = unit_value_size(UnitRecord(name, "", content_hash("")))
            text = "#" * (MAX_UNIT_VALUE_BYTES - empty)
            records.append(UnitRecord(name, text, content_hash(text)))
        # Four units of the largest size: one transaction each, and a snapshot above gRPC's
        # default 4 MiB answer limit.
        assert registry.write_units(records, DesiredState.INACTIVE, registry.snapshot())
        snapshot = registry.snapshot()
        assert {n: r.hash for n, r in snapshot.units.items()} == {r.name: r.hash for r in records}
    finally:
        registry.destroy(r.name for r in records)
        registry.close()


def test_an_etcd_with_a_smaller_request_limit_is_one_line(tmp_path: Path) -> None:
    small = EtcdCluster.start(tmp_path / "small", extra=["--max-request-bytes", "65536"])
    try:
        path = tmp_path / "big.service"
        path.write_text(unit_text() + "#" * 100_000 + "\n")
        proc = subprocess.run(
            [*FLEETCTL, "--endpoint", small.endpoints[0], "submit", str(path)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert proc.returncode == 1
        assert proc.stderr.count("\n") == 1, proc.stderr
        assert "refused the request as too large (etcdserver: request is too large)" in proc.stderr
        assert "raise that limit" in proc.stderr
    finally:
        small.stop()
