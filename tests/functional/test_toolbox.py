"""The operator's toolbox on a real local cluster with etcd authentication: `local-cluster` run
directly without the virtualenv on PATH, `up --auth`, every auth case through fleetctl, and the
JSON documents parsed and checked against what the machines report."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from localcluster import auth

from fleetd.registry import EtcdRegistry
from tests.functional.conftest import (
    AGENT_TTL,
    REPO,
    TOOL,
    UNITS,
    VENV_BIN,
    one_line_error,
    wait_until,
    write_unit,
)

pytestmark = pytest.mark.functional


@dataclass
class Secured:
    dir: Path
    endpoint: str = ""
    users: dict[str, tuple[str, str]] = field(default_factory=dict)

    def fleetctl(
        self, user: str | None, *args: str | Path, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "FLEETCTL_"))}
        env["FLEETCTL_ENDPOINT"] = self.endpoint
        if user is not None:
            env["FLEETCTL_USERNAME"], env["FLEETCTL_PASSWORD"] = self.users[user]
        proc = subprocess.run(
            [str(VENV_BIN / "fleetctl"), *map(str, args)],
            capture_output=True, text=True, env=env, timeout=120, check=False,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(f"fleetctl {args} exited {proc.returncode}: {proc.stderr}")
        return proc

    def json(self, user: str, *args: str) -> dict[str, object]:
        document = json.loads(self.fleetctl(user, *args, "-o", "json").stdout)
        assert isinstance(document, dict)
        return document


def bare_env() -> dict[str, str]:
    """A login shell's environment: no virtualenv on PATH, no fleet variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "FLEETCTL_"))}
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    return env


@pytest.fixture(scope="module")
def secured() -> Iterator[Secured]:
    if os.geteuid() != 0:
        pytest.skip("systemd managers in own cgroups need root")
    if shutil.which("etcd") is None:
        pytest.skip("etcd-server is not installed")
    base = Path(tempfile.mkdtemp(prefix="lc-auth-", dir="/tmp"))
    handle = Secured(base / "c")
    run = [str(TOOL), "--dir", str(handle.dir)]
    try:
        # Run as a user would: the script itself, from a shell without the virtualenv.
        up = subprocess.run(
            [*run, "up", "--auth", "--agent-ttl", str(int(AGENT_TTL))],
            capture_output=True, text=True, env=bare_env(), cwd=REPO, timeout=180, check=False,
        )  # fmt: skip
        assert up.returncode == 0, up.stderr
        exports = dict(
            line.removeprefix("export ").split("=", 1)
            for line in up.stdout.splitlines()
            if line.startswith("export ")
        )
        handle.endpoint = exports["FLEETCTL_ENDPOINT"]
        assert exports["FLEETCTL_USERNAME"] == auth.ADMIN_USER
        for user in (auth.ROOT, auth.ADMIN_USER, auth.VIEWER_USER, auth.AGENT_USER):
            handle.users[user] = (user, auth.password(handle.dir, user))
        assert handle.users[auth.ADMIN_USER][1] == exports["FLEETCTL_PASSWORD"]
        root = ":".join(handle.users[auth.ROOT])
        auth.etcdctl([handle.endpoint], "user", "add", "nobody:nobody-pw", user=root)
        handle.users["nobody"] = ("nobody", "nobody-pw")
        yield handle
    finally:
        subprocess.run([*run, "destroy"], env=bare_env(), timeout=180, check=False)
        shutil.rmtree(base, ignore_errors=True)


def test_fleetd_config_and_password_files(secured: Secured) -> None:
    config = (secured.dir / "m" / "core-01" / "fleet.toml").read_text()
    assert 'etcd_username = "fleet-agent"' in config
    assert "etcd_password_file" in config
    assert auth.password(secured.dir, auth.AGENT_USER) not in config
    for user in (auth.ROOT, auth.AGENT_USER, auth.ADMIN_USER, auth.VIEWER_USER):
        assert auth.password_file(secured.dir, user).stat().st_mode & 0o077 == 0


def test_every_auth_case(secured: Secured, tmp_path: Path) -> None:
    line = one_line_error(secured.fleetctl(None, "list-units", check=False))
    assert "requires authentication" in line and "FLEETCTL_USERNAME" in line
    line = one_line_error(secured.fleetctl("nobody", "list-units", check=False))
    assert "denied user 'nobody' read access under /fleet/: permission denied" in line

    viewer = auth.VIEWER_USER
    listed = secured.json(viewer, "list-machines")
    assert len(listed["machines"]) == 3  # type: ignore[arg-type]
    path = write_unit(tmp_path, "viewed.service")
    line = one_line_error(secured.fleetctl(viewer, "start", path, check=False))
    assert f"denied user '{viewer}' write access under /fleet/: permission denied" in line
    assert "viewed.service" not in secured.fleetctl(viewer, "list-unit-files").stdout

    # An agent's password is no way into fleetctl's writes either.
    line = one_line_error(secured.fleetctl(auth.AGENT_USER, "start", path, check=False))
    assert "write access" in line


def test_fleet_runs_fully_with_its_roles_and_json_tells_the_truth(
    secured: Secured, tmp_path: Path
) -> None:
    admin, viewer = auth.ADMIN_USER, auth.VIEWER_USER
    units = [UNITS / "hello.service"]
    for i in (1, 2):
        units.append(write_unit(tmp_path, f"web{i}.service", "Conflicts=web*.service"))
    started = secured.fleetctl(admin, "start", *units)
    assert started.stdout.count("launched on") == 3

    machines = secured.json(viewer, "list-machines")["machines"]
    assert isinstance(machines, list)
    ids = {m["id"]: m for m in machines}
    assert {m["version"] for m in machines} == {"0.1.0"}
    assert all(0 <= m["lease_renewed_seconds_ago"] <= AGENT_TTL for m in machines)
    assert sorted(m["name"] for m in machines) == ["core-01", "core-02", "core-03"]

    listed = secured.json(viewer, "list-units")["units"]
    assert isinstance(listed, list)
    assert sorted(u["unit"] for u in listed) == ["hello.service", "web1.service", "web2.service"]
    assert all(u["active"] == "active" and u["machine"] in ids for u in listed)
    web = {u["unit"]: u["machine"] for u in listed if u["unit"].startswith("web")}
    assert web["web1.service"] != web["web2.service"]  # the Conflicts rule held

    files = secured.json(viewer, "list-unit-files")["unit_files"]
    assert isinstance(files, list)
    assert {f["unit"]: (f["desired_state"], f["state"]) for f in files} == {
        name: ("launched", "launched")
        for name in ("hello.service", "web1.service", "web2.service")
    }
    status = secured.json(viewer, "status", "web1.service")["units"]
    assert isinstance(status, list)
    (entry,) = status
    assert entry["owner"] == web["web1.service"]
    assert [m["machine"] for m in entry["machines"]] == [web["web1.service"]]
    plan = secured.json(admin, "rebalance", "--dry-run")
    assert plan["moves"] == [] and plan["imbalance"] == 0

    full = secured.fleetctl(viewer, "list-machines", "--full").stdout.splitlines()
    assert full[0].split() == ["MACHINE", "IP", "METADATA", "VERSION", "RENEWED"]

    secured.fleetctl(admin, "destroy", "hello.service", "web1.service", "web2.service")
    registry = EtcdRegistry(
        secured.endpoint, "/fleet/", username=auth.ROOT, password=secured.users[auth.ROOT][1]
    )
    try:
        # destroy waited: nothing is owned or reported any more.
        snapshot = registry.snapshot()
        assert not snapshot.units and not snapshot.owners and not snapshot.states
        wait_until(lambda: len(registry.snapshot().machines) == 3, what="machines still up")
    finally:
        registry.close()


def test_progress_on_a_terminal_and_completion_of_the_cluster_units(
    secured: Secured, tmp_path: Path
) -> None:
    admin = auth.ADMIN_USER
    paths = [write_unit(tmp_path, f"tty{i}.service") for i in range(3)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "FLEETCTL_"))}
    env["FLEETCTL_ENDPOINT"] = secured.endpoint
    env["FLEETCTL_USERNAME"], env["FLEETCTL_PASSWORD"] = secured.users[admin]

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [str(VENV_BIN / "fleetctl"), "start", *map(str, paths)],
        stdout=slave, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    os.close(slave)
    shown = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                shown += chunk
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
    assert proc.wait(120) == 0
    text = shown.decode()
    # The first poll comes right after the write, long before an agent can start a unit.
    assert "\r\x1b[K[0/3 done] waiting for tty" in text
    final = [line.split("\r\x1b[K")[-1] for line in text.replace("\r\n", "\n").split("\n")]
    assert sorted(line.split(" launched")[0] for line in final if line) == [
        f"Unit tty{i}.service" for i in range(3)
    ]

    complete = dict(env, _FLEETCTL_COMPLETE="complete_bash", COMP_WORDS="fleetctl stop tty",
                    COMP_CWORD="2")  # fmt: skip
    offered = subprocess.run(
        [str(VENV_BIN / "fleetctl")], env=complete, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert offered.stdout.split() == [f"tty{i}.service" for i in range(3)]
    secured.fleetctl(admin, "destroy", *[p.name for p in paths])
