"""The guard: stops this machine's fleet units before the lease can expire when no fleetd is
there to do it (fleetd exited for a restart, or was killed, and no successor came back in time).

fleetd starts it as a transient service of the same systemd manager (`fleet-guard-<id>.service`),
so it outlives fleetd's process and cgroup. It reads the lease file fleetd refreshes after every
keep-alive (`fleetd.agent.lease.LeaseFile`): while the deadline is far, it sleeps; at deadline -
margin it stops every unit in the units directory, and half a margin before the deadline kills
what still runs, exactly as fleetd's own fencing does. A successor fleetd that re-attaches to the
lease keeps refreshing the same file, so the guard simply never fires. It exits when the file is
removed (fleetd drained the machine) or once the deadline has passed and nothing runs (that lease
is gone; the next fleetd starts a guard for its own lease).

Run as `python -m fleetd.guard --lease-file F --units-directory D --margin M [--user]`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from fleetd.agent.fence import kill_units, stop_units
from fleetd.agent.lease import LeaseFile
from fleetd.clock import Clock
from fleetd.errors import FleetError
from fleetd.ports import UnitManager

log = logging.getLogger("fleetd.guard")


class Guard:
    def __init__(
        self,
        lease_file: LeaseFile,
        manager: UnitManager,
        margin: float,
        clock: Clock,
        units: Callable[[], Iterable[str]] | None = None,
    ) -> None:
        self.lease_file = lease_file
        self.manager = manager
        self.margin = margin
        self.clock = clock
        self.units = units or (lambda: list(manager.loaded_units()))
        self._fired_for: int | None = None

    def tick(self) -> bool:
        """One look; False when the guard has nothing left to do."""
        record = self.lease_file.load()
        if record is None:
            log.info("no lease file: fleetd left the cluster cleanly; guard exits")
            return False
        now = self.clock()
        if now < record.deadline - self.margin:
            return True
        if self._fired_for != record.lease_id:
            self._fired_for = record.lease_id
            log.error("lease %x was not renewed: stopping fleet's units before it expires",
                      record.lease_id)
        names = list(self.units())
        if now >= record.deadline - self.margin / 2:
            running = kill_units(self.manager, names, "the lease expires: no fleetd renewed it")
        else:
            running = stop_units(self.manager, names, "the lease expires: no fleetd renewed it")
        if not running and now >= record.deadline:
            log.info("lease %x is over and no fleet unit runs; guard exits", record.lease_id)
            return False
        return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleetd.guard", description=__doc__.splitlines()[0])
    parser.add_argument("--lease-file", required=True)
    parser.add_argument("--units-directory", required=True)
    parser.add_argument("--margin", type=float, required=True)
    parser.add_argument("--user", action="store_true", help="the user manager (session bus)")
    parser.add_argument("--timeout", type=float, default=5.0, help="D-Bus timeout, seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from fleetd.systemd import DbusUnitManager

    try:
        manager = DbusUnitManager(
            Path(args.units_directory), user=args.user, timeout=args.timeout
        )
    except FleetError as exc:
        log.error("guard cannot start: %s", exc)
        return 1
    units = Path(args.units_directory)

    def unit_files() -> list[str]:
        # Every file fleetd wrote, linked or not: the guard only reads, it never repairs.
        try:
            return [p.name for p in units.iterdir() if not p.name.startswith(".")]
        except FileNotFoundError:
            return []

    guard = Guard(
        LeaseFile(Path(args.lease_file)), manager, args.margin, time.monotonic, unit_files
    )
    while True:
        try:
            if not guard.tick():
                return 0
        except FleetError as exc:
            log.error("guard: %s", exc)
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
