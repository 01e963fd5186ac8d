"""The one place that knows the etcd key layout.

Everything lives under a configurable prefix (default ``/fleet/``)::

    <prefix>unit/<name>        JSON {"name", "text", "hash"}       content (fleetctl writes)
    <prefix>desired/<name>     "inactive"|"loaded"|"launched"      desired state (fleetctl)
    <prefix>owner/<name>       JSON {"machine_id"}                 who runs a non-global unit;
                                                                   bound to the owner's lease
    <prefix>machine/<id>       JSON {"id", "public_ip", "metadata", "version", "name"}
                                                                   presence; bound to the lease
    <prefix>state/<name>/<id>  JSON {"load", "active", "sub", "hash", "since"}
                                                                   published by machine <id>;
                                                                   bound to its lease
    <prefix>move/<name>        machine id                          a rebalance asks the owner to
                                                                   hand the unit to that machine
    <prefix>meta/units-changed ""                                  written with every change of
                                                                   unit content that can add a
                                                                   rule (fleetctl)

A machine's presence, the owner keys it holds and the states it published all share its lease, so
a dead machine's keys vanish together and nothing else has to clean up. The owner key's create
revision is a fencing token: it changes every time ownership changes hands.

Unit content and desired state are separate keys so that start/stop touch one small value. A
write of unit content also writes `meta/units-changed` in the same transaction, so a claim guards
on "no unit content changed since my snapshot" by one key's mod revision: a range compare over
every unit key would cost etcd a read of all of them per claim. The one write that leaves the mark
alone is a new self-contained unit (`fleetd.placement.moves_units_changed`): it can add no rule a
claim in flight should have guarded on, and a big submission of plain instances would otherwise
fail every claim sent while it is being written.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

DEFAULT_PREFIX = "/fleet/"


class Kind(enum.Enum):
    UNIT = "unit"
    DESIRED = "desired"
    OWNER = "owner"
    MACHINE = "machine"
    STATE = "state"
    MOVE = "move"
    META = "meta"  # bookkeeping of the registry itself, not about one unit


UNITS_CHANGED = "units-changed"

# `Kind(text)` costs an enum lookup and an exception for every unknown kind; keys are parsed
# once per registry entry (tens of thousands in a listing), so a plain dict decides instead.
_KINDS: dict[str, Kind] = {kind.value: kind for kind in Kind}


@dataclass(frozen=True, slots=True)
class ParsedKey:
    """A registry key split into what it addresses; `machine_id` is set for STATE keys."""

    kind: Kind
    name: str
    machine_id: str = ""


def normalize_prefix(prefix: str) -> str:
    """Always one leading and one trailing slash, so prefixes compose by concatenation."""
    core = prefix.strip("/")
    return "/" + core + "/" if core else "/"


class KeyLayout:
    """Builds and parses keys under one prefix."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = normalize_prefix(prefix)

    def unit(self, name: str) -> str:
        return f"{self.prefix}unit/{name}"

    def desired(self, name: str) -> str:
        return f"{self.prefix}desired/{name}"

    def owner(self, name: str) -> str:
        return f"{self.prefix}owner/{name}"

    def machine(self, machine_id: str) -> str:
        return f"{self.prefix}machine/{machine_id}"

    def state(self, name: str, machine_id: str) -> str:
        return f"{self.prefix}state/{name}/{machine_id}"

    def move(self, name: str) -> str:
        return f"{self.prefix}move/{name}"

    def units_changed(self) -> str:
        """The key whose mod revision is the last change of any unit's content."""
        return f"{self.prefix}{Kind.META.value}/{UNITS_CHANGED}"

    def kind_prefix(self, kind: Kind) -> str:
        return f"{self.prefix}{kind.value}/"

    def parse(self, key: str) -> ParsedKey | None:
        """Split a key under this prefix; None for a key this layout does not own."""
        parts = self.split(key)
        return None if parts is None else ParsedKey(*parts)

    def split(self, key: str) -> tuple[Kind, str, str] | None:
        """`parse` as a plain (kind, name, machine id) tuple, for decoding a whole registry
        without building an object per key."""
        if not key.startswith(self.prefix):
            return None
        kind_text, sep, tail = key[len(self.prefix) :].partition("/")
        if not sep or not tail:
            return None
        kind = _KINDS.get(kind_text)
        if kind is None:
            return None
        if kind is Kind.STATE:
            name, sep, machine_id = tail.rpartition("/")
            if not sep or not name or not machine_id:
                return None
            return kind, name, machine_id
        if "/" in tail:
            return None
        return kind, tail, ""


def range_end(prefix: str) -> str:
    """The etcd range end that covers every key starting with `prefix`."""
    last = prefix[-1]
    return prefix[:-1] + chr(ord(last) + 1)
