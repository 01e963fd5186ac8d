"""fleetd's configuration: defaults, then the TOML file, then FLEET_<KEY> environment variables,
then command-line flags, each layer overriding the one before. Keys are fleet's own.

Every bad value is a `ConfigError` naming the key and its source, raised before the agent touches
etcd or systemd.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import toml

from fleetd.errors import ConfigError
from fleetd.keys import DEFAULT_PREFIX, normalize_prefix

DEFAULT_CONFIG_PATH = "/etc/fleet/fleet.toml"
_MACHINE_ID = re.compile(r"^[0-9a-f]{32}$")
_META_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class Config:
    etcd_servers: tuple[str, ...] = ("http://127.0.0.1:2379",)
    etcd_key_prefix: str = DEFAULT_PREFIX
    etcd_cafile: str | None = None
    etcd_certfile: str | None = None
    etcd_keyfile: str | None = None
    # etcd authentication; the password may come from a file so it stays out of fleet.toml.
    etcd_username: str | None = None
    etcd_password: str | None = field(default=None, repr=False)
    etcd_password_file: str | None = None
    etcd_request_timeout: float = 0.0  # 0: automatic, see `request_timeout`
    public_ip: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    agent_ttl: float = 10.0
    units_directory: str = "/run/fleet/units"
    systemd_user: bool = False
    machine_id: str = ""
    hostname: str = ""
    # Seconds a machine ranked r-th waits, times r, before it bids for a unit (see planner).
    claim_stagger: float = 2.0
    # HOST:PORT of the Prometheus /metrics and /health endpoint; empty: no endpoint.
    metrics_address: str = ""
    fence_margin: float = 0.0  # 0: automatic, see `margin`
    runtime_directory: str = ""  # "": the units directory's parent
    # Every D-Bus call returns or fails within this; the calls fencing makes (stop, kill, state
    # reads) within a fifth of it, at most one second.
    systemd_timeout: float = 5.0

    @property
    def margin(self) -> float:
        """Seconds before the lease's deadline at which fencing starts: units get SIGTERM then,
        SIGKILL half a margin before the deadline."""
        return self.fence_margin or min(3.0, self.agent_ttl / 3)

    @property
    def request_timeout(self) -> float:
        """etcd request timeout: 3 s, or less for a short TTL, so a hung keep-alive leaves time
        for another before fencing."""
        return self.etcd_request_timeout or min(3.0, (self.agent_ttl - self.margin) / 2)

    @property
    def runtime_dir(self) -> str:
        return self.runtime_directory or str(Path(self.units_directory).parent)


def validate_timing(config: Config) -> None:
    """Refuse settings under which the agent could not keep its promise or would fence a healthy
    machine: called at start-up, before anything is touched."""
    ttl, margin = config.agent_ttl, config.margin
    if margin >= ttl / 2:
        raise ConfigError(
            f"fence_margin {margin:.3g}s must be less than half of agent_ttl {ttl:.3g}s: "
            "lower fence_margin or raise agent_ttl"
        )
    if margin < 0.5:
        raise ConfigError(
            f"fence_margin {margin:.3g}s leaves units no time to be stopped and killed before "
            "the lease expires: set it to at least 0.5 (or agent_ttl to at least 1.5)"
        )
    window = ttl - margin
    if config.request_timeout > window / 2:
        raise ConfigError(
            f"etcd_request_timeout {config.request_timeout:.3g}s is too long for agent_ttl "
            f"{ttl:.3g}s: units are fenced {window:.3g}s after the last keep-alive, and a hung "
            f"request must leave time to retry; set etcd_request_timeout to at most "
            f"{window / 2:.3g} or raise agent_ttl"
        )



def parse_metadata(value: Any, source: str) -> dict[str, str]:
    """Metadata as fleet wrote it ("region=us-east,zone=a") or as a TOML table."""
    if isinstance(value, Mapping):
        items = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, str):
        items = []
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            key, eq, val = part.partition("=")
            if not eq:
                raise ConfigError(f"{source}: metadata entry {part!r} must be key=value")
            items.append((key.strip(), val.strip()))
    else:
        raise ConfigError(f'{source}: metadata must be a table or "key=value,..."')
    out: dict[str, str] = {}
    for key, val in items:
        if not _META_KEY.match(key):
            raise ConfigError(
                f"{source}: metadata key {key!r} may only have letters, digits, _ and -"
            )
        if not isinstance(val, str | int | float) or isinstance(val, bool) or str(val) == "":
            raise ConfigError(f"{source}: metadata value of {key!r} must be a non-empty string")
        out[key] = str(val)
    return out


def _coerce(name: str, value: Any, source: str) -> Any:
    where = f"{source}: {name}"
    if name == "etcd_servers":
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of etcd URLs")
        return tuple(v.strip() for v in value)
    if name == "metadata":
        return parse_metadata(value, source)
    if name in (
        "agent_ttl", "etcd_request_timeout", "claim_stagger", "fence_margin", "systemd_timeout"
    ):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number of seconds, not {value!r}") from None
        if number < 0 or (number == 0 and name != "claim_stagger"):
            raise ConfigError(f"{where} must be more than 0 seconds")
        return number
    if name == "systemd_user":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{where} must be true or false, not {value!r}")
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string")
    if name == "etcd_key_prefix":
        return normalize_prefix(value)
    if name == "machine_id" and value and not _MACHINE_ID.match(value):
        raise ConfigError(f"{where} must be 32 lowercase hex characters, like /etc/machine-id")
    if name == "public_ip" and value:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ConfigError(f"{where} {value!r} is not an IP address") from None
    if name in (
        "etcd_cafile",
        "etcd_certfile",
        "etcd_keyfile",
        "etcd_username",
        "etcd_password",
        "etcd_password_file",
    ):
        return value or None
    if name == "metrics_address" and value:
        _check_host_port(value, where)
    return value


def _check_host_port(value: str, where: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{where} {value!r} must be HOST:PORT, like 127.0.0.1:9100")


_KEYS = {f.name for f in fields(Config)}


def _layer(config: Config, values: Mapping[str, Any], source: str) -> Config:
    changes: dict[str, Any] = {}
    for key, value in values.items():
        if key not in _KEYS:
            raise ConfigError(
                f"{source}: unknown key {key!r}; known keys: {', '.join(sorted(_KEYS))}"
            )
        changes[key] = _coerce(key, value, source)
    return replace(config, **changes)


def load_config(
    path: str | None,
    environ: Mapping[str, str],
    flags: Mapping[str, Any],
) -> Config:
    """Build the effective configuration. A missing default file is fine; a missing named one is
    not."""
    config = Config()
    file_path = path or environ.get("FLEET_CONFIG") or DEFAULT_CONFIG_PATH
    explicit = bool(path or environ.get("FLEET_CONFIG"))
    if Path(file_path).exists():
        try:
            data = toml.load(file_path)
        except (toml.TomlDecodeError, OSError) as exc:
            raise ConfigError(f"config file {file_path}: {str(exc).splitlines()[0]}") from None
        config = _layer(config, data, f"config file {file_path}")
    elif explicit:
        raise ConfigError(f"config file {file_path} does not exist: create it or drop --config")
    env_values = {
        key: environ[f"FLEET_{key.upper()}"] for key in _KEYS if f"FLEET_{key.upper()}" in environ
    }
    config = _layer(config, env_values, "environment")
    config = _layer(config, {k: v for k, v in flags.items() if v is not None}, "command line")
    config = _resolve_password(config)
    if not config.machine_id:
        config = replace(config, machine_id=read_machine_id())
    if not config.hostname:
        config = replace(config, hostname=socket.gethostname())
    validate_timing(config)
    return config


def _resolve_password(config: Config) -> Config:
    """Read etcd_password_file into etcd_password; a user name needs exactly one of them."""
    if config.etcd_password_file:
        if config.etcd_password is not None:
            raise ConfigError("set etcd_password or etcd_password_file, not both")
        path = config.etcd_password_file
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"etcd_password_file {path}: {exc.strerror}") from None
        # A file written with `echo` ends in a newline that is not part of the password.
        config = replace(config, etcd_password=text.rstrip("\r\n"))
    if config.etcd_username and config.etcd_password is None:
        raise ConfigError("etcd_username is set without etcd_password or etcd_password_file")
    if config.etcd_password is not None and not config.etcd_username:
        raise ConfigError("an etcd password is set without etcd_username")
    return config


def read_machine_id(path: str = "/etc/machine-id") -> str:
    try:
        value = Path(path).read_text().strip()
    except OSError:
        raise ConfigError(
            f"cannot read {path}: set machine_id in the config (32 hex characters)"
        ) from None
    if not _MACHINE_ID.match(value):
        raise ConfigError(f"{path} does not hold a machine id: set machine_id in the config")
    return value


def reload_metadata(config: Config, path: str | None, environ: Mapping[str, str]) -> Config:
    """On SIGHUP: re-read the file and environment, keep everything but metadata (changing the
    identity or the etcd endpoints of a running agent is a restart, not a reload)."""
    fresh = load_config(path, environ, {})
    return replace(config, metadata=fresh.metadata, public_ip=fresh.public_ip or config.public_ip)


def config_flags(**values: Any) -> dict[str, Any]:
    """Drop unset flags, so only what the user typed overrides the file."""
    return {k: v for k, v in values.items() if v is not None}
