"""fleetctl against a real etcd: what each command writes, prints and refuses.

Every test runs the real command line (typer's runner, in process) under its own key prefix and
checks the registry through `EtcdRegistry.snapshot`, never through fleetctl itself.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from fleetctl.main import app
from fleetd.model import DesiredState, Machine
from fleetd.registry import EtcdRegistry
from fleetd.snapshot import Snapshot
from fleetd.unitfile import content_hash
from tests.support.etcd_fixtures import EtcdCluster, etcd, etcd_prefix  # noqa: F401

pytestmark = pytest.mark.component

HELLO = "[Unit]\r\nDescription=Hello ünïcode\n\n[Service]\nExecStart=/bin/sleep 1000"
PLAIN = "[Unit]\nDescription=plain\n\n[Service]\nExecStart=/bin/true\n"


class Fleetctl:
    """Runs fleetctl against one etcd prefix and reads that prefix back."""

    def __init__(self, endpoints: list[str], prefix: str, cwd: Path) -> None:
        self.endpoints = endpoints
        self.prefix = prefix
        self.cwd = cwd
        self.registry = EtcdRegistry(endpoints, prefix, timeout=3.0)

    def __call__(self, *args: str, endpoint: str | None = None) -> Result:
        argv = [
            "--endpoint",
            endpoint or ",".join(self.endpoints),
            "--etcd-key-prefix",
            self.prefix,
            "--request-timeout",
            "2",
            *args,
        ]
        return CliRunner().invoke(app, argv, catch_exceptions=False)

    def snapshot(self) -> Snapshot:
        return self.registry.snapshot()

    def state(self) -> tuple[dict[str, str], dict[str, DesiredState]]:
        snap = self.snapshot()
        return (
            {name: record.text for name, record in snap.units.items()},
            {name: desired.state for name, desired in snap.desired.items()},
        )

    def file(self, name: str, text: str) -> str:
        path = self.cwd / name
        path.write_bytes(text.encode())
        return str(path)


@pytest.fixture
def fleetctl(
    etcd: EtcdCluster,  # noqa: F811
    etcd_prefix: str,  # noqa: F811
    tmp_path: Path,
) -> Iterator[Fleetctl]:
    ctl = Fleetctl(list(etcd.endpoints), etcd_prefix, tmp_path)
    yield ctl
    ctl.registry.close()


def add_machine(ctl: Fleetctl, machine_id: str, name: str, metadata: dict[str, str]) -> None:
    lease = ctl.registry.grant_lease(60)
    machine = Machine(machine_id, "127.0.0.9", metadata, "0.1.0", name)
    assert ctl.registry.register_machine(machine, lease)


def one_error_line(result: Result) -> str:
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fleetctl: ")
    return lines[0]


def test_submit_then_cat_gives_back_the_exact_bytes(fleetctl: Fleetctl) -> None:
    path = fleetctl.file("hello.service", HELLO)
    result = fleetctl("submit", path)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "Unit hello.service inactive\n"
    cat = fleetctl("cat", "hello.service")
    assert cat.exit_code == 0
    assert cat.stdout_bytes == HELLO.encode()
    units, desired = fleetctl.state()
    assert units == {"hello.service": HELLO}
    assert desired == {"hello.service": DesiredState.INACTIVE}


def test_list_unit_files_after_submit(fleetctl: Fleetctl) -> None:
    fleetctl("submit", fleetctl.file("hello.service", HELLO), fleetctl.file("b.service", PLAIN))
    result = fleetctl("list-unit-files")
    assert result.exit_code == 0, result.stderr
    rows = [[c for c in line.split("\t") if c] for line in result.stdout.splitlines()]
    assert rows == [
        ["UNIT", "HASH", "DSTATE", "STATE", "TARGET"],
        ["b.service", content_hash(PLAIN)[:7], "inactive", "inactive", "-"],
        ["hello.service", content_hash(HELLO)[:7], "inactive", "inactive", "-"],
    ]
    desc = fleetctl("list-unit-files", "--fields", "unit,desc", "--no-legend")
    assert desc.stdout == "b.service\tplain\nhello.service\tHello ünïcode\n"


def test_start_no_block_sets_desired_launched(fleetctl: Fleetctl) -> None:
    fleetctl("submit", fleetctl.file("a.service", PLAIN))
    path = fleetctl.file("b.service", PLAIN)
    result = fleetctl("start", "--no-block", "a.service", path)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "Triggered unit a.service start\nTriggered unit b.service start\n"
    _, desired = fleetctl.state()
    assert desired == {"a.service": DesiredState.LAUNCHED, "b.service": DesiredState.LAUNCHED}


def test_submit_keeps_the_desired_state_of_existing_units(fleetctl: Fleetctl) -> None:
    path = fleetctl.file("a.service", PLAIN)
    fleetctl("start", "--no-block", path)
    assert fleetctl("submit", path).stdout == ""
    assert fleetctl.state()[1] == {"a.service": DesiredState.LAUNCHED}


def test_stop_and_unload_no_block(fleetctl: Fleetctl) -> None:
    fleetctl("start", "--no-block", fleetctl.file("a.service", PLAIN))
    assert fleetctl("stop", "--no-block", "a").stdout == "Triggered unit a.service stop\n"
    assert fleetctl.state()[1] == {"a.service": DesiredState.LOADED}
    assert fleetctl("unload", "--no-block", "a.service").exit_code == 0
    assert fleetctl.state()[1] == {"a.service": DesiredState.INACTIVE}
    # With nothing owning it, an inactive unit is already where unload wants it.
    assert fleetctl("unload", "a.service").stdout == "Unit a.service inactive\n"


def test_destroy(fleetctl: Fleetctl) -> None:
    fleetctl("submit", fleetctl.file("a.service", PLAIN), fleetctl.file("b.service", PLAIN))
    result = fleetctl("destroy", "a.service", "b")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "Destroyed a.service\nDestroyed b.service\n"
    assert fleetctl.state() == ({}, {})


def test_instance_comes_from_the_registry_template(fleetctl: Fleetctl, tmp_path: Path) -> None:
    template = "[Service]\nExecStart=/bin/echo %i\n"
    fleetctl("submit", fleetctl.file("web@.service", template))
    elsewhere = tmp_path / "empty"
    elsewhere.mkdir()
    result = fleetctl("start", "--no-block", str(elsewhere / "web@1.service"))
    assert result.exit_code == 0, result.stderr
    units, desired = fleetctl.state()
    assert units == {"web@.service": template, "web@1.service": template}
    assert desired["web@1.service"] is DesiredState.LAUNCHED
    assert desired["web@.service"] is DesiredState.INACTIVE


def test_instance_comes_from_a_local_template(fleetctl: Fleetctl) -> None:
    template = "[Service]\nExecStart=/bin/echo %i\n"
    fleetctl.file("db@.service", template)
    result = fleetctl("submit", str(fleetctl.cwd / "db@7.service"))
    assert result.exit_code == 0, result.stderr
    assert fleetctl.state()[0] == {"db@7.service": template}


BAD_UNIT = "[Service\nExecStart=/bin/true\n"
CONTRADICTORY = "[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nMachineID=abc123\nGlobal=true\n"


@pytest.mark.parametrize(
    ("argv", "files", "expect"),
    [
        (["start", "{dir}/missing.service"], {}, "unit missing.service not found: no file"),
        (["submit", "bad$name.service"], {}, "bad$name.service"),
        (["submit", "{dir}/bad.service"], {"bad.service": BAD_UNIT}, "malformed section header"),
        (
            ["load", "{dir}/both.service"],
            {"both.service": CONTRADICTORY},
            "MachineID cannot be combined with Global",
        ),
        (
            ["start", "{dir}/web@.service"],
            {"web@.service": PLAIN},
            "cannot activate template web@.service: start an instance such as web@1.service",
        ),
        (
            ["submit", "{dir}/ok.service", "{dir}/bad.service"],
            {"ok.service": PLAIN, "bad.service": BAD_UNIT},
            "bad.service",
        ),
        (["list-units", "--fields", "unit,color"], {}, "valid fields are unit, load"),
        (["stop", "nothere.service"], {}, "unit nothere.service not found in the registry"),
        (["destroy", "existing.service", "nothere"], {}, "nothere.service not found"),
        (["cat", "nothere.service"], {}, "nothere.service not found"),
        (["status", "nothere.service"], {}, "nothere.service not found"),
        (["stop", "existing.service"], {}, "cannot stop unit existing.service: it is inactive"),
    ],
    ids=[
        "missing-file",
        "invalid-name",
        "malformed",
        "contradictory-xfleet",
        "template-start",
        "one-bad-of-two",
        "unknown-field",
        "stop-unknown",
        "destroy-unknown",
        "cat-unknown",
        "status-unknown",
        "stop-inactive",
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    fleetctl: Fleetctl, argv: list[str], files: dict[str, str], expect: str
) -> None:
    fleetctl("submit", fleetctl.file("existing.service", PLAIN))
    before = fleetctl.state()
    for name, text in files.items():
        fleetctl.file(name, text)
    result = fleetctl(*[a.format(dir=fleetctl.cwd) for a in argv])
    assert expect in one_error_line(result)
    assert result.stdout == ""
    assert fleetctl.state() == before


def test_unreachable_etcd_is_one_line(fleetctl: Fleetctl) -> None:
    path = fleetctl.file("a.service", PLAIN)
    started = time.monotonic()
    result = fleetctl("start", path, endpoint="http://127.0.0.1:1")
    line = one_error_line(result)
    assert line.startswith("fleetctl: cannot reach etcd at http://127.0.0.1:1: ")
    assert time.monotonic() - started < 15
    assert fleetctl.state() == ({}, {})


def test_replace_versus_the_warning(fleetctl: Fleetctl) -> None:
    path = fleetctl.file("a.service", PLAIN)
    fleetctl("submit", path)
    changed = PLAIN.replace("/bin/true", "/bin/false")
    fleetctl.file("a.service", changed)

    kept = fleetctl("submit", path)
    assert kept.exit_code == 0
    assert kept.stderr == (
        f"WARNING: Unit a.service in registry differs from local unit file {path}. "
        "Add --replace to override.\n"
    )
    assert fleetctl.state()[0] == {"a.service": PLAIN}

    # As fleet does, start still launches the registry's copy when the file differs.
    started = fleetctl("start", "--no-block", path)
    assert "differs from local unit file" in started.stderr
    assert fleetctl.state() == ({"a.service": PLAIN}, {"a.service": DesiredState.LAUNCHED})

    replaced = fleetctl("start", "--no-block", "--replace", path)
    assert replaced.exit_code == 0
    assert replaced.stderr == ""
    assert fleetctl.state() == ({"a.service": changed}, {"a.service": DesiredState.LAUNCHED})


def test_submit_replace_of_an_inactive_unit(fleetctl: Fleetctl) -> None:
    path = fleetctl.file("a.service", PLAIN)
    fleetctl("submit", path)
    fleetctl.file("a.service", PLAIN + "# v2\n")
    assert fleetctl("submit", "--replace", path).exit_code == 0
    assert fleetctl.state() == (
        {"a.service": PLAIN + "# v2\n"},
        {"a.service": DesiredState.INACTIVE},
    )


def test_start_gives_up_with_the_reason_no_machine_can_run_it(fleetctl: Fleetctl) -> None:
    add_machine(fleetctl, "a1" * 16, "core-01", {"zone": "a"})
    unit = PLAIN + "\n[X-Fleet]\nMachineMetadata=zone=b\n"
    path = fleetctl.file("meta@nowhere.service", unit)
    result = fleetctl("start", "--block-attempts", "2", path)
    line = one_error_line(result)
    assert line == (
        "fleetctl: Unit meta@nowhere.service not launched: no machine can run it: "
        "core-01: metadata zone=b not matched"
    )
    assert fleetctl.state()[1] == {"meta@nowhere.service": DesiredState.LAUNCHED}

    status = fleetctl("status", "meta@nowhere.service")
    assert status.exit_code == 0
    assert "  core-01: metadata zone=b not matched" in status.stdout.splitlines()

    machines = fleetctl("list-machines", "--full")
    assert machines.stdout.splitlines()[1].split("\t")[0] == "a1" * 16
    assert "zone=a" in machines.stdout


def test_environment_variables_configure_the_connection(
    fleetctl: Fleetctl, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleetctl("submit", fleetctl.file("a.service", PLAIN))
    monkeypatch.setenv("FLEETCTL_ENDPOINT", fleetctl.endpoints[0])
    monkeypatch.setenv("FLEETCTL_ETCD_KEY_PREFIX", fleetctl.prefix)
    monkeypatch.setenv("FLEETCTL_REQUEST_TIMEOUT", "2")
    result = CliRunner().invoke(app, ["list-unit-files", "--no-legend", "--fields", "unit"])
    assert result.stdout == "a.service\n"


def test_commands_load_no_grpc_library(fleetctl: Fleetctl) -> None:
    """fleetctl speaks to etcd over its JSON gateway: a command starts without gRPC and the etcd
    client's protobuf code, most of what a short command such as list-units would cost."""
    path = fleetctl.file("light.service", PLAIN)
    code = (
        "import sys\n"
        "from fleetctl.main import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "heavy = ('grpc', 'pyetcd', 'google')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))\n"
    )
    endpoint = ["--endpoint", fleetctl.endpoints[0], "--etcd-key-prefix", fleetctl.prefix]
    for command in (["submit", path], ["list-unit-files", "--no-legend"], ["list-units"]):
        run = subprocess.run(
            [sys.executable, "-c", code, *endpoint, *command],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert run.returncode == 0, run.stderr
        assert run.stdout.splitlines()[-1] == "[]", (command, run.stdout)
    assert "light.service" in fleetctl.snapshot().units
