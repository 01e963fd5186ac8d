"""A loopback TCP relay that plays the network between one machine's fleetd and etcd.

One relay listens on one local port per etcd member and forwards each connection to that member.
Its mode says what the "network" does:

    open       connections pass
    refuse     every open connection is reset, new ones are reset at once (a clean cut)
    blackhole  every open connection is reset, new ones are accepted and then ignored: the
               client hears nothing, as behind a dead link, until its own timeout fires

The same class serves tests in-process (`Relay(...)`, `cut()`, `heal()`) and the local cluster
tool, which runs it as a detached process (`python proxy.py --state F --target H:P ...`): the
process writes its ports and pid to the state file, and a new mode is handed over by writing the
control file and sending SIGHUP; the process acknowledges by writing the applied sequence number
back into the state file. One thread and one selector serve every connection, so an idle relay
costs no CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import signal
import socket
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

MODES = ("open", "refuse", "blackhole")
HOST = "127.0.0.1"


def _reset(sock: socket.socket) -> None:
    """Close with an RST, so the peer learns at once that the connection is gone."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class Relay:
    """Forward `listen port -> target` for each target; one selector thread does all the I/O."""

    def __init__(self, targets: Sequence[tuple[str, int]], mode: str = "open") -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        self.mode = mode
        self._selector = selectors.DefaultSelector()
        self._listeners: dict[socket.socket, tuple[str, int]] = {}
        self.ports: list[int] = []
        for target in targets:
            server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind((HOST, 0))
            server.listen(128)
            server.setblocking(False)
            self._listeners[server] = target
            self.ports.append(int(server.getsockname()[1]))
            self._selector.register(server, selectors.EVENT_READ)
        self._peer: dict[socket.socket, socket.socket | None] = {}  # None: a held (ignored) client
        # Other threads (and signal handlers) only post requests; the loop thread owns sockets.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        # Re-entrant: the process's SIGHUP handler runs on the loop thread, maybe inside it.
        self._lock = threading.RLock()
        self._pending: list[tuple[str, int]] = []
        self._applied = threading.Condition(self._lock)
        self._generation = 0
        self.seq = 0  # the last applied request's number (the control file's "seq")
        self._closing = False
        self._thread: threading.Thread | None = None

    # -- in-process use -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self.ports[0]

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.ports[0]}"

    @property
    def urls(self) -> list[str]:
        return [f"http://{HOST}:{port}" for port in self.ports]

    def start(self) -> Relay:
        self._thread = threading.Thread(target=self.serve, name="relay", daemon=True)
        self._thread.start()
        return self

    def set_mode(self, mode: str, wait: float = 5.0) -> None:
        """Switch mode; returns once the loop applied it (open connections are dropped then)."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        with self._lock:
            self.request(mode)
            target = self._generation + len(self._pending)
            if self._thread is not None and threading.current_thread() is not self._thread:
                self._applied.wait_for(lambda: self._generation >= target, wait)

    def cut(self, mode: str = "refuse") -> None:
        self.set_mode(mode)

    def heal(self) -> None:
        self.set_mode("open")

    def request(self, mode: str, seq: int = 0) -> None:
        """Queue a mode change for the loop; safe from a signal handler on the loop thread."""
        with self._lock:
            self._pending.append((mode, seq))
            self._wake()

    def stop(self) -> None:
        with self._lock:
            self._closing = True
            self._wake()

    def close(self) -> None:
        self.stop()
        if self._thread is not None:
            self._thread.join(5)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    # -- the loop -------------------------------------------------------------------------------

    def serve(self, on_applied: Callable[[str, int], None] | None = None) -> None:
        try:
            while True:
                for key, _ in self._selector.select():
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is self._wake_r:
                        with contextlib.suppress(OSError):
                            while sock.recv(4096):
                                pass
                    elif sock in self._listeners:
                        self._accept(sock)
                    elif sock in self._peer:
                        self._forward(sock)
                with self._lock:
                    if self._closing:
                        return
                    pending, self._pending = self._pending, []
                for mode, seq in pending:
                    self._apply(mode)
                    self.seq = seq
                if pending:
                    with self._lock:
                        self._generation += len(pending)
                        self._applied.notify_all()
                    if on_applied is not None:
                        on_applied(self.mode, self.seq)
        finally:
            self._drop_all()
            for server in self._listeners:
                with contextlib.suppress(OSError):
                    server.close()
            self._selector.close()

    def _apply(self, mode: str) -> None:
        if mode != "open" or self.mode != "open":
            # Any change of the network drops what was open, healing included: clients held in
            # the black hole reconnect then instead of waiting for their own timeout.
            self._drop_all()
        self.mode = mode

    def _accept(self, server: socket.socket) -> None:
        try:
            client, _ = server.accept()
        except OSError:
            return
        if self.mode == "refuse":
            _reset(client)
            return
        client.setblocking(False)
        if self.mode == "blackhole":
            self._peer[client] = None
            self._selector.register(client, selectors.EVENT_READ)
            return
        try:
            upstream = socket.create_connection(self._listeners[server], timeout=1)
        except OSError:
            _reset(client)
            return
        upstream.setblocking(False)
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._peer[client] = upstream
        self._peer[upstream] = client
        self._selector.register(client, selectors.EVENT_READ)
        self._selector.register(upstream, selectors.EVENT_READ)

    def _forward(self, sock: socket.socket) -> None:
        peer = self._peer.get(sock)
        try:
            data = sock.recv(262144)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(sock)
            return
        if peer is None:
            return  # black hole: read and forget
        try:
            # Loopback peers drain fast; a stopped (paused) peer only stalls its own relay.
            peer.setblocking(True)
            peer.settimeout(30)
            peer.sendall(data)
            peer.setblocking(False)
        except OSError:
            self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        peer = self._peer.pop(sock, None)
        for each in (sock, peer):
            if each is None:
                continue
            self._peer.pop(each, None)
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(each)
            _reset(each)

    def _drop_all(self) -> None:
        for sock in list(self._peer):
            if sock in self._peer:
                self._drop(sock)


# -- as a process of the local cluster tool ----------------------------------------------------


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data) + "\n")
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="loopback relay between a fleetd and etcd")
    parser.add_argument("--state", required=True, type=Path, help="JSON file this process writes")
    parser.add_argument("--control", required=True, type=Path, help="JSON file read on SIGHUP")
    parser.add_argument("--target", action="append", required=True, help="HOST:PORT, repeated")
    args = parser.parse_args(argv)
    targets = []
    for text in args.target:
        host, _, port = text.rpartition(":")
        targets.append((host, int(port)))
    relay = Relay(targets)

    def publish(mode: str, seq: int) -> None:
        state = {"pid": os.getpid(), "ports": relay.ports, "mode": mode, "seq": seq}
        _write_json(args.state, state)

    def on_hup(signum: int, frame: object) -> None:
        try:
            control = json.loads(args.control.read_text())
            mode, seq = str(control["mode"]), int(control["seq"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        if mode in MODES:
            relay.request(mode, seq)

    def on_term(signum: int, frame: object) -> None:
        relay.stop()

    signal.signal(signal.SIGHUP, on_hup)
    signal.signal(signal.SIGTERM, on_term)
    publish(relay.mode, 0)
    relay.serve(on_applied=publish)
    return 0


if __name__ == "__main__":
    sys.exit(main())
