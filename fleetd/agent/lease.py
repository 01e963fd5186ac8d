"""The lease keeper: the one owner of the machine's lease, its registration and its deadline.

It publishes a read-only `LeaseView` (lease id, deadline, registered) as one immutable value that
every other part reads in a single step, so nobody checks the lease id and then reads it again
while it changes. A write bound to a lease that etcd no longer holds fails, so a stale view can
cost a retry but never a key without a lease.

The deadline is the *send* time of the last successful keep-alive plus the TTL etcd granted:
etcd refreshed the lease after we sent the request, so it cannot expire before that instant,
however long the answer took to come back.

The lease id and deadline are also kept in a file in the runtime directory, refreshed after each
keep-alive: a successor fleetd (restart for an upgrade, or after a crash) re-attaches to the lease
while etcd still holds it and adopts the units without restarting them, and the guard
(`fleetd.guard`) stops the units before that deadline when no fleetd comes back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fleetd.clock import Clock
from fleetd.errors import RegistryUnavailable
from fleetd.model import Machine
from fleetd.ports import Registry

log = logging.getLogger("fleetd")

NO_DEADLINE = -math.inf


@dataclass(frozen=True)
class LeaseView:
    """What the agent may do, as of the last keep-alive."""

    lease_id: int | None = None
    deadline: float = NO_DEADLINE  # clock time before which etcd cannot have expired the lease
    registered: bool = False  # the machine key is held under this lease

    def may_run(self, now: float, margin: float) -> bool:
        """Units may keep running: the lease cannot expire within the fencing margin."""
        return now < self.deadline - margin

    def may_start(self, now: float, margin: float) -> bool:
        """New units may be loaded and started (and claims made): joined and not fencing."""
        return self.registered and self.lease_id is not None and self.may_run(now, margin)


def boot_id() -> str:
    """This boot's id: a deadline on the monotonic clock means nothing after a reboot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class LeaseRecord:
    lease_id: int
    deadline: float  # on the monotonic clock of boot `boot`
    machine_id: str
    boot: str


class LeaseFile:
    """The lease id and deadline in the runtime directory, written atomically (rename)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._failing = False

    def save(self, record: LeaseRecord) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(
                json.dumps(
                    {
                        "lease_id": record.lease_id,
                        "deadline": record.deadline,
                        "machine_id": record.machine_id,
                        "boot_id": record.boot,
                    }
                )
            )
            os.replace(tmp, self.path)
            self._failing = False
        except OSError as exc:
            if not self._failing:
                log.warning("could not keep the lease in %s (a restart will stop units): %s",
                            self.path, exc)
            self._failing = True

    def load(self) -> LeaseRecord | None:
        try:
            data = json.loads(self.path.read_text())
            return LeaseRecord(
                int(data["lease_id"]),
                float(data["deadline"]),
                str(data["machine_id"]),
                str(data.get("boot_id", "")),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable lease file %s: %s", self.path, exc)
            return None

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class LeaseKeeper:
    """Takes, renews and registers the lease; `tick()` is one step, `interval` apart."""

    def __init__(
        self,
        registry: Registry,
        ttl: float,
        margin: float,
        clock: Clock,
        machine: Callable[[], Machine],
        lease_file: LeaseFile | None = None,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.registry = registry
        self.ttl = ttl
        self.margin = margin
        self.clock = clock
        self.machine = machine
        self.lease_file = lease_file
        self.on_change = on_change
        self._view = LeaseView()
        self._refused_logged = False
        self._restored: int | None = None

    @property
    def interval(self) -> float:
        """Three keep-alives fit between two deadlines' fencing points."""
        return max(0.1, (self.ttl - self.margin) / 3)

    def view(self) -> LeaseView:
        return self._view

    def restore(self) -> bool:
        """Take over the lease a previous fleetd of this machine left in the runtime directory:
        its units may run until that lease's deadline (minus the margin) and are adopted if the
        first keep-alive finds etcd still holding it."""
        if self.lease_file is None:
            return False
        record = self.lease_file.load()
        me = self.machine().id
        if record is None or record.machine_id != me or record.boot != boot_id():
            return False
        self._set(LeaseView(record.lease_id, record.deadline, registered=False))
        self._restored = record.lease_id
        log.info(
            "found lease %x of a previous run; its units may run %.1fs more unless it is renewed",
            record.lease_id,
            record.deadline - self.margin - self.clock(),
        )
        return True

    def tick(self) -> float:
        """One keep-alive (or grant, or registration); returns seconds until the next."""
        view = self._view
        try:
            if view.lease_id is None:
                sent = self.clock()
                lease = self.registry.grant_lease(self.ttl)
                view = LeaseView(lease, sent + self.ttl, registered=False)
                self._set(view)
            else:
                sent = self.clock()
                remaining = self.registry.keepalive(view.lease_id)
                if remaining <= 0:
                    log.error("lease %x expired: this machine's units lost their owner; "
                              "joining again with a new lease", view.lease_id)
                    self._set(LeaseView())
                    return 0.0
                view = LeaseView(view.lease_id, sent + min(remaining, self.ttl), view.registered)
                self._set(view)
            if not view.registered:
                return self._register(view)
        except RegistryUnavailable as exc:
            silent = self.clock() - (view.deadline - self.ttl)
            log.warning("lease keep-alive failed (%.1fs since the last one): %s", silent, exc)
            return min(self.interval, 0.5)
        return self.interval

    def _register(self, view: LeaseView) -> float:
        assert view.lease_id is not None
        machine = self.machine()
        if not self.registry.register_machine(machine, view.lease_id):
            if not self._refused_logged:
                log.error(
                    "machine id %s is already held by a live agent: not joining; check "
                    "machine_id (/etc/machine-id) is unique, retrying",
                    machine.id,
                )
                self._refused_logged = True
            return 2.0
        self._refused_logged = False
        if view.lease_id == self._restored:
            # Re-attached to the previous run's lease: the machine key is already ours; write
            # it again, since this run may be a new version or have new metadata.
            self.registry.update_machine(machine, view.lease_id)
        self._set(LeaseView(view.lease_id, view.deadline, registered=True))
        log.info(
            "joined the cluster as machine %s (%s), lease %x, ttl %ss",
            machine.id,
            machine.public_ip or "no public ip",
            view.lease_id,
            self.ttl,
        )
        return self.interval

    def _set(self, view: LeaseView) -> None:
        old = self._view
        changed = (view.lease_id, view.registered) != (old.lease_id, old.registered)
        self._view = view
        if self.lease_file is not None and view.lease_id is not None and view.registered:
            self.lease_file.save(
                LeaseRecord(view.lease_id, view.deadline, self.machine().id, boot_id())
            )
        if changed:
            self.on_change()

    def revoke(self) -> None:
        """Give the lease back (drain): ownership, presence and states vanish at once."""
        view = self._view
        if view.lease_id is not None:
            try:
                self.registry.revoke(view.lease_id)
            except RegistryUnavailable as exc:
                log.warning("could not revoke the lease (it expires by itself): %s", exc)
        self._view = LeaseView()
        if self.lease_file is not None:
            self.lease_file.remove()
