"""The UnitManager port over systemd's D-Bus API (org.freedesktop.systemd1.Manager).

Owns the agent's units directory: every unit the agent runs is a file written here, linked into
the manager at runtime (so nothing survives a reboot that fleet did not ask for again) and, when
it has an [Install] section, enabled at runtime too. One bus connection and one Manager proxy are
made per adapter and reused: a fresh proxy introspects the object on every creation. The state
of a running unit carries the container it runs, when it follows podman's cidfile convention
(`fleetd.podman`).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gi.repository import Gio, GLib
from pydbus import SystemBus, connect

from fleetd.errors import InvalidUnitName, SystemdError
from fleetd.model import Container, SystemdState
from fleetd.podman import PodmanProbe, runtime_dir
from fleetd.unitfile import content_hash, has_section

SYSTEMD_SERVICE = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"

NOT_FOUND = SystemdState(load="not-found", active="inactive", sub="dead")

# How long `unload` waits for a stop that is still running; systemd's own stop timeouts bound
# the stop itself, this only bounds how long one round of the agent can be held up by it.
STOP_WAIT = 30.0
_BUSY_STATES = frozenset({"active", "activating", "deactivating", "reloading"})
_JOB_GRACE = 1.0

# D-Bus errors systemd answers with when the unit (or its file) simply is not there; unloading a
# unit that never got that far is not a failure.
_ABSENT_ERRORS = frozenset(
    {"org.freedesktop.systemd1.NoSuchUnit", "org.freedesktop.DBus.Error.FileNotFound"}
)


class DbusUnitManager:
    """A systemd manager (system bus, or a user manager's session bus) driven over D-Bus."""

    def __init__(
        self,
        units_directory: Path,
        user: bool = False,
        bus_address: str | None = None,
        containers: PodmanProbe | None = None,
    ) -> None:
        self.units_directory = units_directory
        self.containers = containers or PodmanProbe(runtime_dir(user))
        try:
            if user:
                address = bus_address or os.environ.get("DBUS_SESSION_BUS_ADDRESS")
                if not address:
                    raise SystemdError(
                        "no session bus to reach the user manager: set DBUS_SESSION_BUS_ADDRESS"
                    )
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
        path = self._path(name)
        self.units_directory.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed so that a crash never leaves a half-written unit that a
        # later reload would pick up.
        tmp = self.units_directory / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(path)
        self._call(name, "link", "LinkUnitFiles", [str(path)], True, True)
        if has_section(text, "Install"):
            self._call(name, "enable", "EnableUnitFiles", [name], True, True)

    def reload(self) -> None:
        self._call("(all units)", "reload", "Reload")

    def start(self, name: str) -> None:
        self._path(name)
        self._call(name, "start", "StartUnit", name, "replace")

    def stop(self, name: str) -> None:
        self._path(name)
        self._call(name, "stop", "StopUnit", name, "replace")

    def unload(self, name: str) -> None:
        path = self._path(name)
        self._wait_stopped(name)
        self._call(name, "disable", "DisableUnitFiles", [name], True, tolerate_absent=True)
        self._call(name, "reset the failed state of", "ResetFailedUnit", name, tolerate_absent=True)
        path.unlink(missing_ok=True)

    def _wait_stopped(self, name: str) -> None:
        """Wait (bounded) until a stop job of `name` has run to its end.

        The agent queues a stop and unloads in the same round. If the file went away and the
        manager reloaded while the unit was still deactivating, systemd would drop the commands
        it had not run yet: a container unit's ExecStopPost (`podman rm`) would never run and
        its stopped container would stay behind.
        """
        start = time.monotonic()
        while time.monotonic() - start < STOP_WAIT:
            rows = self._call(name, "read the state of", "ListUnitsByNames", [name])
            active = rows[0][3] if rows else "inactive"
            # A job just queued may not have moved the unit out of "active" yet: a short grace
            # for that, while a running stop ("deactivating") is waited for in full.
            if active != "deactivating" and (
                active not in _BUSY_STATES or time.monotonic() - start > _JOB_GRACE
            ):
                return
            time.sleep(0.05)

    def loaded_units(self) -> dict[str, str]:
        try:
            entries = list(self.units_directory.iterdir())
        except FileNotFoundError:
            return {}
        return {
            entry.name: content_hash(entry.read_text())
            for entry in entries
            if not entry.name.startswith(".") and entry.is_file()
        }

    def states(self, names: Iterable[str]) -> dict[str, SystemdState]:
        wanted = list(dict.fromkeys(names))
        if not wanted:
            return {}
        label = wanted[0] if len(wanted) == 1 else f"{len(wanted)} units ({wanted[0]}, ...)"
        rows = self._call(label, "read the state of", "ListUnitsByNames", wanted)
        found = {
            row[0]: SystemdState(
                load=row[2], active=row[3], sub=row[4], container=self._container(row[0], row[3])
            )
            for row in rows or []
        }
        return {name: found.get(name, NOT_FOUND) for name in wanted}

    def _container(self, name: str, active: str) -> Container | None:
        # Only a running unit has a container: a stopped one removed it (ExecStopPost), and a
        # starting one may still hold the previous run's cidfile.
        if active not in ("active", "reloading"):
            return None
        return self.containers.container(name)

    def unit_file_state(self, name: str) -> str:
        """systemd's UnitFileState for the unit ("linked-runtime", "enabled-runtime", ...), or
        "not-found" when no file of that name is installed."""
        self._path(name)
        state = self._call(
            name, "read the file state of", "GetUnitFileState", name, tolerate_absent=True
        )
        return "not-found" if state is None else str(state)

    def _path(self, name: str) -> Path:
        if not name or "/" in name or name.startswith(".") or "\0" in name:
            raise InvalidUnitName(f"{name!r} is not a unit name that can be a file name")
        return self.units_directory / name

    def _call(
        self, unit: str, what: str, method: str, *args: Any, tolerate_absent: bool = False
    ) -> Any:
        try:
            return getattr(self._manager, method)(*args)
        except GLib.Error as exc:
            if tolerate_absent and Gio.DBusError.get_remote_error(exc) in _ABSENT_ERRORS:
                return None
            raise SystemdError(f"systemd could not {what} {unit}: {_brief(exc)}") from exc


def _brief(exc: GLib.Error) -> str:
    """The error on one line, systemd's words first and the D-Bus error's short name after."""
    message = str(exc.message or exc)
    remote = Gio.DBusError.get_remote_error(exc)
    if remote:
        message = message.removeprefix(f"GDBus.Error:{remote}:").strip()
        message = f"{message} ({remote.rsplit('.', 1)[-1]})"
    return " ".join(message.split())
