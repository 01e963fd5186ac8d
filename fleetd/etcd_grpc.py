"""etcd over gRPC (the python-etcd3 API): the agent's transport, with its long-lived watch stream
and lease keep-alives.

It turns the registry's request values (`fleetd.etcd_kv`) into the library's, and every client
failure into `Refused` (etcd said no) or `Unreachable` (no answer), marking a failed endpoint so
the next call goes to another.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import grpc
import pyetcd
from pyetcd import etcdrpc
from pyetcd import exceptions as etcd_exceptions
from pyetcd.client import Endpoint, MultiEndpointEtcd3Client

from fleetd.errors import ConfigError
from fleetd.etcd_kv import (
    Compare,
    Delete,
    Lease,
    Op,
    Page,
    Put,
    Refused,
    Row,
    Unreachable,
    WatchHandler,
)
from fleetd.ports import WatchEvent

log = logging.getLogger(__name__)

# gRPC refuses answers over 4 MB by default, and a page of the registry may hold several units
# of up to 1.5 MB each.
GRPC_OPTIONS = [("grpc.max_receive_message_length", 1 << 30)]

_NO_ANSWER = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _details(exc: grpc.RpcError) -> str:
    details = exc.details() if hasattr(exc, "details") else None
    if details:
        return str(details)
    return str(exc.code()) if hasattr(exc, "code") else str(exc)


def _unreachable(exc: BaseException) -> Unreachable:
    if isinstance(exc, etcd_exceptions.ConnectionFailedError):
        # gRPC reports a refused TLS handshake like any unreachable server.
        return Unreachable("connection refused or unavailable", handshake=True)
    if isinstance(exc, etcd_exceptions.NoServerAvailableError):
        return Unreachable("no endpoint available", handshake=True)
    if isinstance(exc, etcd_exceptions.ConnectionTimeoutError):
        return Unreachable("request timed out")
    text = str(exc) or type(exc).__name__
    return Unreachable(text.splitlines()[0])


class GrpcTransport:
    def __init__(
        self,
        endpoints: Sequence[str],
        timeout: float,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
    ) -> None:
        self.timeout = timeout
        creds = None
        if ca_file:
            try:
                creds = MultiEndpointEtcd3Client.get_secure_creds(ca_file, key_file, cert_file)
            except OSError as exc:
                raise ConfigError(f"cannot read TLS file {exc.filename}: {exc.strerror}") from None
        eps = []
        for url in endpoints:
            parts = urlsplit(url)
            secure = parts.scheme == "https"
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
        self.client = MultiEndpointEtcd3Client(endpoints=eps, timeout=timeout, failover=True)

    @contextmanager
    def _calling(self) -> Iterator[None]:
        try:
            yield
        except grpc.RpcError as exc:
            raise Refused(_details(exc), exc.code().value[0]) from exc
        except (etcd_exceptions.Etcd3Exception, ValueError) as exc:
            raise _unreachable(exc) from exc

    def _marking(self, exc: grpc.RpcError) -> None:
        """For calls made on the library's stubs directly: mark a dead endpoint failed as the
        library's own calls do, so the next try goes to another."""
        self.client._manage_grpc_errors(exc)

    # ----------------------------------------------------------------------------------- auth

    def use_token(self, token: str) -> None:
        metadata = (("token", token),) if token else None
        self.client.metadata = metadata
        # The watch stream in use keeps its old token; new streams get the new one.
        watcher = self.client._stubs.get("watcher")
        if watcher is not None:
            watcher._metadata = metadata

    def authenticate(self, name: str, password: str) -> str:
        # The library's own user/password support sends the token as call credentials, which
        # gRPC refuses on plain-text channels: the token goes in each call's metadata instead.
        request = etcdrpc.AuthenticateRequest(name=name, password=password)
        with self._calling():
            try:
                response = self.client.authstub.Authenticate(request, self.timeout)
            except grpc.RpcError as exc:
                if exc.code() in _NO_ANSWER:
                    self._marking(exc)
                raise
        return str(response.token)

    # ---------------------------------------------------------------------------------- reads

    def range(
        self,
        start: str | bytes,
        end: str | bytes,
        limit: int = 0,
        revision: int = 0,
        keys_only: bool = False,
    ) -> Page:
        with self._calling():
            response = self.client.get_range_response(
                start, end, limit=limit or None, revision=revision or None, keys_only=keys_only
            )
        rows = [
            (kv.key, kv.value, kv.mod_revision, kv.create_revision, kv.lease)
            for kv in response.kvs
        ]
        return Page(int(response.header.revision), rows, bool(response.more), int(response.count))

    def get(self, key: str) -> Row | None:
        with self._calling():
            value, meta = self.client.get(key)
        if meta is None:
            return None
        return (meta.key, value or b"", meta.mod_revision, meta.create_revision, meta.lease_id)

    # --------------------------------------------------------------------------------- writes

    def _compare(self, compare: Compare) -> Any:
        tx = self.client.transactions
        if compare.target == "create":
            subject = tx.create(compare.key)
        elif compare.target == "mod":
            subject = tx.mod(compare.key, range_end=compare.range_end)
        else:
            subject = tx.value(compare.key)
        if compare.relation == "==":
            return subject == compare.operand
        if compare.relation == "<":
            return subject < compare.operand
        return subject > compare.operand

    def _op(self, op: Op) -> Any:
        tx = self.client.transactions
        if isinstance(op, Put):
            return tx.put(op.key, op.value, lease=op.lease or None)
        if isinstance(op, Delete):
            return tx.delete(op.key)
        return tx.txn([self._compare(c) for c in op.compare], [self._op(o) for o in op.success], [])

    def txn(self, compare: Sequence[Compare], success: Sequence[Op]) -> tuple[bool, list[bool]]:
        with self._calling():
            ok, responses = self.client.transaction(
                compare=[self._compare(c) for c in compare],
                success=[self._op(o) for o in success],
                failure=[],
            )
        nested = [
            bool(r.response_txn.succeeded)
            for r in responses
            if r.WhichOneof("response") == "response_txn"
        ]
        return bool(ok), nested

    def put(self, key: str, value: str | bytes, lease: int = 0) -> None:
        with self._calling():
            self.client.put(key, value, lease=lease or None)

    def delete(self, key: str) -> None:
        with self._calling():
            self.client.delete(key)

    # --------------------------------------------------------------------------------- leases

    def grant(self, ttl: int) -> int:
        with self._calling():
            return int(self.client.lease(ttl).id)

    def keepalive(self, lease_id: int) -> int:
        with self._calling():
            for response in self.client.refresh_lease(lease_id):
                return int(response.TTL)
        return 0

    def revoke(self, lease_id: int) -> None:
        with self._calling():
            self.client.revoke_lease(lease_id)

    def lease(self, lease_id: int) -> Lease:
        # Without the keys: listing a lease's keys needs read access to them.
        request = etcdrpc.LeaseTimeToLiveRequest(ID=lease_id, keys=False)
        with self._calling():
            try:
                response = self.client.leasestub.LeaseTimeToLive(
                    request, self.timeout, metadata=self.client.metadata
                )
            except grpc.RpcError as exc:
                self._marking(exc)
                raise
        return Lease(int(response.grantedTTL), int(response.TTL))

    # ---------------------------------------------------------------------------------- watch

    def watch(self, prefix: str, start_revision: int, handler: WatchHandler) -> Callable[[], None]:
        def on_response(response: Any) -> None:
            if isinstance(response, BaseException):
                handler(response)
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
                handler(events)

        with self._calling():
            watch_id = int(
                self.client.add_watch_prefix_callback(
                    prefix, on_response, start_revision=start_revision
                )
            )
        if watch_id < 0:
            denied = grpc.StatusCode.PERMISSION_DENIED.value[0]
            raise Refused("etcdserver: permission denied", denied)

        def cancel() -> None:
            try:
                self.client.cancel_watch(watch_id)
            except Exception:
                log.debug("cancelling the watch failed", exc_info=True)

        return cancel

    def reset_watches(self) -> None:
        # etcd checks a new watch against the token its stream was opened with.
        watcher = self.client._stubs.pop("watcher", None)
        if watcher is not None:
            try:
                watcher.close()
            except Exception:
                log.debug("closing the watch stream failed", exc_info=True)

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:
            log.debug("closing the etcd client failed", exc_info=True)
