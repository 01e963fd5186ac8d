"""The fleetd agent: one machine's loops around the pure planners, in files a reader can hold in
their head:

- `lease`: the lease keeper (lease id, send-time deadline, registration; the lease file);
- `fence`: stop, then kill, every unit before the lease can expire;
- `mirror`: the registry snapshot kept current by one watch;
- `executor`: the only code that drives systemd and releases ownership (refuses LOAD/START
  after the deadline and RELEASE before the unit is seen stopped);
- `publish`: the published unit states;
- `reconcile`: one round, plan then act;
- `runner`: the `Agent` that wires them, its threads and its three ways out.
"""

from fleetd.agent.runner import Agent, ExitMode, guard_unit_name

__all__ = ["Agent", "ExitMode", "guard_unit_name"]
