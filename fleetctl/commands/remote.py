"""The commands that reach into a machine over ssh: ssh (a shell or a command on a machine, or
on the machine running a unit), journal (a unit's journal on its machine) and the remote half of
status (`systemctl status` of the unit on its machine).

Which machine: the registry says. A machine is named by its id, a unique id prefix or its name
(hostname); a unit by its name, and then means the machine that published a state for it. The
connection is `fleetctl.ssh` with the global ssh options.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
from dataclasses import replace
from typing import Annotated

import typer

from fleetctl.client import options_of, registry
from fleetctl.commands.lifecycle import unit_names
from fleetctl.completion import complete_machine_ids, complete_machine_or_unit, complete_unit_names
from fleetctl.ssh import DEFAULT_PORT, Ssh
from fleetd.errors import FleetError, InvalidUnitName, UnitNotFound
from fleetd.model import Machine
from fleetd.snapshot import Snapshot


class MachineNotFound(FleetError):
    """No machine in the registry matches an id, prefix or name."""


class AmbiguousTarget(FleetError):
    """An argument matches several machines, or a machine and a unit."""


class UnitNotRunning(FleetError):
    """The unit exists but no machine runs it (or it is global, on every machine)."""


SshPort = Annotated[
    int,
    typer.Option(
        "--ssh-port",
        envvar="FLEETCTL_SSH_PORT",
        min=1,
        max=65535,
        help="Connect to machines over SSH on this TCP port.",
    ),
]


def find_machine(snapshot: Snapshot, lookup: str) -> Machine:
    """A machine by full id, name, or unique id prefix."""
    machines = list(snapshot.machines.values())
    exact = [m for m in machines if m.id == lookup]
    if exact:
        return exact[0]
    named = [m for m in machines if m.name and m.name == lookup]
    prefixed = [m for m in machines if m.id.startswith(lookup)] if lookup else []
    found = named or prefixed
    if len(found) > 1:
        ids = ", ".join(sorted(m.short_id for m in found))
        raise AmbiguousTarget(
            f"{lookup!r} matches {len(found)} machines ({ids}): give more of the machine id"
        )
    if not found:
        raise MachineNotFound(
            f"no machine {lookup!r} in the cluster: see `fleetctl list-machines --full`"
        )
    return found[0]


def machine_of_unit(snapshot: Snapshot, name: str) -> Machine:
    """The machine running unit `name` (UnitNotFound / UnitNotRunning otherwise)."""
    record = snapshot.units.get(name)
    if record is None:
        raise UnitNotFound(f"unit {name} not found in the registry")
    if record.requirements is not None and record.requirements.global_:
        raise UnitNotRunning(
            f"{name} is a global unit and runs on every machine: name a machine instead"
        )
    owner = snapshot.owner_of(name)
    if owner is None:
        per = snapshot.states.get(name, {})
        owner = next(iter(sorted(per)), None)
    if owner is None:
        raise UnitNotRunning(
            f"unit {name} is not running on any machine: start it, or see `fleetctl status {name}`"
        )
    machine = snapshot.machines.get(owner)
    if machine is None:
        raise UnitNotRunning(f"unit {name} is on machine {owner[:8]}, which has left the cluster")
    return machine


def _as_unit(lookup: str) -> str | None:
    try:
        return unit_names([lookup])[0]
    except InvalidUnitName:
        return None


def resolve(snapshot: Snapshot, lookup: str) -> Machine:
    """fleet's rule: the argument may be a machine or a unit; both at once is ambiguous."""
    machine: Machine | None = None
    with contextlib.suppress(MachineNotFound):
        machine = find_machine(snapshot, lookup)
    unit = _as_unit(lookup)
    if unit is not None and unit in snapshot.units:
        if machine is not None:
            raise AmbiguousTarget(
                f"{lookup!r} names both a machine and the unit {unit}: "
                "use --machine or --unit to say which"
            )
        return machine_of_unit(snapshot, unit)
    if machine is None:
        raise MachineNotFound(
            f"no machine or unit {lookup!r} in the cluster: see `fleetctl list-machines --full` "
            "and `fleetctl list-units`"
        )
    return machine


def address(machine: Machine) -> str:
    if not machine.public_ip:
        raise MachineNotFound(
            f"machine {machine.short_id} published no address: set public_ip in its fleetd config"
        )
    return machine.public_ip


def client(ctx: typer.Context, port: int) -> Ssh:
    options = options_of(ctx)
    ssh = Ssh(replace(options.ssh, port=port))
    ctx.call_on_close(ssh.close)
    return ssh


# ------------------------------------------------------------------------------- commands


def ssh(
    ctx: typer.Context,
    target: Annotated[
        str | None,
        typer.Argument(
            help="Machine id, id prefix or name, or a unit name.",
            show_default=False,
            autocompletion=complete_machine_or_unit,
        ),
    ] = None,
    command: Annotated[
        list[str] | None,
        typer.Argument(help="Command to run (after --); none: an interactive shell."),
    ] = None,
    machine: Annotated[
        str | None,
        typer.Option(
            "--machine", "-m", help="Open SSH to this machine.", autocompletion=complete_machine_ids
        ),
    ] = None,
    unit: Annotated[
        str | None,
        typer.Option(
            "--unit",
            "-u",
            help="Open SSH to the machine running this unit.",
            autocompletion=complete_unit_names,
        ),
    ] = None,
    ssh_port: SshPort = DEFAULT_PORT,
) -> None:
    """Open a shell, or run a command, on a machine or on the machine running a unit."""
    words = list(command or [])
    if machine and unit:
        raise AmbiguousTarget("give --machine or --unit, not both")
    if (machine or unit) and target is not None:
        words.insert(0, target)
        target = None
    if not (machine or unit or target):
        raise MachineNotFound("name a machine or a unit: fleetctl ssh MACHINE|UNIT [-- COMMAND]")
    snapshot = registry(ctx).snapshot()
    if machine:
        found = find_machine(snapshot, machine)
    elif unit:
        found = machine_of_unit(snapshot, unit_names([unit])[0])
    else:
        assert target is not None
        found = resolve(snapshot, target)
    connection = client(ctx, ssh_port)
    # As with ssh(1): the words are joined into one remote shell command line.
    code = connection.run(address(found), words, tty=not words and sys.stdin.isatty())
    raise typer.Exit(code)


def journal(
    ctx: typer.Context,
    unit: Annotated[
        str,
        typer.Argument(
            help="A unit name.", show_default=False, autocompletion=complete_unit_names
        ),
    ],
    lines: Annotated[
        int, typer.Option("--lines", "-n", min=0, help="Number of recent lines to show.")
    ] = 10,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines as they come.")
    ] = False,
    output_mode: Annotated[
        str, typer.Option("--output", help="journalctl's output mode (short, cat, json, ...).")
    ] = "short",
    sudo: Annotated[bool, typer.Option("--sudo", help="Run journalctl with sudo.")] = False,
    ssh_port: SshPort = DEFAULT_PORT,
) -> None:
    """Print a unit's journal from the machine running it."""
    (name,) = unit_names([unit])
    snapshot = registry(ctx).snapshot()
    found = machine_of_unit(snapshot, name)
    # --unit and --user-unit match either way fleetd runs units (system or user manager).
    argv = [
        "journalctl", "--unit", name, "--user-unit", name, "--no-pager",
        "-n", str(lines), "--output", output_mode,
    ]  # fmt: skip
    if follow:
        argv.append("--follow")
    if sudo:
        argv.insert(0, "sudo")
    code = client(ctx, ssh_port).run(address(found), [shlex.join(argv)])
    raise typer.Exit(code)


def systemctl_status_command(name: str) -> str:
    """`systemctl status` of the unit from whichever manager fleetd drives on that machine:
    the user manager when it knows the unit, else the system manager."""
    quoted = shlex.quote(name)
    return (
        f'if [ "$(systemctl --user show -p LoadState --value -- {quoted} 2>/dev/null)" = loaded ]'
        f"; then exec systemctl --user status -l --no-pager -- {quoted}"
        f"; else exec systemctl status -l --no-pager -- {quoted}; fi"
    )


def register(app: typer.Typer) -> None:
    settings = {"allow_interspersed_args": False, "ignore_unknown_options": True}
    app.command("ssh", context_settings=settings)(ssh)
    app.command("journal")(journal)
