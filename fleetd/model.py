"""The value types every layer shares: machines, units, desired and published states, and the
table that lets equal strings of many records be one object.

Everything here is immutable and free of I/O so that the pure core (placement, planning) can be
tested with plain values and Hypothesis strategies. The records have slots: a registry holds tens
of thousands of them.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

# Values that repeat across thousands of keys (machine ids, systemd's state words, the content
# hash of instances of one template) are kept once: a registry of 10,000 units would otherwise
# hold each as a string of its own per key. Bounded: past the bound the table starts afresh,
# which only costs sharing, never correctness.
_SHARED_LIMIT = 8192
_shared: dict[str, str] = {}


def shared(text: str) -> str:
    """An equal string, the same object for every caller while the table holds it."""
    found = _shared.get(text)
    if found is not None:
        return found
    if len(_shared) >= _SHARED_LIMIT:
        _shared.clear()
    _shared[text] = text
    return text


# Revisions and the small records built from them repeat too: every key of one etcd
# transaction carries the same revision (fleetctl writes 60 units a transaction, claims and
# published states go in batches), so the desired states of a batch are equal records, and so
# are the owners of a batch of claims. Bounded like the strings.
_shared_values: dict[Hashable, Hashable] = {}
_V = TypeVar("_V", bound=Hashable)


def shared_value(value: _V) -> _V:
    """An equal immutable value (an int, a frozen record), the same object for every caller
    while the table holds it. Only a value of the same type is returned: 1 and 1.0 are equal
    but not interchangeable."""
    found = _shared_values.get(value)
    if found is not None and type(found) is type(value):
        return found
    if len(_shared_values) >= _SHARED_LIMIT:
        _shared_values.clear()
    _shared_values[value] = value
    return value


class DesiredState(enum.StrEnum):
    """What the operator asked for (fleet's "target state")."""

    INACTIVE = "inactive"
    LOADED = "loaded"
    LAUNCHED = "launched"


@dataclass(frozen=True, slots=True)
class Machine:
    """A live agent as it announced itself in the registry."""

    id: str
    public_ip: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    version: str = ""
    name: str = ""  # a human label (hostname); fleet had none, reasons read better with it

    @property
    def short_id(self) -> str:
        return self.id[:8]

    @property
    def label(self) -> str:
        return self.name or self.short_id

    @property
    def zone(self) -> str | None:
        return self.metadata.get("zone")

    @property
    def region(self) -> str | None:
        return self.metadata.get("region")


@dataclass(frozen=True, slots=True)
class Container:
    """The container a running unit keeps (podman's `--cidfile` convention): its full id and the
    image it was created from, as the runtime names it."""

    id: str
    image: str

    @property
    def short_id(self) -> str:
        return self.id[:12]


@dataclass(frozen=True, slots=True)
class SystemdState:
    """systemd's own view of a unit: LoadState / ActiveState / SubState, and the container the
    unit runs, when it runs one (read by the unit manager adapter from the container runtime)."""

    load: str
    active: str
    sub: str
    container: Container | None = None


@dataclass(frozen=True, slots=True)
class PublishedState:
    """What a machine published about a unit it runs."""

    machine_id: str
    load: str
    active: str
    sub: str
    hash: str
    since: float  # epoch seconds of the last ActiveState change seen by the publisher
    reason: str = ""  # why a deactivating unit is being stopped (a move waits for the stop)
    container: Container | None = None


@dataclass(frozen=True, slots=True)
class Owner:
    """Who holds a unit. `revision` is the owner key's create revision: a fencing token."""

    machine_id: str
    revision: int
    mod_revision: int = 0
