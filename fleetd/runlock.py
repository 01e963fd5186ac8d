"""One fleetd per machine: an exclusive lock on a file in the runtime directory, held for the
process's life and released by the kernel however the process ends (SIGKILL included).

Without it, a second fleetd started by mistake would find the lease file of the live one and
re-attach to its lease, and two agents would drive the same units. A successor started right
after a restart waits a moment for its predecessor to finish exiting.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import IO

from fleetd.errors import FleetError

LOCK_FILE = "fleetd.lock"


class AlreadyRunning(FleetError):
    """Another fleetd of this machine holds the runtime directory."""


def hold_runtime_lock(directory: Path, wait: float = 10.0) -> IO[str]:
    """Take the lock (waiting up to `wait` seconds) and return the open file: keep it open for
    as long as the agent runs."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle = (directory / LOCK_FILE).open("a+")
    except OSError as exc:
        raise FleetError(
            f"cannot use runtime directory {directory}: {exc.strerror}; set runtime_directory"
        ) from None
    give_up = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= give_up:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                handle.close()
                raise AlreadyRunning(
                    f"another fleetd (pid {holder}) runs for this machine with runtime directory "
                    f"{directory}: stop it first (or give this one its own runtime_directory)"
                ) from None
            time.sleep(0.1)
    with contextlib.suppress(OSError):
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
    return handle
