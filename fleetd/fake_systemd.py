"""An in-memory UnitManager that behaves like a systemd manager as far as fleet can observe.

Used by pure-logic tests and the scale simulator. It shares the contract suite in
tests/contract/test_unit_manager.py with `fleetd.systemd.DbusUnitManager`, which pins down the
behaviour it mirrors, as measured on systemd 252:

* Files and the manager's memory are separate. `load` writes (and links) a file; the manager
  reads a file when it first needs the unit (start, a state query) and again on `reload`. A unit
  already in memory keeps its old text until a reload; a running unit keeps running what it was
  started with until it is restarted.
* Units that are inactive and not failed are forgotten at once (systemd's garbage collection), so
  they are read afresh from disk the next time they are needed.
* Dependencies, as far as fleet's units use them: loading a unit with an [Install] section
  enables it, so the units named by its WantedBy=/RequiredBy= pull it in when they start (after a
  reload, as the .wants links systemd reads); Wants=/Requires=/BindsTo= in [Unit] pull in too, and
  stopping a unit stops the active units that have it in BindsTo=, Requires= or PartOf=.
* Nothing runs: what a started unit does is decided by `outcome`, by default from its ExecStart
  line (`/bin/false` or `exit N` with N != 0 fails; `/bin/true` or `exit 0` finishes; anything
  else keeps running).
* A unit named in `slow_stop` ignores SIGTERM: a stop leaves it "deactivating" until the test
  calls `finish_stop` (its stop timeout ran out) or the agent kills it. `hung = True` makes every
  call fail as a D-Bus call to a hung manager does once its timeout runs out.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

from fleetd.errors import InvalidUnitFile, InvalidUnitName, SystemdError
from fleetd.model import SystemdState
from fleetd.snapshot import UnitRecord, check_unit_size
from fleetd.unitfile import content_hash, has_section, parse_unit_file, parse_unit_name

NOT_FOUND = SystemdState(load="not-found", active="inactive", sub="dead")
_R = TypeVar("_R")

_EXEC_START = re.compile(r"^\s*ExecStart\s*=\s*(.*)$", re.MULTILINE)
_EXIT_CODE = re.compile(r"\bexit\s+(\d+)")


class Outcome(Enum):
    """What the main process of a started unit does."""

    RUNS = "runs"
    SUCCEEDS = "succeeds"
    FAILS = "fails"


def outcome_from_exec_start(text: str) -> Outcome:
    """Guess what a unit's ExecStart would do, for the few shapes tests use."""
    match = _EXEC_START.search(text)
    if match is None:
        return Outcome.FAILS  # systemd refuses a service without ExecStart
    command = match.group(1).strip().lstrip("-@:+!")
    if re.match(r"^(/usr)?(/bin/)?false\b", command):
        return Outcome.FAILS
    if re.match(r"^(/usr)?(/bin/)?true\b", command):
        return Outcome.SUCCEEDS
    if "while" not in command and (code := _EXIT_CODE.search(command)) is not None:
        return Outcome.SUCCEEDS if code.group(1) == "0" else Outcome.FAILS
    return Outcome.RUNS


def _remains_after_exit(text: str) -> bool:
    return re.search(r"^\s*RemainAfterExit\s*=\s*(yes|true|on|1)\s*$", text, re.M) is not None


@dataclass
class _Unit:
    """A unit as the manager holds it in memory."""

    text: str  # what the manager last read from disk
    active: str = "inactive"
    sub: str = "dead"
    file_missing: bool = False  # the file vanished while the unit was active
    running_text: str | None = None  # what the current run was started from
    wanted_by_links: frozenset[str] = frozenset()  # enabled units whose [Install] names this one
    pid: int = 0


# Cached: a stop looks at every active unit, and the scale simulator holds thousands.
@functools.lru_cache(maxsize=4096)
def _unit_values(text: str, section: str, keys: tuple[str, ...]) -> frozenset[str]:
    """Every unit named by the keys of one section (space-separated lists, several lines)."""
    try:
        unit = parse_unit_file(text)
    except InvalidUnitFile:
        return frozenset()
    return frozenset(
        word for key in keys for value in unit.values(section, key) for word in value.split()
    )


def _locked(method: Callable[..., _R]) -> Callable[..., _R]:
    """One call at a time, as systemd serialises its bus requests: the agent's fencing thread and
    a test's sampler call in while the reconcile thread does."""

    @functools.wraps(method)
    def call(self: FakeUnitManager, *args: object, **kwargs: object) -> _R:
        with self._lock:
            return method(self, *args, **kwargs)

    return call


class FakeUnitManager:
    """In-memory UnitManager; see the module docstring for the systemd behaviour it mirrors."""

    def __init__(self, outcome: Callable[[str], Outcome] = outcome_from_exec_start) -> None:
        self._outcome = outcome
        self._lock = threading.RLock()
        self._files: dict[str, str] = {}
        self._enabled: set[str] = set()
        self._memory: dict[str, _Unit] = {}
        self.reloads = 0  # how often reload was called, for tests that count round trips
        self.slow_stop: set[str] = set()
        self.hung = False
        self.guards: dict[str, list[str]] = {}
        self.kills: list[str] = []
        self._next_pid = 1000

    def _answer(self, what: str, name: str) -> None:
        if self.hung:
            raise SystemdError(f"systemd could not {what} {name}: no answer within the timeout")

    @_locked
    def load(self, name: str, text: str) -> None:
        _check_name(name)
        check_unit_size(UnitRecord(name, text, content_hash(text)))
        self._answer("link", name)
        self._files[name] = text
        if has_section(text, "Install"):
            self._enabled.add(name)
        else:
            self._enabled.discard(name)

    def load_many(self, units: Mapping[str, str]) -> dict[str, Exception]:
        failures: dict[str, Exception] = {}
        for name, text in units.items():
            try:
                self.load(name, text)
            except (SystemdError, InvalidUnitName, InvalidUnitFile) as exc:
                failures[name] = exc
        return failures

    @_locked
    def reload(self) -> None:
        self._answer("reload", "(all units)")
        self.reloads += 1
        for name, unit in list(self._memory.items()):
            if name in self._files:
                unit.text = self._files[name]
                unit.file_missing = False
                unit.wanted_by_links = self._links_to(name)
            else:
                unit.file_missing = True
        self._collect_garbage()

    @_locked
    def start(self, name: str) -> None:
        _check_name(name)
        self._answer("start", name)
        unit = self._get(name)
        if unit is None or unit.file_missing:
            raise SystemdError(f"systemd could not start {name}: Unit {name} not found.")
        if unit.active in ("active", "deactivating"):
            return
        unit.running_text = unit.text
        self._next_pid += 1
        unit.pid = self._next_pid
        outcome = self._outcome(unit.text)
        if outcome is Outcome.RUNS:
            unit.active, unit.sub = "active", "running"
        elif outcome is Outcome.FAILS:
            unit.active, unit.sub = "failed", "failed"
        elif _remains_after_exit(unit.text):
            unit.active, unit.sub = "active", "exited"
        else:
            unit.active, unit.sub = "inactive", "dead"
        self._start_pulled_in(unit)
        self._collect_garbage()

    @_locked
    def stop(self, name: str) -> None:
        _check_name(name)
        self._answer("stop", name)
        unit = self._get(name)
        if unit is None:
            raise SystemdError(f"systemd could not stop {name}: Unit {name} not loaded.")
        # Stopping a failed unit leaves it failed, as systemd does, until reset-failed; a second
        # stop of a unit that is stopping already changes nothing.
        if unit.active == "deactivating":
            return
        if unit.active == "active" and unit.running_text is not None and name in self.slow_stop:
            unit.active, unit.sub = "deactivating", "stop-sigterm"
            return
        if unit.active in ("active", "deactivating"):
            unit.active, unit.sub = "inactive", "dead"
            unit.running_text = None
            unit.pid = 0
        self._stop_bound_to(name)
        self._collect_garbage()

    def _start_pulled_in(self, unit: _Unit) -> None:
        """One start job pulls in the unit's dependencies: its enabled wanted-by links and its own
        Wants=/Requires=/BindsTo=. A missing one is skipped (systemd fails the job only for
        Requires=, which fleet's units do not rely on)."""
        own = _unit_values(unit.text, "Unit", ("Wants", "Requires", "BindsTo"))
        for other in sorted(own | unit.wanted_by_links):
            held = self._get(other)
            if held is not None and not held.file_missing and held.active != "active":
                self.start(other)

    def _stop_bound_to(self, name: str) -> None:
        """Stopping a unit stops the active units bound to it (BindsTo=, Requires=, PartOf=)."""
        for other, unit in sorted(self._memory.items()):
            keys = ("BindsTo", "Requires", "PartOf")
            if unit.active == "active" and name in _unit_values(unit.text, "Unit", keys):
                self.stop(other)

    def _links_to(self, name: str) -> frozenset[str]:
        """The enabled units whose [Install] WantedBy=/RequiredBy= name `name`: systemd's
        name.wants/ and name.requires/ links, read when the unit is read."""
        return frozenset(
            other
            for other in self._enabled
            if other in self._files
            and name in _unit_values(self._files[other], "Install", ("WantedBy", "RequiredBy"))
        )

    @_locked
    def finish_stop(self, name: str) -> None:
        """The stop of a `slow_stop` unit completes (its process exited, or systemd's stop
        timeout ran out and it was killed)."""
        unit = self._memory.get(name)
        if unit is not None and unit.active == "deactivating":
            unit.active, unit.sub = "inactive", "dead"
            unit.running_text = None
            unit.pid = 0
            self._stop_bound_to(name)
        self._collect_garbage()

    @_locked
    def kill(self, name: str) -> None:
        _check_name(name)
        self._answer("kill", name)
        self.kills.append(name)
        unit = self._memory.get(name)
        if unit is not None and unit.active in ("active", "activating", "deactivating"):
            # The main process died of SIGKILL: systemd records the unit as failed.
            unit.active, unit.sub = "failed", "failed"
            unit.running_text = None
            unit.pid = 0

    @_locked
    def main_pids(self, names: Iterable[str]) -> dict[str, int]:
        self._answer("read the main pid of", "units")
        out = {}
        for name in names:
            unit = self._memory.get(name)
            out[name] = unit.pid if unit is not None else 0
        return out

    @_locked
    def start_guard(self, name: str, argv: Sequence[str]) -> None:
        self._answer("start", name)
        self.guards.setdefault(name, list(argv))

    @_locked
    def unload(self, name: str) -> None:
        _check_name(name)
        self._answer("disable", name)
        self._enabled.discard(name)
        unit = self._memory.get(name)
        if unit is not None and unit.active == "failed":
            unit.active, unit.sub = "inactive", "dead"
        self._files.pop(name, None)
        self._collect_garbage()

    def start_many(self, names: Sequence[str]) -> dict[str, Exception]:
        return _each(self.start, names)

    def stop_many(self, names: Sequence[str]) -> dict[str, Exception]:
        return _each(self.stop, names)

    def unload_many(self, names: Sequence[str]) -> dict[str, Exception]:
        return _each(self.unload, names)

    @_locked
    def loaded_units(self) -> dict[str, str]:
        self._answer("list", "units")
        return {name: content_hash(text) for name, text in self._files.items()}

    @_locked
    def states(self, names: Iterable[str], patient: bool = False) -> dict[str, SystemdState]:
        self._answer("read the state of", "units")
        result: dict[str, SystemdState] = {}
        for name in names:
            unit = self._get(name)
            if unit is None:
                result[name] = NOT_FOUND
            else:
                load = "not-found" if unit.file_missing else "loaded"
                result[name] = SystemdState(load=load, active=unit.active, sub=unit.sub)
        self._collect_garbage()
        return result

    @_locked
    def unit_file_state(self, name: str) -> str:
        """systemd's UnitFileState for the unit: how it is linked and enabled."""
        if name not in self._files:
            return "not-found"
        return "enabled-runtime" if name in self._enabled else "linked-runtime"

    @_locked
    def running_text(self, name: str) -> str | None:
        """The unit text the current run of `name` was started from (None when not running);
        the fake's stand-in for looking at what a real process does."""
        unit = self._memory.get(name)
        running = unit is not None and unit.active in ("active", "deactivating")
        return unit.running_text if unit is not None and running else None

    def _get(self, name: str) -> _Unit | None:
        unit = self._memory.get(name)
        if unit is None and name in self._files:
            unit = self._memory[name] = _Unit(
                text=self._files[name], wanted_by_links=self._links_to(name)
            )
        return unit

    def _collect_garbage(self) -> None:
        for name in [n for n, u in self._memory.items() if u.active == "inactive"]:
            del self._memory[name]


def _each(call: Callable[[str], None], names: Sequence[str]) -> dict[str, Exception]:
    """A batch call as the one-unit calls, one after another: each unit's error on its own."""
    failures: dict[str, Exception] = {}
    for name in dict.fromkeys(names):
        try:
            call(name)
        except (SystemdError, InvalidUnitName) as exc:
            failures[name] = exc
    return failures


def _check_name(name: str) -> None:
    # The one validator every layer shares (raises InvalidUnitName).
    parse_unit_name(name)
