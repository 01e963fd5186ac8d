"""etcd authentication for a local cluster (`up --auth`): the root user, fleet's roles and users,
then `auth enable`, all through `etcdctl` as an operator would type it (README: etcd
authentication).

The roles confine fleet to its key prefix and give each party write access only where it writes:

    fleet-agent    read the prefix; write owner/, machine/, state/   (what fleetd writes)
    fleet-admin    read the prefix; write unit/, desired/, move/, meta/ (what fleetctl writes)
    fleet-viewer   read the prefix                                    (list and status only)

One user per role (`fleet-agent`, `fleetctl`, `fleet-viewer`) with a random password kept in
`<dir>/auth/<user>.password` (mode 0600), and `root` for the operator. fleetd reads its password
from the file (`etcd_password_file`); `local-cluster env` prints the fleetctl user's.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from localcluster.etcd import EtcdError

AUTH_DIR = "auth"
ROOT = "root"
AGENT_USER = "fleet-agent"
ADMIN_USER = "fleetctl"
VIEWER_USER = "fleet-viewer"

# role -> the sub-prefixes (under the fleet prefix) it may write; every role reads the prefix.
ROLE_WRITES: Mapping[str, tuple[str, ...]] = {
    "fleet-agent": ("owner/", "machine/", "state/"),
    "fleet-admin": ("unit/", "desired/", "move/", "meta/"),
    "fleet-viewer": (),
}
USER_ROLES: Mapping[str, str] = {
    AGENT_USER: "fleet-agent",
    ADMIN_USER: "fleet-admin",
    VIEWER_USER: "fleet-viewer",
}


def password_file(dir: Path, user: str) -> Path:
    return dir / AUTH_DIR / f"{user}.password"


def password(dir: Path, user: str) -> str:
    try:
        return password_file(dir, user).read_text().strip()
    except OSError as exc:
        raise EtcdError(f"no password for etcd user {user} in {dir / AUTH_DIR}: {exc}") from exc


def etcdctl(endpoints: Sequence[str], *args: str, user: str | None = None) -> str:
    """Run etcdctl against the cluster; `user` is "name:password" once auth is on."""
    command = ["etcdctl", "--endpoints", ",".join(endpoints), "--dial-timeout", "5s"]
    if user:
        command += ["--user", user]
    env = dict(os.environ, ETCDCTL_API="3")
    try:
        proc = subprocess.run(
            [*command, *args], capture_output=True, text=True, timeout=30, env=env, check=False
        )
    except FileNotFoundError as exc:
        raise EtcdError("etcdctl not found: run scripts/setup (package etcd-client)") from exc
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise EtcdError(f"etcdctl {' '.join(args[:3])} failed: {last}")
    return proc.stdout


def _new_password(dir: Path, user: str) -> str:
    path = password_file(dir, user)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    value = secrets.token_urlsafe(18)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(value + "\n")
    return value


def enabled(endpoints: Sequence[str]) -> bool:
    """Whether etcd already asks for credentials (a re-run of `up` finds it on)."""
    try:
        etcdctl(endpoints, "user", "list")
    except EtcdError as exc:
        if "user name is empty" in str(exc) or "permission denied" in str(exc):
            return True
        raise
    return False


def setup(endpoints: Sequence[str], dir: Path, prefix: str) -> None:
    """Create root, the roles and users, then turn authentication on. Runs once per cluster."""
    if enabled(endpoints):
        return
    root_password = _new_password(dir, ROOT)
    etcdctl(endpoints, "user", "add", f"{ROOT}:{root_password}")
    etcdctl(endpoints, "user", "grant-role", ROOT, "root")
    for role, writes in ROLE_WRITES.items():
        etcdctl(endpoints, "role", "add", role)
        etcdctl(endpoints, "role", "grant-permission", "--prefix=true", role, "read", prefix)
        for sub in writes:
            etcdctl(
                endpoints, "role", "grant-permission", "--prefix=true", role, "readwrite",
                prefix + sub,
            )
    for user, role in USER_ROLES.items():
        etcdctl(endpoints, "user", "add", f"{user}:{_new_password(dir, user)}")
        etcdctl(endpoints, "user", "grant-role", user, role)
    etcdctl(endpoints, "auth", "enable")
