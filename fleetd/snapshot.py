"""An in-memory picture of the registry, kept current incrementally from one watch.

The agent reads the whole prefix once, then applies each watch event to this picture; it never
re-reads the registry per event (the thundering herd that hurt fleet at scale). fleetctl builds
the same picture from one read. The value encodings (JSON) live here too, so the registry
adapter only moves bytes.

Each record remembers the etcd mod revision of its key: claims compare those revisions inside the
claim transaction, so a decision is only committed if the facts it was based on still hold.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from fleetd.errors import InvalidUnitFile, InvalidUnitName, UnitTooLarge
from fleetd.keys import UNITS_CHANGED, KeyLayout, Kind
from fleetd.model import (
    Container,
    DesiredState,
    Machine,
    Owner,
    PublishedState,
    shared,
    shared_value,
)
from fleetd.unitfile import Requirements, content_hash, parse_unit_name, requirements_for


@dataclass(frozen=True, slots=True)
class UnitRecord:
    """A unit as stored: its verbatim text, content hash and the revision of its key."""

    name: str
    text: str
    hash: str
    revision: int = 0
    # The parse of the text: the Requirements, the reason it is invalid, or None before the
    # first question. Kept on the record, which every copy of a snapshot shares, so a unit is
    # parsed once per content however many snapshots and planners hold it.
    _parsed: Requirements | str | None = field(
        default=None, init=False, repr=False, compare=False, hash=False
    )

    def _parse(self) -> Requirements | str:
        parsed = self._parsed
        if parsed is None:
            try:
                parsed = requirements_for(self.text, self.name)
            except (InvalidUnitFile, InvalidUnitName) as exc:
                parsed = str(exc)
            object.__setattr__(self, "_parsed", parsed)
        return parsed

    @property
    def requirements(self) -> Requirements | None:
        """Parsed [X-Fleet] rules, or None when the stored text is invalid (written by a foreign
        client): such a unit is never placed, and `invalid_reason` says why."""
        parsed = self._parse()
        return None if isinstance(parsed, str) else parsed

    @property
    def invalid_reason(self) -> str | None:
        parsed = self._parse()
        return parsed if isinstance(parsed, str) else None


@dataclass(frozen=True, slots=True)
class Desired:
    """A unit's desired state as the registry holds it, with the revision that wrote it (claims
    guard on it)."""

    state: DesiredState
    revision: int = 0


# ---------------------------------------------------------------------------------- encoding


def encode_unit(record: UnitRecord) -> str:
    return json.dumps({"name": record.name, "text": record.text, "hash": record.hash})


# etcd refuses a request whose raft entry exceeds --max-request-bytes (1.5 MiB by default) with
# "request is too large"; above that plus gRPC's 512 KiB allowance the server's gRPC layer drops
# it as "received message larger than max". The raft entry is the binding limit: it holds the
# whole transaction, so a unit's stored value must leave room for its keys (a unit name is at
# most 256 bytes, the prefix is the operator's), the desired-state put and the compares.
MAX_REQUEST_BYTES = 1536 * 1024
REQUEST_OVERHEAD = 4096
MAX_UNIT_VALUE_BYTES = MAX_REQUEST_BYTES - REQUEST_OVERHEAD


def unit_value_size(record: UnitRecord) -> int:
    """Bytes the unit's stored value takes in etcd (JSON escaping included)."""
    return len(encode_unit(record).encode())


def check_unit_size(record: UnitRecord) -> None:
    """Refuse a unit etcd would refuse, before anything is sent (and, on the agent's side, a
    value no honest client could have written)."""
    size = unit_value_size(record)
    if size > MAX_UNIT_VALUE_BYTES:
        raise UnitTooLarge(
            f"unit {record.name} is too large for etcd: {size} bytes stored "
            f"({len(record.text.encode())} of text, JSON-escaped) exceed the limit of "
            f"{MAX_UNIT_VALUE_BYTES} bytes (etcd's default --max-request-bytes of 1.5 MiB less "
            f"{REQUEST_OVERHEAD} for the request's keys and framing): make the unit file smaller"
        )


def encode_owner(machine_id: str) -> str:
    return json.dumps({"machine_id": machine_id})


def encode_machine(machine: Machine) -> str:
    return json.dumps(
        {
            "id": machine.id,
            "public_ip": machine.public_ip,
            "metadata": dict(sorted(machine.metadata.items())),
            "version": machine.version,
            "name": machine.name,
        }
    )


def encode_state(state: PublishedState) -> str:
    data: dict[str, Any] = {
        "load": state.load,
        "active": state.active,
        "sub": state.sub,
        "hash": state.hash,
        "since": state.since,
    }
    if state.reason:
        data["reason"] = state.reason
    if state.container is not None:
        data["container"] = {"id": state.container.id, "image": state.container.image}
    return json.dumps(data)


def _container(data: Any) -> Container | None:
    """The optional container of a published state; absent or malformed reads as none (an
    older agent publishes no such field)."""
    if not isinstance(data, dict) or not data.get("id"):
        return None
    return Container(str(data["id"]), str(data.get("image", "")))


def _brief(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__


def _load(value: bytes | str) -> Any:
    text = value.decode() if isinstance(value, bytes) else value
    try:
        return json.loads(text)
    except RecursionError:
        # JSON nested deeper than the interpreter's stack: no encoder here writes that.
        raise ValueError("registry value nested too deeply") from None


_DESIRED_STATES: dict[str, DesiredState] = {state.value: state for state in DesiredState}


# Mostly refused names: a name the picture holds already passed (`Snapshot._names`), so the
# cache need not hold one entry per unit of the registry.
@functools.lru_cache(maxsize=1 << 10)
def _name_refusal(name: str) -> str | None:
    """Why systemd would refuse the unit name, or None."""
    try:
        parse_unit_name(name)
    except InvalidUnitName as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------------------------- snapshot


class OneState(Mapping[str, PublishedState]):
    """The published states of a unit only one machine published, as nearly every unit has
    (its owner): a read-only mapping of that one entry, a quarter of a dict's size (10,000
    one-entry dicts held about 2 MB)."""

    __slots__ = ("_machine_id", "_state")

    def __init__(self, machine_id: str, state: PublishedState) -> None:
        self._machine_id = machine_id
        self._state = state

    def __getitem__(self, machine_id: str) -> PublishedState:
        if machine_id == self._machine_id:
            return self._state
        raise KeyError(machine_id)

    def __contains__(self, machine_id: object) -> bool:
        return machine_id == self._machine_id

    def get(self, machine_id: str, default: Any = None) -> Any:
        return self._state if machine_id == self._machine_id else default

    def __iter__(self) -> Iterator[str]:
        return iter((self._machine_id,))

    def __len__(self) -> int:
        return 1

    def __repr__(self) -> str:
        return repr({self._machine_id: self._state})


def _states(per: dict[str, PublishedState]) -> Mapping[str, PublishedState]:
    """A unit's published states as they are stored: one entry takes the small form."""
    if len(per) == 1:
        ((machine_id, state),) = per.items()
        return OneState(machine_id, state)
    return per


@dataclass
class Snapshot:
    """Everything the planners need, keyed by unit name or machine id.

    `revision` is the etcd revision this picture is current to.
    """

    revision: int = 0
    units: dict[str, UnitRecord] = field(default_factory=dict)
    desired: dict[str, Desired] = field(default_factory=dict)
    owners: dict[str, Owner] = field(default_factory=dict)
    machines: dict[str, Machine] = field(default_factory=dict)
    # Per unit, its published states by machine: maps that are replaced, never changed.
    states: dict[str, Mapping[str, PublishedState]] = field(default_factory=dict)
    moves: dict[str, str] = field(default_factory=dict)  # unit -> machine a rebalance wants
    # Registry keys under the prefix that no agent acts on, with the reason: a name systemd
    # would refuse, an undecodable value, an unknown desired state, a key of no known kind.
    refused: dict[str, str] = field(default_factory=dict)
    # Which units, desired states, owners, machines and move hints `apply` changed since the
    # last `take_changes`: what an incremental planner needs to look at again. Published
    # states are left out (no plan reads them); a copy starts with an empty journal.
    changes: set[tuple[Kind, str]] = field(default_factory=set, compare=False, repr=False)
    # Off while a whole registry is read into a fresh picture: every key would be journaled
    # (30,000 entries, 3 MB, for 10,000 units) for planners that start from the whole picture
    # anyway. The reader turns it on once the picture is complete.
    journal: bool = field(default=True, compare=False, repr=False)
    # One string per unit name for all the maps above (each key would otherwise bring its own
    # copy of the name), and the unit texts by content hash, so instances of one template share
    # one text. Entries go when no map holds the name or hash any more; a copy starts without.
    # A name in `_names` is valid: it got there through `_put`, after the name was checked (so
    # every unit's name, which comes in four keys and again in each watch event of them, is
    # validated once while the picture holds it).
    _names: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    _texts: dict[str, tuple[str, int]] = field(default_factory=dict, compare=False, repr=False)

    def take_changes(self) -> set[tuple[Kind, str]]:
        changes, self.changes = self.changes, set()
        return changes

    def copy(self) -> Snapshot:
        """A picture that later events do not change (values are immutable; maps are copied).
        `apply` replaces a unit's map of published states instead of changing it, so the copy
        shares those maps."""
        return Snapshot(
            revision=self.revision,
            units=dict(self.units),
            desired=dict(self.desired),
            owners=dict(self.owners),
            machines=dict(self.machines),
            states=dict(self.states),
            moves=dict(self.moves),
            refused=dict(self.refused),
        )

    def only(self, layout: KeyLayout, kinds: Collection[Kind]) -> Snapshot:
        """The picture a read of only these kinds of keys gives (`Registry.snapshot(kinds)`):
        the other maps empty, and only the refused keys under these kinds' prefixes."""
        wanted = set(kinds)
        prefixes = tuple(layout.kind_prefix(kind) for kind in wanted)
        return Snapshot(
            revision=self.revision,
            units=dict(self.units) if Kind.UNIT in wanted else {},
            desired=dict(self.desired) if Kind.DESIRED in wanted else {},
            owners=dict(self.owners) if Kind.OWNER in wanted else {},
            machines=dict(self.machines) if Kind.MACHINE in wanted else {},
            states=dict(self.states) if Kind.STATE in wanted else {},
            moves=dict(self.moves) if Kind.MOVE in wanted else {},
            refused={k: v for k, v in self.refused.items() if k.startswith(prefixes)},
        )

    def desired_state(self, name: str) -> DesiredState:
        entry = self.desired.get(name)
        return entry.state if entry else DesiredState.INACTIVE

    def owner_of(self, name: str) -> str | None:
        owner = self.owners.get(name)
        return owner.machine_id if owner else None

    def apply(
        self,
        layout: KeyLayout,
        key: str,
        value: bytes | None,
        mod_revision: int,
        create_revision: int = 0,
    ) -> str | None:
        """Apply one put (value set) or delete (value None) of a key under the prefix.

        Returns the reason the entry is refused, or None. A refused entry is left out of the
        picture and listed in `refused` instead: whatever a foreign or broken writer puts under
        the prefix must neither crash nor mislead the agents, and the operator must see it.
        """
        if not key.startswith(layout.prefix):
            return None
        if mod_revision > self.revision:
            self.revision = mod_revision
        if self.refused:
            self.refused.pop(key, None)
        parts = layout.split(key)
        if parts is not None and parts[0] is Kind.META:
            # The registry's own bookkeeping: read by claims in etcd, nothing to picture here.
            if parts[1] == UNITS_CHANGED:
                return None
            parts = None
        if parts is None:
            reason: str | None = (
                "not a key fleet knows (expected unit/, desired/, owner/, machine/, ...)"
            )
        else:
            kind, name, machine_id = parts
            reason = (
                None if kind is Kind.MACHINE or name in self._names else _name_refusal(name)
            )
            too_large = value is not None and len(value) > MAX_UNIT_VALUE_BYTES
            if reason is None and kind is Kind.UNIT and too_large:
                # fleetctl never stores more; a larger value came from another writer, and an
                # agent does not build a file from it.
                assert value is not None
                reason = (
                    f"stored unit of {len(value)} bytes exceeds the limit of "
                    f"{MAX_UNIT_VALUE_BYTES} bytes"
                )
                self._delete(kind, name, machine_id)
            if reason is None:
                if kind is not Kind.STATE and self.journal:
                    self.changes.add((kind, name))
                # A valid put replaces whatever the key held; a refused one leaves nothing.
                self._delete(kind, name, machine_id)
                if value is not None:
                    try:
                        self._put(kind, name, machine_id, value, mod_revision, create_revision)
                    except (ValueError, KeyError, TypeError, AttributeError) as exc:
                        reason = f"undecodable value: {_brief(exc)}"
            if kind is not Kind.MACHINE:
                self._forget_name(name)
        if reason is not None and value is not None:
            self.refused[key] = reason
            return reason
        return None

    def _name(self, name: str) -> str:
        return self._names.setdefault(name, name)

    def _forget_name(self, name: str) -> None:
        if name in self._names and not (
            name in self.units
            or name in self.desired
            or name in self.owners
            or name in self.states
            or name in self.moves
        ):
            del self._names[name]

    def _text(self, text: str, hash_: str) -> str:
        """The one copy of a unit text with this hash; counts the records holding it."""
        entry = self._texts.get(hash_)
        if entry is None:
            self._texts[hash_] = (text, 1)
            return text
        if entry[0] != text:
            # Another text with the same SHA-1: keep both, share neither.
            return text
        self._texts[hash_] = (entry[0], entry[1] + 1)
        return entry[0]

    def _drop_text(self, record: UnitRecord) -> None:
        entry = self._texts.get(record.hash)
        if entry is None or entry[0] is not record.text:
            return
        hash_ = record.hash
        if entry[1] <= 1:
            del self._texts[hash_]
        else:
            self._texts[hash_] = (entry[0], entry[1] - 1)

    def _delete(self, kind: Kind, name: str, machine_id: str) -> None:
        if kind is Kind.STATE:
            # Replaced, not changed: copies share these maps.
            per = self.states.get(name)
            if per is not None and machine_id in per:
                rest = {m: s for m, s in per.items() if m != machine_id}
                if rest:
                    self.states[name] = _states(rest)
                else:
                    del self.states[name]
            return
        if kind is Kind.UNIT:
            gone = self.units.pop(name, None)
            if gone is not None:
                self._drop_text(gone)
            return
        self._map(kind).pop(name, None)

    def _map(self, kind: Kind) -> dict[str, Any]:
        # Compared by identity: an enum member hashes in Python code, slow for a per-key lookup.
        if kind is Kind.UNIT:
            return self.units
        if kind is Kind.DESIRED:
            return self.desired
        if kind is Kind.OWNER:
            return self.owners
        if kind is Kind.MACHINE:
            return self.machines
        if kind is Kind.MOVE:
            return self.moves
        raise ValueError(f"no map of {kind}")

    def _put(
        self,
        kind: Kind,
        name: str,
        machine_id: str,
        value: bytes,
        mod_revision: int,
        create_revision: int,
    ) -> None:
        if kind is not Kind.MACHINE:
            name = self._name(name)
        if kind is Kind.DESIRED:
            text = value.decode()
            # The enum's own call raises the error (and message) of an unknown state.
            state = _DESIRED_STATES.get(text) or DesiredState(text)
            # The units of one transaction share one revision: one record for all of them.
            self.desired[name] = shared_value(Desired(state, shared_value(mod_revision)))
        elif kind is Kind.MOVE:
            self.moves[name] = value.decode()
        else:
            data = _load(value)
            if not isinstance(data, dict):
                raise TypeError(f"expected a JSON object, got {type(data).__name__}")
            if kind is Kind.STATE:
                machine_id = shared(machine_id)
                published = PublishedState(
                    machine_id,
                    shared(str(data["load"])),
                    shared(str(data["active"])),
                    shared(str(data["sub"])),
                    shared(str(data["hash"])),
                    float(data.get("since", 0.0)),
                    str(data.get("reason", "")),
                    _container(data.get("container")),
                )
                # Replaced, not changed: copies share these maps.
                per = self.states.get(name)
                if per:
                    self.states[name] = _states({**per, machine_id: published})
                else:
                    self.states[name] = OneState(machine_id, published)
            elif kind is Kind.UNIT:
                if not isinstance(data["text"], str):
                    raise TypeError("unit text is not a string")
                # The agents compare this hash with the file they wrote: one that is not the
                # text's own would make the owner reload and restart the unit every round.
                hash_ = shared(str(data["hash"]))
                if hash_ != content_hash(data["text"]):
                    raise ValueError("its hash is not the hash of its text")
                self.units[name] = UnitRecord(
                    name, self._text(data["text"], hash_), hash_, shared_value(mod_revision)
                )
            elif kind is Kind.OWNER:
                # Mostly one revision (the claim created the key): then one int object; and
                # the claims of one batch are one record.
                mod_revision = shared_value(mod_revision)
                created = create_revision or mod_revision
                self.owners[name] = shared_value(
                    Owner(
                        shared(str(data["machine_id"])),
                        mod_revision if created == mod_revision else shared_value(created),
                        mod_revision,
                    )
                )
            elif kind is Kind.MACHINE:
                metadata: Mapping[str, str] = {
                    str(k): str(v) for k, v in dict(data.get("metadata") or {}).items()
                }
                self.machines[name] = Machine(
                    str(data["id"]),
                    str(data.get("public_ip", "")),
                    metadata,
                    str(data.get("version", "")),
                    str(data.get("name", "")),
                )
