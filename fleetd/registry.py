"""The etcd adapter: every read and write of the registry, over the python-etcd3 API.

It moves bytes between etcd and the core's types (`fleetd.snapshot`), builds keys only through
`fleetd.keys`, and turns every client failure into `RegistryUnavailable` with a one-line reason.
Transactions are the unit of safety here:

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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import grpc
import pyetcd
from pyetcd import etcdrpc
from pyetcd import exceptions as etcd_exceptions
from pyetcd.client import Endpoint, MultiEndpointEtcd3Client

from fleetd.errors import (
    AuthError,
    ConfigError,
    FleetError,
    PermissionDenied,
    RegistryUnavailable,
    UnitTooLarge,
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

# The whole registry is read in pages of this many keys, all at one revision: one answer for
# 10,000 units (about 6 MB of protobuf) would be held whole beside the picture built from it and
# leave the agent's heap that much larger for good.
SNAPSHOT_PAGE = 2000

# gRPC refuses answers over 4 MB by default, and a page of the registry may hold several units
# of up to 1.5 MB each.
GRPC_OPTIONS = [("grpc.max_receive_message_length", 1 << 30)]


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


def _details(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "details"):
        return str(exc.details() or "")
    return ""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError):
        details = exc.details() if hasattr(exc, "details") else None
        return str(details or exc.code() if hasattr(exc, "code") else exc)
    if isinstance(exc, etcd_exceptions.ConnectionFailedError):
        return "connection refused or unavailable"
    if isinstance(exc, etcd_exceptions.ConnectionTimeoutError):
        return "request timed out"
    if isinstance(exc, etcd_exceptions.NoServerAvailableError):
        return "no endpoint available"
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0]


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
_Group = tuple[Any, list[Any], int, bool]


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
        creds = None
        if ca_file or cert_file or key_file:
            if not ca_file:
                raise ConfigError("a client certificate needs a CA file too: set --ca-file")
            if bool(cert_file) != bool(key_file):
                raise ConfigError("--cert-file and --key-file go together: set both or neither")
            try:
                creds = MultiEndpointEtcd3Client.get_secure_creds(ca_file, key_file, cert_file)
            except OSError as exc:
                raise ConfigError(f"cannot read TLS file {exc.filename}: {exc.strerror}") from None
        eps = []
        for url in self.endpoints:
            parts = urlsplit(url)
            secure = parts.scheme == "https"
            if secure and creds is None:
                raise ConfigError(f"etcd endpoint {url} uses https: set --ca-file")
            # A failed endpoint is retried after a short pause: with few members, giving up on
            # one for minutes (the client's default) would leave nothing to fail over to.
            eps.append(
                Endpoint(
                    parts.hostname,
                    parts.port or 2379,
                    secure=secure,
                    creds=creds if secure else None,
                    time_retry=1.0,
                    opts=GRPC_OPTIONS,
                )
            )
        self._client = MultiEndpointEtcd3Client(endpoints=eps, timeout=timeout, failover=True)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------ plumbing

    # --------------------------------------------------------------------------- auth

    def _authenticate(self) -> None:
        """Get a token for our user; etcd checks it on every request but lease keep-alives.

        The library's own user/password support sends the token as call credentials, which gRPC
        refuses on plain-text channels, so the token goes in each call's metadata instead (the
        watch stream takes the metadata it was opened with).
        """
        with self._auth_lock:
            if self._token is not None:
                return
            if not self.username:
                self._token = ""
                return
            request = etcdrpc.AuthenticateRequest(name=self.username, password=self._password)
            try:
                response = self._client.authstub.Authenticate(request, self.timeout)
            except grpc.RpcError as exc:
                if "authentication is not enabled" in _details(exc):
                    # Credentials ahead of `etcdctl auth enable` are fine: go without a token,
                    # and authenticate once etcd starts asking for one.
                    self._token = ""
                    return
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    # Let the client mark the endpoint failed so the next try uses another.
                    self._client._manage_grpc_errors(exc)
                raise
            self._token = str(response.token)
            metadata = (("token", self._token),)
            self._client.metadata = metadata
            # The watch stream in use keeps its old token; new streams get the new one.
            watcher = self._client._stubs.get("watcher")
            if watcher is not None:
                watcher._metadata = metadata

    def _forget_token(self) -> None:
        with self._auth_lock:
            self._token = None

    def _reset_watch_stream(self) -> None:
        """Drop the shared watch stream: etcd checks a new watch against the token the stream
        was opened with, so after a new token only a new stream can create watches."""
        watcher = self._client._stubs.pop("watcher", None)
        if watcher is not None:
            try:
                watcher.close()
            except Exception:
                log.debug("closing the watch stream failed", exc_info=True)

    def _refusal(self, exc: BaseException, doing: str) -> FleetError | None:
        """The typed error for a request etcd refused (authentication, permission, size), else
        None."""
        details = _details(exc)
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
        except (grpc.RpcError, etcd_exceptions.Etcd3Exception, ValueError) as exc:
            denied = self._refusal(exc, doing)
            if denied is not None:
                raise denied from exc
            reason = _reason(exc)
            if any(e.startswith("https:") for e in self.endpoints) and isinstance(
                exc, etcd_exceptions.ConnectionFailedError | etcd_exceptions.NoServerAvailableError
            ):
                # gRPC reports a refused TLS handshake like any unreachable server.
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
        try:
            self._client.close()
        except Exception:
            log.debug("closing the etcd client failed", exc_info=True)

    # ---------------------------------------------------------------------------------- reads

    def snapshot(self) -> Snapshot:
        """The whole registry, read in pages at one revision, current to that revision."""
        prefix = self.layout.prefix

        def read() -> Snapshot:
            # A fresh picture: nothing to journal until it is complete.
            snap = Snapshot(journal=False)
            start, end = prefix.encode(), range_end(prefix)
            revision: int | None = None
            with _no_collection():
                while True:
                    # Every page at the first page's revision: one consistent picture.
                    response = self._client.get_range_response(
                        start, end, limit=SNAPSHOT_PAGE, revision=revision
                    )
                    if revision is None:
                        revision = int(response.header.revision)
                    for kv in response.kvs:
                        snap.apply(
                            self.layout,
                            kv.key.decode(),
                            kv.value,
                            kv.mod_revision,
                            kv.create_revision,
                        )
                    if not response.more or not response.kvs:
                        break
                    start = bytes(response.kvs[-1].key) + b"\0"
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
            found = self._client.get_prefix(prefix, keys_only=True)
            return {
                meta.key.decode()[len(prefix) :]: int(meta.lease_id)
                for _, meta in found
                if meta.key.decode()[len(prefix) :] in wanted and meta.lease_id
            }

        def ttl(lease_id: int) -> tuple[int, int]:
            # Without the keys: listing a lease's keys needs read access to them.
            request = etcdrpc.LeaseTimeToLiveRequest(ID=lease_id, keys=False)
            try:
                response = self._client.leasestub.LeaseTimeToLive(
                    request, self.timeout, metadata=self._client.metadata
                )
            except grpc.RpcError as exc:
                # As the library's own calls do: a dead endpoint is marked, the retry moves on.
                self._client._manage_grpc_errors(exc)
                raise
            return int(response.grantedTTL), int(response.TTL)

        ages: dict[str, float] = {}
        for machine_id, lease_id in self._retrying(leases, doing="read access").items():
            granted, remaining = self._retrying(partial(ttl, lease_id), doing="read access")
            if remaining >= 0 and granted > 0:
                ages[machine_id] = float(max(0, granted - remaining))
        return ages

    def watch(
        self, start_revision: int, callback: Callable[[list[WatchEvent] | BaseException], None]
    ) -> Callable[[], None]:
        """Watch the whole prefix from `start_revision`; returns a cancel function. The callback
        gets each batch of events, or the exception that ended the watch (then re-sync)."""
        prefix = self.layout.prefix

        def on_response(response: Any) -> None:
            if isinstance(response, BaseException):
                callback(response)
                return
            events = []
            for event in response.events:
                is_put = isinstance(event, pyetcd.events.PutEvent)
                events.append(
                    WatchEvent(
                        event.key.decode(),
                        event.value if is_put else None,
                        event.mod_revision,
                        event.create_revision,
                    )
                )
            if events:
                callback(events)

        def add() -> int:
            return int(
                self._client.add_watch_prefix_callback(
                    prefix, on_response, start_revision=start_revision
                )
            )

        with self._calling("read access"):
            watch_id = add()
            if watch_id < 0 and self.username:
                # etcd refused the watch: the stream may carry an expired token. Try once more
                # on a fresh stream with a fresh token before calling it a denial.
                self._forget_token()
                self._authenticate()
                self._reset_watch_stream()
                watch_id = add()
        if watch_id < 0:
            raise PermissionDenied(
                f"etcd at {','.join(self.endpoints)} refused to watch {prefix}"
                + (f" for user {self.username!r}" if self.username else "")
                + ": permission denied (the user's roles do not allow reading it)"
            )

        def cancel() -> None:
            try:
                self._client.cancel_watch(watch_id)
            except Exception:
                log.debug("cancelling the watch failed", exc_info=True)

        return cancel

    # ------------------------------------------------------------------------ fleetctl writes

    def _txn(self, compare: list[Any], success: list[Any]) -> bool:
        # Every transaction here is guarded or idempotent, so one that failed on a dying
        # endpoint is safe to send again to the next: if the first did commit, the guard of the
        # second fails and callers treat that as "re-read and decide again".
        def call() -> bool:
            ok, _ = self._client.transaction(compare=compare, success=success, failure=[])
            return bool(ok)

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
        part carrying its own units' guards; after a failed part, the parts before it stay
        written and a retry finds them already done.
        """
        tx = self._client.transactions
        groups: list[_Group] = []
        for record in records:
            key = self.layout.unit(record.name)
            old = seen.units.get(record.name)
            ops: list[Any] = []
            size = 3 * len(key)
            mark = False
            if old is None or old.hash != record.hash:
                value = encode_unit(record)
                ops.append(tx.put(key, value))
                size += len(value.encode())
                mark = moves_units_changed(record, old)
            current = seen.desired.get(record.name)
            state = desired or (current.state if current else DesiredState.INACTIVE)
            if current is None or current.state is not state:
                ops.append(tx.put(self.layout.desired(record.name), state.value))
            if ops:
                groups.append((tx.mod(key) == (old.revision if old else 0), ops, size, mark))
        for chunk in _batches(groups):
            ops = [op for _, group_ops, _, _ in chunk for op in group_ops]
            if any(mark for _, _, _, mark in chunk):
                # What claims compare instead of every unit key (see fleetd.keys).
                ops.append(tx.put(self.layout.units_changed(), ""))
            if not self._txn([c for c, _, _, _ in chunk], ops):
                return False
        return True

    def set_desired(self, names: Iterable[str], state: DesiredState) -> None:
        tx = self._client.transactions
        ops = [tx.put(self.layout.desired(n), state.value) for n in names]
        for i in range(0, len(ops), MAX_TXN_OPS):
            self._txn([], ops[i : i + MAX_TXN_OPS])

    def destroy(self, names: Iterable[str]) -> None:
        """Remove units' content and desired state. Owners notice, stop the unit and release it
        themselves; their published state goes with the unload."""
        tx = self._client.transactions
        ops: list[Any] = []
        for name in names:
            ops.append(tx.delete(self.layout.unit(name)))
            ops.append(tx.delete(self.layout.desired(name)))
            ops.append(tx.delete(self.layout.move(name)))
        for i in range(0, len(ops), MAX_TXN_OPS):
            self._txn([], ops[i : i + MAX_TXN_OPS])

    def request_move(self, unit: str, machine_id: str) -> None:
        """Ask the owner of `unit` to hand it to `machine_id` (a rebalance step)."""
        self._retrying(lambda: self._client.put(self.layout.move(unit), machine_id))

    def clear_move(self, unit: str) -> None:
        self._retrying(lambda: self._client.delete(self.layout.move(unit)))

    # --------------------------------------------------------------------------- agent writes

    def grant_lease(self, ttl: float) -> int:
        def grant() -> int:
            return int(self._client.lease(max(1, round(ttl))).id)

        result: int = self._retrying(grant)
        return result

    def keepalive(self, lease_id: int) -> float:
        """Refresh the lease; returns its remaining TTL in seconds (0: it has expired)."""
        with self._calling():
            for response in self._client.refresh_lease(lease_id):
                return float(response.TTL)
        return 0.0

    def revoke(self, lease_id: int) -> None:
        self._retrying(lambda: self._client.revoke_lease(lease_id))

    def register_machine(self, machine: Machine, lease_id: int) -> bool:
        """Announce the machine, only if no live agent holds its id already."""
        tx = self._client.transactions
        key = self.layout.machine(machine.id)
        if self._txn([tx.create(key) == 0], [tx.put(key, encode_machine(machine), lease=lease_id)]):
            return True

        # A retried transaction fails against its own earlier success: the key is then ours.
        def holder() -> int:
            _, meta = self._client.get(key)
            return int(meta.lease_id) if meta is not None else 0

        return bool(self._retrying(holder) == lease_id)

    def update_machine(self, machine: Machine, lease_id: int) -> None:
        key = self.layout.machine(machine.id)
        self._retrying(lambda: self._client.put(key, encode_machine(machine), lease=lease_id))

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
        tx = self._client.transactions
        owner = self.layout.owner(unit)
        compare: list[Any] = [
            tx.create(owner) == 0,
            tx.mod(self.layout.desired(unit)) == desired_revision,
            tx.create(self.layout.machine(machine_id)) > 0,
        ]
        compare.append(tx.mod(self.layout.units_changed()) < snapshot_revision + 1)
        owners_prefix = self.layout.kind_prefix(Kind.OWNER)
        for prefix in sorted(guards.prefixes):
            compare.append(self._range_mod_below(owners_prefix + prefix, snapshot_revision + 1))
        for name, revision in sorted(guards.exact.items()):
            compare.append(tx.mod(self.layout.owner(name)) == revision)
        if len(compare) > MAX_TXN_OPS - 1:
            # Too many facts to compare one by one: require that no ownership changed at all.
            compare = [*compare[:4], self._range_mod_below(owners_prefix, snapshot_revision + 1)]
        return self._txn(compare, [tx.put(owner, encode_owner(machine_id), lease=lease_id)])

    def claim_many(
        self,
        units: Mapping[str, int],
        machine_id: str,
        lease_id: int,
        snapshot_revision: int,
    ) -> dict[str, bool]:
        """One transaction of nested ones, one per unit (etcd judges every nested compare
        against the state before the transaction, and commits each that holds)."""
        tx = self._client.transactions
        machine = tx.create(self.layout.machine(machine_id)) > 0
        changed = tx.mod(self.layout.units_changed()) < snapshot_revision + 1
        owner_value = encode_owner(machine_id)
        won: dict[str, bool] = {}
        names = sorted(units)
        for start in range(0, len(names), MAX_TXN_OPS):
            part = names[start : start + MAX_TXN_OPS]
            nested = [
                tx.txn(
                    [
                        tx.create(self.layout.owner(unit)) == 0,
                        tx.mod(self.layout.desired(unit)) == units[unit],
                        machine,
                        changed,
                    ],
                    [tx.put(self.layout.owner(unit), owner_value, lease=lease_id)],
                    [],
                )
                for unit in part
            ]

            def send(nested: list[Any] = nested) -> list[bool]:
                _, responses = self._client.transaction([], nested, [])
                return [bool(r.response_txn.succeeded) for r in responses]

            # Safe to send again to the next endpoint: a part that did commit loses every
            # claim the second time, and a lost claim means "re-read and decide again".
            results: list[bool] = self._retrying(send)
            won.update(zip(part, results, strict=True))
        return won

    def _range_mod_below(self, prefix: str, revision: int) -> Any:
        compare = self._client.transactions.mod(prefix, range_end=range_end(prefix))
        return compare < revision

    def release(self, unit: str, machine_id: str) -> bool:
        """Delete the owner key, only if this machine holds it."""
        tx = self._client.transactions
        owner = self.layout.owner(unit)
        return self._txn([tx.value(owner) == encode_owner(machine_id)], [tx.delete(owner)])

    def publish_states(
        self,
        machine_id: str,
        lease_id: int,
        states: Mapping[str, PublishedState],
        withdrawn: Iterable[str] = (),
    ) -> None:
        tx = self._client.transactions
        ops: list[Any] = [
            tx.put(self.layout.state(unit, machine_id), encode_state(state), lease=lease_id)
            for unit, state in sorted(states.items())
        ]
        ops += [tx.delete(self.layout.state(unit, machine_id)) for unit in sorted(withdrawn)]
        for start in range(0, len(ops), MAX_TXN_OPS):
            # Puts and deletes are idempotent: a part sent again after a dying endpoint
            # committed it writes the same values.
            part = ops[start : start + MAX_TXN_OPS]

            def write(part: list[Any] = part) -> Any:
                return self._client.transaction([], part, [])

            self._retrying(write)
