"""How the fleetd process takes its signals: the agent runs on a thread of its own and the main
thread does nothing but wait for signals and act on them.

Python runs a signal handler on the main thread, between two bytecodes of whatever that thread
was doing. Had the main thread been running the agent, a handler could interrupt it inside a lock
the handler needs as well (a `threading.Event` holds one while it is set, cleared or waited on; a
second SIGTERM arriving during the first one's handler is the same case) and wait on itself for
ever: the agent then never drains, and its lease loop keeps renewing. So no handler here does
anything but let the interpreter note the signal: the signal's number reaches the main thread
through the wakeup file descriptor, and the action runs there, in plain code, holding nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import threading
from collections.abc import Callable, Mapping
from types import FrameType

log = logging.getLogger("fleetd")

# Written by the agent's thread when it ends; signal numbers start at 1.
_DONE = 0
# How often the main thread looks whether the agent ended, should its note of it be lost.
_LOOK_EVERY = 1.0


def _noted(signum: int, frame: FrameType | None) -> None:
    """The Python-level handler: nothing. Installing one is what makes the interpreter write the
    signal's number to the wakeup fd instead of taking the default action (exit)."""


def serve(run: Callable[[], None], actions: Mapping[int, Callable[[], None]]) -> None:
    """Run `run` on a worker thread; on the main thread (the caller's, which must be the main
    one) call `actions[sig]` when `sig` arrives, until `run` returns. Whatever `run` raised is
    raised here. Signals pending when `run` ends, or coming later, are ignored: the agent has
    done what they would ask, and a SIGTERM after a drain must not turn a clean exit into death
    by signal.

    Signals read together are acted on once each, in the order of their last arrival: a flood
    of SIGHUPs is one reload, and a SIGTERM among them is never lost behind the others."""
    # A pipe, not a socket pair: it holds 64 KiB of signal numbers, where a socket's buffer
    # counts a whole packet's overhead for each one-byte write and fills after a few hundred.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    failure: list[BaseException] = []

    def body() -> None:
        try:
            run()
        except BaseException as exc:
            failure.append(exc)
        finally:
            with contextlib.suppress(OSError):
                os.write(wake_w, bytes([_DONE]))

    for sig in actions:
        signal.signal(sig, _noted)
    previous_fd = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    worker = threading.Thread(target=body, name="agent")
    try:
        worker.start()
        while worker.is_alive():
            select.select([wake_r], [], [], _LOOK_EVERY)
            try:
                received = os.read(wake_r, 65536)
            except BlockingIOError:
                continue
            if _DONE in received:
                break
            # dict keeps insertion order: re-inserting moves a signal to its last arrival.
            batch: dict[int, None] = {}
            for number in received:
                batch.pop(number, None)
                batch[number] = None
            for number in batch:
                action = actions.get(number)
                if action is None:
                    continue
                try:
                    action()
                except Exception:
                    # Leaving here would leave the agent running with nobody to take a
                    # SIGTERM: say it and keep serving.
                    log.exception("acting on signal %s failed", signal.Signals(number).name)
        worker.join()
    finally:
        # The handlers stay: without the wakeup fd they do nothing at all.
        signal.set_wakeup_fd(previous_fd)
        os.close(wake_r)
        os.close(wake_w)
    if failure:
        raise failure[0]
