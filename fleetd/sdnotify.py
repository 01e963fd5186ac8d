"""systemd's notify protocol for fleetd itself (Type=notify, WatchdogSec=).

Readiness tells systemd when the agent has joined the cluster. The watchdog covers a frozen
agent (deadlocked, or its reconcile thread stuck): systemd kills it and starts a new one, which
re-attaches to the lease and adopts the units if it is back in time. A frozen agent's units are
stopped before its lease expires in any case: by its own fencing thread, or by the guard
(fleetd.guard), which runs outside fleetd's process.

No library: the protocol is one datagram on the socket named by $NOTIFY_SOCKET.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Notifier:
    """Where to send notifications (None: not started by systemd with Type=notify), and how
    often systemd wants a watchdog ping (None: no watchdog)."""

    address: str | None = None
    watchdog_interval: float | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Notifier:
        address = environ.get("NOTIFY_SOCKET") or None
        interval: float | None = None
        usec = environ.get("WATCHDOG_USEC")
        pid = environ.get("WATCHDOG_PID")
        if usec and (not pid or pid == str(os.getpid())):
            try:
                interval = int(usec) / 1_000_000
            except ValueError:
                log.warning("ignoring WATCHDOG_USEC=%r: not a number", usec)
        return cls(address, interval if interval and interval > 0 else None)

    def send(self, message: str) -> bool:
        if self.address is None:
            return False
        # A leading '@' names a socket in the abstract namespace.
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message.encode(), target)
        except OSError as exc:
            log.warning("could not notify systemd (%s): %s", message, exc)
            return False
        return True
