"""The commands that show one unit: cat (its stored file) and status (what its machines report,
or why none runs it)."""

import typer

from fleetctl import output
from fleetctl.client import registry
from fleetctl.commands.lifecycle import existing_records, unit_names
from fleetctl.options import OutputFormat, UnitName, UnitNames


def cat(ctx: typer.Context, unit: UnitName) -> None:
    """Print a unit file exactly as stored in the registry."""
    names = unit_names([unit])
    (record,) = existing_records(registry(ctx).snapshot(), names)
    output.raw(record.text)


def status(ctx: typer.Context, units: UnitNames, output_format: OutputFormat = "table") -> None:
    """Show what the machines running each unit report, or why no machine runs it."""
    fmt = output.parse_output(output_format)
    names = unit_names(units)
    snapshot = registry(ctx).snapshot()
    records = existing_records(snapshot, names)
    if fmt == "json":
        output.raw(output.document(output.status_document(snapshot, records)))
        return
    output.table("\n".join(output.status_block(snapshot, record) for record in records))
    for message in output.refused_messages(snapshot, names):
        output.warn(message)


def register(app: typer.Typer) -> None:
    app.command("cat")(cat)
    app.command("status")(status)
