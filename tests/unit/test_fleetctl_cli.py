"""The command line itself, with the registry replaced through `fleetctl.client.factory`: global
options, the error table, --debug and the version."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from fleetctl import __version__, client, main
from fleetctl.client import GlobalOptions
from fleetd.errors import (
    ConfigError,
    InvalidUnitName,
    RegistryUnavailable,
    UnitNotFound,
)
from fleetd.keys import KeyLayout, Kind
from fleetd.model import DesiredState, Machine, PublishedState
from fleetd.snapshot import Desired, Snapshot, UnitRecord


class FakeRegistry:
    def __init__(self, snapshot: Snapshot | None = None, fail: Exception | None = None) -> None:
        self.snap = snapshot or Snapshot()
        self.fail = fail
        self.writes: list[tuple[list[UnitRecord], DesiredState | None]] = []
        self.closed = False
        self.options: list[GlobalOptions] = []
        self.asked: list[frozenset[Kind] | None] = []

    def snapshot(self, kinds: Collection[Kind] | None = None) -> Snapshot:
        self.asked.append(None if kinds is None else frozenset(kinds))
        if self.fail is not None:
            raise self.fail
        # What etcd would give for a read of only these kinds: a listing that needs more than
        # it asks for fails here.
        return self.snap if kinds is None else self.snap.only(KeyLayout(), kinds)

    def write_units(
        self, records: Iterable[UnitRecord], desired: DesiredState | None, seen: Snapshot
    ) -> bool:
        records = list(records)
        self.writes.append((records, desired))
        for record in records:
            self.snap.units[record.name] = record
            if desired is not None:
                self.snap.desired[record.name] = Desired(desired)
        return True

    def destroy(self, names: Iterable[str]) -> None:
        for name in names:
            self.snap.units.pop(name, None)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeRegistry:
    registry = FakeRegistry()

    def factory(options: GlobalOptions) -> FakeRegistry:
        registry.options.append(options)
        return registry

    monkeypatch.setattr(client, "factory", factory)
    return registry


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    # The app `fleetctl ARGS` runs with, as the console script picks it.
    return CliRunner().invoke(main.app_for(args), list(args), env=env)


@pytest.mark.parametrize(
    ("args", "word"),
    [
        ([], None),
        (["list-units"], "list-units"),
        (["list-units", "--no-legend"], "list-units"),
        (["--endpoint", "http://10.0.0.1:2379", "cat", "a.service"], "cat"),
        (["--endpoint=http://10.0.0.1:2379", "status", "a.service"], "status"),
        (["--request-timeout", "2", "--debug", "start", "a.service"], "start"),
        # A value that looks like a command is still the option's value.
        (["--tunnel", "status", "list-machines"], "list-machines"),
        (["--debug"], None),
        (["-h"], None),
        (["--", "ssh", "m1"], "ssh"),
        (["--endpoint"], None),
    ],
)
def test_the_command_a_line_names(args: list[str], word: str | None) -> None:
    assert main.command_word(args) == word


def test_one_command_is_built_for_a_command_line_that_names_it() -> None:
    names = [str(info.name) for info in main.app.registered_commands]
    assert len(names) > 10
    for name in names:
        lean = main.app_for(["--debug", name, "x"])
        built = [info.name for info in lean.registered_commands]
        assert built == (names if name == "help" else [name]), name


@pytest.mark.parametrize("args", [[], ["--help"], ["nosuch"], ["help", "start"], ["lis"]])
def test_the_whole_cli_for_lines_that_need_every_command(args: list[str]) -> None:
    assert main.app_for(args) is main.app


def test_completion_always_gets_the_whole_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("_FLEETCTL_COMPLETE", "complete_bash")
    assert main.app_for(["list-units"]) is main.app


def test_a_command_built_alone_shows_and_takes_what_it_does_in_the_whole_cli() -> None:
    for info in main.app.registered_commands:
        assert info.name is not None
        args = ["--endpoint", "http://127.0.0.1:1", info.name, "--help"]
        alone = CliRunner().invoke(main.app_for(args), args)
        whole = CliRunner().invoke(main.app, args)
        assert (alone.exit_code, alone.stdout) == (whole.exit_code, whole.stdout), info.name


def test_version() -> None:
    assert run("version").stdout == f"fleetctl version {__version__}\n"
    assert run("--version").stdout == f"fleetctl version {__version__}\n"


def test_help_in_every_spelling_succeeds_and_shows_the_version() -> None:
    # fleet's TestClientHelpFlag and TestClientVersionHelpOutput.
    outputs = {}
    for args in (["--help"], ["-h"], ["help"], []):
        result = run(*args)
        assert result.exit_code == 0, (args, result.output)
        assert "Usage: fleetctl" in result.stdout, args
        assert "list-unit-files" in result.stdout, args
        outputs[" ".join(args)] = result.stdout
    assert outputs["--help"] == outputs["-h"]
    assert outputs["help"] == outputs[""]
    assert f"fleetctl version {__version__}" in outputs["help"]


def test_help_of_one_command() -> None:
    result = run("help", "start")
    assert result.exit_code == 0, result.output
    assert "Usage: fleetctl start" in result.stdout
    assert "--no-block" in result.stdout


def test_help_of_an_unknown_command_is_one_line() -> None:
    result = run("help", "nosuch")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "fleetctl: no command 'nosuch': `fleetctl help` lists the commands"
    ]


def test_global_options_and_their_environment_variables(fake: FakeRegistry) -> None:
    env = {"FLEETCTL_ETCD_KEY_PREFIX": "/other/", "FLEETCTL_REQUEST_TIMEOUT": "7.5"}
    result = run("--endpoint", "http://10.0.0.1:2379", "list-machines", env=env)
    assert result.exit_code == 0, result.stderr
    (options,) = fake.options
    assert options.endpoint == "http://10.0.0.1:2379"
    assert options.etcd_key_prefix == "/other/"
    assert options.request_timeout == 7.5
    assert fake.closed


def test_defaults(fake: FakeRegistry) -> None:
    run("list-units")
    (options,) = fake.options
    assert options.endpoint == "http://127.0.0.1:2379"
    assert options.etcd_key_prefix == "/fleet/"
    assert options.request_timeout == 3.0


def test_list_machines_through_the_factory(fake: FakeRegistry) -> None:
    fake.snap.machines = {"f" * 32: Machine("f" * 32, "10.0.0.3", {"b": "2", "a": "1"})}
    result = run("list-machines", "--no-legend")
    assert result.stdout == "ffffffff...\t10.0.0.3\ta=1,b=2\n"


def test_listings_and_cat_read_only_the_kinds_they_show(fake: FakeRegistry) -> None:
    """list-units needs no unit texts or owners (half of a large registry): a unit that should
    run and has published nothing yet is known by its desired state alone."""
    me = "a" * 32
    fake.snap.machines = {me: Machine(me, "10.0.0.1")}
    for name, desired in (("up.service", DesiredState.LAUNCHED),
                          ("soon.service", DesiredState.LAUNCHED),
                          ("off.service", DesiredState.INACTIVE)):  # fmt: skip
        fake.snap.units[name] = UnitRecord(name, "[Service]\nExecStart=/bin/true\n", "h")
        fake.snap.desired[name] = Desired(desired)
    fake.snap.states["up.service"] = {
        me: PublishedState(me, "loaded", "active", "running", "h", 1.0)
    }
    result = run("list-units", "--no-legend")
    assert [line.split() for line in result.stdout.splitlines()] == [
        ["soon.service", "-", "-", "-"],
        ["up.service", "aaaaaaaa.../10.0.0.1", "active", "running"],
    ]
    assert fake.asked == [frozenset({Kind.MACHINE, Kind.STATE, Kind.DESIRED})]
    run("list-machines", "--no-legend")
    assert fake.asked[-1] == frozenset({Kind.MACHINE})
    run("list-unit-files", "--no-legend")
    assert fake.asked[-1] is None
    result = run("cat", "soon.service")
    assert result.stdout == "[Service]\nExecStart=/bin/true\n"
    assert fake.asked[-1] == frozenset({Kind.UNIT})


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (
            RegistryUnavailable("cannot reach etcd at http://x:1: timed out"),
            "fleetctl: cannot reach etcd at http://x:1: timed out",
        ),
        (ConfigError("bad endpoint\nsecond line"), "fleetctl: bad endpoint"),
        (
            PermissionError(13, "Permission denied", "/etc/x"),
            "fleetctl: cannot read /etc/x: Permission denied",
        ),
    ],
)
def test_errors_are_one_line_and_exit_1(error: Exception, line: str) -> None:
    def factory(options: GlobalOptions) -> FakeRegistry:
        return FakeRegistry(fail=error)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(client, "factory", factory)
        result = run("list-unit-files")
    assert result.exit_code == 1
    assert result.stderr == line + "\n"
    assert result.stdout == ""


def test_debug_lets_the_traceback_through(monkeypatch: pytest.MonkeyPatch) -> None:
    error = RegistryUnavailable("cannot reach etcd at http://x:1: refused")
    monkeypatch.setattr(client, "factory", lambda options: FakeRegistry(fail=error))
    result = run("--debug", "list-units")
    assert result.exception is error


def test_error_table_covers_every_fleet_error() -> None:
    assert main.describe(UnitNotFound("unit x not found")) == ("unit x not found", 1)
    assert main.describe(InvalidUnitName("bad")) == ("bad", 1)
    assert main.describe(KeyboardInterrupt()) == ("interrupted", 130)
    with pytest.raises(TypeError):
        main.describe(ValueError("not ours"))


def test_bad_request_timeout_is_refused(fake: FakeRegistry) -> None:
    result = run("--request-timeout", "0", "list-units")
    assert result.exit_code == 1
    assert result.stderr == "fleetctl: --request-timeout=0.0 must be more than 0 seconds\n"


def test_start_writes_every_unit_in_one_call(fake: FakeRegistry, tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.service").write_text("[Service]\nExecStart=/bin/true\n")
    args = [str(tmp_path / f"{n}.service") for n in ("a", "b", "c")]
    result = run("start", "--no-block", *args)
    assert result.exit_code == 0, result.stderr
    assert len(fake.writes) == 1
    records, desired = fake.writes[0]
    assert [r.name for r in records] == ["a.service", "b.service", "c.service"]
    assert desired is DesiredState.LAUNCHED


def test_bad_name_fails_before_the_registry_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    def factory(options: GlobalOptions) -> FakeRegistry:
        raise AssertionError("the registry must not be contacted")

    monkeypatch.setattr(client, "factory", factory)
    result = run("start", "ok.service", "bad$name.service")
    assert result.exit_code == 1
    assert "bad$name.service" in result.stderr


def test_the_entry_loads_the_command_with_the_collector_off_and_runs_it_with_it_on() -> None:
    """`fleetctl.__main__` (the installed command): the imports run with the cycle collector
    off, what they built is frozen, and the collector is back on once they are done."""
    import subprocess
    import sys

    probe = (
        "import gc, sys\n"
        "seen = []\n"
        "class Watch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'typer':\n"
        "            seen.append(gc.isenabled())\n"
        "sys.meta_path.insert(0, Watch())\n"
        "sys.argv = ['fleetctl', 'version']\n"
        "import fleetctl.__main__ as entry\n"
        "try:\n"
        "    entry.main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(seen, gc.isenabled(), gc.get_freeze_count() > 0, file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert __version__ in result.stdout
    assert result.stderr.strip().splitlines()[-1] == "[False] True True"
