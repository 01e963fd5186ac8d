"""The read-only listings: list-machines, list-units and list-unit-files.

Each reads the registry once and hands the snapshot to `fleetctl.output`; the field names and the
output format are checked before etcd is contacted, so a typo fails fast and without a network
round trip. With `--output json` the listing is one JSON document of every field (`--fields`
only shapes tables). list-machines and list-units read only the kinds of keys they show: with
10,000 units, the unit texts and owners list-units leaves out are half of what the registry holds.
"""

import typer

from fleetctl import output
from fleetctl.client import registry
from fleetctl.options import (
    Full,
    MachineFields,
    NoLegend,
    OutputFormat,
    UnitFields,
    UnitFileFields,
)
from fleetd.keys import Kind

# What each listing reads: list-units shows published states, the machines they were published
# by, and a row of dashes for a unit whose desired state asks for it to run.
MACHINE_KINDS = frozenset({Kind.MACHINE})
UNIT_STATE_KINDS = frozenset({Kind.MACHINE, Kind.STATE, Kind.DESIRED})


def list_machines(
    ctx: typer.Context,
    fields: MachineFields = None,
    full: Full = False,
    no_legend: NoLegend = False,
    output_format: OutputFormat = "table",
) -> None:
    """List the machines in the cluster: id, public IP and metadata (--full: version and when
    each last renewed its lease)."""
    fmt = output.parse_output(output_format)
    columns = output.machine_fields(fields, full)
    # Lease ages cost a read per machine: only for the column that shows them (and JSON).
    wants_ages = fmt == "json" or "renewed" in output.parse_fields(columns, output.MACHINE_FIELDS)
    reg = registry(ctx)
    snapshot = reg.snapshot(MACHINE_KINDS)
    ages = reg.lease_ages(snapshot.machines) if wants_ages else {}
    if fmt == "json":
        output.raw(output.document(output.machines_document(snapshot, ages)))
        return
    output.table(output.machines_table(snapshot, columns, full, not no_legend, ages))


def list_units(
    ctx: typer.Context,
    fields: UnitFields = output.DEFAULT_UNIT_FIELDS,
    full: Full = False,
    no_legend: NoLegend = False,
    output_format: OutputFormat = "table",
) -> None:
    """List the state every machine published for the units it runs."""
    fmt = output.parse_output(output_format)
    output.parse_fields(fields, output.UNIT_FIELDS)
    snapshot = registry(ctx).snapshot(UNIT_STATE_KINDS)
    if fmt == "json":
        output.raw(output.document(output.units_document(snapshot)))
        return
    output.table(output.units_table(snapshot, fields, full, not no_legend))


def list_unit_files(
    ctx: typer.Context,
    fields: UnitFileFields = output.DEFAULT_UNIT_FILE_FIELDS,
    full: Full = False,
    no_legend: NoLegend = False,
    output_format: OutputFormat = "table",
) -> None:
    """List the units in the registry, their desired and reached states and where they run."""
    fmt = output.parse_output(output_format)
    output.parse_fields(fields, output.UNIT_FILE_FIELDS)
    snapshot = registry(ctx).snapshot()
    if fmt == "json":
        output.raw(output.document(output.unit_files_document(snapshot)))
        return
    output.table(output.unit_files_table(snapshot, fields, full, not no_legend))
    for message in output.refused_messages(snapshot):
        output.warn(message)


def register(app: typer.Typer) -> None:
    app.command("list-machines")(list_machines)
    app.command("list-units")(list_units)
    app.command("list-unit-files")(list_unit_files)
