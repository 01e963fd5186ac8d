"""The part of etcd's v3 API the registry speaks, whatever carries it: compares, operations and
transactions as plain values, the two ways a request can fail, and the `Transport` protocol that
gRPC (`fleetd.etcd_grpc`, the agent's) and etcd's JSON gateway (`fleetd.etcd_http`, fleetctl's)
both implement.

`fleetd.registry` builds every request out of these values, so what a claim compares or what a
submission writes is decided once, not once per transport; the shared registry contract suite
runs on both. Nothing here imports a client library.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from fleetd.ports import WatchEvent

Target = Literal["create", "mod", "value"]
Relation = Literal["==", "<", ">"]


@dataclass(frozen=True, slots=True)
class Compare:
    """One condition of a transaction: the key's (or, with `range_end`, every key's in the
    range) create revision, mod revision or value, held against `operand`."""

    key: str
    target: Target
    relation: Relation
    operand: int | str
    range_end: str | None = None


@dataclass(frozen=True, slots=True)
class Put:
    """Set `key` to `value`, bound to `lease` when not 0 (the key goes when the lease does)."""

    key: str
    value: str | bytes
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    """Remove `key`."""

    key: str


@dataclass(frozen=True, slots=True)
class Txn:
    """A transaction nested in another: etcd judges its compares against the state before the
    outer transaction and commits its operations if they all hold."""

    compare: Sequence[Compare]
    success: Sequence[Put | Delete]


Op = Put | Delete | Txn


def created(key: str, relation: Relation, revision: int) -> Compare:
    return Compare(key, "create", relation, revision)


def modified(key: str, relation: Relation, revision: int, range_end: str | None = None) -> Compare:
    return Compare(key, "mod", relation, revision, range_end)


def holds(key: str, value: str) -> Compare:
    return Compare(key, "value", "==", value)


# One key of a range read: key, value, mod revision, create revision, lease.
Row = tuple[bytes, bytes, int, int, int]


@dataclass(slots=True)
class Page:
    """One answer of a range read: its rows, the revision it was read at, and whether more keys
    follow past the limit."""

    revision: int
    rows: list[Row] = field(default_factory=list)
    more: bool = False
    count: int = 0  # keys in the whole range asked for at that revision (etcd's count)


@dataclass(frozen=True, slots=True)
class Lease:
    """What etcd says of a lease, without its keys."""

    granted: int  # seconds the lease was granted for
    remaining: int  # seconds left; -1 once it is gone


class Refused(Exception):
    """etcd answered, and refused the request; `details` is etcd's own message (the registry's
    table of refusals reads it) and `code` the gRPC status code."""

    def __init__(self, details: str, code: int = 0) -> None:
        super().__init__(details)
        self.details = details
        self.code = code


class Unreachable(Exception):
    """No answer from etcd: refused connection, timeout, no endpoint left. `handshake` when a
    TLS handshake may be what failed (gRPC cannot tell it from a server that is not there)."""

    def __init__(self, reason: str, handshake: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.handshake = handshake


WatchHandler = Callable[[list[WatchEvent] | BaseException], None]


class Transport(Protocol):
    """One client connection to a set of etcd endpoints. Every method raises `Refused` or
    `Unreachable` and nothing else a caller must know; a failed endpoint is marked so that the
    next call goes to another."""

    def use_token(self, token: str) -> None:
        """Send this auth token with every later request ("" for none)."""

    def authenticate(self, name: str, password: str) -> str: ...

    def range(
        self,
        start: str | bytes,
        end: str | bytes,
        limit: int = 0,
        revision: int = 0,
        keys_only: bool = False,
    ) -> Page: ...

    def get(self, key: str) -> Row | None: ...

    def txn(self, compare: Sequence[Compare], success: Sequence[Op]) -> tuple[bool, list[bool]]:
        """Commit `success` if every compare holds: (whether they held, for each nested `Txn`
        in `success` whether its own compares held)."""
        ...

    def put(self, key: str, value: str | bytes, lease: int = 0) -> None: ...

    def delete(self, key: str) -> None: ...

    def grant(self, ttl: int) -> int: ...

    def keepalive(self, lease_id: int) -> int:
        """Renew the lease; the seconds it now has left (0: it is gone)."""
        ...

    def revoke(self, lease_id: int) -> None: ...

    def lease(self, lease_id: int) -> Lease: ...

    def watch(self, prefix: str, start_revision: int, handler: WatchHandler) -> Callable[[], None]:
        """Watch every key under `prefix` from `start_revision`: `handler` gets each batch of
        events in order, or the exception that ended the watch. Returns the cancel function;
        raises `Refused` when etcd would not create the watch."""
        ...

    def reset_watches(self) -> None:
        """Open the next watch on a new stream (one made with a new token)."""

    def close(self) -> None: ...
