"""Which machine `fleetctl ssh`, `journal` and `status` reach: machine ids, prefixes and names,
units and their machines, and every way a lookup fails; and the command lines sent to ssh."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from fleetctl.commands.remote import (
    AmbiguousTarget,
    MachineNotFound,
    UnitNotRunning,
    find_machine,
    machine_of_unit,
    resolve,
    systemctl_status_command,
)
from fleetctl.ssh import Ssh, SshError, SshOptions, host_pattern, split_host
from fleetd.errors import FleetError, UnitNotFound
from fleetd.model import DesiredState, Machine, Owner, PublishedState
from fleetd.snapshot import Desired, Snapshot, UnitRecord
from fleetd.unitfile import content_hash

A = "2f9e13a1" + "0" * 24
B = "2f9e77b2" + "1" * 24
C = "0abc1234" + "2" * 24
HELLO = "[Service]\nExecStart=/bin/sleep 1000\n"
GLOBAL = "[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nGlobal=true\n"


def record(name: str, text: str) -> UnitRecord:
    return UnitRecord(name, text, content_hash(text), 1)


def cluster() -> Snapshot:
    snap = Snapshot()
    snap.machines = {
        A: Machine(A, "127.0.0.10", {}, "0.1.0", "core-01"),
        B: Machine(B, "127.0.0.11", {}, "0.1.0", "core-02"),
        C: Machine(C, "", {}, "0.1.0", "core-03.service"),
    }
    snap.units = {
        "hello.service": record("hello.service", HELLO),
        "idle.service": record("idle.service", HELLO),
        "global.service": record("global.service", GLOBAL),
        "core-03.service": record("core-03.service", HELLO),
        "gone.service": record("gone.service", HELLO),
    }
    snap.desired = {"hello.service": Desired(DesiredState.LAUNCHED, 2)}
    snap.owners = {"hello.service": Owner(B, 5, 5), "gone.service": Owner("f" * 32, 6, 6)}
    snap.states = {
        "hello.service": {B: PublishedState(B, "loaded", "active", "running", "", 1.0)},
    }
    return snap


@pytest.mark.parametrize(
    ("lookup", "expected"),
    [(A, A), ("core-01", A), ("0abc", C), ("hello.service", B), ("hello", B)],
    ids=["full-id", "name", "prefix", "unit", "unit-without-suffix"],
)
def test_resolves(lookup: str, expected: str) -> None:
    assert resolve(cluster(), lookup).id == expected


@pytest.mark.parametrize(
    ("lookup", "error", "fragment"),
    [
        ("2f9e", AmbiguousTarget, "'2f9e' matches 2 machines (2f9e13a1, 2f9e77b2)"),
        ("nosuch", MachineNotFound, "no machine or unit 'nosuch' in the cluster"),
        ("idle.service", UnitNotRunning, "unit idle.service is not running on any machine"),
        ("global.service", UnitNotRunning, "global unit"),
        ("gone.service", UnitNotRunning, "has left the cluster"),
        ("core-03.service", AmbiguousTarget, "names both a machine and the unit"),
    ],
    ids=["ambiguous-prefix", "unknown", "not-running", "global", "owner-gone", "machine-and-unit"],
)
def test_refuses(lookup: str, error: type[FleetError], fragment: str) -> None:
    with pytest.raises(error) as caught:
        resolve(cluster(), lookup)
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)


def test_explicit_machine_and_unit_lookups() -> None:
    assert find_machine(cluster(), "core-03.service").id == C
    with pytest.raises(UnitNotFound, match=r"unit nosuch\.service not found"):
        machine_of_unit(cluster(), "nosuch.service")
    with pytest.raises(MachineNotFound, match="no machine 'zzz'"):
        find_machine(cluster(), "zzz")


@pytest.mark.parametrize(
    ("address", "expected"),
    [("h", ("h", 22)), ("h:2222", ("h", 2222)), ("[::1]:23", ("::1", 23))],
)
def test_split_host(address: str, expected: tuple[str, int]) -> None:
    assert split_host(address, 22) == expected


@pytest.mark.parametrize("address", ["h:x", "h:0", ":22", "h:70000"])
def test_split_host_refuses(address: str) -> None:
    with pytest.raises(SshError, match="bad"):
        split_host(address, 22)


def test_host_patterns() -> None:
    assert host_pattern("127.0.0.10", 22) == "127.0.0.10"
    assert host_pattern("127.0.0.10", 2222) == "[127.0.0.10]:2222"


def test_ssh_command_lines(tmp_path: Path) -> None:
    log = tmp_path / "log"
    strict = Ssh(SshOptions(username="root", port=2222, known_hosts_file=str(tmp_path / "kh")))
    argv = strict.argv("127.0.0.10", ["echo hi"], log)
    assert argv[-2:] == ["127.0.0.10", "echo hi"]
    assert "StrictHostKeyChecking=yes" in argv
    assert f"UserKnownHostsFile={tmp_path / 'kh'}" in argv
    assert argv[argv.index("-p") + 1] == "2222" and argv[argv.index("-l") + 1] == "root"
    loose = Ssh(SshOptions(strict_host_key_checking=False, tunnel="127.0.0.11:2200"))
    argv = loose.argv("127.0.0.12", [], log)
    assert "StrictHostKeyChecking=no" in argv and "UserKnownHostsFile=/dev/null" in argv
    proxy = next(a for a in argv if a.startswith("ProxyCommand="))
    jump = shlex.split(proxy.removeprefix("ProxyCommand="))
    assert jump[-3:] == ["-W", "%h:%p", "127.0.0.11"]
    assert jump[jump.index("-p") + 1] == "2200"
    strict.close()
    loose.close()


def test_status_command_quotes_the_unit() -> None:
    command = systemctl_status_command("a b.service")
    assert "systemctl --user status -l --no-pager -- 'a b.service'" in command
    assert "exec systemctl status -l --no-pager -- 'a b.service'" in command
