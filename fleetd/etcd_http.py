"""etcd over its JSON gateway (POST /v3/..., the same API as gRPC, keys and values in base64):
fleetctl's transport. It needs only the standard library, so a fleetctl command starts without
loading gRPC and the etcd client's protobuf code (about 45 ms of CPU on every invocation, most of
a `list-units`); the agent keeps gRPC for its long-lived streams. Its HTTP/1.1 is `fleetd.http1`,
which loads no `email` and, for an http endpoint, no `ssl`.

Each thread keeps one connection per endpoint alive between requests. A connection error marks
the endpoint failed for a second (as the gRPC client does) after one fresh retry, since a kept
connection may simply have been closed by etcd while idle.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

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
from fleetd.http1 import Connection
from fleetd.keys import range_end
from fleetd.ports import WatchEvent

if TYPE_CHECKING:
    import ssl

log = logging.getLogger(__name__)

RETRY_FAILED = 1.0  # seconds before a failed endpoint is tried again
_NO_ANSWER_CODES = (4, 14)  # gRPC DEADLINE_EXCEEDED, UNAVAILABLE: no answer from the cluster
_TARGETS = {"create": "CREATE", "mod": "MOD", "value": "VALUE"}
_RESULTS = {"==": "EQUAL", "<": "LESS", ">": "GREATER"}


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode("ascii")


def _bytes(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def _row(kv: dict[str, Any]) -> Row:
    return (
        _bytes(kv.get("key")),
        _bytes(kv.get("value")),
        int(kv.get("mod_revision", 0)),
        int(kv.get("create_revision", 0)),
        int(kv.get("lease", 0)),
    )


def _compare(compare: Compare) -> dict[str, Any]:
    out: dict[str, Any] = {
        "key": _b64(compare.key),
        "target": _TARGETS[compare.target],
        "result": _RESULTS[compare.relation],
    }
    if compare.range_end is not None:
        out["range_end"] = _b64(compare.range_end)
    if compare.target == "value":
        out["value"] = _b64(str(compare.operand))
    else:
        out[f"{compare.target}_revision"] = str(compare.operand)
    return out


def _op(op: Op) -> dict[str, Any]:
    if isinstance(op, Put):
        put: dict[str, Any] = {"key": _b64(op.key), "value": _b64(op.value)}
        if op.lease:
            put["lease"] = str(op.lease)
        return {"request_put": put}
    if isinstance(op, Delete):
        return {"request_delete_range": {"key": _b64(op.key)}}
    return {
        "request_txn": {
            "compare": [_compare(c) for c in op.compare],
            "success": [_op(o) for o in op.success],
        }
    }


def _unreachable(exc: BaseException) -> Unreachable:
    # ssl is loaded only for https endpoints: without it, exc is no SSLError.
    tls = sys.modules.get("ssl")
    if tls is not None and isinstance(exc, tls.SSLError):
        return Unreachable(f"the TLS handshake failed ({exc.reason or exc})")
    if isinstance(exc, TimeoutError | socket.timeout):
        return Unreachable("request timed out")
    if isinstance(exc, ConnectionRefusedError):
        return Unreachable("connection refused or unavailable")
    text = str(exc).strip() or type(exc).__name__
    return Unreachable(text.splitlines()[0])


class HttpTransport:
    def __init__(
        self,
        endpoints: Sequence[str],
        timeout: float,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
    ) -> None:
        self.timeout = timeout
        self._targets = []
        for url in endpoints:
            parts = urlsplit(url)
            secure = parts.scheme == "https"
            self._targets.append((secure, parts.hostname or "", parts.port or 2379))
        self._tls: ssl.SSLContext | None = None
        if ca_file or any(secure for secure, _, _ in self._targets):
            import ssl  # OpenSSL: only for https, which most fleetctl runs do not use

            try:
                self._tls = ssl.create_default_context(cafile=ca_file or None)
                if cert_file:
                    self._tls.load_cert_chain(cert_file, key_file)
            except FileNotFoundError as exc:
                raise ConfigError(f"cannot read TLS file {exc.filename}: {exc.strerror}") from None
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot use the TLS files given: {exc}") from None
        self._token = ""
        self._lock = threading.Lock()
        self._current = 0
        self._failed_until: dict[int, float] = {}
        self._local = threading.local()
        self._open: list[Connection] = []
        self._streams: set[Connection] = set()

    # ------------------------------------------------------------------------ connections

    def _endpoint(self) -> int:
        now = time.monotonic()
        with self._lock:
            count = len(self._targets)
            for step in range(count):
                index = (self._current + step) % count
                if self._failed_until.get(index, 0.0) <= now:
                    self._current = index
                    return index
        raise Unreachable("no endpoint available", handshake=True)

    def _fail(self, index: int) -> None:
        with self._lock:
            self._failed_until[index] = time.monotonic() + RETRY_FAILED

    def _connect(self, index: int, timeout: float | None) -> Connection:
        secure, host, port = self._targets[index]
        return Connection(host, port, timeout, self._tls if secure else None)

    def _kept(self, index: int) -> tuple[Connection, bool]:
        """This thread's connection to the endpoint, and whether it is a new one."""
        kept: dict[int, Connection] = self._local.__dict__.setdefault("conns", {})
        conn = kept.get(index)
        if conn is not None:
            return conn, False
        conn = kept[index] = self._connect(index, self.timeout)
        with self._lock:
            self._open.append(conn)
        return conn, True

    def _drop(self, index: int) -> None:
        conn = self._local.__dict__.get("conns", {}).pop(index, None)
        if conn is not None:
            conn.close()
            with self._lock:
                if conn in self._open:
                    self._open.remove(conn)

    def _headers(self, token: bool = True) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if token and self._token:
            headers["Authorization"] = self._token
        return headers

    def _post(self, path: str, body: dict[str, Any], token: bool = True) -> dict[str, Any]:
        data = json.dumps(body).encode()
        index = self._endpoint()
        while True:
            conn, fresh = self._kept(index)
            try:
                response = conn.request("POST", path, data, self._headers(token))
                raw = response.read()
                break
            except OSError as exc:  # fleetd.http1.ProtocolError is one too
                self._drop(index)
                if not fresh and not isinstance(exc, TimeoutError | socket.timeout):
                    continue  # a kept connection etcd had closed: once more on a new one
                self._fail(index)
                raise _unreachable(exc) from exc
        return self._answer(index, response.status, raw)

    def _answer(self, index: int, status: int, raw: bytes) -> dict[str, Any]:
        try:
            payload = json.loads(raw) if raw else {}
        except ValueError:
            payload = {}
        if not isinstance(payload, dict):
            payload = {}
        if status == 200:
            return payload
        error = payload.get("error")
        if isinstance(error, dict):  # a stream's error
            payload = error
            error = payload.get("message")
        details = str(payload.get("message") or error or f"HTTP {status}")
        code = int(payload.get("code") or payload.get("grpc_code") or 0)
        if code in _NO_ANSWER_CODES or (not code and status >= 500):
            self._fail(index)
            raise Unreachable(details)
        raise Refused(details, code)

    # ----------------------------------------------------------------------------------- auth

    def use_token(self, token: str) -> None:
        self._token = token

    def authenticate(self, name: str, password: str) -> str:
        # Without the token held: etcd refuses any request carrying an expired one, this too,
        # and the registry authenticates again precisely because it expired.
        answer = self._post(
            "/v3/auth/authenticate", {"name": name, "password": password}, token=False
        )
        return str(answer.get("token", ""))

    # ---------------------------------------------------------------------------------- reads

    def range(
        self,
        start: str | bytes,
        end: str | bytes,
        limit: int = 0,
        revision: int = 0,
        keys_only: bool = False,
    ) -> Page:
        body: dict[str, Any] = {"key": _b64(start), "range_end": _b64(end)}
        if limit:
            body["limit"] = str(limit)
        if revision:
            body["revision"] = str(revision)
        if keys_only:
            body["keys_only"] = True
        answer = self._post("/v3/kv/range", body)
        rows = [_row(kv) for kv in answer.get("kvs", ())]
        return Page(
            int(answer["header"]["revision"]),
            rows,
            bool(answer.get("more", False)),
            int(answer.get("count", 0)),
        )

    def get(self, key: str) -> Row | None:
        answer = self._post("/v3/kv/range", {"key": _b64(key)})
        kvs = answer.get("kvs", ())
        return _row(kvs[0]) if kvs else None

    # --------------------------------------------------------------------------------- writes

    def txn(self, compare: Sequence[Compare], success: Sequence[Op]) -> tuple[bool, list[bool]]:
        answer = self._post(
            "/v3/kv/txn",
            {"compare": [_compare(c) for c in compare], "success": [_op(o) for o in success]},
        )
        nested = [
            bool(r["response_txn"].get("succeeded", False))
            for r in answer.get("responses", ())
            if "response_txn" in r
        ]
        return bool(answer.get("succeeded", False)), nested

    def put(self, key: str, value: str | bytes, lease: int = 0) -> None:
        self._post("/v3/kv/put", _op(Put(key, value, lease))["request_put"])

    def delete(self, key: str) -> None:
        self._post("/v3/kv/deleterange", {"key": _b64(key)})

    # --------------------------------------------------------------------------------- leases

    def grant(self, ttl: int) -> int:
        return int(self._post("/v3/lease/grant", {"TTL": str(ttl)})["ID"])

    def keepalive(self, lease_id: int) -> int:
        answer = self._post("/v3/lease/keepalive", {"ID": str(lease_id)})
        result = answer.get("result", answer)
        return max(0, int(result.get("TTL", 0)))

    def revoke(self, lease_id: int) -> None:
        self._post("/v3/lease/revoke", {"ID": str(lease_id)})

    def lease(self, lease_id: int) -> Lease:
        # Without the keys: listing a lease's keys needs read access to them.
        answer = self._post("/v3/lease/timetolive", {"ID": str(lease_id), "keys": False})
        return Lease(int(answer.get("grantedTTL", 0)), int(answer.get("TTL", -1)))

    # ---------------------------------------------------------------------------------- watch

    def watch(self, prefix: str, start_revision: int, handler: WatchHandler) -> Callable[[], None]:
        """A stream of its own: one POST whose answer is one JSON message a line for as long
        as the watch lasts, read by a thread of its own."""
        index = self._endpoint()
        conn = self._connect(index, self.timeout)
        body = {
            "create_request": {
                "key": _b64(prefix),
                "range_end": _b64(range_end(prefix)),
                "start_revision": str(start_revision),
            }
        }
        try:
            response = conn.request("POST", "/v3/watch", json.dumps(body).encode(), self._headers())
            if response.status != 200:
                self._answer(index, response.status, response.read())
            created = self._message(index, response.readline())
        except OSError as exc:
            conn.close()
            self._fail(index)
            raise _unreachable(exc) from exc
        except BaseException:
            conn.close()
            raise
        if created.get("canceled"):
            conn.close()
            raise Refused(str(created.get("cancel_reason") or "etcdserver: permission denied"), 7)
        if conn.sock is not None:
            conn.sock.settimeout(None)  # a quiet registry sends nothing for a long time
        cancelled = threading.Event()
        with self._lock:
            self._streams.add(conn)

        def read() -> None:
            try:
                while not cancelled.is_set():
                    line = response.readline()
                    if not line:
                        raise Unreachable("the watch stream ended")
                    message = self._message(index, line)
                    if message.get("canceled"):
                        # Compacted past its revision, or refused: the mirror reads afresh.
                        why = message.get("cancel_reason") or "the watch was cancelled"
                        raise Refused(str(why))
                    events = [
                        WatchEvent(
                            _bytes(e["kv"].get("key")).decode(),
                            None if e.get("type") == "DELETE" else _bytes(e["kv"].get("value")),
                            int(e["kv"].get("mod_revision", 0)),
                            int(e["kv"].get("create_revision", 0)),
                        )
                        for e in message.get("events", ())
                    ]
                    if events:
                        handler(events)
            except Exception as exc:
                if not cancelled.is_set():
                    handler(exc if isinstance(exc, Refused | Unreachable) else _unreachable(exc))
            finally:
                conn.close()
                with self._lock:
                    self._streams.discard(conn)

        threading.Thread(target=read, name="etcd-watch", daemon=True).start()

        def cancel() -> None:
            cancelled.set()
            _shut(conn)

        return cancel

    def _message(self, index: int, line: bytes) -> dict[str, Any]:
        if not line.strip():
            raise Unreachable("the watch stream ended")
        message = json.loads(line)
        if "error" in message:
            self._answer(index, 500, line)
        result: dict[str, Any] = message.get("result", {})
        return result

    def reset_watches(self) -> None:
        # Every watch opens its own stream with the token of its time: nothing to reset.
        return

    def close(self) -> None:
        with self._lock:
            conns, self._open = self._open, []
            streams = list(self._streams)
        for conn in conns:
            conn.close()
        for conn in streams:
            _shut(conn)


def _shut(conn: Connection) -> None:
    """End a stream another thread is reading: shutting the socket wakes its read."""
    sock = conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
