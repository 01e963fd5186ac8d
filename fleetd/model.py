"""The value types every layer shares: machines, units, desired and published states.

Everything here is immutable and free of I/O so that the pure core (placement, planning) can be
tested with plain values and Hypothesis strategies.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


class DesiredState(enum.StrEnum):
    """What the operator asked for (fleet's "target state")."""

    INACTIVE = "inactive"
    LOADED = "loaded"
    LAUNCHED = "launched"


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class SystemdState:
    """systemd's own view of a unit: LoadState / ActiveState / SubState."""

    load: str
    active: str
    sub: str


@dataclass(frozen=True)
class PublishedState:
    """What a machine published about a unit it runs."""

    machine_id: str
    load: str
    active: str
    sub: str
    hash: str
    since: float  # epoch seconds of the last ActiveState change seen by the publisher
    reason: str = ""  # why a deactivating unit is being stopped (a move waits for the stop)


@dataclass(frozen=True)
class Owner:
    """Who holds a unit. `revision` is the owner key's create revision: a fencing token."""

    machine_id: str
    revision: int
    mod_revision: int = 0
