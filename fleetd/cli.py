"""The `fleetd` command: read the configuration, wire the adapters to the agent, handle signals.

Errors a user can cause (a bad config, an unreachable systemd) are one line on stderr and exit 1;
`--debug` adds tracebacks and debug logging.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fleetd import __version__
from fleetd.config import Config, config_flags, load_config, reload_metadata
from fleetd.errors import FleetError
from fleetd.runlock import hold_runtime_lock
from fleetd.signals import serve

if TYPE_CHECKING:
    from fleetd.agent import Agent
    from fleetd.ports import UnitManager

app = typer.Typer(add_completion=False, help="fleetd: the fleet agent for one machine.")

# In the runtime directory: the lease a restarted fleetd re-attaches to, and the guard watches.
LEASE_FILE = "fleetd-lease.json"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fleetd version {__version__}")
        raise typer.Exit()


def build_agent(config: Config, manager: UnitManager | None = None) -> Agent:
    """The agent as `fleetd` runs it; a given `manager` stands in for systemd's D-Bus API (the
    memory benchmark runs this wiring with the in-memory one)."""
    # Adapters are imported here so that `fleetd --help` and config errors do not need D-Bus.
    from fleetd.agent import Agent
    from fleetd.agent.lease import LeaseFile
    from fleetd.metrics import InstrumentedUnitManager, Metrics, MetricsServer, PrometheusMetrics
    from fleetd.registry import EtcdRegistry
    from fleetd.sdnotify import Notifier

    registry = EtcdRegistry(
        config.etcd_servers,
        config.etcd_key_prefix,
        timeout=config.request_timeout,
        ca_file=config.etcd_cafile,
        cert_file=config.etcd_certfile,
        key_file=config.etcd_keyfile,
        username=config.etcd_username,
        password=config.etcd_password,
    )
    if manager is None:
        from fleetd.systemd import DbusUnitManager

        manager = DbusUnitManager(
            Path(config.units_directory), user=config.systemd_user, timeout=config.systemd_timeout
        )
    metrics = Metrics()
    if config.metrics_address:
        prometheus = PrometheusMetrics(config.machine_id, __version__)
        # Serves from a daemon thread for the life of the process.
        MetricsServer(config.metrics_address, prometheus)
        manager = InstrumentedUnitManager(manager, prometheus)
        metrics = prometheus
    lease_path = Path(config.runtime_dir) / LEASE_FILE
    guard = [
        sys.executable, "-m", "fleetd.guard",
        "--lease-file", str(lease_path),
        "--units-directory", config.units_directory,
        "--margin", f"{config.margin:g}",
        "--timeout", f"{config.systemd_timeout:g}",
    ]
    if config.systemd_user:
        guard.append("--user")
    return Agent(
        config,
        registry,
        manager,
        notifier=Notifier.from_environ(os.environ),
        lease_file=LeaseFile(lease_path),
        guard_argv=guard,
        metrics=metrics,
    )


@app.command()
def run(
    config_path: Annotated[
        str | None,
        typer.Option("--config", help="TOML config file (default /etc/fleet/fleet.toml)"),
    ] = None,
    etcd_servers: Annotated[str | None, typer.Option(help="Comma-separated etcd URLs.")] = None,
    etcd_key_prefix: Annotated[str | None, typer.Option(help="Registry key prefix.")] = None,
    machine_id: Annotated[str | None, typer.Option(help="32 hex characters.")] = None,
    public_ip: Annotated[str | None, typer.Option(help="Address shown by fleetctl.")] = None,
    metadata: Annotated[str | None, typer.Option(help="key=value,key2=value2")] = None,
    agent_ttl: Annotated[float | None, typer.Option(help="Lease TTL in seconds.")] = None,
    units_directory: Annotated[
        str | None, typer.Option(help="Where unit files are written.")
    ] = None,
    systemd_user: Annotated[
        bool | None, typer.Option("--systemd-user/--systemd-system", help="Which manager to drive.")
    ] = None,
    debug: Annotated[bool, typer.Option(help="Debug logging and tracebacks.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Run the agent. SIGTERM/SIGINT: drain (stop the units, hand them over, exit 0). SIGUSR2:
    exit for a restart (units keep running; a fleetd started within the lease's TTL adopts
    them). SIGHUP: re-read the metadata."""
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not debug:
        # The gRPC and GLib layers are chatty at INFO; our own log says what matters.
        logging.getLogger("grpc").setLevel(logging.WARNING)
    flags = config_flags(
        etcd_servers=etcd_servers,
        etcd_key_prefix=etcd_key_prefix,
        machine_id=machine_id,
        public_ip=public_ip,
        metadata=metadata,
        agent_ttl=agent_ttl,
        units_directory=units_directory,
        systemd_user=systemd_user,
    )
    try:
        config = load_config(config_path, os.environ, flags)
        # Held until the process ends: a second fleetd of this machine must not adopt the
        # live one's lease.
        run_lock = hold_runtime_lock(Path(config.runtime_dir))
        agent = build_agent(config)
    except FleetError as exc:
        if debug:
            raise
        typer.echo(f"fleetd: {exc}", err=True)
        raise typer.Exit(1) from None

    from fleetd.agent import ExitMode

    def reload() -> None:
        # Reloading reads files: not on the thread that takes the signals.
        def read() -> None:
            try:
                agent.update_config(reload_metadata(agent.config, config_path, os.environ))
            except FleetError as exc:
                logging.getLogger("fleetd").error("reload failed, keeping the old config: %s", exc)

        threading.Thread(target=read, name="reload", daemon=True).start()

    try:
        serve(
            agent.run,
            {
                signal.SIGTERM: lambda: agent.stop(mode=ExitMode.DRAIN),
                signal.SIGINT: lambda: agent.stop(mode=ExitMode.DRAIN),
                signal.SIGUSR2: lambda: agent.stop(mode=ExitMode.RESTART),
                signal.SIGHUP: reload,
            },
        )
    finally:
        run_lock.close()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
