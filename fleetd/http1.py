"""HTTP/1.1 requests over one kept connection, as fleetctl's transport to etcd's JSON gateway
(`fleetd.etcd_http`) needs them: a request with a body, an answer whose body has a length, comes
in chunks or lasts until the server closes, read whole or a line at a time (a watch stream).

Why not `http.client`: importing it loads the `email` package (its header parser) and `ssl`
(OpenSSL) on every fleetctl command, some 15-20 ms of the ~0.1 CPU-seconds a `list-units`
costs, paid by every poll of a script that waits for its units. Here `ssl` loads only for an
https endpoint. What is not needed is left out: no proxies, no `Expect: 100-continue`, no
pipelining (one request at a time on a connection).
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from io import BufferedReader
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ssl

MAX_LINE = 65_536  # bytes in a status, header or chunk-size line
MAX_HEADERS = 100
_HEX = b"0123456789abcdefABCDEF"


class ProtocolError(ConnectionError):
    """The server's answer is not HTTP/1.x, or it closed the connection part-way through one.
    A ConnectionError: to a caller it means the same as a connection reset, try another."""


class Response:
    """One answer. Its body is read once, whole (`read`) or a line at a time (`readline`)."""

    def __init__(self, conn: Connection, stream: BufferedReader, method: str) -> None:
        self._conn = conn
        self._stream = stream
        self.status, self.headers, keep = _head(stream)
        chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        length = self.headers.get("content-length")
        interim = 100 <= self.status < 200  # 100 Continue: the real answer follows
        self._left: int | None = None  # bytes of the body (or of the current chunk) still to read
        self._until_close = False
        if interim or method == "HEAD" or self.status in (204, 304):
            self._left = 0
            chunked = False
        elif not chunked and length is not None:
            if not (length.isascii() and length.isdigit()):
                raise ProtocolError(f"bad Content-Length {length[:40]!r}")
            self._left = int(length)
        elif not chunked:
            self._until_close = True
            keep = False  # the body ends where the connection does
        self._chunked = chunked
        self._keep = keep or interim
        self._buffer = b""  # body bytes read ahead of a line's end
        self.done = False
        if self._left == 0:
            self._finish()

    # ---------------------------------------------------------------------------- reading

    def read(self) -> bytes:
        """The whole (rest of the) body."""
        parts = [self._buffer]
        self._buffer = b""
        while not self.done:
            parts.append(self._piece(1 << 16))
        return b"".join(parts)

    def readline(self) -> bytes:
        """The body up to and with its next b"\\n", or what is left; b"" at its end."""
        while b"\n" not in self._buffer and not self.done:
            self._buffer += self._piece(1 << 16)
        cut = self._buffer.find(b"\n") + 1 or len(self._buffer)
        line, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return line

    def _piece(self, size: int) -> bytes:
        """Some more of the body (at least one byte unless it has ended); marks the end."""
        if self._chunked:
            if not self._left:
                self._left = _chunk_size(self._stream)
                if self._left == 0:
                    _skip_trailers(self._stream)
                    self._finish()
                    return b""
            data = self._stream.read(min(size, self._left))
            if not data:
                raise ProtocolError("the connection closed inside a chunk")
            self._left -= len(data)
            if self._left == 0 and self._stream.read(2) != b"\r\n":
                raise ProtocolError("a chunk does not end with CRLF")
            return data
        if self._until_close:
            data = self._stream.read1(size)
            if not data:
                self._finish()
            return data
        assert self._left is not None
        data = self._stream.read(min(size, self._left))
        if not data:
            raise ProtocolError(f"the connection closed with {self._left} bytes of the body due")
        self._left -= len(data)
        if self._left == 0:
            self._finish()
        return data

    def _finish(self) -> None:
        self.done = True
        if not self._keep:
            self._conn.close()


class Connection:
    """One connection to host:port, opened by the first request and kept for the next ones
    while the server keeps it. Not for use by two threads at once."""

    def __init__(
        self,
        host: str,
        port: int,
        timeout: float | None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.tls = tls
        self.sock: socket.socket | None = None
        self._stream: BufferedReader | None = None
        self._response: Response | None = None
        self._authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def request(
        self, method: str, path: str, body: bytes, headers: Mapping[str, str]
    ) -> Response:
        """Send one request and read the head of its answer. An answer not read to its end
        before the next request closes the connection: the next one opens a new one."""
        if self._response is not None and not self._response.done:
            self.close()
        self._response = None
        if self.sock is None:
            self._open()
        assert self.sock is not None and self._stream is not None
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self._authority}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        lines.append(f"Content-Length: {len(body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.sock.sendall(head + body)
        response = Response(self, self._stream, method)
        while 100 <= response.status < 200:
            response = Response(self, self._stream, method)
        self._response = response
        return response

    def _open(self) -> None:
        # A str host goes through the IDNA codec, whose import costs more than the lookup of a
        # numeric address; an ASCII name needs no encoding.
        host: str | bytes = self.host.encode("ascii") if self.host.isascii() else self.host
        sock = socket.create_connection((host, self.port), self.timeout)  # type: ignore[arg-type]
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self._stream = sock.makefile("rb")

    def close(self) -> None:
        stream, sock = self._stream, self.sock
        self._stream = self.sock = None
        self._response = None
        if stream is not None:
            stream.close()
        if sock is not None:
            sock.close()


# -------------------------------------------------------------------------------- parsing


def _line(stream: BufferedReader, what: str) -> bytes:
    line = stream.readline(MAX_LINE + 1)
    if len(line) > MAX_LINE:
        raise ProtocolError(f"the {what} line is longer than {MAX_LINE} bytes")
    return line


def _head(stream: BufferedReader) -> tuple[int, dict[str, str], bool]:
    """The status, the headers (names in lower case; repeated ones joined by commas) and
    whether the server keeps the connection open after this answer."""
    status_line = _line(stream, "status")
    if not status_line:
        raise ProtocolError("the server closed the connection without an answer")
    parts = status_line.decode("latin-1").rstrip("\r\n").split(None, 2) or [""]
    code = parts[1] if len(parts) > 1 else ""
    if not (parts[0].startswith("HTTP/1.") and code.isascii() and code.isdigit()):
        raise ProtocolError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
    version, status = parts[0], int(code)
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        raw = _line(stream, "header")
        if raw in (b"\r\n", b"\n"):
            break
        if not raw:
            raise ProtocolError("the connection closed inside the headers")
        name, colon, value = raw.decode("latin-1").partition(":")
        if not colon:
            raise ProtocolError(f"not a header line: {raw[:80]!r}")
        key = name.strip().lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    else:
        raise ProtocolError(f"more than {MAX_HEADERS} header lines")
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep = "keep-alive" in tokens if version == "HTTP/1.0" else "close" not in tokens
    return status, headers, keep


def _chunk_size(stream: BufferedReader) -> int:
    line = _line(stream, "chunk size")
    if not line:
        raise ProtocolError("the connection closed before a chunk")
    size = line.split(b";", 1)[0].strip()  # chunk extensions are ignored
    # Hex digits only: int() would also take a sign, "0x" and underscores.
    if not size or size.strip(_HEX):
        raise ProtocolError(f"bad chunk size {size[:40]!r}")
    return int(size, 16)


def _skip_trailers(stream: BufferedReader) -> None:
    for _ in range(MAX_HEADERS + 1):
        line = _line(stream, "trailer")
        if line in (b"\r\n", b"\n", b""):
            return
    raise ProtocolError(f"more than {MAX_HEADERS} trailer lines")
