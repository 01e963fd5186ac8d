"""`fleetctl version`: the version of this client (it needs no cluster)."""

import typer

from fleetctl import __version__, output


def version_line() -> str:
    return f"fleetctl version {__version__}"


def version() -> None:
    """Print the version and exit."""
    output.echo(version_line())


def register(app: typer.Typer) -> None:
    app.command("version")(version)
