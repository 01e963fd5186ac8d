"""fleetd.http1 against a scripted server on loopback: every way an answer's body may end, kept
and closed connections, and answers that are not HTTP. Real etcd answers are covered by the
registry's contract and component tests over the "http" transport."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetd.http1 import MAX_HEADERS, MAX_LINE, Connection, ProtocolError


@dataclass
class Script:
    """What the server answers to each request, in order, and what it saw."""

    answers: list[bytes]
    close_after: set[int] = field(default_factory=set)  # answer indexes after which it hangs up
    requests: list[tuple[int, bytes]] = field(default_factory=list)  # (connection no., request)


def _read_request(conn: socket.socket, pending: bytes) -> tuple[bytes, bytes] | None:
    """One request (head and a Content-Length body) and the bytes read past it."""
    while b"\r\n\r\n" not in pending:
        data = conn.recv(65536)
        if not data:
            return None
        pending += data
    head, _, rest = pending.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        data = conn.recv(65536)
        if not data:
            return None
        rest += data
    return head + b"\r\n\r\n" + rest[:length], rest[length:]


@pytest.fixture
def server() -> Iterator[tuple[int, Script]]:
    listener = socket.create_server(("127.0.0.1", 0))
    script = Script([])
    stop = threading.Event()

    def serve() -> None:
        count = 0
        answered = 0
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            count += 1
            pending = b""
            with conn:
                while answered < len(script.answers):
                    got = _read_request(conn, pending)
                    if got is None:
                        break
                    request, pending = got
                    script.requests.append((count, request))
                    conn.sendall(script.answers[answered])
                    answered += 1
                    if answered - 1 in script.close_after:
                        break

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], script
    finally:
        stop.set()
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accept(); close() alone does not
        listener.close()
        thread.join(5)


def _chunked_answer(chunks: list[bytes], size_format: bytes) -> bytes:
    """A 200 whose body is these chunks, each size written with `size_format` (hex)."""
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"".join(size_format % len(c) + b"\r\n" + c + b"\r\n" for c in chunks)
    return head + body + b"0\r\n\r\n"


def _conn(port: int) -> Connection:
    return Connection("127.0.0.1", port, timeout=5)


# ------------------------------------------------------------------------------ bodies


BODIES = [
    # (answer, body read, whether the connection is kept)
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"hello", True),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", b"", True),
    (b"HTTP/1.1 204 No Content\r\n\r\n", b"", True),
    (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n1;name=value\r\n \r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n",
        b"hello 0123456789",
        True,
    ),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", b"ok", False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", b"ok", False),
    (
        b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\nok",
        b"ok",
        True,
    ),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx", b"x", True),
    (b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy", b"busy", True),
]


@pytest.mark.parametrize(("answer", "body", "kept"), BODIES)
def test_each_way_a_body_ends_is_read_whole(
    server: tuple[int, Script], answer: bytes, body: bytes, kept: bool
) -> None:
    port, script = server
    script.answers = [answer, b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext"]
    if not kept:
        script.close_after = {0}
    conn = _conn(port)
    response = conn.request("POST", "/v3/kv/range", b"{}", {})
    assert response.read() == body
    assert response.done
    assert (conn.sock is not None) == kept
    # The next request goes on the same connection only when the first one was kept.
    assert conn.request("POST", "/v3/kv/range", b"{}", {}).read() == b"next"
    assert [number for number, _ in script.requests] == [1, 1 if kept else 2]
    conn.close()


def test_a_body_that_lasts_until_the_server_closes(server: tuple[int, Script]) -> None:
    port, script = server
    script.answers = [b"HTTP/1.1 200 OK\r\n\r\nall of it\nuntil the end"]
    script.close_after = {0}
    conn = _conn(port)
    response = conn.request("GET", "/", b"", {})
    assert response.readline() == b"all of it\n"
    assert response.read() == b"until the end"
    assert conn.sock is None


def test_the_request_carries_host_length_headers_and_body(server: tuple[int, Script]) -> None:
    port, script = server
    script.answers = [b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"]
    conn = _conn(port)
    conn.request("POST", "/v3/kv/txn", b'{"a": 1}', {"Authorization": "token"}).read()
    head, _, body = script.requests[0][1].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v3/kv/txn HTTP/1.1"
    assert set(lines[1:]) == {
        f"Host: 127.0.0.1:{port}".encode(),
        b"Authorization: token",
        b"Content-Length: 8",
    }
    assert body == b'{"a": 1}'
    conn.close()


def test_an_ipv6_host_is_bracketed_in_the_host_header() -> None:
    assert Connection("::1", 2379, 1)._authority == "[::1]:2379"


def test_an_answer_left_unread_makes_the_next_request_open_a_new_connection(
    server: tuple[int, Script],
) -> None:
    port, script = server
    script.answers = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nnew",
    ]
    script.close_after = {0}
    conn = _conn(port)
    conn.request("POST", "/", b"", {})  # never read
    assert conn.request("POST", "/", b"", {}).read() == b"new"
    assert [number for number, _ in script.requests] == [1, 2]
    conn.close()


# ---------------------------------------------------------------------------- streams


def test_a_chunked_stream_is_read_a_line_at_a_time(server: tuple[int, Script]) -> None:
    port, script = server
    lines = [b'{"result": {"created": true}}\n', b'{"result": {"events": []}}\n', b"{}\n"]
    # Two lines in one chunk, one line across two chunks.
    body = lines[0] + lines[1] + lines[2]
    cut = len(lines[0]) + len(lines[1]) + 1
    chunks = [body[:cut], body[cut:]]
    answer = _chunked_answer(chunks, b"%x")
    script.answers = [answer]
    conn = _conn(port)
    response = conn.request("POST", "/v3/watch", b"{}", {})
    assert [response.readline() for _ in range(4)] == [*lines, b""]
    assert response.done
    conn.close()


@settings(max_examples=60, deadline=None)
@given(
    lines=st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"") + b"\n"), max_size=8),
    cuts=st.lists(st.integers(min_value=1, max_value=40), max_size=20),
)
def test_any_chunking_gives_the_same_lines_and_body(lines: list[bytes], cuts: list[int]) -> None:
    body = b"".join(lines)
    chunks = []
    rest = body
    for size in cuts:
        if not rest:
            break
        chunks.append(rest[:size])
        rest = rest[size:]
    if rest:
        chunks.append(rest)
    answer = _chunked_answer(chunks, b"%X")
    for by_line in (False, True):
        a, b = socket.socketpair()
        with a, b:
            b.sendall(answer)
            b.shutdown(socket.SHUT_WR)
            conn = Connection("unused", 0, 5)
            conn.sock, conn._stream = a, a.makefile("rb")
            from fleetd.http1 import Response

            response = Response(conn, conn._stream, "POST")
            if by_line:
                got = []
                while line := response.readline():
                    got.append(line)
                assert got == lines
            else:
                assert response.read() == body
            assert response.done
            conn.close()


# ------------------------------------------------------------------------ not HTTP


BAD = [
    (b"", "without an answer"),
    (b"SSH-2.0-OpenSSH_9.2\r\n", "not an HTTP/1.x status line"),
    (b"HTTP/2 200\r\n\r\n", "not an HTTP/1.x status line"),
    (b"HTTP/1.1 2x0 OK\r\n\r\n", "not an HTTP/1.x status line"),
    (b"HTTP/1.1 \xb2\xb2\xb2 OK\r\n\r\n", "not an HTTP/1.x status line"),
    (b"\r\n", "not an HTTP/1.x status line"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "not a header line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n", "inside the headers"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello", "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "closed with 5 bytes of the body due"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n", "bad chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n", "bad chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1_0\r\n", "bad chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXY", "CRLF"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel", "inside a chunk"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "before a chunk"),
    (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * (MAX_HEADERS + 1) + b"\r\n", "header lines"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"y" * MAX_LINE + b"\r\n\r\n", "longer than"),
]


@pytest.mark.parametrize(("answer", "message"), BAD)
def test_an_answer_that_is_not_http_is_a_protocol_error(
    server: tuple[int, Script], answer: bytes, message: str
) -> None:
    port, script = server
    script.answers = [answer]
    script.close_after = {0}
    conn = _conn(port)
    with pytest.raises(ProtocolError, match=message):
        conn.request("POST", "/", b"{}", {}).read()
    conn.close()


def test_a_protocol_error_is_a_connection_error() -> None:
    # The transport retries and fails over on OSError; a garbled answer must take that path.
    assert issubclass(ProtocolError, ConnectionError)


def test_a_listing_loads_neither_http_client_email_nor_ssl() -> None:
    """What this module is for: fleetctl's imports, a registry over http and a request made,
    without the standard library's HTTP client and its email and OpenSSL imports."""
    code = (
        "import sys, fleetctl.main\n"
        "from fleetd.registry import EtcdRegistry\n"
        "from fleetd.errors import RegistryUnavailable\n"
        "reg = EtcdRegistry(['http://127.0.0.1:9'], '/x/', timeout=0.5, transport='http')\n"
        "try:\n"
        "    reg.snapshot()\n"
        "except RegistryUnavailable:\n"
        "    pass\n"
        "print(sorted(m for m in ('http.client', 'email', 'ssl') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
