"""The UnitManager contract, run against the in-memory fake and the D-Bus adapter on a real
`systemd --user` manager, so the fake cannot drift from what systemd does.

Real units are asynchronous (start/stop only queue a job), so every expectation about a state is
a bounded poll; against the fake the first poll already sees it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fleetd.errors import InvalidUnitName, SystemdError, UnitTooLarge
from fleetd.fake_systemd import FakeUnitManager
from fleetd.model import SystemdState
from fleetd.snapshot import MAX_UNIT_VALUE_BYTES
from fleetd.systemd import DbusUnitManager

try:
    from tests.support.systemd_fixtures import (
        ManagerHandle,
        requires_real_manager,
        running_manager,
        user_manager,
    )
except ModuleNotFoundError:  # tests/ itself is on sys.path rather than the repository root
    from support.systemd_fixtures import (  # type: ignore[no-redef]
        ManagerHandle,
        requires_real_manager,
        running_manager,
        user_manager,
    )

__all__ = ["user_manager"]  # a fixture: imported so pytest finds it here

NOT_FOUND = SystemdState("not-found", "inactive", "dead")
POLL_TIMEOUT = 15.0


def looping_unit(marker: str, out: Path, install: bool = False) -> str:
    """A unit that records `marker` in `out` when it starts, then runs until stopped."""
    text = (
        "[Unit]\n"
        f"Description={marker}\n"
        "[Service]\n"
        "Type=simple\n"
        # systemd turns "$$" into "$", so the shell sees "$$": its own pid.
        f"ExecStart=/bin/sh -c 'echo {marker} $$$$ > {out}; while :; do echo hi; sleep 1; done'\n"
    )
    if install:
        text += "[Install]\nWantedBy=default.target\n"
    return text


FAILING_UNIT = "[Service]\nType=simple\nExecStart=/bin/sh -c 'exit 1'\n"


@dataclass
class Backend:
    """One UnitManager under test plus the backend-specific way to see what a unit runs."""

    kind: str
    manager: FakeUnitManager | DbusUnitManager
    workdir: Path
    started: list[str] = field(default_factory=list)

    def unit_name(self, stem: str = "u", suffix: str = ".service") -> str:
        return f"{stem}-{uuid.uuid4().hex[:8]}{suffix}"

    def wait_state(self, name: str, want: Callable[[SystemdState], bool]) -> SystemdState:
        deadline = time.monotonic() + POLL_TIMEOUT
        while True:
            state = self.manager.states([name])[name]
            if want(state) or time.monotonic() > deadline:
                return state
            time.sleep(0.02)

    def wait_active(self, name: str) -> SystemdState:
        return self.wait_state(name, lambda s: s.active == "active")

    def wait_inactive(self, name: str) -> SystemdState:
        return self.wait_state(name, lambda s: s.active in ("inactive", "failed"))

    def running_marker(self, name: str, expect: str) -> str | None:
        """The marker of the unit text the running process was started from."""
        if isinstance(self.manager, FakeUnitManager):
            text = self.manager.running_text(name)
            found = re.search(r"^Description=(.*)$", text or "", re.MULTILINE)
            return found.group(1) if found else None
        out = self.out(name)
        deadline = time.monotonic() + POLL_TIMEOUT
        marker = None
        while time.monotonic() < deadline:
            if out.exists() and (words := out.read_text().split()):
                marker = words[0]
                if marker == expect:
                    break
            time.sleep(0.02)
        return marker

    def out(self, name: str) -> Path:
        return self.workdir / f"{name}.out"

    def start(self, name: str) -> None:
        self.started.append(name)
        self.manager.start(name)


@pytest.fixture(params=["fake", "real"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "fake":
        yield Backend("fake", FakeUnitManager(), tmp_path)
        return
    # Skips with the reason when real managers cannot run here.
    handle: ManagerHandle = request.getfixturevalue("user_manager")
    manager = DbusUnitManager(tmp_path / "units", user=True, bus_address=handle.bus_address)
    backend = Backend("real", manager, tmp_path)
    try:
        yield backend
    finally:
        # The manager is shared by the module: leave nothing running or installed behind.
        for name in backend.started:
            with contextlib.suppress(SystemdError):
                manager.stop(name)
        for name in backend.started:
            backend.wait_inactive(name)
        for name in manager.loaded_units():
            manager.unload(name)
        manager.reload()
        manager.close()


def test_load_reload_start_runs_the_unit(backend: Backend) -> None:
    name = backend.unit_name()
    backend.manager.load(name, looping_unit("v1", backend.out(name)))
    backend.manager.reload()
    backend.start(name)
    assert backend.wait_active(name) == SystemdState("loaded", "active", "running")
    assert backend.running_marker(name, "v1") == "v1"


def test_stop_makes_the_unit_inactive(backend: Backend) -> None:
    name = backend.unit_name()
    backend.manager.load(name, looping_unit("v1", backend.out(name)))
    backend.manager.reload()
    backend.start(name)
    backend.wait_active(name)
    backend.manager.stop(name)
    assert backend.wait_inactive(name) == SystemdState("loaded", "inactive", "dead")


def test_unload_removes_the_file_and_the_unit(backend: Backend) -> None:
    name = backend.unit_name()
    backend.manager.load(name, looping_unit("v1", backend.out(name)))
    backend.manager.reload()
    backend.start(name)
    backend.wait_active(name)
    backend.manager.stop(name)
    backend.wait_inactive(name)
    backend.manager.unload(name)
    backend.manager.reload()
    assert name not in backend.manager.loaded_units()
    assert not (backend.workdir / "units" / name).exists()
    assert backend.manager.states([name]) == {name: NOT_FOUND}
    assert backend.manager.unit_file_state(name) == "not-found"


def test_loaded_units_hashes_the_file_text(backend: Backend) -> None:
    a, b = backend.unit_name("a"), backend.unit_name("b")
    text_a, text_b = looping_unit("va", backend.out(a)), looping_unit("vb", backend.out(b))
    backend.manager.load(a, text_a)
    backend.manager.load(b, text_b)
    assert backend.manager.loaded_units() == {
        a: hashlib.sha1(text_a.encode()).hexdigest(),
        b: hashlib.sha1(text_b.encode()).hexdigest(),
    }
    backend.manager.unload(a)
    assert backend.manager.loaded_units() == {b: hashlib.sha1(text_b.encode()).hexdigest()}
    # A new text loaded again, and (real manager) a file changed in place behind its back:
    # the hash follows the file, though the adapter keeps hashes between calls.
    text_b2 = looping_unit("vb2", backend.out(b))
    backend.manager.load(b, text_b2)
    assert backend.manager.loaded_units() == {b: hashlib.sha1(text_b2.encode()).hexdigest()}
    if backend.kind == "real":
        path = backend.workdir / "units" / b
        with path.open("a") as out:
            out.write("# edited\n")
        edited = (text_b2 + "# edited\n").encode()
        assert backend.manager.loaded_units() == {b: hashlib.sha1(edited).hexdigest()}


def test_unit_with_install_section_is_enabled_at_runtime(backend: Backend) -> None:
    plain, installed = backend.unit_name("plain"), backend.unit_name("installed")
    backend.manager.load(plain, looping_unit("v1", backend.out(plain)))
    backend.manager.load(installed, looping_unit("v1", backend.out(installed), install=True))
    backend.manager.reload()
    assert backend.manager.unit_file_state(plain) == "linked-runtime"
    assert backend.manager.unit_file_state(installed) == "enabled-runtime"
    backend.manager.unload(installed)
    backend.manager.reload()
    assert backend.manager.unit_file_state(installed) == "not-found"


def follower_unit(marker: str, out: Path, leader: str) -> str:
    """fleet's discovery.service shape: bound to `leader` and enabled into its wants."""
    return (
        f"[Unit]\nDescription={marker}\nBindsTo={leader}\n"
        f"[Service]\nType=simple\nExecStart=/bin/sh -c 'echo {marker} > {out}; "
        "while :; do sleep 1; done'\n"
        f"[Install]\nWantedBy={leader}\n"
    )


def test_enabled_unit_starts_and_stops_with_the_unit_that_wants_it(backend: Backend) -> None:
    # fleet's TestInstallUnit: loading enables the [Install] section, so starting the leader
    # pulls the follower in, and BindsTo= takes it down with the leader.
    leader, follower = backend.unit_name("hello"), backend.unit_name("discovery")
    backend.manager.load(leader, looping_unit("lead", backend.out(leader)))
    backend.manager.load(follower, follower_unit("follow", backend.out(follower), leader))
    backend.manager.reload()
    backend.started.append(follower)
    assert backend.manager.states([follower])[follower].active == "inactive"
    backend.start(leader)
    assert backend.wait_active(leader).active == "active"
    assert backend.wait_active(follower) == SystemdState("loaded", "active", "running")
    backend.manager.stop(leader)
    assert backend.wait_inactive(leader).active == "inactive"
    assert backend.wait_inactive(follower) == SystemdState("loaded", "inactive", "dead")


def test_unit_whose_process_exits_1_fails_and_unload_resets_it(backend: Backend) -> None:
    name = backend.unit_name("fails")
    backend.manager.load(name, FAILING_UNIT)
    backend.manager.reload()
    backend.start(name)
    assert backend.wait_state(name, lambda s: s.active == "failed") == SystemdState(
        "loaded", "failed", "failed"
    )
    backend.manager.unload(name)
    backend.manager.reload()
    assert backend.manager.states([name]) == {name: NOT_FOUND}


def test_stopping_a_failed_unit_leaves_it_failed(backend: Backend) -> None:
    name = backend.unit_name("fails")
    backend.manager.load(name, FAILING_UNIT)
    backend.manager.reload()
    backend.start(name)
    backend.wait_state(name, lambda s: s.active == "failed")
    backend.manager.stop(name)
    assert backend.wait_inactive(name) == SystemdState("loaded", "failed", "failed")


@pytest.mark.parametrize(
    ("service", "expected"),
    [
        ("Type=oneshot\nExecStart=/bin/true\n", SystemdState("loaded", "inactive", "dead")),
        (
            "Type=oneshot\nRemainAfterExit=yes\nExecStart=/bin/true\n",
            SystemdState("loaded", "active", "exited"),
        ),
    ],
    ids=["oneshot", "remain-after-exit"],
)
def test_unit_whose_process_succeeds(
    backend: Backend, service: str, expected: SystemdState
) -> None:
    name = backend.unit_name("once")
    backend.manager.load(name, f"[Service]\n{service}")
    backend.manager.reload()
    backend.start(name)
    assert backend.wait_state(name, lambda s: s == expected) == expected


def test_states_of_unknown_units_read_not_found(backend: Backend) -> None:
    names = [backend.unit_name("nope"), backend.unit_name("nope", "@1.service"), "x.socket"]
    assert backend.manager.states(names) == dict.fromkeys(names, NOT_FOUND)
    assert backend.manager.states([]) == {}


def test_states_mix_known_and_unknown_units(backend: Backend) -> None:
    known, unknown = backend.unit_name("known"), backend.unit_name("unknown")
    backend.manager.load(known, looping_unit("v1", backend.out(known)))
    backend.manager.reload()
    assert backend.manager.states([known, unknown]) == {
        known: SystemdState("loaded", "inactive", "dead"),
        unknown: NOT_FOUND,
    }


def test_start_or_stop_of_a_unit_never_loaded_raises(backend: Backend) -> None:
    name = backend.unit_name("never")
    with pytest.raises(SystemdError, match=re.escape(name)):
        backend.manager.start(name)
    with pytest.raises(SystemdError, match=re.escape(name)):
        backend.manager.stop(name)


def test_unload_of_a_unit_never_loaded_is_harmless(backend: Backend) -> None:
    name = backend.unit_name("never")
    backend.manager.unload(name)
    backend.manager.reload()
    assert backend.manager.states([name]) == {name: NOT_FOUND}


def test_a_freshly_loaded_unit_starts_even_before_reload(backend: Backend) -> None:
    # systemd 252 reads a unit file it has never seen on demand; only changes to a unit it
    # already holds need the reload.
    name = backend.unit_name()
    backend.manager.load(name, looping_unit("v1", backend.out(name)))
    backend.start(name)
    assert backend.wait_active(name).sub == "running"


def test_asking_for_a_state_first_does_not_hide_a_later_load(backend: Backend) -> None:
    name = backend.unit_name()
    assert backend.manager.states([name]) == {name: NOT_FOUND}
    backend.manager.load(name, looping_unit("v1", backend.out(name)))
    assert backend.manager.states([name]) == {name: SystemdState("loaded", "inactive", "dead")}
    backend.start(name)
    assert backend.wait_active(name).sub == "running"


def test_replacing_the_text_runs_the_new_text_after_reload_and_restart(backend: Backend) -> None:
    name = backend.unit_name()
    backend.manager.load(name, looping_unit("v1", backend.out(name)))
    backend.manager.reload()
    backend.start(name)
    backend.wait_active(name)
    assert backend.running_marker(name, "v1") == "v1"

    backend.manager.load(name, looping_unit("v2", backend.out(name)))
    backend.manager.reload()
    # A reload does not touch the running process.
    assert backend.manager.states([name])[name].active == "active"
    assert backend.running_marker(name, "v1") == "v1"

    backend.manager.stop(name)
    backend.wait_inactive(name)
    backend.start(name)
    backend.wait_active(name)
    assert backend.running_marker(name, "v2") == "v2"


def test_template_instance_runs_from_a_file_of_its_own_name(backend: Backend) -> None:
    name = backend.unit_name("hello", "@1.service")
    backend.manager.load(name, looping_unit("i1", backend.out(name)))
    backend.manager.reload()
    backend.start(name)
    assert backend.wait_active(name) == SystemdState("loaded", "active", "running")
    assert set(backend.manager.loaded_units()) == {name}
    if backend.kind == "real":
        assert (backend.workdir / "units" / name).read_text().startswith("[Unit]")


@pytest.mark.parametrize("bad", ["", "../evil.service", "a/b.service", ".hidden.service"])
def test_names_that_cannot_be_file_names_are_refused(backend: Backend, bad: str) -> None:
    with pytest.raises(InvalidUnitName):
        backend.manager.load(bad, FAILING_UNIT)


def test_a_unit_larger_than_the_registry_limit_is_refused(backend: Backend) -> None:
    text = FAILING_UNIT + "#" * MAX_UNIT_VALUE_BYTES
    with pytest.raises(UnitTooLarge):
        backend.manager.load("huge.service", text)
    assert backend.manager.loaded_units() == {}
    if backend.kind == "real":
        assert not (backend.workdir / "units" / "huge.service").exists()


@requires_real_manager
def test_unit_files_are_written_safely(user_manager, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Mode 0644 in a 0755 directory; links planted at the file's name or at its temporary name
    are replaced, never written through; a units directory that is a link is refused."""
    units = tmp_path / "units"
    units.mkdir(mode=0o777)
    os.chmod(units, 0o777)
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    (units / "planted.service").symlink_to(victim)
    (units / ".planted.service.tmp").symlink_to(victim)
    manager = DbusUnitManager(units, user=True, bus_address=user_manager.bus_address)
    try:
        manager.load("planted.service", FAILING_UNIT)
        path = units / "planted.service"
        assert not path.is_symlink()
        assert path.read_text() == FAILING_UNIT
        assert victim.read_text() == "untouched\n"
        assert path.stat().st_mode & 0o777 == 0o644
        assert units.stat().st_mode & 0o777 == 0o755
        assert not (units / ".planted.service.tmp").exists()
        manager.unload("planted.service")
        manager.reload()
    finally:
        manager.close()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "linked-units").symlink_to(elsewhere)
    linked = DbusUnitManager(
        tmp_path / "linked-units", user=True, bus_address=user_manager.bus_address
    )
    try:
        with pytest.raises(SystemdError, match="is not a plain directory"):
            linked.load("a.service", FAILING_UNIT)
        assert list(elsewhere.iterdir()) == []
    finally:
        linked.close()


@requires_real_manager
def test_same_unit_name_on_two_managers_is_isolated(tmp_path: Path) -> None:
    """Stopping a unit on one machine must not touch the same-named unit on another: each
    manager has its own cgroup subtree."""
    name = "same.service"
    with (
        running_manager("a", tmp_path / "a") as machine_a,
        running_manager("b", tmp_path / "b") as machine_b,
    ):
        assert machine_a.cgroup != machine_b.cgroup
        adapters = {
            key: DbusUnitManager(tmp_path / key / "units", user=True, bus_address=h.bus_address)
            for key, h in (("a", machine_a), ("b", machine_b))
        }
        try:
            for key, adapter in adapters.items():
                adapter.load(name, looping_unit(key, tmp_path / f"{key}.out"))
                adapter.reload()
                adapter.start(name)
            pids = {}
            for key, adapter in adapters.items():
                backend = Backend("real", adapter, tmp_path)
                assert backend.wait_active(name).sub == "running"
                deadline = time.monotonic() + POLL_TIMEOUT
                out = tmp_path / f"{key}.out"
                while not (out.exists() and len(out.read_text().split()) == 2):
                    assert time.monotonic() < deadline, f"unit on {key} never wrote {out}"
                    time.sleep(0.02)
                pids[key] = int(out.read_text().split()[1])

            adapters["a"].stop(name)
            Backend("real", adapters["a"], tmp_path).wait_inactive(name)
            assert adapters["a"].states([name])[name].active == "inactive"
            os.kill(pids["b"], 0)  # still alive: raises ProcessLookupError otherwise
            assert adapters["b"].states([name])[name] == SystemdState("loaded", "active", "running")
        finally:
            for adapter in adapters.values():
                adapter.close()


@requires_real_manager
def test_stop_terminates_added_processes_gracefully(tmp_path: Path) -> None:
    import subprocess

    with running_manager("m", tmp_path / "m") as handle:
        extra = subprocess.Popen(["sleep", "300"])
        try:
            handle.add_process(extra.pid)
            started = time.monotonic()
            handle.stop(timeout=5)
            assert extra.wait(timeout=5) == -15
            assert time.monotonic() - started < 4
            assert not handle.is_running()
        finally:
            if extra.poll() is None:
                extra.kill()
                extra.wait()


@requires_real_manager
def test_manager_is_found_again_and_kill_takes_added_processes(tmp_path: Path) -> None:
    """The local cluster's launcher: a later process finds the manager from its state dir, and a
    power cut kills the manager, its units and processes added to the machine."""
    import subprocess

    with running_manager("m", tmp_path / "m") as handle:
        again = ManagerHandle.load(tmp_path / "m")
        assert again == handle and again.is_running()
        extra = subprocess.Popen(["sleep", "300"])
        try:
            handle.add_process(extra.pid)
            adapter = DbusUnitManager(tmp_path / "units", user=True, bus_address=handle.bus_address)
            try:
                adapter.load("loop.service", looping_unit("v1", tmp_path / "loop.out"))
                adapter.start("loop.service")
                Backend("real", adapter, tmp_path).wait_active("loop.service")
                handle.kill()
                assert extra.wait(timeout=5) == -9
                assert not handle.is_running()
                assert handle.processes() == {}
                # A dead manager is a SystemdError (temporary) with a one-line message.
                one_line = r"^systemd could not read the state of loop\.service: [^\n]*$"
                with pytest.raises(SystemdError, match=one_line):
                    adapter.states(["loop.service"])
            finally:
                adapter.close()
        finally:
            if extra.poll() is None:
                extra.kill()
                extra.wait()
        handle.cleanup()
        assert not any(d.exists() for d in handle.cgroup_dirs())
        assert ManagerHandle.load(tmp_path / "m") is None


@pytest.mark.parametrize(
    "stem", ["colon:name", "escaped\\x2dname", "tpl@inst@more"], ids=["colon", "escape", "at"]
)
def test_every_name_the_validator_accepts_runs(backend: Backend, stem: str) -> None:
    """fleetctl, the agent and the managers share one validator: what it accepts must run."""
    name = backend.unit_name(stem)
    backend.manager.load(name, looping_unit("v1", backend.workdir / "odd.out"))
    backend.manager.reload()
    backend.start(name)
    assert backend.wait_active(name).sub == "running"
    assert name in backend.manager.loaded_units()


def test_kill_ends_a_unit_that_ignores_sigterm(backend: Backend) -> None:
    name = backend.unit_name("stubborn")
    armed = backend.workdir / f"{name}.armed"
    text = (
        "[Service]\nTimeoutStopSec=60\n"
        f"ExecStart=/bin/sh -c 'trap \"\" TERM; touch {armed}; while :; do sleep 0.2; done'\n"
    )
    backend.manager.load(name, text)
    backend.manager.reload()
    backend.start(name)
    backend.wait_active(name)
    if isinstance(backend.manager, FakeUnitManager):
        backend.manager.slow_stop.add(name)
    else:
        # systemd reports a simple service active once it forked: a SIGTERM before the shell
        # set its trap would end it at once, which is not the case under test.
        deadline = time.monotonic() + POLL_TIMEOUT
        while not armed.exists():
            assert time.monotonic() < deadline, "the unit never set its SIGTERM trap"
            time.sleep(0.02)
    backend.manager.stop(name)
    assert backend.wait_state(name, lambda s: s.active == "deactivating").active == "deactivating"
    started = time.monotonic()
    backend.manager.kill(name)
    assert backend.wait_inactive(name).active in ("inactive", "failed")
    assert time.monotonic() - started < 10


def test_main_pid_of_a_running_unit_and_of_an_unknown_one(backend: Backend) -> None:
    name = backend.unit_name()
    backend.manager.load(name, looping_unit("v1", backend.out(name)))
    backend.start(name)
    backend.wait_active(name)
    pids = backend.manager.main_pids([name, "never-loaded.service"])
    assert pids["never-loaded.service"] == 0
    assert pids[name] > 0
    if backend.kind == "real":
        out = backend.out(name)
        deadline = time.monotonic() + POLL_TIMEOUT
        while not (out.exists() and len(out.read_text().split()) == 2):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert int(out.read_text().split()[1]) == pids[name]


def test_guard_runs_as_a_transient_service_once(backend: Backend) -> None:
    name = backend.unit_name("guard")
    argv = ["/bin/sh", "-c", "sleep 60"]
    backend.manager.start_guard(name, argv)
    backend.manager.start_guard(name, argv)  # already there: nothing more happens
    if backend.kind == "real":
        assert backend.wait_active(name).sub == "running"
        assert name not in backend.manager.loaded_units()  # not one of fleet's unit files
        backend.started.append(name)
    else:
        assert isinstance(backend.manager, FakeUnitManager)
        assert backend.manager.guards == {name: argv}


@requires_real_manager
def test_a_file_systemd_never_linked_is_not_reported_loaded(user_manager, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A crash between writing a unit file and linking it leaves a file whose hash matches:
    the adapter must not count it as loaded, or no later round would link it."""
    units = tmp_path / "units"
    units.mkdir()
    (units / "orphan-file.service").write_text(FAILING_UNIT)
    manager = DbusUnitManager(units, user=True, bus_address=user_manager.bus_address)
    try:
        assert manager.loaded_units() == {}
        assert not (units / "orphan-file.service").exists()
        manager.load("orphan-file.service", FAILING_UNIT)
        assert manager.unit_file_state("orphan-file.service") == "linked-runtime"
        assert set(manager.loaded_units()) == {"orphan-file.service"}
        # A second adapter (a restarted fleetd) checks the link once and keeps the file.
        again = DbusUnitManager(units, user=True, bus_address=user_manager.bus_address)
        assert set(again.loaded_units()) == {"orphan-file.service"}
        again.close()
        manager.unload("orphan-file.service")
        manager.reload()
    finally:
        manager.close()


@requires_real_manager
def test_calls_to_a_hung_manager_time_out(tmp_path: Path) -> None:
    """A manager that does not answer (SIGSTOP) turns into a SystemdError within the timeout."""
    with running_manager("h", tmp_path / "h") as handle:
        manager = DbusUnitManager(
            tmp_path / "units", user=True, bus_address=handle.bus_address, timeout=1.0
        )
        os.kill(handle.pid, 19)  # SIGSTOP
        try:
            started = time.monotonic()
            with pytest.raises(SystemdError):
                manager.states(["x.service"])
            with pytest.raises(SystemdError):
                manager.reload()
            # Not a speed goal: only that neither call waits for the manager forever (each is
            # bounded by the 1 s timeout; the margin absorbs a loaded CI machine).
            assert time.monotonic() - started < 20
        finally:
            os.kill(handle.pid, 18)  # SIGCONT
            manager.close()


@requires_real_manager
def test_a_queued_start_job_reads_activating(user_manager, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A unit waiting for an ordering dependency is still "inactive" in systemd, but it will run:
    it must not look stopped to an agent about to give it away."""
    manager = DbusUnitManager(tmp_path / "units", user=True, bus_address=user_manager.bus_address)
    slow, late = "slow-first.service", "after-slow.service"
    try:
        manager.load(slow, "[Service]\nType=oneshot\nExecStart=/bin/sleep 3\n")
        manager.load(late, f"[Unit]\nAfter={slow}\n[Service]\nExecStart=/bin/sleep 100\n")
        manager.reload()
        manager.start(slow)
        manager.start(late)
        assert manager.states([late])[late].active == "activating"
        manager.stop(late)
        manager.stop(slow)
        deadline = time.monotonic() + POLL_TIMEOUT
        while manager.states([late])[late].active not in ("inactive", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        for name in (late, slow):
            manager.unload(name)
        manager.reload()
        manager.close()


def test_load_many_loads_each_good_unit_and_reports_each_bad_one(backend: Backend) -> None:
    """Several units in one call: the good ones are linked (and enabled where they have an
    [Install] section) exactly as `load` would, the bad ones come back with their own error and
    leave nothing behind."""
    good = [backend.unit_name(f"many{i}") for i in range(3)]
    installed = backend.unit_name("manyinst")
    units = {name: looping_unit("v1", backend.out(name)) for name in good}
    units[installed] = looping_unit("v1", backend.out(installed), install=True)
    units["bad/name.service"] = FAILING_UNIT
    units["huge.service"] = FAILING_UNIT + "#" * MAX_UNIT_VALUE_BYTES
    failures = backend.manager.load_many(units)
    assert set(failures) == {"bad/name.service", "huge.service"}
    assert isinstance(failures["bad/name.service"], InvalidUnitName)
    assert isinstance(failures["huge.service"], UnitTooLarge)
    assert set(backend.manager.loaded_units()) == {*good, installed}
    backend.manager.reload()
    assert backend.manager.unit_file_state(good[0]) == "linked-runtime"
    assert backend.manager.unit_file_state(installed) == "enabled-runtime"
    backend.start(good[1])
    assert backend.wait_active(good[1]) == SystemdState("loaded", "active", "running")
    assert backend.manager.load_many({}) == {}


def test_load_many_again_keeps_units_that_were_linked_already(backend: Backend) -> None:
    """A unit loaded again with new text keeps its link (the manager reports no new link for
    it): it is read back, not reported as failed."""
    names = [backend.unit_name(f"again{i}") for i in range(2)]
    assert backend.manager.load_many({n: looping_unit("v1", backend.out(n)) for n in names}) == {}
    fresh = backend.unit_name("fresh")
    units = {n: looping_unit("v2", backend.out(n)) for n in [*names, fresh]}
    assert backend.manager.load_many(units) == {}
    assert set(backend.manager.loaded_units()) == {*names, fresh}
    backend.manager.reload()
    for name in (*names, fresh):
        assert backend.manager.unit_file_state(name) == "linked-runtime"
    backend.start(names[0])
    assert backend.running_marker(names[0], "v2") == "v2"


def test_start_many_and_stop_many_act_on_each_unit_and_report_each_failure(
    backend: Backend,
) -> None:
    """The calls go together, the outcomes are each unit's own: good units start (and stop),
    a bad name and a unit the manager does not know come back with their own error."""
    good = [backend.unit_name(f"batch{i}") for i in range(4)]
    assert backend.manager.load_many({n: looping_unit(n, backend.out(n)) for n in good}) == {}
    backend.manager.reload()
    unknown = backend.unit_name("unknown")
    backend.started.extend(good)
    failures = backend.manager.start_many([*good, "bad/name.service", unknown])
    assert set(failures) == {"bad/name.service", unknown}
    assert isinstance(failures["bad/name.service"], InvalidUnitName)
    assert isinstance(failures[unknown], SystemdError)
    assert unknown in str(failures[unknown])
    for name in good:
        assert backend.wait_active(name) == SystemdState("loaded", "active", "running")
        assert backend.running_marker(name, name) == name
    failures = backend.manager.stop_many([*good[:3], "bad/name.service"])
    assert set(failures) == {"bad/name.service"}
    for name in good[:3]:
        assert backend.wait_inactive(name) == SystemdState("loaded", "inactive", "dead")
    assert backend.manager.states([good[3]])[good[3]].active == "active"
    assert backend.manager.start_many([]) == {}
    assert backend.manager.stop_many([]) == {}


def test_unload_many_unloads_each_stopped_unit(backend: Backend) -> None:
    """One batch unloads stopped units (a failed one's failed state reset too) and tolerates a
    unit that was never loaded, as `unload` does; a bad name is reported on its own."""
    names = [backend.unit_name(f"gone{i}") for i in range(3)]
    failing = backend.unit_name("failing")
    units = {n: looping_unit("v1", backend.out(n)) for n in names}
    units[failing] = FAILING_UNIT
    assert backend.manager.load_many(units) == {}
    backend.manager.reload()
    backend.start(failing)
    assert backend.wait_state(failing, lambda s: s.active == "failed").active == "failed"
    never = backend.unit_name("never")
    failures = backend.manager.unload_many([*names, failing, never, "bad/name.service"])
    assert set(failures) == {"bad/name.service"}
    backend.manager.reload()
    assert backend.manager.loaded_units() == {}
    for name in (*names, failing):
        assert not (backend.workdir / "units" / name).exists()
        assert backend.manager.states([name]) == {name: NOT_FOUND}
        assert backend.manager.unit_file_state(name) == "not-found"
    assert backend.manager.unload_many([]) == {}


def test_a_unit_the_manager_does_not_know_starts_from_its_new_file_without_a_reload(
    backend: Backend,
) -> None:
    """What lets a round that only loads new units skip the daemon-reload: a unit that reads
    not-found (even once asked about, so the manager holds it as not-found) is read from its
    file when started after the link, the first time and again after an unload."""
    names = [backend.unit_name(f"fresh{i}") for i in range(2)]
    assert backend.manager.states(names) == dict.fromkeys(names, NOT_FOUND)
    assert backend.manager.load_many({n: looping_unit("v1", backend.out(n)) for n in names}) == {}
    backend.started.extend(names)
    assert backend.manager.start_many(names) == {}
    for name in names:
        assert backend.wait_active(name) == SystemdState("loaded", "active", "running")
        assert backend.running_marker(name, "v1") == "v1"
    assert backend.manager.stop_many(names) == {}
    for name in names:
        backend.wait_inactive(name)
    assert backend.manager.unload_many(names) == {}
    backend.manager.reload()
    assert backend.manager.states(names) == dict.fromkeys(names, NOT_FOUND)
    backend.manager.load(names[0], looping_unit("v2", backend.out(names[0])))
    backend.start(names[0])
    assert backend.wait_active(names[0]) == SystemdState("loaded", "active", "running")
    assert backend.running_marker(names[0], "v2") == "v2"


def test_a_patient_state_read_reads_what_a_quick_one_reads(backend: Backend) -> None:
    """`patient` only changes how long the read may wait for the manager's answer."""
    name, absent = backend.unit_name("patient"), backend.unit_name("absent")
    backend.manager.load(name, looping_unit("v1", backend.out(name)))
    backend.start(name)
    backend.wait_active(name)
    quick = backend.manager.states([name, absent])
    assert backend.manager.states([name, absent], patient=True) == quick
    assert quick == {name: SystemdState("loaded", "active", "running"), absent: NOT_FOUND}


@requires_real_manager
def test_a_batch_load_reads_back_only_the_links_the_manager_did_not_report_making(  # type: ignore[no-untyped-def]
    user_manager, tmp_path: Path
) -> None:
    """Reading a file state back costs the manager some 2 ms a unit: a fresh batch is checked
    in the link call's own report; a unit linked already (not reported again) is read back."""
    manager = DbusUnitManager(tmp_path / "units", user=True, bus_address=user_manager.bus_address)
    read_back: list[list[str]] = []
    real_file_states = manager._file_states

    def file_states(names: list[str]) -> dict[str, str]:
        read_back.append(sorted(names))
        return real_file_states(names)

    manager._file_states = file_states  # type: ignore[method-assign]
    old = [f"rb-{uuid.uuid4().hex[:8]}-{i}.service" for i in range(3)]
    try:
        assert manager.load_many({n: FAILING_UNIT for n in old}) == {}
        assert read_back == []
        new = f"rb-{uuid.uuid4().hex[:8]}-new.service"
        texts = {n: FAILING_UNIT + "# v2\n" for n in old} | {new: FAILING_UNIT}
        assert manager.load_many(texts) == {}
        assert read_back == [sorted(old)]
        assert set(manager.loaded_units()) == {*old, new}
    finally:
        for name in manager.loaded_units():
            manager.unload(name)
        manager.reload()
        manager.close()
