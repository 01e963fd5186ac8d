"""The etcd adapter: every read and write of the registry, whatever carries it to etcd.

It moves bytes between etcd and the core's types (`fleetd.snapshot`), builds keys only through
`fleetd.keys`, and turns every failure into a typed error with a one-line reason: a refusal etcd
gave (authentication, permission, size) into its own error, anything else into
`RegistryUnavailable`. Requests are built out of `fleetd.etcd_kv`'s values and sent by one of two
transports: gRPC (`fleetd.etcd_grpc`, the default, which the agent uses) or etcd's JSON gateway
(`fleetd.etcd_http`, which fleetctl uses: it starts without gRPC's libraries, and loads them only
for the rest of a large read, `BULK_READ_KEYS`). Transactions are the unit of safety here:

- a claim creates the owner key only if it is absent, bound to the claimant's lease, and only if
  every fact the placement relied on still holds (`fleetd.placement.Guards`) and no unit content
  changed after the claimant's snapshot;
- fleetctl's writes of several units go in one transaction, so agents see a batch at once and plan
  it as a whole.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any, Literal
from urllib.parse import urlsplit

from fleetd.errors import (
    AuthError,
    ConfigError,
    FleetError,
    PermissionDenied,
    RegistryUnavailable,
    UnitTooLarge,
)
from fleetd.etcd_kv import (
    Compare,
    Delete,
    Op,
    Put,
    Refused,
    Transport,
    Txn,
    Unreachable,
    created,
    holds,
    modified,
)
from fleetd.keys import KeyLayout, Kind, range_end
from fleetd.model import DesiredState, Machine, PublishedState
from fleetd.placement import Guards, moves_units_changed
from fleetd.ports import WatchEvent
from fleetd.snapshot import (
    MAX_REQUEST_BYTES,
    REQUEST_OVERHEAD,
    Snapshot,
    UnitRecord,
    encode_machine,
    encode_owner,
    encode_state,
    encode_unit,
)

log = logging.getLogger(__name__)

__all__ = ["MAX_TXN_OPS", "EtcdRegistry", "WatchEvent", "parse_endpoints"]

# etcd refuses transactions with more operations than --max-txn-ops (128 by default).
MAX_TXN_OPS = 120

# A write of more units than one transaction holds sends its parts this many at a time, each on
# a connection of its own: etcd commits transactions that arrive together with one disk sync,
# where one after another each waits for its own (some 15 ms apiece here). And the agents see
# the parts land together: parts 15 ms apart could be planned apart, and an agent that claimed
# the first ones claims the rest only after it has started those (a second or so later).
# Eight parts: 480 units.
WRITE_WIDTH = 8

# The whole registry is read in pages of this many keys, all at one revision: one answer for
# 10,000 units (about 6 MB of protobuf) would be held whole beside the picture built from it and
# leave the agent's heap that much larger for good.
SNAPSHOT_PAGE = 2000

# A read over the JSON gateway that still has more than this many keys to come after its first
# page goes on over gRPC, at the same revision. The gateway costs etcd some 10 µs a key to
# render as JSON (`fleetctl list-unit-files` of 10,000 units, 40,000 keys: 0.98 s over HTTP,
# 0.67 s so), while loading gRPC's libraries costs a command some 45 ms of CPU: at 2,000 units
# (8,000 keys) the two ways take as long, so short commands and small clusters stay without it.
BULK_READ_KEYS = 6000


def parse_endpoints(text: str | Sequence[str]) -> list[str]:
    items = text.split(",") if isinstance(text, str) else list(text)
    endpoints = [e.strip() for e in items if e.strip()]
    if not endpoints:
        raise ConfigError("no etcd endpoint given: set --endpoint (e.g. http://127.0.0.1:2379)")
    for endpoint in endpoints:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"etcd endpoint {endpoint!r} is not a URL: use http://HOST:PORT or https://HOST:PORT"
            )
    return endpoints


@contextmanager
def _no_collection() -> Iterator[None]:
    """Keep the cycle collector out while a whole registry is decoded: the records form no
    cycles, and with 10,000 units the collector would walk a heap growing by hundreds of
    thousands of objects again and again (a tenth of the decoding time). Restores the collector
    only if it was on, so nested or concurrent uses end with it on."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# A unit's part of a write: its compare, its operations, their bytes, and whether it moves the
# units-changed mark.
_Group = tuple[Compare, list[Op], int, bool]


def _batches(groups: list[_Group]) -> Iterator[list[_Group]]:
    """Consecutive groups (compare, ops, bytes, mark) that fit one transaction: at most
    MAX_TXN_OPS / 2 units (two operations each) and within etcd's request size."""
    budget = MAX_REQUEST_BYTES - REQUEST_OVERHEAD
    chunk: list[_Group] = []
    used = 0
    for group in groups:
        if chunk and (len(chunk) >= MAX_TXN_OPS // 2 or used + group[2] > budget):
            yield chunk
            chunk, used = [], 0
        chunk.append(group)
        used += group[2] + 64
    if chunk:
        yield chunk


def _together(calls: Sequence[Callable[[], bool]], width: int = WRITE_WIDTH) -> bool:
    """Run calls `width` at a time, each thread taking the next one due; True when all of
    them returned True. Every call runs even when one fails; the first (in the calls' order)
    exception is raised after all are done."""
    if len(calls) <= 1 or width <= 1:
        return all([call() for call in calls])  # a list: every call runs
    results: list[bool | BaseException] = [False] * len(calls)
    due = iter(range(len(calls)))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                index = next(due, None)
            if index is None:
                return
            try:
                results[index] = calls[index]()
            except BaseException as exc:  # handed to the caller's thread below
                results[index] = exc

    threads = [
        threading.Thread(target=work, name="etcd-write", daemon=True)
        for _ in range(min(width, len(calls)) - 1)
    ]
    for thread in threads:
        thread.start()
    work()
    for thread in threads:
        thread.join()
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return all(results)


class EtcdRegistry:
    """The registry as the agent and fleetctl see it."""

    def __init__(
        self,
        endpoints: str | Sequence[str],
        prefix: str = "/fleet/",
        timeout: float = 5.0,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        username: str | None = None,
        password: str | None = None,
        transport: Literal["grpc", "http"] = "grpc",
    ) -> None:
        self.endpoints = parse_endpoints(endpoints)
        if username and password is None:
            raise ConfigError(f"etcd user {username!r} needs a password")
        if password is not None and not username:
            raise ConfigError("an etcd password needs a user name")
        self.username = username or None
        self._password = password
        # The current auth token; "" while none is needed (no credentials, or auth is off).
        self._token: str | None = None
        self._auth_lock = threading.Lock()
        self.layout = KeyLayout(prefix)
        self.timeout = timeout
        if (cert_file or key_file) and not ca_file:
            raise ConfigError("a client certificate needs a CA file too: set --ca-file")
        if bool(cert_file) != bool(key_file):
            raise ConfigError("--cert-file and --key-file go together: set both or neither")
        for url in self.endpoints:
            if urlsplit(url).scheme == "https" and not ca_file:
                raise ConfigError(f"etcd endpoint {url} uses https: set --ca-file")
        self._tls = (ca_file, cert_file, key_file)
        # The gRPC transport an HTTP registry reads the rest of a large read with, built on
        # the first such read; none once one failed there: this registry then stays on HTTP.
        self._bulk: Transport | None = None
        self._bulk_wanted = transport == "http"
        # Imported here: each transport's libraries load only for the registries that use it.
        if transport == "http":
            from fleetd.etcd_http import HttpTransport

            self.transport: Transport = HttpTransport(
                self.endpoints, timeout, ca_file, cert_file, key_file
            )
        else:
            from fleetd.etcd_grpc import GrpcTransport

            self.transport = GrpcTransport(self.endpoints, timeout, ca_file, cert_file, key_file)

    # --------------------------------------------------------------------------- auth

    def _authenticate(self) -> None:
        """Get a token for our user; etcd checks it on every request but lease keep-alives."""
        with self._auth_lock:
            if self._token is not None:
                return
            if not self.username:
                self._token = ""
                return
            try:
                token = self.transport.authenticate(self.username, self._password or "")
            except Refused as exc:
                if "authentication is not enabled" not in exc.details:
                    raise
                # Credentials ahead of `etcdctl auth enable` are fine: go without a token, and
                # authenticate once etcd starts asking for one.
                token = ""
            self._token = token
            self.transport.use_token(token)
            if self._bulk is not None:
                self._bulk.use_token(token)

    def _forget_token(self) -> None:
        with self._auth_lock:
            self._token = None

    def _refusal(self, details: str, doing: str) -> FleetError | None:
        """The typed error for a request etcd refused (authentication, permission, size), else
        None."""
        where = ",".join(self.endpoints)
        who = f"user {self.username!r}" if self.username else "an anonymous client"
        if "invalid auth token" in details or ("user name is empty" in details and self.username):
            # An expired token (idle for --auth-token-ttl, or etcd restarted), or auth was
            # turned on after we started: authenticate again on the next attempt.
            self._forget_token()
            return RegistryUnavailable(f"etcd at {where} asked to authenticate again: retry")
        if "user name is empty" in details:
            return AuthError(f"etcd at {where} requires authentication and no user was given")
        if "authentication failed" in details:
            return AuthError(f"etcd at {where} refused {who}: wrong user name or password")
        if "request is too large" in details or "larger than max" in details:
            return UnitTooLarge(
                f"etcd at {where} refused the request as too large ({details}): its "
                f"--max-request-bytes is below the {MAX_REQUEST_BYTES} bytes fleet expects; "
                "make the unit files smaller or raise that limit"
            )
        if "permission denied" in details:
            return PermissionDenied(
                f"etcd at {where} denied {who} {doing} under {self.layout.prefix}: "
                "permission denied (the user's roles do not allow it)"
            )
        return None

    # ------------------------------------------------------------------------------ plumbing

    @contextmanager
    def _calling(self, doing: str = "this request") -> Iterator[None]:
        try:
            if self._token is None:
                self._authenticate()
            yield
        except Refused as exc:
            denied = self._refusal(exc.details, doing)
            if denied is not None:
                raise denied from exc
            raise RegistryUnavailable(
                f"cannot reach etcd at {','.join(self.endpoints)}: {exc.details}"
            ) from exc
        except Unreachable as exc:
            reason = exc.reason
            if exc.handshake and any(e.startswith("https:") for e in self.endpoints):
                reason += " (or the TLS handshake failed: check the CA, certificate and key files)"
            raise RegistryUnavailable(
                f"cannot reach etcd at {','.join(self.endpoints)}: {reason}"
            ) from exc

    def _retrying(
        self, call: Callable[[], Any], attempts: int = 3, doing: str = "write access"
    ) -> Any:
        """Run an idempotent call, moving to the next endpoint when one fails."""
        first: RegistryUnavailable | None = None
        for attempt in range(attempts):
            try:
                with self._calling(doing):
                    return call()
            except (AuthError, PermissionDenied, UnitTooLarge):
                # Another endpoint would give the same answer.
                raise
            except RegistryUnavailable as exc:
                # The first failure names the real cause; later ones only say that every
                # endpoint is marked failed.
                first = first or exc
                if attempt + 1 < attempts:
                    time.sleep(0.05 * (attempt + 1))
        assert first is not None
        raise first

    def close(self) -> None:
        self.transport.close()
        if self._bulk is not None:
            self._bulk.close()

    def _bulk_reader(self) -> Transport | None:
        """The gRPC transport for the rest of a large read, built on first use; None when this
        registry reads over gRPC already, or a bulk read failed before."""
        with self._auth_lock:
            if self._bulk is None and self._bulk_wanted:
                try:
                    from fleetd.etcd_grpc import GrpcTransport

                    bulk = GrpcTransport(self.endpoints, self.timeout, *self._tls)
                except Exception as exc:  # no faster way, not a failed read
                    self._bulk_wanted = False
                    log.debug("no gRPC transport for large reads: %s", exc)
                    return None
                # etcd's tokens are the same whichever way a request comes.
                bulk.use_token(self._token or "")
                self._bulk = bulk
            return self._bulk

    def _drop_bulk(self, exc: Exception) -> None:
        # gRPC may not get through where HTTP does (a proxy of HTTP/1.1 only, an endpoint
        # serving the gateway on a listener of its own): the read goes on over HTTP.
        log.debug("reading over gRPC failed (%s): on over the JSON gateway", exc)
        with self._auth_lock:
            bulk, self._bulk, self._bulk_wanted = self._bulk, None, False
        if bulk is not None:
            bulk.close()

    def grpc_client(self) -> Any:
        """The python-etcd3 client under a gRPC registry (benchmarks write raw keys with it)."""
        from fleetd.etcd_grpc import GrpcTransport

        if not isinstance(self.transport, GrpcTransport):
            raise TypeError("this registry speaks to etcd over its JSON gateway, not gRPC")
        return self.transport.client

    # ---------------------------------------------------------------------------------- reads

    def snapshot(self, kinds: Collection[Kind] | None = None) -> Snapshot:
        """The whole registry (or the keys of `kinds` only), read in pages at one revision,
        current to that revision."""
        if kinds is None:
            prefixes = [self.layout.prefix]
        else:
            ordered = sorted(set(kinds), key=lambda kind: kind.value)
            prefixes = [self.layout.kind_prefix(kind) for kind in ordered]

        def read() -> Snapshot:
            # A fresh picture: nothing to journal until it is complete.
            snap = Snapshot(journal=False)
            revision = 0
            transport = self.transport
            with _no_collection():
                for prefix in prefixes:
                    start: str | bytes = prefix
                    end = range_end(prefix)
                    while True:
                        # Every page at the first page's revision: one consistent picture.
                        try:
                            page = transport.range(start, end, SNAPSHOT_PAGE, revision)
                        except (Refused, Unreachable) as exc:
                            if transport is self.transport:
                                raise
                            self._drop_bulk(exc)
                            transport = self.transport
                            continue
                        revision = revision or page.revision
                        for key, value, mod, create, _ in page.rows:
                            snap.apply(self.layout, key.decode(), value, mod, create)
                        if not page.more or not page.rows:
                            break
                        start = page.rows[-1][0] + b"\0"
                        if (
                            transport is self.transport
                            and page.count - len(page.rows) > BULK_READ_KEYS
                        ):
                            transport = self._bulk_reader() or transport
            snap.revision = revision
            snap.journal = True
            return snap

        result: Snapshot = self._retrying(read, doing="read access")
        return result

    def lease_ages(self, machine_ids: Iterable[str]) -> dict[str, float]:
        """Seconds since each machine last renewed its lease: the lease's granted TTL less what
        remains of it (etcd resets the remainder on every keep-alive). Costs one read per
        machine and nothing on the agents' side; machines whose key or lease is gone are left
        out."""
        wanted = set(machine_ids)
        prefix = self.layout.kind_prefix(Kind.MACHINE)

        def leases() -> dict[str, int]:
            page = self.transport.range(prefix, range_end(prefix), keys_only=True)
            found = ((key.decode()[len(prefix) :], lease) for key, _, _, _, lease in page.rows)
            return {machine: lease for machine, lease in found if machine in wanted and lease}

        ages: dict[str, float] = {}
        for machine_id, lease_id in self._retrying(leases, doing="read access").items():
            lease = self._retrying(partial(self.transport.lease, lease_id), doing="read access")
            if lease.remaining >= 0 and lease.granted > 0:
                ages[machine_id] = float(max(0, lease.granted - lease.remaining))
        return ages

    def watch(
        self, start_revision: int, callback: Callable[[list[WatchEvent] | BaseException], None]
    ) -> Callable[[], None]:
        """Watch the whole prefix from `start_revision`; returns a cancel function. The callback
        gets each batch of events, or the exception that ended the watch (then re-sync)."""
        prefix = self.layout.prefix

        def add() -> Callable[[], None] | None:
            try:
                return self.transport.watch(prefix, start_revision, callback)
            except Refused as exc:
                if "permission denied" in exc.details:
                    return None
                raise

        with self._calling("read access"):
            cancel = add()
            if cancel is None and self.username:
                # etcd refused the watch: the stream may carry an expired token. Try once more
                # on a fresh stream with a fresh token before calling it a denial.
                self._forget_token()
                self._authenticate()
                self.transport.reset_watches()
                cancel = add()
        if cancel is None:
            raise PermissionDenied(
                f"etcd at {','.join(self.endpoints)} refused to watch {prefix}"
                + (f" for user {self.username!r}" if self.username else "")
                + ": permission denied (the user's roles do not allow reading it)"
            )
        return cancel

    # ------------------------------------------------------------------------ fleetctl writes

    def _txn(self, compare: Sequence[Compare], success: Sequence[Op]) -> bool:
        # Every transaction here is guarded or idempotent, so one that failed on a dying
        # endpoint is safe to send again to the next: if the first did commit, the guard of the
        # second fails and callers treat that as "re-read and decide again".
        def call() -> bool:
            ok, _ = self.transport.txn(compare, success)
            return ok

        result: bool = self._retrying(call)
        return result

    def write_units(
        self,
        records: Iterable[UnitRecord],
        desired: DesiredState | None,
        seen: Snapshot,
    ) -> bool:
        """Write unit contents and/or desired states, each unit guarded on its key still having
        the revision `seen` shows, so concurrent fleetctl runs cannot silently overwrite each
        other. Returns False when a guard failed (re-read, decide again, retry).

        Up to MAX_TXN_OPS / 2 units (within etcd's request size) go in one transaction, so
        agents see such a batch at once and plan it as a whole. A larger batch is split, each
        part carrying its own units' guards, and the parts are sent together (`_together`):
        after a failed part the others stay written, and a retry finds them already done.
        """
        groups: list[_Group] = []
        for record in records:
            key = self.layout.unit(record.name)
            old = seen.units.get(record.name)
            ops: list[Op] = []
            size = 3 * len(key)
            mark = False
            if old is None or old.hash != record.hash:
                value = encode_unit(record)
                ops.append(Put(key, value))
                size += len(value.encode())
                mark = moves_units_changed(record, old)
            current = seen.desired.get(record.name)
            state = desired or (current.state if current else DesiredState.INACTIVE)
            if current is None or current.state is not state:
                ops.append(Put(self.layout.desired(record.name), state.value))
            if ops:
                groups.append((modified(key, "==", old.revision if old else 0), ops, size, mark))
        parts: list[Callable[[], bool]] = []
        for chunk in _batches(groups):
            ops = [op for _, group_ops, _, _ in chunk for op in group_ops]
            if any(mark for _, _, _, mark in chunk):
                # What claims compare instead of every unit key (see fleetd.keys).
                ops.append(Put(self.layout.units_changed(), ""))
            parts.append(partial(self._txn, [c for c, _, _, _ in chunk], ops))
        return _together(parts)

    def set_desired(self, names: Iterable[str], state: DesiredState) -> None:
        ops: list[Op] = [Put(self.layout.desired(n), state.value) for n in names]
        self._unguarded(ops)

    def _unguarded(self, ops: Sequence[Op]) -> None:
        """Operations that guard on nothing, in as many transactions as they need, sent
        together."""
        step = MAX_TXN_OPS
        _together([partial(self._txn, [], ops[i : i + step]) for i in range(0, len(ops), step)])

    def destroy(self, names: Iterable[str]) -> None:
        """Remove units' content and desired state. Owners notice, stop the unit and release it
        themselves; their published state goes with the unload."""
        ops: list[Op] = []
        for name in names:
            ops.append(Delete(self.layout.unit(name)))
            ops.append(Delete(self.layout.desired(name)))
            ops.append(Delete(self.layout.move(name)))
        self._unguarded(ops)

    def request_move(self, unit: str, machine_id: str) -> None:
        """Ask the owner of `unit` to hand it to `machine_id` (a rebalance step)."""
        self._retrying(partial(self.transport.put, self.layout.move(unit), machine_id))

    def clear_move(self, unit: str) -> None:
        self._retrying(partial(self.transport.delete, self.layout.move(unit)))

    # --------------------------------------------------------------------------- agent writes

    def grant_lease(self, ttl: float) -> int:
        result: int = self._retrying(partial(self.transport.grant, max(1, round(ttl))))
        return result

    def keepalive(self, lease_id: int) -> float:
        """Refresh the lease; returns its remaining TTL in seconds (0: it has expired)."""
        with self._calling():
            return float(self.transport.keepalive(lease_id))

    def revoke(self, lease_id: int) -> None:
        self._retrying(partial(self.transport.revoke, lease_id))

    def register_machine(self, machine: Machine, lease_id: int) -> bool:
        """Announce the machine, only if no live agent holds its id already."""
        key = self.layout.machine(machine.id)
        if self._txn(
            [created(key, "==", 0)], [Put(key, encode_machine(machine), lease=lease_id)]
        ):
            return True

        # A retried transaction fails against its own earlier success: the key is then ours.
        def holder() -> int:
            row = self.transport.get(key)
            return row[4] if row is not None else 0

        return bool(self._retrying(holder) == lease_id)

    def update_machine(self, machine: Machine, lease_id: int) -> None:
        key = self.layout.machine(machine.id)
        self._retrying(partial(self.transport.put, key, encode_machine(machine), lease_id))

    def claim(
        self,
        unit: str,
        machine_id: str,
        lease_id: int,
        snapshot_revision: int,
        desired_revision: int,
        guards: Guards,
    ) -> bool:
        """Create the owner key of `unit` for `machine_id`, atomically with every guard."""
        owner = self.layout.owner(unit)
        compare: list[Compare] = [
            created(owner, "==", 0),
            modified(self.layout.desired(unit), "==", desired_revision),
            created(self.layout.machine(machine_id), ">", 0),
            modified(self.layout.units_changed(), "<", snapshot_revision + 1),
        ]
        owners_prefix = self.layout.kind_prefix(Kind.OWNER)
        for prefix in sorted(guards.prefixes):
            compare.append(_range_mod_below(owners_prefix + prefix, snapshot_revision + 1))
        for name, revision in sorted(guards.exact.items()):
            compare.append(modified(self.layout.owner(name), "==", revision))
        if len(compare) > MAX_TXN_OPS - 1:
            # Too many facts to compare one by one: require that no ownership changed at all.
            compare = [*compare[:4], _range_mod_below(owners_prefix, snapshot_revision + 1)]
        return self._txn(compare, [Put(owner, encode_owner(machine_id), lease=lease_id)])

    def claim_many(
        self,
        units: Mapping[str, int],
        machine_id: str,
        lease_id: int,
        snapshot_revision: int,
    ) -> dict[str, bool]:
        """One transaction of nested ones, one per unit (etcd judges every nested compare
        against the state before the transaction, and commits each that holds)."""
        machine = created(self.layout.machine(machine_id), ">", 0)
        changed = modified(self.layout.units_changed(), "<", snapshot_revision + 1)
        owner_value = encode_owner(machine_id)
        won: dict[str, bool] = {}
        names = sorted(units)
        for start in range(0, len(names), MAX_TXN_OPS):
            part = names[start : start + MAX_TXN_OPS]
            nested: list[Op] = [
                Txn(
                    [
                        created(self.layout.owner(unit), "==", 0),
                        modified(self.layout.desired(unit), "==", units[unit]),
                        machine,
                        changed,
                    ],
                    [Put(self.layout.owner(unit), owner_value, lease=lease_id)],
                )
                for unit in part
            ]

            def send(nested: list[Op] = nested) -> list[bool]:
                _, results = self.transport.txn([], nested)
                return results

            # Safe to send again to the next endpoint: a part that did commit loses every
            # claim the second time, and a lost claim means "re-read and decide again".
            results: list[bool] = self._retrying(send)
            won.update(zip(part, results, strict=True))
        return won

    def release(self, unit: str, machine_id: str) -> bool:
        """Delete the owner key, only if this machine holds it."""
        owner = self.layout.owner(unit)
        return self._txn([holds(owner, encode_owner(machine_id))], [Delete(owner)])

    def publish_states(
        self,
        machine_id: str,
        lease_id: int,
        states: Mapping[str, PublishedState],
        withdrawn: Iterable[str] = (),
    ) -> None:
        ops: list[Op] = [
            Put(self.layout.state(unit, machine_id), encode_state(state), lease=lease_id)
            for unit, state in sorted(states.items())
        ]
        ops += [Delete(self.layout.state(unit, machine_id)) for unit in sorted(withdrawn)]
        for start in range(0, len(ops), MAX_TXN_OPS):
            # Puts and deletes are idempotent: a part sent again after a dying endpoint
            # committed it writes the same values.
            part = ops[start : start + MAX_TXN_OPS]
            self._retrying(partial(self.transport.txn, [], part))


def _range_mod_below(prefix: str, revision: int) -> Compare:
    return modified(prefix, "<", revision, range_end=range_end(prefix))
