"""The `fleetctl` command: the root app, its global options, and the one table that turns errors
into a message and an exit code.

Commands raise typed errors and never print them. The root group catches the types listed in
`ERRORS`, once, around every command: the user sees one line `fleetctl: <message>` on stderr and
the table's exit code; `--debug` lets the exception through with its traceback instead.
"""

import gc
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import typer
from typer.core import TyperGroup
from typer.models import CommandInfo

from fleetctl import completion, output
from fleetctl.client import DEFAULT_ENDPOINT, DEFAULT_TIMEOUT, GlobalOptions
from fleetctl.commands import inspect, lifecycle, listing, rebalance, remote, version
from fleetctl.ssh import (
    DEFAULT_KNOWN_HOSTS,
    DEFAULT_SSH_TIMEOUT,
    DEFAULT_USERNAME,
    SshOptions,
)
from fleetd.errors import AuthError, ConfigError, FleetError, PermissionDenied, RegistryUnavailable
from fleetd.keys import DEFAULT_PREFIX


def _os_message(exc: BaseException) -> str:
    assert isinstance(exc, OSError)
    if exc.filename:
        return f"cannot read {exc.filename}: {exc.strerror}"
    return str(exc)


def _auth_message(exc: BaseException) -> str:
    return (
        f"{exc}: set --username and --password (or FLEETCTL_USERNAME and FLEETCTL_PASSWORD)"
    )


def _denied_message(exc: BaseException) -> str:
    return f"{exc}; ask for a user with the fleet role (README: etcd authentication)"


# Most specific first: the first entry whose type matches decides.
ERRORS: tuple[tuple[type[BaseException], int, Callable[[BaseException], str]], ...] = (
    (AuthError, 1, _auth_message),
    (PermissionDenied, 1, _denied_message),
    (RegistryUnavailable, 1, str),
    (ConfigError, 1, str),
    (FleetError, 1, str),
    (OSError, 1, _os_message),
    (KeyboardInterrupt, 130, lambda _exc: "interrupted"),
)
HANDLED = tuple(entry[0] for entry in ERRORS)


def describe(exc: BaseException) -> tuple[str, int]:
    """The one-line message and exit code for a handled error."""
    for kind, code, message in ERRORS:
        if isinstance(exc, kind):
            text = message(exc).strip().splitlines()
            return (text[0] if text else type(exc).__name__), code
    raise TypeError(f"{type(exc).__name__} is not in the error table")


class FleetctlGroup(TyperGroup):
    """The root command group: applies the error table around whichever command runs."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except HANDLED as exc:
            options = ctx.find_object(GlobalOptions)
            if options is not None and options.debug:
                raise
            message, code = describe(exc)
            output.error(message)
            raise typer.Exit(code) from None


def _new_app() -> typer.Typer:
    return typer.Typer(
        cls=FleetctlGroup,
        name="fleetctl",
        # The version in the help text, as fleet's `fleetctl help` shows it.
        help=f"fleetctl: manage the units of a fleet cluster ({version.version_line()}).",
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )


app = _new_app()


def _print_version(value: bool) -> None:
    if value:
        output.echo(version.version_line())
        raise typer.Exit()


def _show_help(ctx: Any) -> None:
    # Typer's rich help prints itself and returns ""; plain click returns the text.
    text = ctx.get_help()
    if text:
        output.echo(text)


@app.callback(invoke_without_command=True)
def root(
    ctx: typer.Context,
    endpoint: Annotated[
        str,
        typer.Option(envvar="FLEETCTL_ENDPOINT", help="etcd endpoint(s), comma-separated."),
    ] = DEFAULT_ENDPOINT,
    etcd_key_prefix: Annotated[
        str, typer.Option(envvar="FLEETCTL_ETCD_KEY_PREFIX", help="Registry key prefix in etcd.")
    ] = DEFAULT_PREFIX,
    request_timeout: Annotated[
        float,
        typer.Option(envvar="FLEETCTL_REQUEST_TIMEOUT", help="Seconds to wait for etcd."),
    ] = DEFAULT_TIMEOUT,
    ca_file: Annotated[
        str | None, typer.Option(envvar="FLEETCTL_CA_FILE", help="CA certificate for https.")
    ] = None,
    cert_file: Annotated[
        str | None,
        typer.Option(envvar="FLEETCTL_CERT_FILE", help="Client certificate for https."),
    ] = None,
    key_file: Annotated[
        str | None,
        typer.Option(envvar="FLEETCTL_KEY_FILE", help="Client certificate key for https."),
    ] = None,
    username: Annotated[
        str | None,
        typer.Option(envvar="FLEETCTL_USERNAME", help="etcd user name (etcd authentication)."),
    ] = None,
    password: Annotated[
        str | None,
        typer.Option(
            envvar="FLEETCTL_PASSWORD",
            help="etcd password; prefer the environment variable, a flag shows in ps.",
            show_default=False,
        ),
    ] = None,
    tunnel: Annotated[
        str,
        typer.Option(
            envvar="FLEETCTL_TUNNEL",
            help="Reach etcd and the machines through ssh to this HOST[:PORT].",
        ),
    ] = "",
    ssh_username: Annotated[
        str, typer.Option(envvar="FLEETCTL_SSH_USERNAME", help="User name for ssh to machines.")
    ] = DEFAULT_USERNAME,
    strict_host_key_checking: Annotated[
        str,
        typer.Option(
            envvar="FLEETCTL_STRICT_HOST_KEY_CHECKING",
            metavar="BOOL",
            help="Verify machines' host keys against --known-hosts-file (true/false).",
        ),
    ] = "true",
    known_hosts_file: Annotated[
        str,
        typer.Option(
            envvar="FLEETCTL_KNOWN_HOSTS_FILE",
            help="Host keys of machines; ignored without strict host key checking.",
        ),
    ] = DEFAULT_KNOWN_HOSTS,
    ssh_timeout: Annotated[
        float,
        typer.Option(envvar="FLEETCTL_SSH_TIMEOUT", help="Seconds to wait for an ssh connection."),
    ] = DEFAULT_SSH_TIMEOUT,
    ssh_identity_file: Annotated[
        str | None,
        typer.Option(
            envvar="FLEETCTL_SSH_IDENTITY_FILE",
            help="Private key for ssh (besides ssh-agent and ssh's defaults).",
        ),
    ] = None,
    debug: Annotated[
        bool, typer.Option("--debug", envvar="FLEETCTL_DEBUG", help="Debug logging and tracebacks.")
    ] = False,
    show_version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            expose_value=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    ctx.obj = GlobalOptions(
        endpoint=endpoint,
        etcd_key_prefix=etcd_key_prefix,
        request_timeout=request_timeout,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
        username=username or None,
        password=password,
        debug=debug,
        ssh=SshOptions(
            username=ssh_username,
            tunnel=tunnel,
            strict_host_key_checking=_truth("--strict-host-key-checking", strict_host_key_checking),
            known_hosts_file=known_hosts_file,
            timeout=ssh_timeout,
            identity_file=ssh_identity_file,
        ),
    )
    if debug:
        logging.basicConfig(
            level=logging.DEBUG,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
    if bool(username) != (password is not None):
        raise ConfigError(
            "--password needs --username (or FLEETCTL_USERNAME)"
            if password is not None
            else f"--username {username} needs --password (or FLEETCTL_PASSWORD)"
        )
    if request_timeout <= 0:
        raise ConfigError(f"--request-timeout={request_timeout} must be more than 0 seconds")
    if ctx.invoked_subcommand is None:
        # Bare `fleetctl` shows the help and succeeds, as fleet's does.
        _show_help(ctx)
        raise typer.Exit(0)


@app.command("help")
def help_command(
    ctx: typer.Context,
    command: Annotated[str | None, typer.Argument(help="A command to show the help of.")] = None,
) -> None:
    """Show the help of fleetctl, or of one command."""
    parent = ctx.parent
    assert parent is not None
    if command is None:
        _show_help(parent)
        return
    group = parent.command
    assert isinstance(group, TyperGroup)
    found = group.get_command(parent, command)
    if found is None:
        raise FleetError(f"no command {command!r}: `fleetctl help` lists the commands")
    _show_help(typer.Context(found, info_name=command, parent=parent))


def _truth(option: str, value: str) -> bool:
    text = value.strip().lower()
    if text in ("1", "t", "true", "yes", "on"):
        return True
    if text in ("0", "f", "false", "no", "off"):
        return False
    raise ConfigError(f"{option}={value} must be true or false")


for group in (lifecycle, listing, inspect, rebalance, remote, version, completion):
    group.register(app)


def command_word(args: Sequence[str]) -> str | None:
    """The command a fleetctl command line names: its first word that is neither a global option
    nor the value of one (None when it names none). Which options take a value is read from the
    root's own parameters, so the two cannot disagree."""
    takes_value = {
        name
        for param in typer.main.get_command(_root_with([])).params
        if param.param_type_name == "option" and not getattr(param, "is_flag", False)
        for name in (*param.opts, *param.secondary_opts)
    }
    words = iter(args)
    for word in words:
        if word == "--":
            return next(words, None)
        if word.startswith("-") and word != "-":
            if "=" not in word and word in takes_value:
                next(words, None)
            continue
        return word
    return None


def app_for(args: Sequence[str]) -> typer.Typer:
    """The app that runs `fleetctl ARGS`: the root with only the command the line names, or the
    whole CLI. Typer turns every command it holds into a click command on each run (some 5 ms
    of the 0.1 CPU-seconds a `fleetctl list-units` costs, for 18 commands); one is enough to
    run one. The whole CLI for everything that needs the others: no command or one it does not
    know (the help, and the "no such command" error, list them all), `help`, and shell
    completion."""
    if os.environ.get(completion.COMPLETE_VAR):
        return app
    name = command_word(args)
    found = [info for info in app.registered_commands if info.name == name]
    if name == "help" or len(found) != 1:
        return app
    return _root_with(found)


def _root_with(commands: list[CommandInfo]) -> typer.Typer:
    """The root (its callback, so its global options) holding only these commands."""
    root = _new_app()
    root.registered_callback = app.registered_callback
    root.registered_commands = commands
    return root


def main() -> None:
    # What the imports built lives until the process ends: frozen, the cycle collector no longer
    # walks it on each full collection while a command builds a large registry's rows (the
    # installed command, fleetctl.__main__, froze it already).
    gc.freeze()
    app_for(sys.argv[1:])(prog_name="fleetctl")


if __name__ == "__main__":
    main()
