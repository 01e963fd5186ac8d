"""The ports the agent needs from the outside world, as Protocols: the registry and a systemd
manager.

Adapters implement them (`fleetd.registry` over etcd, `fleetd.systemd` over D-Bus) and in-memory
fakes implement them for deterministic tests and the scale simulator (`fleetd.fake_registry`,
`fleetd.fake_systemd`); each fake shares a contract test suite with its real adapter so the two
cannot drift (tests/contract/).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from fleetd.model import DesiredState, Machine, PublishedState, SystemdState

if TYPE_CHECKING:
    from fleetd.keys import KeyLayout, Kind
    from fleetd.placement import Guards
    from fleetd.snapshot import Snapshot, UnitRecord


@dataclass(frozen=True)
class WatchEvent:
    """One change of one key under the prefix, as the watch reports it."""

    key: str
    value: bytes | None  # None for a delete
    mod_revision: int
    create_revision: int


WatchCallback = Callable[[list[WatchEvent] | BaseException], None]


class Registry(Protocol):
    """The cluster registry as the agent and fleetctl use it.

    Every call either does what it says or raises `RegistryUnavailable`. Keys bound to a lease
    (machine presence, owners, published states) vanish when the lease expires or is revoked;
    writes with a lease that no longer exists fail, so nothing is ever written without one.
    """

    @property
    def layout(self) -> KeyLayout: ...

    @property
    def endpoints(self) -> Sequence[str]: ...

    def close(self) -> None: ...

    # reads
    def snapshot(self, kinds: Collection[Kind] | None = None) -> Snapshot:
        """The whole registry, current to one revision; with `kinds`, only the keys of those
        kinds (a listing of published states need not read every unit's text)."""
        ...

    def watch(self, start_revision: int, callback: WatchCallback) -> Callable[[], None]:
        """Report every change from `start_revision` on, in order, in batches; the exception that
        ended the watch is reported too (then the caller reads everything again). Returns a
        cancel function."""
        ...

    # leases and presence
    def grant_lease(self, ttl: float) -> int: ...

    def keepalive(self, lease_id: int) -> float:
        """Refresh the lease; its TTL in seconds counted from this refresh, 0 if it is gone."""
        ...

    def revoke(self, lease_id: int) -> None: ...

    def register_machine(self, machine: Machine, lease_id: int) -> bool:
        """Announce the machine unless a live agent with another lease holds its id (re-announcing
        with the lease that holds it already succeeds)."""
        ...

    def update_machine(self, machine: Machine, lease_id: int) -> None: ...

    # ownership and published state
    def claim(
        self,
        unit: str,
        machine_id: str,
        lease_id: int,
        snapshot_revision: int,
        desired_revision: int,
        guards: Guards,
    ) -> bool:
        """Become the owner of `unit`, only if it has none, its desired state and every guarded
        fact are unchanged since the snapshot, and the machine is present."""
        ...

    def claim_many(
        self,
        units: Mapping[str, int],
        machine_id: str,
        lease_id: int,
        snapshot_revision: int,
    ) -> dict[str, bool]:
        """`claim` of several units (unit -> the desired revision the snapshot shows) that
        guard on nothing else, in one write: each is won or lost on its own, all judged against
        the registry as it was before any of them. Only for claims whose guards are empty, so
        that none could depend on another's owner key. Returns unit -> won."""
        ...

    def release(self, unit: str, machine_id: str) -> bool:
        """Give up ownership, only if `machine_id` holds it."""
        ...

    def publish_states(
        self,
        machine_id: str,
        lease_id: int,
        states: Mapping[str, PublishedState],
        withdrawn: Iterable[str] = (),
    ) -> None:
        """Write `states` (unit -> state) under the lease and delete the published states of
        the `withdrawn` units, for `machine_id`; as few transactions as the limit on operations
        per transaction allows, so one round of the publisher costs one or a few writes."""
        ...

    # fleetctl's writes
    def write_units(
        self, records: Iterable[UnitRecord], desired: DesiredState | None, seen: Snapshot
    ) -> bool: ...

    def set_desired(self, names: Iterable[str], state: DesiredState) -> None: ...

    def destroy(self, names: Iterable[str]) -> None: ...

    def request_move(self, unit: str, machine_id: str) -> None: ...

    def clear_move(self, unit: str) -> None: ...


class UnitManager(Protocol):
    """One systemd manager (system or user) as the agent drives it.

    The agent loads a batch of units (`load_many`, or `load` each), then calls `reload` once,
    then starts or stops them (`start_many`, `stop_many`, or one by one).
    `unload` is only called for a unit that is stopped already, and a `reload` follows it.
    Every call returns or raises `SystemdError` within the adapter's timeout: a hung manager is
    an error, never a blocked agent.
    """

    def load(self, name: str, text: str) -> None:
        """Write the unit file into the units directory and link it into the manager (runtime,
        force), atomically: afterwards either the file is there and linked, or `loaded_units`
        does not list it. A unit with an [Install] section is also enabled (runtime)."""
        ...

    def load_many(self, units: Mapping[str, str]) -> dict[str, Exception]:
        """`load` for several units (name -> text) at once, as few manager calls as the
        manager allows; each unit is loaded or not on its own. Returns the error of each unit
        that was not loaded (empty: all were)."""
        ...

    def reload(self) -> None:
        """Make the manager re-read unit files (daemon-reload)."""
        ...

    def start(self, name: str) -> None:
        """Start the unit (job mode "replace"); returns once the job is queued."""
        ...

    def start_many(self, names: Sequence[str]) -> dict[str, Exception]:
        """`start` for several units, the calls sent together rather than one per round trip;
        each unit starts or fails on its own. Returns the error of each unit whose start job
        was not queued (empty: all were)."""
        ...

    def stop(self, name: str) -> None:
        """Stop the unit (job mode "replace"); returns once the job is queued."""
        ...

    def stop_many(self, names: Sequence[str]) -> dict[str, Exception]:
        """`stop` for several units as `start_many` starts them."""
        ...

    def kill(self, name: str) -> None:
        """SIGKILL every process of the unit (systemd's KillUnit, who "all"): the escalation when
        a stop cannot wait for the unit's own stop timeout."""
        ...

    def unload(self, name: str) -> None:
        """Disable the unit, reset its failed state and delete its file."""
        ...

    def unload_many(self, names: Sequence[str]) -> dict[str, Exception]:
        """`unload` for several stopped units, as few manager calls as the manager allows;
        returns the error of each unit not unloaded (its file then stays)."""
        ...

    def loaded_units(self) -> dict[str, str]:
        """Units this adapter wrote and linked that are still on disk: name -> sha1 hex of the
        file text."""
        ...

    def states(self, names: Iterable[str], patient: bool = False) -> dict[str, SystemdState]:
        """systemd's LoadState/ActiveState/SubState of each named unit (a unit systemd does not
        know reads as load "not-found", active "inactive", sub "dead"). A state read waits the
        adapter's short timeout, as fencing needs; `patient` waits the full call timeout (a
        manager busy forking a batch of just-started units answers only once it is done)."""
        ...

    def main_pids(self, names: Iterable[str]) -> dict[str, int]:
        """The MainPID of each named unit (0: none)."""
        ...

    def start_guard(self, name: str, argv: Sequence[str]) -> None:
        """Run `argv` as a transient service `name` of this manager, unless it runs already: it
        outlives the agent's process (see fleetd.guard)."""
        ...
