"""The ports the core needs from the outside world, as Protocols.

Adapters implement them (`fleetd.systemd` over D-Bus, `fleetd.registry` over etcd) and in-memory
fakes implement them for pure-logic tests and the scale simulator; each fake shares a contract test
suite with its real adapter so the two cannot drift (tests/contract/).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from fleetd.model import SystemdState


class UnitManager(Protocol):
    """One systemd manager (system or user) as the agent drives it.

    The agent calls `load` for each unit of a batch, then `reload` once, then `start`/`stop`.
    `unload` is only called for a unit that is stopped already, and a `reload` follows it.
    """

    def load(self, name: str, text: str) -> None:
        """Write the unit file into the units directory and link it into the manager (runtime,
        force). A unit with an [Install] section is also enabled (runtime). Overwrites an older
        file of the same name."""
        ...

    def reload(self) -> None:
        """Make the manager re-read unit files (daemon-reload)."""
        ...

    def start(self, name: str) -> None:
        """Start the unit (job mode "replace"); returns once the job is queued."""
        ...

    def stop(self, name: str) -> None:
        """Stop the unit (job mode "replace"); returns once the job is queued."""
        ...

    def unload(self, name: str) -> None:
        """Disable the unit, reset its failed state and delete its file."""
        ...

    def loaded_units(self) -> dict[str, str]:
        """Units this adapter wrote that are still on disk: name -> sha1 hex of the file text."""
        ...

    def states(self, names: Iterable[str]) -> dict[str, SystemdState]:
        """systemd's LoadState/ActiveState/SubState of each named unit (a unit systemd does not
        know reads as load "not-found", active "inactive", sub "dead")."""
        ...
