"""The rebalance plan: which units to move where so that machine loads even out, without breaking
any rule. A pure function of a snapshot; `fleetctl rebalance` prints it and carries it out one move
at a time through the registry's move hints (see fleetd.keys).

A move is only planned when
- the unit is not pinned (`Pin=true`), not global, has no MachineOf/ZoneOf/RegionOf peers and is
  no unit's peer (followers move with their peer, never on their own);
- the target passes every hard checker with the unit taken off its current machine;
- it does not make the unit's template group less evenly spread (the soft rule), and
- it strictly lowers the load difference between the two machines (so the plan terminates and
  never oscillates).
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetd.model import DesiredState
from fleetd.placement import View, feasible, score_spread
from fleetd.snapshot import Snapshot


@dataclass(frozen=True)
class Move:
    """One step of a rebalance: `unit` from machine `source` to machine `target`, and why."""

    unit: str
    source: str
    target: str
    reason: str


def _loads(view: View) -> dict[str, int]:
    return {m: len(view.on_machine.get(m, ())) for m in view.machines}


def _movable(view: View, unit: str) -> bool:
    req = view.requirements.get(unit)
    if req is None or req.pin or req.global_:
        return False
    if req.machine_of or req.zone_of or req.region_of:
        return False
    if view.snapshot.desired_state(unit) is DesiredState.INACTIVE:
        return False
    return not any(
        unit in (other.machine_of + other.zone_of + other.region_of)
        for other in view.requirements.values()
    )


def imbalance(snapshot: Snapshot) -> int:
    """max - min of non-global units per machine."""
    loads = _loads(View(snapshot))
    return max(loads.values()) - min(loads.values()) if loads else 0


def plan_rebalance(snapshot: Snapshot, max_moves: int | None = None) -> list[Move]:
    view = View(snapshot)
    moves: list[Move] = []
    moved: set[str] = set()
    while max_moves is None or len(moves) < max_moves:
        loads = _loads(view)
        if not loads:
            break
        move = _best_move(view, loads, moved)
        if move is None:
            break
        view.place(move.unit, move.target)
        moved.add(move.unit)
        moves.append(move)
    return moves


def _best_move(view: View, loads: dict[str, int], moved: set[str]) -> Move | None:
    # From the most loaded machine to the least loaded one that can take a unit.
    sources = sorted(loads, key=lambda m: (-loads[m], m))
    targets = sorted(loads, key=lambda m: (loads[m], m))
    for source in sources:
        for target in targets:
            if loads[source] - loads[target] < 2:
                break
            for unit in sorted(view.on_machine.get(source, ())):
                if unit in moved or not _movable(view, unit):
                    continue
                if _fits(view, unit, source, target):
                    return Move(
                        unit,
                        source,
                        target,
                        f"{view.label(source)} runs {loads[source]} units, "
                        f"{view.label(target)} {loads[target]}",
                    )
    return None


def _fits(view: View, unit: str, source: str, target: str) -> bool:
    req = view.requirements[unit]
    machines = view.machines
    revision = view.revision[unit]
    view.remove(unit)
    try:
        if not feasible(unit, req, machines[target], view).ok:
            return False
        # Soft spread: the target must be at least as good for the group as the source, leaving
        # out the plain load term that the move is meant to change.
        there = score_spread(unit, req, machines[target], view)[:-1]
        here = score_spread(unit, req, machines[source], view)[:-1]
        return there <= here
    finally:
        view.place(unit, source, revision)
