"""`fleetctl rebalance`: even out machine loads after machines joined, without breaking any rule.

The plan is `fleetd.rebalance.plan_rebalance`, a pure function of one snapshot. Carrying it out is
one unit at a time: write the move hint, wait until the unit left its machine and runs on the
target (or wherever the agents placed it, if the target could no longer take it), clear the hint,
then the next move. So at most one unit is ever in flight, and a failure leaves the rest alone.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer

from fleetctl import output
from fleetctl.client import Registry, registry
from fleetctl.options import OutputFormat
from fleetd.errors import FleetError
from fleetd.model import DesiredState
from fleetd.rebalance import Move, imbalance, plan_rebalance
from fleetd.snapshot import Snapshot


class RebalanceStalled(FleetError):
    """A move did not complete in time."""


def _line(snapshot: Snapshot, move: Move) -> str:
    source = snapshot.machines.get(move.source)
    target = snapshot.machines.get(move.target)
    return (
        f"move {move.unit}: {source.label if source else move.source[:8]} -> "
        f"{target.label if target else move.target[:8]} ({move.reason})"
    )


def _settled(snapshot: Snapshot, move: Move) -> bool:
    """The unit left its old machine and runs (or is loaded, as desired) somewhere else."""
    owner = snapshot.owners.get(move.unit)
    if owner is None or owner.machine_id == move.source:
        return False
    state = snapshot.states.get(move.unit, {}).get(owner.machine_id)
    record = snapshot.units.get(move.unit)
    if state is None or record is None or state.hash != record.hash:
        return False
    if snapshot.desired_state(move.unit) is DesiredState.LAUNCHED:
        return state.active == "active"
    return state.load == "loaded"


def _carry_out(reg: Registry, snapshot: Snapshot, move: Move, timeout: float) -> Snapshot:
    reg.request_move(move.unit, move.target)
    try:
        deadline = time.monotonic() + timeout
        while True:
            current = reg.snapshot()
            if _settled(current, move):
                return current
            if time.monotonic() > deadline:
                raise RebalanceStalled(
                    f"moving {move.unit} to {move.target[:8]} did not complete in {timeout:g}s: "
                    f"check `fleetctl status {move.unit}`"
                )
            time.sleep(0.5)
    finally:
        reg.clear_move(move.unit)


def rebalance(
    ctx: typer.Context,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan, move nothing.")
    ] = False,
    max_moves: Annotated[
        int | None, typer.Option("--max-moves", min=1, help="Move at most this many units.")
    ] = None,
    move_timeout: Annotated[
        float, typer.Option("--move-timeout", min=1, help="Seconds to wait for each move.")
    ] = 60.0,
    output_format: OutputFormat = "table",
) -> None:
    """Move units from busy machines to idle ones, one at a time, keeping every rule."""
    if output.parse_output(output_format) == "json" and not dry_run:
        raise output.UnknownFormat("--output json shows a plan: add --dry-run")
    reg = registry(ctx)
    snapshot = reg.snapshot()
    moves = plan_rebalance(snapshot, max_moves)
    if output_format == "json":
        output.raw(output.document(output.rebalance_document(moves, imbalance(snapshot))))
        return
    if not moves:
        output.echo(f"Nothing to move (imbalance {imbalance(snapshot)})")
        return
    for move in moves:
        output.echo(_line(snapshot, move))
    if dry_run:
        return
    current = snapshot
    for move in moves:
        # Re-check against the cluster as it is now: an earlier move or an operator may have
        # changed it, and a move that no longer fits is skipped rather than forced.
        if move.unit not in current.owners or current.owners[move.unit].machine_id != move.source:
            output.warn(f"skipping {move.unit}: it no longer runs where the plan found it")
            continue
        current = _carry_out(reg, current, move, move_timeout)
        owner = current.owners[move.unit].machine_id
        output.echo(f"Unit {move.unit} moved to {output.machine_legend(current, owner)}")
    output.echo(f"Rebalanced: imbalance {imbalance(snapshot)} -> {imbalance(current)}")


def register(app: typer.Typer) -> None:
    app.command("rebalance")(rebalance)
