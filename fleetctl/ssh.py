"""fleetctl's way to the machines: real OpenSSH (`ssh`), driven with fleet's options.

fleet built its own SSH client; this module runs the system's `ssh` instead and keeps fleet's
behaviour around it:

- Host keys (`--strict-host-key-checking`, default on, and `--known-hosts-file`, default
  `~/.fleetctl/known_hosts`): a known host must present the key on file, a changed key is refused;
  an unknown host's key is shown and the user is asked on stdin, as fleet asks (so `yes |
  fleetctl ...` works in scripts), and added to the file when accepted. ssh itself then
  verifies the key with `StrictHostKeyChecking=yes`. With checking off no file is read or written.
- `--tunnel HOST[:PORT]`: every connection to a machine hops through that host (`ssh -W`), and the
  registry connection is forwarded through it too (`forward_endpoints`).
- ssh's own messages go to a log file (`-E`), so a failure of ssh is one line of ours while the
  remote command's stderr still reaches the user; the remote command's exit status is returned.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit, urlunsplit

from fleetd.errors import FleetError

DEFAULT_USERNAME = "core"
DEFAULT_PORT = 22
DEFAULT_KNOWN_HOSTS = "~/.fleetctl/known_hosts"
DEFAULT_SSH_TIMEOUT = 10.0
# ssh's exit status when ssh itself (not the remote command) failed.
SSH_FAILED = 255


class SshError(FleetError):
    """ssh could not reach a machine, authenticate, or trust its host key."""


@dataclass(frozen=True)
class SshOptions:
    """How fleetctl reaches machines (and, with `tunnel`, etcd) through ssh: the --ssh-* and
    --tunnel options."""

    username: str = DEFAULT_USERNAME
    port: int = DEFAULT_PORT
    tunnel: str = ""
    strict_host_key_checking: bool = True
    known_hosts_file: str = DEFAULT_KNOWN_HOSTS
    timeout: float = DEFAULT_SSH_TIMEOUT
    identity_file: str | None = None

    @property
    def known_hosts(self) -> Path:
        return Path(os.path.expanduser(self.known_hosts_file))


def split_host(address: str, default_port: int) -> tuple[str, int]:
    """`host`, `host:port` or `[v6]:port` -> (host, port)."""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port = rest.removeprefix(":")
    elif address.count(":") == 1:
        host, _, port = address.partition(":")
    else:
        host, port = address, ""
    if not host:
        raise SshError(f"bad address {address!r}: use HOST or HOST:PORT")
    if not port:
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise SshError(f"bad port in {address!r}: use HOST:PORT with a port from 1 to 65535")
    return host, int(port)


def host_pattern(host: str, port: int) -> str:
    """How known_hosts names a host: bare on port 22, else [host]:port."""
    return host if port == DEFAULT_PORT else f"[{host}]:{port}"


class Ssh:
    """Connections to machines with one set of options; `close()` removes the log files."""

    def __init__(
        self,
        options: SshOptions,
        stdin: TextIO | None = None,
        stderr: TextIO | None = None,
    ) -> None:
        self.options = options
        self.binary = shutil.which("ssh") or ""
        if not self.binary:
            raise SshError("ssh is not installed: install OpenSSH's client (openssh-client)")
        self._stdin = stdin
        self._stderr = stderr
        import tempfile  # here: only a command that reaches a machine needs it (and `random`)

        self._tmp = Path(tempfile.mkdtemp(prefix="fleetctl-ssh-"))
        self._trusted: set[tuple[str, int]] = set()

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    # -- building the command line

    def _common(self, log: Path) -> list[str]:
        opts = self.options
        args = [
            "-E", str(log),
            "-o", f"ConnectTimeout={max(1, round(opts.timeout))}",
            "-o", "ServerAliveInterval=10",
        ]  # fmt: skip
        if opts.strict_host_key_checking:
            args += [
                "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={opts.known_hosts}",
            ]  # fmt: skip
        else:
            args += [
                "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR",
            ]  # fmt: skip
        if opts.identity_file:
            args += ["-i", os.path.expanduser(opts.identity_file)]
        return args

    def _hop(self, host: str, port: int, log: Path, tunnel: str) -> list[str]:
        """Options that reach host:port, through the tunnel host when there is one."""
        args = ["-p", str(port), "-l", self.options.username]
        if tunnel:
            thost, tport = split_host(tunnel, DEFAULT_PORT)
            jump = [
                self.binary, *self._common(log), "-p", str(tport), "-l", self.options.username,
                "-W", "%h:%p", thost,
            ]  # fmt: skip
            # ssh runs ProxyCommand through the shell and expands %h/%p itself.
            args += ["-o", "ProxyCommand=" + shlex.join(jump).replace("'%h:%p'", "%h:%p")]
        return args

    def argv(
        self, host: str, command: Sequence[str], log: Path, extra: Sequence[str] = ()
    ) -> list[str]:
        """The ssh command line that runs `command` (a remote shell command line; none: a
        login shell) on host."""
        port = self.options.port
        return [
            self.binary, *self._common(log), *self._hop(host, port, log, self.options.tunnel),
            *extra, host,
            *command,
        ]  # fmt: skip

    # -- host keys

    def trust(self, host: str, port: int, via_tunnel: bool = True) -> None:
        """Make sure host's key is in the known-hosts file, asking the user for a new one."""
        opts = self.options
        if not opts.strict_host_key_checking or (host, port) in self._trusted:
            return
        if via_tunnel and opts.tunnel:
            thost, tport = split_host(opts.tunnel, DEFAULT_PORT)
            self.trust(thost, tport, via_tunnel=False)
        pattern = host_pattern(host, port)
        known = opts.known_hosts
        if known.exists() and _keygen(["-F", pattern, "-f", str(known)]).returncode == 0:
            self._trusted.add((host, port))
            return
        learned = self._learn_key(host, port, via_tunnel)
        fingerprint = _keygen(["-l", "-f", str(learned)]).stdout.split()
        kind = fingerprint[-1].strip("()") if fingerprint else "unknown"
        digest = fingerprint[1] if len(fingerprint) > 1 else "?"
        err = self._stderr or sys.stderr
        err.write(
            f"The authenticity of host '{pattern}' can't be established.\n"
            f"{kind} key fingerprint is {digest}.\n"
            "Are you sure you want to continue connecting (yes/no)? "
        )
        err.flush()
        source = self._stdin or sys.stdin
        line = source.readline()
        if not source.isatty():
            err.write("\n")  # nobody typed (and echoed) a newline: what follows gets its own line
        answer = line.strip().lower()
        if answer not in ("yes", "y"):
            raise SshError(f"host key of {pattern} not accepted: answer yes, or add it to {known}")
        known.parent.mkdir(parents=True, exist_ok=True)
        with known.open("a") as out:
            out.write(learned.read_text())
        err.write(f"Warning: Permanently added '{pattern}' ({kind}) to the list of known hosts.\n")
        self._trusted.add((host, port))

    def _learn_key(self, host: str, port: int, via_tunnel: bool) -> Path:
        """The key host presents, learned by a connection that stops before authenticating."""
        store = self._tmp / f"learn-{host}-{port}"
        store.unlink(missing_ok=True)
        log = self._tmp / "learn.log"
        tunnel = self.options.tunnel if via_tunnel else ""
        common = [
            "-o", "StrictHostKeyChecking=accept-new",
            "-o", f"UserKnownHostsFile={store}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "HashKnownHosts=no",
            "-o", "BatchMode=yes",
            "-o", "PreferredAuthentications=none",
        ]  # fmt: skip
        argv = [
            self.binary, "-E", str(log),
            "-o", f"ConnectTimeout={max(1, round(self.options.timeout))}",
            *common, *self._hop(host, port, log, tunnel), host, "true",
        ]  # fmt: skip
        subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, check=False)
        if not store.exists() or not store.read_text().strip():
            raise SshError(
                f"cannot reach {host_pattern(host, port)} over ssh to read its host key: "
                f"{_last_line(log)}"
            )
        return store

    # -- running

    def run(self, host: str, command: Sequence[str], tty: bool = False) -> int:
        """Run a remote command (or a login shell when `command` is empty) on host with this
        process's stdin, stdout and stderr; its exit status, or SshError if ssh failed."""
        self.trust(host, self.options.port)
        log = self._tmp / "ssh.log"
        log.write_text("")
        extra = ["-t"] if tty else []
        # What fleetctl printed so far must come before what the remote side prints.
        sys.stdout.flush()
        proc = subprocess.run(self.argv(host, command, log, extra), check=False)
        if proc.returncode == SSH_FAILED and log.read_text(errors="replace").strip():
            raise SshError(self._failure(host, log))
        return proc.returncode

    def _failure(self, host: str, log: Path) -> str:
        text = log.read_text(errors="replace")
        pattern = host_pattern(host, self.options.port)
        known = self.options.known_hosts
        if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text:
            return (
                f"host key of {pattern} differs from the one in {known} (the machine was "
                f"replaced, or the connection is intercepted): if expected, remove it with "
                f"ssh-keygen -R '{pattern}' -f {known}"
            )
        target = f"{self.options.username}@{pattern}"
        if self.options.tunnel:
            target += f" via {self.options.tunnel}"
        return f"ssh to {target} failed: {_last_line(log)}"

    # -- the registry through the tunnel

    def forward_endpoints(self, endpoints: str) -> tuple[str, Callable[[], None]]:
        """Forward each etcd endpoint through the tunnel host to a local port; the rewritten
        endpoint list and a function that ends the forwarding."""
        thost, tport = split_host(self.options.tunnel, DEFAULT_PORT)
        self.trust(thost, tport, via_tunnel=False)
        forwards: list[str] = []
        rewritten: list[str] = []
        for endpoint in (e.strip() for e in endpoints.split(",") if e.strip()):
            url = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
            if not url.hostname:
                raise SshError(f"cannot tunnel to endpoint {endpoint!r}: it names no host")
            local = _free_local_port()
            forwards += ["-L", f"127.0.0.1:{local}:{url.hostname}:{url.port or 2379}"]
            rewritten.append(urlunsplit((url.scheme, f"127.0.0.1:{local}", url.path, "", "")))
        log = self._tmp / "tunnel.log"
        log.write_text("")
        argv = [
            self.binary, *self._common(log), "-p", str(tport), "-l", self.options.username,
            "-N", "-o", "ExitOnForwardFailure=yes", *forwards, thost,
        ]  # fmt: skip
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)

        def stop() -> None:
            if proc.poll() is None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
            if proc.poll() is None:
                proc.kill()
                proc.wait()

        first = int(forwards[1].split(":")[1])
        deadline = time.monotonic() + self.options.timeout + 5
        while True:
            if proc.poll() is not None:
                raise SshError(
                    f"tunnel through {self.options.username}@{host_pattern(thost, tport)} "
                    f"failed: {_last_line(log)}"
                )
            if _listening(first):
                return ",".join(rewritten), stop
            if time.monotonic() > deadline:
                stop()
                raise SshError(f"tunnel through {self.options.tunnel} not up within timeout")
            time.sleep(0.02)


def _keygen(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ssh-keygen", *args], capture_output=True, text=True, check=False)


def _last_line(log: Path) -> str:
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    except FileNotFoundError:
        return "no message from ssh"
    lines = [line for line in lines if line and not line.startswith(("@", "Warning:"))]
    return lines[-1] if lines else "no message from ssh"


def _free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0
