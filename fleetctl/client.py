"""How fleetctl reaches the registry: the global connection options and the one factory that turns
them into a registry client.

Commands ask `registry(ctx)` for the client; it is built on first use (so `fleetctl version` and
`--help` never touch etcd) and closed when the command ends. Tests replace `factory` to hand the
commands a registry of their choosing.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field, replace
from typing import Protocol

import typer

from fleetctl.ssh import SshOptions
from fleetd.keys import DEFAULT_PREFIX, Kind
from fleetd.model import DesiredState
from fleetd.snapshot import Snapshot, UnitRecord

DEFAULT_ENDPOINT = "http://127.0.0.1:2379"
DEFAULT_TIMEOUT = 3.0


class Registry(Protocol):
    """The part of `fleetd.registry.EtcdRegistry` fleetctl uses."""

    def snapshot(self, kinds: Collection[Kind] | None = None) -> Snapshot: ...

    def write_units(
        self, records: Iterable[UnitRecord], desired: DesiredState | None, seen: Snapshot
    ) -> bool: ...

    def destroy(self, names: Iterable[str]) -> None: ...

    def request_move(self, unit: str, machine_id: str) -> None: ...

    def clear_move(self, unit: str) -> None: ...

    def lease_ages(self, machine_ids: Iterable[str]) -> dict[str, float]: ...

    def close(self) -> None: ...


@dataclass
class GlobalOptions:
    """The options every fleetctl command shares (where etcd is, how to reach it, who asks),
    and the registry client built from them once per invocation."""

    endpoint: str = DEFAULT_ENDPOINT
    etcd_key_prefix: str = DEFAULT_PREFIX
    request_timeout: float = DEFAULT_TIMEOUT
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    debug: bool = False
    ssh: SshOptions = field(default_factory=SshOptions)
    # The client of this invocation, once built.
    connection: Registry | None = field(default=None, repr=False)


def build_registry(options: GlobalOptions) -> Registry:
    # Imported here: most errors a user makes (a bad name, a missing file) are found before a
    # registry is needed. Over etcd's JSON gateway: a command then loads no gRPC library, which
    # would be most of the CPU a short command such as list-units costs (a listing of thousands
    # of units reads its bulk over gRPC all the same: fleetd.registry.BULK_READ_KEYS).
    from fleetd.registry import EtcdRegistry

    return EtcdRegistry(
        options.endpoint,
        options.etcd_key_prefix,
        timeout=options.request_timeout,
        ca_file=options.ca_file,
        cert_file=options.cert_file,
        key_file=options.key_file,
        username=options.username,
        password=options.password,
        transport="http",
    )


factory: Callable[[GlobalOptions], Registry] = build_registry


def options_of(ctx: typer.Context) -> GlobalOptions:
    obj = ctx.find_object(GlobalOptions)
    return obj if obj is not None else GlobalOptions()


def registry(ctx: typer.Context) -> Registry:
    """The registry client of this invocation, built by `factory` on first use."""
    options = options_of(ctx)
    if options.connection is None:
        target = options
        if options.ssh.tunnel:
            target = _tunnelled(ctx, options)
        connection = factory(target)
        options.connection = connection
        ctx.call_on_close(connection.close)
    return options.connection


def _tunnelled(ctx: typer.Context, options: GlobalOptions) -> GlobalOptions:
    """--tunnel: etcd is reached through ssh port forwards via the tunnel host, as fleet did."""
    from fleetctl.ssh import Ssh

    ssh = Ssh(options.ssh)
    ctx.call_on_close(ssh.close)
    endpoint, stop = ssh.forward_endpoints(options.endpoint)
    ctx.call_on_close(stop)
    return replace(options, endpoint=endpoint)
