"""The read-only listings: list-machines, list-units and list-unit-files.

Each reads the registry once and hands the snapshot to `fleetctl.output`; the field names are
checked before etcd is contacted, so a typo fails fast and without a network round trip.
"""

import typer

from fleetctl import output
from fleetctl.client import registry
from fleetctl.options import Full, MachineFields, NoLegend, UnitFields, UnitFileFields


def list_machines(
    ctx: typer.Context,
    fields: MachineFields = output.DEFAULT_MACHINE_FIELDS,
    full: Full = False,
    no_legend: NoLegend = False,
) -> None:
    """List the machines in the cluster: id, public IP and metadata."""
    output.parse_fields(fields, output.MACHINE_FIELDS)
    snapshot = registry(ctx).snapshot()
    output.table(output.machines_table(snapshot, fields, full, not no_legend))


def list_units(
    ctx: typer.Context,
    fields: UnitFields = output.DEFAULT_UNIT_FIELDS,
    full: Full = False,
    no_legend: NoLegend = False,
) -> None:
    """List the state every machine published for the units it runs."""
    output.parse_fields(fields, output.UNIT_FIELDS)
    snapshot = registry(ctx).snapshot()
    output.table(output.units_table(snapshot, fields, full, not no_legend))


def list_unit_files(
    ctx: typer.Context,
    fields: UnitFileFields = output.DEFAULT_UNIT_FILE_FIELDS,
    full: Full = False,
    no_legend: NoLegend = False,
) -> None:
    """List the units in the registry, their desired and reached states and where they run."""
    output.parse_fields(fields, output.UNIT_FILE_FIELDS)
    snapshot = registry(ctx).snapshot()
    output.table(output.unit_files_table(snapshot, fields, full, not no_legend))
    for message in output.refused_messages(snapshot):
        output.warn(message)


def register(app: typer.Typer) -> None:
    app.command("list-machines")(list_machines)
    app.command("list-units")(list_units)
    app.command("list-unit-files")(list_unit_files)
