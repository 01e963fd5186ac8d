"""The registry mirror: one read of the whole prefix, then one watch keeps an in-memory
`Snapshot` current. It never re-reads the registry per event (the thundering herd that hurt fleet
at scale); a broken watch (endpoint failover, compaction) is the only reason to read everything
again.

The watch callback runs in the registry client's thread; the reconcile thread only ever takes a
copy. Entries the snapshot refuses (invalid names, undecodable values, unknown keys) are logged
once each, when they appear.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from fleetd.ports import Registry, WatchEvent
from fleetd.snapshot import Snapshot

log = logging.getLogger("fleetd")


class Mirror:
    def __init__(self, registry: Registry, wake: Callable[[], None]) -> None:
        self.registry = registry
        self.wake = wake
        self._lock = threading.Lock()
        self._snapshot = Snapshot()
        self._synced_at = 0
        self._cancel: Callable[[], None] | None = None
        self._resync = threading.Event()
        self._resync.set()

    @property
    def needs_sync(self) -> bool:
        return self._resync.is_set()

    def copy(self) -> Snapshot:
        """A picture of the registry that later events do not change."""
        with self._lock:
            return self._snapshot.copy()

    def sync(self) -> None:
        """Read everything once and watch from there."""
        self.close()
        self._resync.clear()
        try:
            snap = self.registry.snapshot()
            with self._lock:
                self._snapshot = snap
                self._synced_at = snap.revision
            self._cancel = self.registry.watch(snap.revision + 1, self._on_watch)
        except BaseException:
            # Not current: the next round reads everything again.
            self._resync.set()
            raise
        for key, reason in sorted(snap.refused.items()):
            log.warning("ignoring registry entry %s: %s", key, reason)
        self.wake()

    def close(self) -> None:
        cancel, self._cancel = self._cancel, None
        if cancel is not None:
            cancel()

    def _on_watch(self, batch: list[WatchEvent] | BaseException) -> None:
        if isinstance(batch, BaseException):
            log.warning("registry watch ended (%s): reading the registry again", batch or "closed")
            self._resync.set()
            self.wake()
            return
        refused: list[tuple[str, str]] = []
        try:
            with self._lock:
                for event in batch:
                    if event.mod_revision <= self._synced_at:
                        # A late event of a cancelled watch: the fresh read has newer data.
                        continue
                    reason = self._snapshot.apply(
                        self.registry.layout,
                        event.key,
                        event.value,
                        event.mod_revision,
                        event.create_revision,
                    )
                    if reason is not None:
                        refused.append((event.key, reason))
        except Exception:
            # Never expected (apply refuses what it cannot decode), but a watch thread that dies
            # would freeze the picture: read everything again instead.
            log.exception("applying a registry watch event failed: reading the registry again")
            self._resync.set()
        for key, reason in refused:
            log.warning("ignoring registry entry %s: %s", key, reason)
        self.wake()
