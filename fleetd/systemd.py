"""The UnitManager port over systemd's D-Bus API (org.freedesktop.systemd1.Manager).

Owns the agent's units directory: every unit the agent runs is a file written here, linked into
the manager at runtime (so nothing survives a reboot that fleet did not ask for again) and, when
it has an [Install] section, enabled at runtime too. One bus connection and one Manager proxy are
made per adapter and reused: a fresh proxy introspects the object on every creation.

Every call carries a timeout (pydbus passes `timeout=` in seconds to GDBus): a hung manager
turns into a `SystemdError`, never a blocked agent. The calls of a batch (`start_many`,
`stop_many`, the reset of `unload_many`) are all sent before any reply is read: the manager
takes them in as fast as it reads its socket instead of one per round trip, which is most of
what starting a hundred units cost. The calls fencing depends on (stop, kill,
state reads) use a shorter one. The state of a running unit carries the container it runs, when
it follows podman's cidfile convention (`fleetd.podman`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from gi.repository import Gio, GLib
from pydbus import SystemBus, connect

from fleetd.errors import InvalidUnitName, SystemdError, UnitTooLarge
from fleetd.model import SystemdState
from fleetd.podman import PodmanProbe, runtime_dir
from fleetd.snapshot import UnitRecord, check_unit_size
from fleetd.unitfile import content_hash, has_section, parse_unit_name

SYSTEMD_SERVICE = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
SERVICE_INTERFACE = "org.freedesktop.systemd1.Service"
MANAGER_INTERFACE = "org.freedesktop.systemd1.Manager"

NOT_FOUND = SystemdState(load="not-found", active="inactive", sub="dead")
UNIT_FILE_MODE = 0o644
UNITS_DIRECTORY_MODE = 0o755


# D-Bus errors systemd answers with when the unit (or its file) simply is not there; unloading a
# unit that never got that far is not a failure.
_ABSENT_ERRORS = frozenset(
    {"org.freedesktop.systemd1.NoSuchUnit", "org.freedesktop.DBus.Error.FileNotFound"}
)
# What GetUnitFileState says of a file we linked (and enabled, with an [Install] section).
_LINKED = frozenset({"linked-runtime", "enabled-runtime", "linked", "enabled"})

log = logging.getLogger(__name__)


class DbusUnitManager:
    """A systemd manager (system bus, or a user manager's session bus) driven over D-Bus."""

    def __init__(
        self,
        units_directory: Path,
        user: bool = False,
        bus_address: str | None = None,
        timeout: float = 5.0,
        containers: PodmanProbe | None = None,
    ) -> None:
        self.units_directory = units_directory
        self.containers = containers or PodmanProbe(runtime_dir(user))
        self.timeout = timeout
        self.fast_timeout = min(1.0, timeout / 5)
        self.user = user
        self.bus_address: str | None = None
        # Files whose link we saw succeed (or checked) in this process.
        self._linked: set[str] = set()
        # name -> ((inode, size, mtime), content hash) of the files `loaded_units` last read.
        self._hashes: dict[str, tuple[tuple[int, int, int], str]] = {}
        try:
            if user:
                address = bus_address or os.environ.get("DBUS_SESSION_BUS_ADDRESS")
                if not address:
                    raise SystemdError(
                        "no session bus to reach the user manager: set DBUS_SESSION_BUS_ADDRESS"
                    )
                self.bus_address = address
                self._bus: Any = connect(address)
            else:
                self._bus = SystemBus()
            self._manager: Any = self._bus.get(SYSTEMD_SERVICE, SYSTEMD_PATH)
        except GLib.Error as exc:
            where = "the user manager's session bus" if user else "the system bus"
            raise SystemdError(f"cannot reach systemd on {where}: {_brief(exc)}") from exc

    def close(self) -> None:
        """Drop the bus connection (only needed when the adapter outlives its use)."""
        self.containers.close()
        if getattr(self._bus, "autoclose", False):
            with contextlib.suppress(GLib.Error):
                self._bus.con.close_sync(None)

    def load(self, name: str, text: str) -> None:
        path = self._write(name, text)
        try:
            self._link([name], [path], [name] if has_section(text, "Install") else [])
            self._check_linked(name)
        except SystemdError:
            path.unlink(missing_ok=True)
            raise
        self._linked.add(name)

    def load_many(self, units: Mapping[str, str]) -> dict[str, Exception]:
        failures: dict[str, Exception] = {}
        written: dict[str, Path] = {}
        try:
            directory = self._units_directory()  # checked once for the batch
        except (OSError, SystemdError) as exc:
            return {name: exc for name in units}
        for name, text in units.items():
            try:
                written[name] = self._write(name, text, directory)
            except (InvalidUnitName, UnitTooLarge, OSError, SystemdError) as exc:
                failures[name] = exc
        if not written:
            return failures
        installs = [n for n in written if has_section(units[n], "Install")]
        try:
            # One link call for all: linking is most of a load's cost.
            linked = self._link(list(written), list(written.values()), installs)
        except SystemdError:
            # One unit spoilt the call: each on its own, so only that one fails.
            for name, path in written.items():
                path.unlink(missing_ok=True)
                try:
                    self.load(name, units[name])
                except SystemdError as exc:
                    failures[name] = exc
            return failures
        # A link the call reports having made is one; only the others (a link that was there
        # already is not reported) are read back, at some 2 ms of the manager's time each.
        unsure = [n for n in written if n not in linked]
        states = self._file_states(unsure) if unsure else {}
        for name, path in written.items():
            state = "linked-runtime" if name in linked else states.get(name, "not-found")
            if state not in _LINKED:
                path.unlink(missing_ok=True)
                failures[name] = SystemdError(
                    f"systemd did not link {name}: its file state is {state}"
                )
                continue
            self._linked.add(name)
        return failures

    def _file_states(self, names: list[str]) -> dict[str, str]:
        """The file state of each unit, read back in one call (one GetUnitFileState per unit
        costs more than the link itself)."""
        rows = self._call(
            _label(names), "read the file states of", "ListUnitFilesByPatterns", [], names,
            timeout=self.fast_timeout,
        )
        wanted = set(names)
        found: dict[str, str] = {}
        for path, state in rows or []:
            name = os.path.basename(str(path))
            # The runtime link wins over a file of the same name elsewhere.
            if name in wanted and found.get(name) not in _LINKED:
                found[name] = str(state)
        for name in names:
            if found.get(name) not in _LINKED:
                # A pattern is a glob: a name it does not match literally is asked for alone.
                found[name] = self.unit_file_state(name)
        return found

    def _link(self, names: list[str], paths: list[Path], installs: list[str]) -> set[str]:
        """Link (and enable) the files; returns the units whose runtime link the manager
        reports having made to our file just now."""
        label = _label(names)
        reply = self._call(label, "link", "LinkUnitFiles", [str(p) for p in paths], True, True)
        if installs:
            self._call(label, "enable", "EnableUnitFiles", installs, True, True)
        ours = {str(p): n for n, p in zip(names, paths, strict=True)}
        made: set[str] = set()
        # The reply lists the changes made, (kind, link, target) each. A unit masked elsewhere
        # is linked all the same; its start then fails with systemd's own word for it.
        for change in reply or ():
            if len(change) != 3:
                continue
            kind, link, target = (str(part) for part in change)
            name = ours.get(target)
            if kind == "symlink" and name is not None and os.path.basename(link) == name:
                made.add(name)
        return made

    def _check_linked(self, name: str) -> None:
        state = self.unit_file_state(name)
        if state not in _LINKED:
            raise SystemdError(f"systemd did not link {name}: its file state is {state}")

    def _write(self, name: str, text: str, directory: Path | None = None) -> Path:
        """Write one unit's file into `directory` (the units directory, checked by the caller
        for a batch; by this call when None)."""
        path = self._path(name)
        # The registry's size limit again: a file is only ever built from a unit fleetctl could
        # have stored.
        check_unit_size(UnitRecord(name, text, content_hash(text)))
        if directory is None:
            directory = self._units_directory()
        # Written aside and renamed, so a crash never leaves a half-written unit that a later
        # reload would pick up; then linked and the link read back. A failed link removes the
        # file again: a file whose hash matches but that systemd does not know would never be
        # linked by a later round.
        self._linked.discard(name)
        tmp = os.path.join(directory, f".{name}.tmp")
        # Never through a link someone planted: the temporary name is created afresh, without
        # following symlinks, readable by all (systemd) and writable by us only; the rename
        # then replaces whatever was at the unit's name, a symlink included, without following
        # it. Whatever holds the temporary name (a crash's leftover, a planted link) makes the
        # create fail and is removed before it is tried again. Plain os calls: a batch writes
        # a hundred files.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        try:
            fd = os.open(tmp, flags, UNIT_FILE_MODE)
        except FileExistsError:
            os.unlink(tmp)
            fd = os.open(tmp, flags, UNIT_FILE_MODE)
        with os.fdopen(fd, "wb") as out:
            os.fchmod(fd, UNIT_FILE_MODE)
            out.write(text.encode())
        os.replace(tmp, path)
        return path

    def reload(self) -> None:
        self._call("(all units)", "reload", "Reload")

    def start(self, name: str) -> None:
        self._path(name)
        self._call(name, "start", "StartUnit", name, "replace")

    def start_many(self, names: Sequence[str]) -> dict[str, Exception]:
        return self._call_many(names, "start", "StartUnit", ("replace",))

    def stop(self, name: str) -> None:
        self._path(name)
        self._call(name, "stop", "StopUnit", name, "replace", timeout=self.fast_timeout)

    def stop_many(self, names: Sequence[str]) -> dict[str, Exception]:
        return self._call_many(
            names, "stop", "StopUnit", ("replace",), timeout=self.fast_timeout
        )

    def kill(self, name: str) -> None:
        self._path(name)
        self._call(name, "kill", "KillUnit", name, "all", 9, timeout=self.fast_timeout)

    def unload(self, name: str) -> None:
        path = self._path(name)
        self._linked.discard(name)
        self._call(name, "disable", "DisableUnitFiles", [name], True, tolerate_absent=True)
        self._call(name, "reset the failed state of", "ResetFailedUnit", name, tolerate_absent=True)
        path.unlink(missing_ok=True)

    def unload_many(self, names: Sequence[str]) -> dict[str, Exception]:
        failures: dict[str, Exception] = {}
        paths: dict[str, Path] = {}
        for name in dict.fromkeys(names):
            try:
                paths[name] = self._path(name)
            except InvalidUnitName as exc:
                failures[name] = exc
        if not paths:
            return failures
        for name in paths:
            self._linked.discard(name)
        try:
            # One call disables them all; one unit it cannot find spoils it, so then each alone.
            self._call(_label(list(paths)), "disable", "DisableUnitFiles", list(paths), True)
        except SystemdError:
            for name in list(paths):
                try:
                    self._call(
                        name, "disable", "DisableUnitFiles", [name], True, tolerate_absent=True
                    )
                except SystemdError as exc:
                    failures[name] = exc
                    del paths[name]
        failures.update(
            self._call_many(
                list(paths), "reset the failed state of", "ResetFailedUnit", (),
                tolerate_absent=True,
            )
        )
        for name, path in paths.items():
            if name not in failures:
                path.unlink(missing_ok=True)
        return failures

    def loaded_units(self) -> dict[str, str]:
        try:
            # os.scandir rather than Path.iterdir: every round lists the directory, twice, and
            # a hundred Path objects cost more than the listing.
            with os.scandir(self.units_directory) as listing:
                entries = list(listing)
        except FileNotFoundError:
            return {}
        out: dict[str, str] = {}
        hashes: dict[str, tuple[tuple[int, int, int], str]] = {}
        for entry in entries:
            # Only files we wrote: not temporaries, not links someone put there.
            if entry.name.startswith("."):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(info.st_mode):
                continue
            if entry.name not in self._linked and not self._check_link(Path(entry.path)):
                continue
            # Every round asks, twice: hash a file again only when it is not the one hashed
            # last time (a load renames a new file into place, so its inode changes).
            signature = (info.st_ino, info.st_size, info.st_mtime_ns)
            known = self._hashes.get(entry.name)
            if known is None or known[0] != signature:
                with open(entry.path, encoding="utf-8") as file:
                    known = (signature, content_hash(file.read()))
            hashes[entry.name] = known
            out[entry.name] = known[1]
        self._hashes = hashes
        return out

    def _check_link(self, entry: Path) -> bool:
        """A file this process did not link itself (an earlier run wrote it): keep it only if
        systemd has it linked, so a crash between write and link is repaired by a new LOAD."""
        try:
            state = self.unit_file_state(entry.name)
        except SystemdError as exc:
            log.warning("cannot check the link of %s: %s", entry.name, exc)
            return True
        except ValueError:
            return False
        if state in _LINKED:
            self._linked.add(entry.name)
            return True
        log.warning("%s is in the units directory but not linked (%s): loading it again",
                    entry.name, state)
        entry.unlink(missing_ok=True)
        return False

    def states(self, names: Iterable[str], patient: bool = False) -> dict[str, SystemdState]:
        wanted = list(dict.fromkeys(names))
        if not wanted:
            return {}
        seconds = self.timeout if patient else self.fast_timeout
        try:
            # The argument built from a string array in one call (GLib.Variant("(as)", ...)
            # walks the list in Python: 0.4 ms a read of 100 names, twenty times this).
            reply = self._bus.con.call_sync(
                SYSTEMD_SERVICE, SYSTEMD_PATH, MANAGER_INTERFACE, "ListUnitsByNames",
                GLib.Variant.new_tuple(GLib.Variant.new_strv(wanted)), _UNIT_ROWS,
                Gio.DBusCallFlags.NONE, int(seconds * 1000), None,
            )
        except GLib.Error as exc:
            raise _refused("read the state of", _label(wanted), exc) from exc
        # Every round reads every unit's state: the six fields used are taken out of the reply
        # one by one (unpacking all ten of every row in Python: 4.5 ms for 100 units, against
        # 2.5 ms so, on a quiet machine).
        found: dict[str, SystemdState] = {}
        rows = reply.get_child_value(0)
        for index in range(rows.n_children()):
            row = rows.get_child_value(index)
            name = row.get_child_value(0).get_string()
            state = _state(
                row.get_child_value(2).get_string(),
                row.get_child_value(3).get_string(),
                row.get_child_value(4).get_string(),
                row.get_child_value(7).get_uint32(),
                row.get_child_value(8).get_string(),
            )
            found[name] = state
        # Only a running unit has a container: a stopped one removed it (ExecStopPost), and a
        # starting one may still hold the previous run's cidfile.
        running = [n for n, s in found.items() if s.active in ("active", "reloading")]
        for name, container in (self.containers.containers(running) if running else {}).items():
            found[name] = replace(found[name], container=container)
        return {name: found.get(name, NOT_FOUND) for name in wanted}

    def main_pids(self, names: Iterable[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for name in names:
            path = self._call(name, "find", "GetUnit", name, tolerate_absent=True)
            if path is None:
                out[name] = 0
                continue
            try:
                unit = self._bus.get(SYSTEMD_SERVICE, path, timeout=self.timeout)
                out[name] = int(unit[SERVICE_INTERFACE].MainPID)
            except (GLib.Error, KeyError) as exc:
                raise SystemdError(f"systemd could not tell the main pid of {name}") from exc
        return out

    def start_guard(self, name: str, argv: Sequence[str]) -> None:
        environment = []
        if self.bus_address:
            environment.append(f"DBUS_SESSION_BUS_ADDRESS={self.bus_address}")
        properties = [
            ("Description", GLib.Variant("s", "fleet guard: stops fleet's units if fleetd "
                                              "does not renew its lease")),
            ("ExecStart", GLib.Variant("a(sasb)", [(argv[0], list(argv), False)])),
            ("Environment", GLib.Variant("as", environment)),
            ("CollectMode", GLib.Variant("s", "inactive-or-failed")),
        ]
        try:
            self._manager.StartTransientUnit(name, "fail", properties, [], timeout=self.timeout)
        except GLib.Error as exc:
            if Gio.DBusError.get_remote_error(exc) == "org.freedesktop.systemd1.UnitExists":
                return  # a guard runs already and watches the same lease file
            raise _refused("start", name, exc) from exc

    def unit_file_state(self, name: str) -> str:
        """systemd's UnitFileState for the unit ("linked-runtime", "enabled-runtime", ...), or
        "not-found" when no file of that name is installed."""
        self._path(name)
        state = self._call(
            name, "read the file state of", "GetUnitFileState", name, tolerate_absent=True
        )
        return "not-found" if state is None else str(state)

    def _path(self, name: str) -> Path:
        parse_unit_name(name)  # the one validator; raises InvalidUnitName
        path = self.units_directory / name
        # A valid name has no '/' and is not '.' or '..': the path stays in the directory.
        assert path.parent == self.units_directory
        return path

    def _units_directory(self) -> Path:
        """The units directory, created 0755; refused if it is a symlink (our files would land
        wherever it points), tightened if others may write into it (they could plant units)."""
        directory = self.units_directory
        directory.mkdir(mode=UNITS_DIRECTORY_MODE, parents=True, exist_ok=True)
        info = directory.lstat()
        if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
            raise SystemdError(
                f"units directory {directory} is not a plain directory: "
                "set units_directory to a directory of its own"
            )
        if info.st_mode & 0o022:
            os.chmod(directory, stat.S_IMODE(info.st_mode) & ~0o022)
        return directory

    def _call(
        self,
        unit: str,
        what: str,
        method: str,
        *args: Any,
        tolerate_absent: bool = False,
        timeout: float | None = None,
    ) -> Any:
        try:
            return getattr(self._manager, method)(*args, timeout=timeout or self.timeout)
        except GLib.Error as exc:
            if tolerate_absent and Gio.DBusError.get_remote_error(exc) in _ABSENT_ERRORS:
                return None
            raise _refused(what, unit, exc) from exc


    def _call_many(
        self,
        names: Sequence[str],
        what: str,
        method: str,
        extra: tuple[str, ...],
        tolerate_absent: bool = False,
        timeout: float | None = None,
    ) -> dict[str, Exception]:
        """`method(name, *extra)` (all strings) for every name, all sent before any reply is
        awaited; returns the error of each call that failed (empty: all succeeded). Every call
        carries the timeout, so every reply (or its timeout) comes, and the wait has a bound of
        its own."""
        failures: dict[str, Exception] = {}
        wanted: list[str] = []
        for name in dict.fromkeys(names):
            try:
                self._path(name)
            except InvalidUnitName as exc:
                failures[name] = exc
                continue
            wanted.append(name)
        if not wanted:
            return failures
        seconds = timeout or self.timeout
        replies: dict[str, GLib.Error | None] = {}
        expired = False

        def answered(connection: Gio.DBusConnection, result: Gio.AsyncResult, name: str) -> None:
            try:
                connection.call_finish(result)
                replies[name] = None
            except GLib.Error as exc:
                replies[name] = exc

        def expire() -> bool:
            nonlocal expired
            expired = True
            return False

        # The replies are dispatched on a main context of this call's own, so no other thread's
        # loop (there is none in the agent) takes them, and nothing else runs meanwhile.
        context = GLib.MainContext.new()
        context.push_thread_default()
        try:
            # Built from typed parts: the generic GLib.Variant(signature, value) walks the value
            # in Python, four times the cost at a hundred calls a batch.
            tail = [GLib.Variant.new_string(arg) for arg in extra]
            for name in wanted:
                self._bus.con.call(
                    SYSTEMD_SERVICE, SYSTEMD_PATH, MANAGER_INTERFACE, method,
                    GLib.Variant.new_tuple(GLib.Variant.new_string(name), *tail), None,
                    Gio.DBusCallFlags.NONE, int(seconds * 1000), None, answered, name,
                )
            guard = GLib.timeout_source_new(int(seconds * 1000) + 1000)
            guard.set_callback(lambda *_: expire())
            guard.attach(context)
            while len(replies) < len(wanted) and not expired:
                context.iteration(True)
            guard.destroy()
        finally:
            context.pop_thread_default()
        for name in wanted:
            error = replies.get(name)
            if name not in replies:
                failures[name] = SystemdError(f"systemd could not {what} {name}: no reply in time")
            elif error is not None and not (
                tolerate_absent and Gio.DBusError.get_remote_error(error) in _ABSENT_ERRORS
            ):
                failures[name] = _refused(what, name, error)
        return failures


def _label(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else f"{len(names)} units ({names[0]}, ...)"


# Jobs that will make an inactive unit run.
_STARTING_JOBS = frozenset({"start", "restart", "try-restart", "reload-or-start", "verify-active"})


# ListUnitsByNames' reply: (name, description, load, active, sub, following, object path, job
# id, job type, job path) per unit.
_UNIT_ROWS = GLib.VariantType.new("(a(ssssssouso))")


def _state(load: str, active: str, sub: str, job_id: int, job_type: str) -> SystemdState:
    """A ListUnits row's states and job as one state. A unit still inactive with a start job
    queued (waiting for an ordering dependency, or not yet run) reads "activating": it is about
    to run, so it must not count as stopped when the agent decides to give it away."""
    if job_id and job_type in _STARTING_JOBS and active in ("inactive", "failed"):
        active = "activating"
    return SystemdState(load=load, active=active, sub=sub)


def _refused(what: str, unit: str, exc: GLib.Error) -> SystemdError:
    """systemd's error for one call, in the adapter's words: "systemd could not <what> <unit>"."""
    return SystemdError(f"systemd could not {what} {unit}: {_brief(exc)}")


def _brief(exc: GLib.Error) -> str:
    """The error on one line, systemd's words first and the D-Bus error's short name after."""
    message = str(exc.message or exc)
    remote = Gio.DBusError.get_remote_error(exc)
    if remote:
        message = message.removeprefix(f"GDBus.Error:{remote}:").strip()
        message = f"{message} ({remote.rsplit('.', 1)[-1]})"
    return " ".join(message.split())
