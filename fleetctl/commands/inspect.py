"""The commands that show one unit: cat (its stored file) and status (what its machines report,
or why none runs it, then the machine's own `systemctl status` over ssh as fleet shows it)."""

from typing import Annotated

import typer

from fleetctl import output
from fleetctl.client import registry
from fleetctl.commands.lifecycle import existing_records, unit_names
from fleetctl.commands.remote import SshPort, address, client, systemctl_status_command
from fleetctl.options import OutputFormat, UnitName, UnitNames
from fleetctl.ssh import DEFAULT_PORT, SshError
from fleetd.keys import Kind


def cat(ctx: typer.Context, unit: UnitName) -> None:
    """Print a unit file exactly as stored in the registry."""
    names = unit_names([unit])
    # The units' contents alone: with 10,000 units the rest is more than half of the registry.
    (record,) = existing_records(registry(ctx).snapshot({Kind.UNIT}), names)
    output.raw(record.text)


def status(
    ctx: typer.Context,
    units: UnitNames,
    ssh_port: SshPort = DEFAULT_PORT,
    registry_only: Annotated[
        bool,
        typer.Option(
            "--registry-only", help="Only what the registry holds; no systemctl status over ssh."
        ),
    ] = False,
    output_format: OutputFormat = "table",
) -> None:
    """Show what the machines running each unit report, or why no machine runs it; then, for a
    unit a machine runs, that machine's `systemctl status` over ssh (not with `-o json`: the
    JSON document holds the registry's part only)."""
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
    if registry_only:
        return
    connection = None
    for record in records:
        owner = snapshot.owner_of(record.name)
        machine = snapshot.machines.get(owner) if owner else None
        if machine is None or owner not in snapshot.states.get(record.name, {}):
            continue  # nothing runs it: the registry's reasons above are all there is
        connection = connection or client(ctx, ssh_port)
        output.echo("")
        try:
            code = connection.run(address(machine), [systemctl_status_command(record.name)])
        except SshError as exc:
            raise SshError(f"{exc} (--registry-only shows the registry's view alone)") from exc
        if code != 0:
            # As fleet: the exit status of systemctl status (3: the unit is not running).
            raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("cat")(cat)
    app.command("status")(status)
