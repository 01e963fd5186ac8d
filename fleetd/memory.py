"""Giving the heap's free memory back to the operating system.

A full read of a large registry and the first planning pass over it leave much memory free
that they needed only for a while: the pages of etcd's answers, the decoded JSON of every key,
the pass's scratch. glibc's malloc keeps what was freed mapped (and resident) in its arenas for
reuse, so without help the agent's RSS stays at that high-water mark for good. `malloc_trim`
returns the free pages of every arena to the kernel.

Only glibc has it: elsewhere (musl, macOS, another C library) `release_free_memory` does
nothing. Python's own small-object allocator gives back its arenas by itself once they are
empty; this is about the C heap under it (large objects, the gRPC and protobuf buffers).
"""

from __future__ import annotations

import ctypes
import logging
import sys
from collections.abc import Callable

log = logging.getLogger(__name__)


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the C library has none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        # The symbols the process has loaded already: the C library the interpreter runs on.
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    result: Callable[[int], int] = trim
    return result


_TRIM = _malloc_trim()


def release_free_memory() -> bool:
    """Return the C heap's free pages to the kernel; True if the C library could be asked.
    Costs a walk of the heap (milliseconds for tens of MB): call it after a large build, not
    per event."""
    if _TRIM is None:
        return False
    try:
        _TRIM(0)
    except Exception:  # a foreign C library's symbol of that name: never worth failing for
        log.debug("malloc_trim failed", exc_info=True)
        return False
    return True
