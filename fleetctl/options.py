"""Option types shared by several commands, so each flag is spelled and documented once."""

from typing import Annotated

import typer

from fleetctl import output
from fleetctl.completion import complete_unit_args, complete_unit_names, fields_completer

UnitArgs = Annotated[
    list[str],
    typer.Argument(
        help="Unit files (paths) or unit names.",
        show_default=False,
        autocompletion=complete_unit_args,
    ),
]
UnitNames = Annotated[
    list[str],
    typer.Argument(
        help="Unit names (a path's basename is used).",
        show_default=False,
        autocompletion=complete_unit_names,
    ),
]
UnitName = Annotated[
    str, typer.Argument(help="A unit name.", show_default=False, autocompletion=complete_unit_names)
]

NoLegend = Annotated[
    bool, typer.Option("--no-legend", help="Do not print a legend (column headers).")
]
Full = Annotated[bool, typer.Option("--full", "-l", help="Do not shorten ids and hashes.")]

NoBlock = Annotated[
    bool, typer.Option("--no-block", help="Do not wait until the units reach the state.")
]
BlockAttempts = Annotated[
    int,
    typer.Option(
        "--block-attempts",
        min=0,
        help="Poll the registry at most N times (about 0.5 s apart) while waiting; 0: no limit.",
    ),
]
Replace = Annotated[
    bool,
    typer.Option(
        "--replace", help="Replace units in the registry whose content differs from the file."
    ),
]


def _fields_help(valid: tuple[str, ...]) -> str:
    return f"Columns to print, comma-separated. Valid fields: {','.join(valid)}."


MachineFields = Annotated[
    str | None,
    typer.Option(
        "--fields",
        help=_fields_help(output.MACHINE_FIELDS)
        + f" Default {output.DEFAULT_MACHINE_FIELDS}; with --full {output.FULL_MACHINE_FIELDS}.",
        show_default=False,
        autocompletion=fields_completer(output.MACHINE_FIELDS),
    ),
]
UnitFields = Annotated[
    str,
    typer.Option(
        "--fields",
        help=_fields_help(output.UNIT_FIELDS),
        autocompletion=fields_completer(output.UNIT_FIELDS),
    ),
]
UnitFileFields = Annotated[
    str,
    typer.Option(
        "--fields",
        help=_fields_help(output.UNIT_FILE_FIELDS),
        autocompletion=fields_completer(output.UNIT_FILE_FIELDS),
    ),
]

OutputFormat = Annotated[
    str,
    typer.Option(
        "--output",
        "-o",
        help="Output format: table, or json (one document; fields in README, JSON output).",
        autocompletion=lambda incomplete: [
            f for f in output.OUTPUT_FORMATS if f.startswith(incomplete)
        ],
    ),
]
