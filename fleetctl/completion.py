"""Shell completion: the `fleetctl completion SHELL` command that prints the script to install,
and the completers that offer unit names from the registry, machine ids and field names.

The scripts are Typer's (bash, zsh, fish; Typer exposes them only from its private modules): on
TAB the shell runs fleetctl again with `_FLEETCTL_COMPLETE` set, and Typer answers with the
matches of the word under the cursor. The completers read the registry with the global options
typed so far on that command line (or their FLEETCTL_* variables); any failure, an unreachable
etcd included, completes nothing rather than printing an error into the user's prompt.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any

import typer
from typer._completion_classes import completion_init
from typer._completion_shared import get_completion_script as _typer_script

from fleetctl import client, output
from fleetd.snapshot import Snapshot
from fleetd.unitfile import UNIT_TYPES

PROG = "fleetctl"
COMPLETE_VAR = "_FLEETCTL_COMPLETE"
SHELLS = ("bash", "zsh", "fish")
# A completion that waits on a dead etcd would freeze the prompt: give up quickly.
COMPLETION_TIMEOUT = 1.5

log = logging.getLogger(__name__)


class UnknownShell(output.UnknownFormat):
    """`fleetctl completion` was asked for a shell it has no script for."""


def script(shell: str) -> str:
    if shell not in SHELLS:
        raise UnknownShell(f"no completion for shell {shell!r}: use one of {', '.join(SHELLS)}")
    return _typer_script(prog_name=PROG, complete_var=COMPLETE_VAR, shell=shell) + "\n"


def _options(ctx: typer.Context) -> client.GlobalOptions:
    """The global options as parsed so far: the root callback does not run while completing."""
    params: dict[str, Any] = dict(ctx.find_root().params)
    return client.GlobalOptions(
        endpoint=params.get("endpoint") or client.DEFAULT_ENDPOINT,
        etcd_key_prefix=params.get("etcd_key_prefix") or client.GlobalOptions.etcd_key_prefix,
        request_timeout=min(
            float(params.get("request_timeout") or COMPLETION_TIMEOUT), COMPLETION_TIMEOUT
        ),
        ca_file=params.get("ca_file"),
        cert_file=params.get("cert_file"),
        key_file=params.get("key_file"),
        username=params.get("username") or None,
        password=params.get("password"),
    )


def _snapshot(ctx: typer.Context) -> Snapshot | None:
    try:
        registry = client.factory(_options(ctx))
    except Exception:
        log.debug("completion: no registry client", exc_info=True)
        return None
    try:
        return registry.snapshot()
    except Exception:
        # Whatever went wrong, a prompt is no place for it.
        log.debug("completion: registry unreadable", exc_info=True)
        return None
    finally:
        registry.close()


def _matching(values: Iterable[str], incomplete: str) -> list[str]:
    return sorted(v for v in set(values) if v.startswith(incomplete))


def complete_unit_names(ctx: typer.Context, incomplete: str) -> list[str]:
    """Units in the registry whose name starts with what was typed."""
    snapshot = _snapshot(ctx)
    return _matching(snapshot.units if snapshot else (), incomplete)


def complete_unit_args(ctx: typer.Context, incomplete: str) -> list[str]:
    """Registry units, and unit files under the typed directory (start, load, submit take
    either)."""
    snapshot = _snapshot(ctx)
    names = list(snapshot.units) if snapshot else []
    folder = Path(incomplete).parent if "/" in incomplete else Path(".")
    try:
        for path in folder.iterdir():
            shown = str(path) if "/" in incomplete else path.name
            if path.is_dir():
                names.append(shown + "/")
            elif path.suffix.lstrip(".") in UNIT_TYPES:
                names.append(shown)
    except OSError:
        pass
    return _matching(names, incomplete)


def complete_machine_ids(ctx: typer.Context, incomplete: str) -> list[tuple[str, str]]:
    """Machine ids (and their host names as the help text shells show beside them)."""
    snapshot = _snapshot(ctx)
    if snapshot is None:
        return []
    return [
        (machine_id, snapshot.machines[machine_id].label)
        for machine_id in _matching(snapshot.machines, incomplete)
    ]


def complete_machine_or_unit(ctx: typer.Context, incomplete: str) -> list[str]:
    """For commands aimed at a machine or at the machine running a unit (`ssh`): machine ids,
    machine names and unit names."""
    snapshot = _snapshot(ctx)
    if snapshot is None:
        return []
    names = [m.name for m in snapshot.machines.values() if m.name]
    return _matching([*snapshot.machines, *names, *snapshot.units], incomplete)


def fields_completer(valid: tuple[str, ...]) -> Callable[[str], list[str]]:
    """Completes the last item of a comma-separated --fields value."""

    def complete(incomplete: str) -> list[str]:
        done, _, last = incomplete.rpartition(",")
        head = f"{done}," if done else ""
        taken = set(done.split(",")) if done else set()
        return [head + f for f in valid if f.startswith(last) and f not in taken]

    return complete


def completion(
    shell: Annotated[
        str,
        typer.Argument(
            help="bash, zsh or fish.",
            autocompletion=lambda incomplete: [s for s in SHELLS if s.startswith(incomplete)],
            show_default=False,
        ),
    ],
) -> None:
    """Print the shell completion script. Install, for example:
    `fleetctl completion bash > /etc/bash_completion.d/fleetctl`,
    `fleetctl completion fish > ~/.config/fish/completions/fleetctl.fish`,
    `fleetctl completion zsh > "${fpath[1]}/_fleetctl"`."""
    output.raw(script(shell))


def register(app: typer.Typer) -> None:
    # Typer's own completion classes (they understand its scripts), without its
    # --install-completion options: fleetctl installs through `completion SHELL`, as kubectl.
    completion_init()
    app.command("completion")(completion)
