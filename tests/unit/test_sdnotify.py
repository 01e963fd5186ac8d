"""systemd's notify protocol: parsing the environment systemd sets, and datagrams on a real
unix socket."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from fleetd.sdnotify import Notifier


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, Notifier(None, None)),
        ({"NOTIFY_SOCKET": "/run/x"}, Notifier("/run/x", None)),
        ({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "4000000"}, Notifier("/run/x", 4.0)),
        (
            {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"},
            Notifier("/run/x", None),
        ),
        ({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "soon"}, Notifier("/run/x", None)),
        ({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "0"}, Notifier("/run/x", None)),
    ],
    ids=["nothing", "socket", "watchdog", "watchdog-for-another-pid", "bad-usec", "zero-usec"],
)
def test_from_environ(environ: dict[str, str], expected: Notifier) -> None:
    assert Notifier.from_environ(environ) == expected


def test_watchdog_for_this_pid() -> None:
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_environ(env).watchdog_interval == 0.5


def test_send_to_a_path_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        assert Notifier(str(path)).send("READY=1")
        assert server.recv(100) == b"READY=1"


def test_send_to_an_abstract_socket() -> None:
    name = f"fleet-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        assert Notifier("@" + name).send("WATCHDOG=1")
        assert server.recv(100) == b"WATCHDOG=1"


def test_no_socket_sends_nothing_and_a_dead_one_is_not_fatal(tmp_path: Path) -> None:
    assert not Notifier().send("READY=1")
    assert not Notifier(str(tmp_path / "absent")).send("READY=1")
