"""The operator's tools without etcd: JSON documents of every listing, status and rebalance
--dry-run; the version and lease columns of list-machines; the size limit of a unit; the progress
line; completion scripts and completers; the auth options and their error lines."""

from __future__ import annotations

import io
import json
from collections.abc import Collection, Iterable
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from fleetctl import client, completion, main, output
from fleetctl.client import GlobalOptions
from fleetctl.commands import lifecycle
from fleetd.config import load_config
from fleetd.errors import AuthError, ConfigError, PermissionDenied, UnitTooLarge
from fleetd.keys import KeyLayout, Kind
from fleetd.model import DesiredState, Machine, Owner, PublishedState
from fleetd.snapshot import (
    MAX_UNIT_VALUE_BYTES,
    Desired,
    Snapshot,
    UnitRecord,
    check_unit_size,
    unit_value_size,
)
from fleetd.unitfile import content_hash

A = "2f9e13a1" + "0" * 24
B = "7c0ffee0" + "1" * 24
HELLO = "[Unit]\nDescription=Hello %i\n\n[Service]\nExecStart=/bin/sleep 1000\n"
NOWHERE = "[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nMachineMetadata=zone=nowhere\n"
GLOBAL = "[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nGlobal=true\n"


def record(name: str, text: str) -> UnitRecord:
    return UnitRecord(name, text, content_hash(text), 1)


def cluster() -> Snapshot:
    snap = Snapshot()
    snap.machines = {
        A: Machine(A, "10.0.0.1", {"zone": "a"}, "0.1.0", "core-01"),
        B: Machine(B, "", {}, "", ""),
    }
    snap.units = {
        "hello@1.service": record("hello@1.service", HELLO),
        "nowhere.service": record("nowhere.service", NOWHERE),
        "global.service": record("global.service", GLOBAL),
        "idle.service": record("idle.service", HELLO),
    }
    snap.desired = {
        "hello@1.service": Desired(DesiredState.LAUNCHED, 2),
        "nowhere.service": Desired(DesiredState.LAUNCHED, 2),
        "global.service": Desired(DesiredState.LAUNCHED, 2),
    }
    snap.owners = {"hello@1.service": Owner(A, 5, 5)}
    snap.states = {
        "hello@1.service": {
            A: PublishedState(A, "loaded", "active", "running", content_hash(HELLO), 1000.5)
        },
    }
    return snap


class FakeRegistry:
    def __init__(self, snapshot: Snapshot, ages: dict[str, float] | None = None) -> None:
        self.snap = snapshot
        self.ages = ages or {}
        self.writes: list[list[UnitRecord]] = []
        self.age_reads = 0

    def snapshot(self, kinds: Collection[Kind] | None = None) -> Snapshot:
        return self.snap if kinds is None else self.snap.only(KeyLayout(), kinds)

    def write_units(
        self, records: Iterable[UnitRecord], desired: DesiredState | None, seen: Snapshot
    ) -> bool:
        self.writes.append(list(records))
        return True

    def lease_ages(self, machine_ids: Iterable[str]) -> dict[str, float]:
        self.age_reads += 1
        return {m: self.ages[m] for m in machine_ids if m in self.ages}

    def destroy(self, names: Iterable[str]) -> None:
        raise AssertionError("not used")

    def close(self) -> None:
        pass


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeRegistry:
    registry = FakeRegistry(cluster(), {A: 2.0})
    monkeypatch.setattr(client, "factory", lambda options: registry)
    return registry


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main.app, list(args), env=env)


def parsed(result: Result) -> object:
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


# ------------------------------------------------------------------------------------ JSON


def test_list_machines_json_has_every_field(fake: FakeRegistry) -> None:
    doc = parsed(run("list-machines", "-o", "json"))
    assert doc == {
        "machines": [
            {
                "id": A,
                "name": "core-01",
                "ip": "10.0.0.1",
                "metadata": {"zone": "a"},
                "version": "0.1.0",
                "lease_renewed_seconds_ago": 2.0,
            },
            {
                "id": B,
                "name": None,
                "ip": None,
                "metadata": {},
                "version": None,
                "lease_renewed_seconds_ago": None,
            },
        ]
    }


def test_list_units_json(fake: FakeRegistry) -> None:
    doc = parsed(run("list-units", "--output", "json"))
    assert doc == {
        "units": [
            {
                "unit": "global.service",
                "machine": None,
                "load": None,
                "active": None,
                "sub": None,
                "hash": None,
                "since": None,
            },
            {
                "unit": "hello@1.service",
                "machine": A,
                "load": "loaded",
                "active": "active",
                "sub": "running",
                "hash": content_hash(HELLO),
                "since": 1000.5,
            },
            {
                "unit": "nowhere.service",
                "machine": None,
                "load": None,
                "active": None,
                "sub": None,
                "hash": None,
                "since": None,
            },
        ]
    }


def test_list_unit_files_json(fake: FakeRegistry) -> None:
    doc = parsed(run("list-unit-files", "-o", "json"))
    assert isinstance(doc, dict)
    by_name = {entry["unit"]: entry for entry in doc["unit_files"]}
    assert list(by_name) == sorted(by_name)
    assert by_name["hello@1.service"] == {
        "unit": "hello@1.service",
        "global": False,
        "desired_state": "launched",
        "state": "launched",
        "machine": A,
        "hash": content_hash(HELLO),
        "description": "Hello 1",
        "refused": None,
    }
    assert doc["refused_entries"] == []
    assert by_name["global.service"]["global"] is True
    assert by_name["global.service"]["state"] is None
    assert by_name["idle.service"]["desired_state"] == "inactive"


def test_status_json_running_and_unschedulable(fake: FakeRegistry) -> None:
    doc = parsed(run("status", "-o", "json", "hello@1", "nowhere.service"))
    assert isinstance(doc, dict)
    hello, nowhere = doc["units"]
    assert hello["unit"] == "hello@1.service"
    assert hello["owner"] == A
    assert hello["not_scheduled"] is None
    assert hello["refused"] is None
    assert hello["machines"] == [
        {
            "machine": A,
            "load": "loaded",
            "active": "active",
            "sub": "running",
            "hash": content_hash(HELLO),
            "since": 1000.5,
            "name": "core-01",
            "ip": "10.0.0.1",
        }
    ]
    assert nowhere["machines"] == []
    refusals = nowhere["not_scheduled"]["machines"]
    assert set(refusals) == {A, B}
    assert all("zone" in reason for reason in refusals.values())


def test_rebalance_dry_run_json(fake: FakeRegistry) -> None:
    doc = parsed(run("rebalance", "--dry-run", "-o", "json"))
    assert doc == {"imbalance": 1, "moves": []}


def test_rebalance_json_needs_dry_run(fake: FakeRegistry) -> None:
    result = run("rebalance", "-o", "json")
    assert result.exit_code == 1
    assert result.stderr == "fleetctl: --output json shows a plan: add --dry-run\n"


def test_unknown_output_format_is_one_line(fake: FakeRegistry) -> None:
    result = run("list-units", "-o", "yaml")
    assert result.exit_code == 1
    assert result.stderr == "fleetctl: unknown output format 'yaml': use --output table or json\n"


# ----------------------------------------------------------------------------- list-machines


def test_machine_columns_stay_fleets_unless_asked(fake: FakeRegistry) -> None:
    plain = run("list-machines")
    assert plain.stdout.splitlines()[0].split() == ["MACHINE", "IP", "METADATA"]
    assert fake.age_reads == 0  # no lease reads for columns nobody asked for

    full = run("list-machines", "--full")
    lines = full.stdout.splitlines()
    assert lines[0].split() == ["MACHINE", "IP", "METADATA", "VERSION", "RENEWED"]
    assert lines[1].split() == [A, "10.0.0.1", "zone=a", "0.1.0", "2s", "ago"]
    assert lines[2].split() == [B, "-", "-", "-", "-"]

    picked = run("list-machines", "--no-legend", "--fields", "machine,version")
    assert picked.stdout.split() == [f"{A[:8]}...", "0.1.0", f"{B[:8]}...", "-"]


# ---------------------------------------------------------------------------- size limit


def test_unit_at_the_limit_passes_and_one_byte_more_is_refused() -> None:
    overhead = unit_value_size(record("big.service", ""))
    body = "x" * (MAX_UNIT_VALUE_BYTES - overhead)
    check_unit_size(UnitRecord("big.service", body, content_hash(body)))
    with pytest.raises(UnitTooLarge) as refused:
        check_unit_size(UnitRecord("big.service", body + "x", content_hash(body + "x")))
    message = str(refused.value)
    assert "\n" not in message
    assert f"{MAX_UNIT_VALUE_BYTES + 1} bytes stored" in message
    assert f"limit of {MAX_UNIT_VALUE_BYTES} bytes" in message
    assert "--max-request-bytes of 1.5 MiB" in message


def test_json_escaping_counts_towards_the_limit() -> None:
    # Each control character takes six bytes once stored as JSON.
    text = "\x01" * (MAX_UNIT_VALUE_BYTES // 6 + 1)
    assert len(text.encode()) < MAX_UNIT_VALUE_BYTES
    with pytest.raises(UnitTooLarge):
        check_unit_size(UnitRecord("esc.service", text, content_hash(text)))


def test_start_refuses_a_large_unit_before_writing(fake: FakeRegistry, tmp_path: Path) -> None:
    path = tmp_path / "big.service"
    path.write_text("[Service]\nExecStart=/bin/true\n# " + "x" * (2 * 1024 * 1024) + "\n")
    result = run("start", str(path))
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("fleetctl: unit big.service is too large for etcd: ")
    assert fake.writes == []


# ------------------------------------------------------------------------------ progress


class Polls:
    """A registry whose units reach their state one poll at a time."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.polls = 0

    def snapshot(self, kinds: Collection[Kind] | None = None) -> Snapshot:
        snap = Snapshot()
        snap.machines = {A: Machine(A, "10.0.0.1", {}, "", "core-01")}
        for i, name in enumerate(self.names):
            snap.units[name] = record(name, HELLO)
            snap.desired[name] = Desired(DesiredState.LAUNCHED, 1)
            if i < self.polls:
                snap.owners[name] = Owner(A, 2)
                snap.states[name] = {
                    A: PublishedState(A, "loaded", "active", "running", content_hash(HELLO), 1.0)
                }
        self.polls += 1
        return snap if kinds is None else snap.only(KeyLayout(), kinds)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def wait(names: list[str], monkeypatch: pytest.MonkeyPatch, stream: io.StringIO) -> str:
    monkeypatch.setattr("sys.stdout", stream)
    registry = Polls(names)
    lifecycle.wait_for(registry, names, DesiredState.LAUNCHED, 0, "start", sleep=lambda _: None)  # type: ignore[arg-type]
    return stream.getvalue()


def test_progress_line_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    names = ["a.service", "b.service", "c.service"]
    shown = wait(names, monkeypatch, Terminal())
    assert "\r\x1b[K[1/3 done] waiting for b.service: no machine has claimed it yet" in shown
    assert "[2/3 done] waiting for c.service" in shown
    # Erased before each result line and at the end: the lines themselves stay as in a pipe.
    final = [line.split("\r\x1b[K")[-1] for line in shown.split("\n")]
    assert final == [f"Unit {n} launched on {A[:8]}.../10.0.0.1" for n in names] + [""]


def test_no_progress_when_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    names = ["a.service", "b.service"]
    shown = wait(names, monkeypatch, io.StringIO())
    assert shown == "".join(f"Unit {n} launched on {A[:8]}.../10.0.0.1\n" for n in names)


def test_progress_is_cut_to_the_terminal_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "30")
    stream = Terminal()
    output.Progress(stream).show("x" * 100)
    assert stream.getvalue() == "\r\x1b[K" + "x" * 26 + "..."


# ---------------------------------------------------------------------------- completion


@pytest.mark.parametrize("shell", completion.SHELLS)
def test_completion_script_for_each_shell(shell: str) -> None:
    result = run("completion", shell)
    assert result.exit_code == 0, result.stderr
    assert "_FLEETCTL_COMPLETE" in result.stdout
    assert "fleetctl" in result.stdout


def test_completion_for_an_unknown_shell_is_one_line() -> None:
    result = run("completion", "tcsh")
    assert result.exit_code == 1
    assert result.stderr == "fleetctl: no completion for shell 'tcsh': use one of bash, zsh, fish\n"


def test_fields_completer_completes_the_last_item() -> None:
    complete = completion.fields_completer(output.UNIT_FIELDS)
    assert complete("") == list(output.UNIT_FIELDS)
    assert complete("unit,ma") == ["unit,machine"]
    assert complete("unit,") == [f"unit,{f}" for f in output.UNIT_FIELDS if f != "unit"]


# ---------------------------------------------------------------------------------- auth


def test_auth_options_reach_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[GlobalOptions] = []

    def factory(options: GlobalOptions) -> FakeRegistry:
        seen.append(options)
        return FakeRegistry(Snapshot())

    monkeypatch.setattr(client, "factory", factory)
    env = {"FLEETCTL_USERNAME": "ops", "FLEETCTL_PASSWORD": "s3cret"}
    assert run("list-units", env=env).exit_code == 0
    assert run("--username", "cli", "--password", "pw", "list-units").exit_code == 0
    assert [(o.username, o.password) for o in seen] == [("ops", "s3cret"), ("cli", "pw")]
    assert "s3cret" not in repr(seen[0])


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--username", "ops"], "fleetctl: --username ops needs --password (or FLEETCTL_PASSWORD)"),
        (["--password", "pw"], "fleetctl: --password needs --username (or FLEETCTL_USERNAME)"),
    ],
)
def test_half_credentials_are_refused(fake: FakeRegistry, args: list[str], line: str) -> None:
    result = run(*args, "list-units")
    assert result.exit_code == 1
    assert result.stderr == line + "\n"


def test_auth_errors_have_their_lines() -> None:
    message, code = main.describe(AuthError("etcd at http://e:1 refused user 'x': wrong"))
    assert code == 1
    assert message.endswith("set --username and --password (or FLEETCTL_USERNAME and "
                            "FLEETCTL_PASSWORD)")
    message, code = main.describe(PermissionDenied("etcd denied user 'v' write access"))
    assert code == 1
    assert "fleet role" in message


# ------------------------------------------------------------------------- fleetd config


MACHINE = {"FLEET_MACHINE_ID": "a" * 32}


def test_fleetd_reads_its_etcd_password_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "etcd.password"
    secret.write_text("from-file\n")
    config = load_config(
        None, {**MACHINE, "FLEET_ETCD_USERNAME": "agent", "FLEET_ETCD_PASSWORD_FILE": str(secret)},
        {},
    )
    assert (config.etcd_username, config.etcd_password) == ("agent", "from-file")
    assert "from-file" not in repr(config)


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"FLEET_ETCD_USERNAME": "agent"}, "etcd_username is set without etcd_password"),
        ({"FLEET_ETCD_PASSWORD": "pw"}, "without etcd_username"),
        (
            {"FLEET_ETCD_USERNAME": "a", "FLEET_ETCD_PASSWORD": "p",
             "FLEET_ETCD_PASSWORD_FILE": "/x"},
            "not both",
        ),
        (
            {"FLEET_ETCD_USERNAME": "a", "FLEET_ETCD_PASSWORD_FILE": "/nonexistent/pw"},
            "etcd_password_file /nonexistent/pw: No such file or directory",
        ),
    ],
)
def test_fleetd_credentials_are_checked(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, {**MACHINE, **env}, {})


# ------------------------------------------------------------------- the agents' side


def test_a_stored_unit_over_the_limit_is_refused_by_the_agents() -> None:
    from fleetd.keys import KeyLayout
    from fleetd.snapshot import encode_unit

    layout = KeyLayout("/fleet/")
    snap = Snapshot()
    small = record("x.service", HELLO)
    assert snap.apply(layout, layout.unit("x.service"), encode_unit(small).encode(), 3) is None
    assert "x.service" in snap.units
    text = "#" * MAX_UNIT_VALUE_BYTES
    big = encode_unit(UnitRecord("x.service", text, content_hash(text))).encode()
    reason = snap.apply(layout, layout.unit("x.service"), big, 4)
    assert reason == (
        f"stored unit of {len(big)} bytes exceeds the limit of {MAX_UNIT_VALUE_BYTES} bytes"
    )
    # The older, valid content is gone too: nobody runs what the key no longer holds.
    assert "x.service" not in snap.units
    assert snap.refused == {layout.unit("x.service"): reason}


def test_refused_entries_are_in_the_json_too(fake: FakeRegistry) -> None:
    fake.snap.refused = {"/fleet/unit/bad name.service": "unit name has invalid characters"}
    fake.snap.units["broken.service"] = record("broken.service", "[X-Fleet]\nMaxPerZone=0\n")
    doc = parsed(run("list-unit-files", "-o", "json"))
    assert isinstance(doc, dict)
    assert doc["refused_entries"] == [
        {"key": "/fleet/unit/bad name.service", "reason": "unit name has invalid characters"}
    ]
    (broken,) = [u for u in doc["unit_files"] if u["unit"] == "broken.service"]
    assert "MaxPerZone" in broken["refused"]
