"""The publisher: the systemd state of every unit this machine has loaded, in the registry under
the machine's lease, with the reason when a unit is being stopped for a move ("stopping on M"
in fleetctl status). Owned by the reconcile thread; writes only what changed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from fleetd.agent.lease import LeaseView
from fleetd.model import PublishedState, SystemdState
from fleetd.ports import Registry
from fleetd.snapshot import Snapshot

log = logging.getLogger("fleetd")


class Publisher:
    def __init__(self, registry: Registry, me: str, wall: Callable[[], float]) -> None:
        self.registry = registry
        self.me = me
        self.wall = wall
        self._published: dict[str, PublishedState] = {}
        self._since: dict[str, tuple[str, float]] = {}
        # States under our lease that we did not write in this run (a restart adopted the
        # lease) are found by one scan of the registry's states per lease; after it, every
        # state of ours is one we wrote, so a round costs our units, not the cluster's.
        self._scanned = False

    def publish(
        self,
        view: LeaseView,
        snap: Snapshot,
        loaded: Mapping[str, str],
        states: Mapping[str, SystemdState],
        reasons: Mapping[str, str],
    ) -> None:
        """Publish each loaded unit's state; withdraw what is no longer loaded here."""
        if view.lease_id is None or not view.registered:
            return
        now = self.wall()
        changed: dict[str, PublishedState] = {}
        for name, digest in sorted(loaded.items()):
            state = states.get(name)
            if state is None:
                continue
            last_active, since = self._since.get(name, ("", now))
            if last_active != state.active:
                since = now
            self._since[name] = (state.active, since)
            reason = reasons.get(name, "") if state.active == "deactivating" else ""
            current = PublishedState(
                self.me, state.load, state.active, state.sub, digest, since, reason, state.container
            )
            if self._published.get(name) != current:
                changed[name] = current
        stale = set(self._published)
        scanning = not self._scanned
        if scanning:
            stale |= {n for n, per in snap.states.items() if self.me in per}
        withdrawn = stale - set(loaded)
        if not changed and not withdrawn:
            return
        # One write for the round; only once it succeeded does it count as published.
        self.registry.publish_states(self.me, view.lease_id, changed, withdrawn)
        self._published.update(changed)
        for name in withdrawn:
            self._published.pop(name, None)
            self._since.pop(name, None)
        if scanning:
            self._scanned = True

    def forget(self) -> None:
        """A new lease: nothing published under the old one survives."""
        self._published.clear()
        self._scanned = False
