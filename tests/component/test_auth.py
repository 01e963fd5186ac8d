"""etcd authentication against a real etcd with auth on (the roles `local-cluster up --auth`
creates, localcluster.auth): who is refused, with which one-line message, and that agents and
fleetctl work fully with their roles only, also after their tokens expired (this etcd's tokens
live 2 s without use instead of 300 s)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest
from localcluster import auth
from localcluster.etcd import EtcdCluster
from typer.testing import CliRunner, Result

from fleetctl.main import app
from fleetd.errors import AuthError, PermissionDenied
from fleetd.model import DesiredState, Machine
from fleetd.registry import EtcdRegistry
from fleetd.snapshot import UnitRecord
from fleetd.unitfile import content_hash
from tests.support.agents import Harness, unit_text
from tests.support.bulk import bulk_pages
from tests.support.etcd_fixtures import etcd, etcd_prefix  # noqa: F401

pytestmark = pytest.mark.component

PREFIX = "/fleet/"
TOKEN_TTL = 2
NOBODY = ("fleet-nobody", "nobody-password")


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EtcdCluster, Path]]:
    dir = tmp_path_factory.mktemp("auth")
    cluster = EtcdCluster.start(dir / "etcd", extra=["--auth-token-ttl", str(TOKEN_TTL)])
    try:
        auth.setup(cluster.endpoints, dir, PREFIX)
        root = f"root:{auth.password(dir, auth.ROOT)}"
        # A user etcd knows but who holds no role at all.
        auth.etcdctl(cluster.endpoints, "user", "add", f"{NOBODY[0]}:{NOBODY[1]}", user=root)
        yield cluster, dir
    finally:
        cluster.stop()


def login(dir: Path, user: str) -> tuple[str, str]:
    return user, auth.password(dir, user)


def fleetctl(cluster: EtcdCluster, user: tuple[str, str] | None, *args: str) -> Result:
    env = {"FLEETCTL_USERNAME": user[0], "FLEETCTL_PASSWORD": user[1]} if user else {}
    argv = ["--endpoint", cluster.endpoints[0], *args]
    return CliRunner().invoke(app, argv, env=env)


def one_line(result: Result) -> str:
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_refusals_are_one_line_and_name_the_fix(secured: tuple[EtcdCluster, Path]) -> None:
    cluster, _ = secured
    anonymous = one_line(fleetctl(cluster, None, "list-units"))
    assert "requires authentication" in anonymous
    assert "--username and --password" in anonymous

    wrong = one_line(fleetctl(cluster, (auth.ADMIN_USER, "not-the-password"), "list-units"))
    assert f"refused user '{auth.ADMIN_USER}': wrong user name or password" in wrong

    roleless = one_line(fleetctl(cluster, NOBODY, "list-units"))
    assert f"denied user '{NOBODY[0]}' read access under /fleet/: permission denied" in roleless

    half = one_line(fleetctl(cluster, None, "--username", "fleetctl", "list-units"))
    assert "--username fleetctl needs --password" in half

    with pytest.raises(AuthError):
        EtcdRegistry(cluster.endpoints, PREFIX).snapshot()
    with pytest.raises(PermissionDenied):
        EtcdRegistry(cluster.endpoints, PREFIX, username=NOBODY[0], password=NOBODY[1]).snapshot()


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_each_role_writes_only_where_it_must(
    secured: tuple[EtcdCluster, Path], transport: Literal["grpc", "http"]
) -> None:
    cluster, dir = secured
    record = UnitRecord("sneaky.service", unit_text(), content_hash(unit_text()))
    agent = EtcdRegistry(
        cluster.endpoints, PREFIX, transport=transport, **_kw(login(dir, auth.AGENT_USER))
    )
    admin = EtcdRegistry(
        cluster.endpoints, PREFIX, transport=transport, **_kw(login(dir, auth.ADMIN_USER))
    )
    try:
        # An agent's credentials cannot put a unit into the cluster...
        with pytest.raises(PermissionDenied):
            agent.write_units([record], DesiredState.LAUNCHED, agent.snapshot())
        # ...and fleetctl's cannot pose as a machine or as a unit's owner.
        lease = admin.grant_lease(5)
        with pytest.raises(PermissionDenied):
            admin.register_machine(Machine("f" * 32, "127.0.0.1"), lease)
        # Outside the prefix nothing is allowed to either.
        outside = EtcdRegistry(
            cluster.endpoints, "/other/", transport=transport, **_kw(login(dir, auth.ADMIN_USER))
        )
        with pytest.raises(PermissionDenied):
            outside.snapshot()
        outside.close()
    finally:
        agent.close()
        admin.close()


@pytest.fixture
def agents(secured: tuple[EtcdCluster, Path]) -> Iterator[Harness]:
    cluster, dir = secured
    harness = Harness(
        list(cluster.endpoints),
        PREFIX,
        stagger=0.05,
        agent_login=login(dir, auth.AGENT_USER),
        client_login=login(dir, auth.ADMIN_USER),
    )
    yield harness
    harness.stop_all()


def test_fleet_works_with_its_roles_and_survives_token_expiry(
    secured: tuple[EtcdCluster, Path], agents: Harness, tmp_path: Path
) -> None:
    cluster, dir = secured
    admin, viewer = login(dir, auth.ADMIN_USER), login(dir, auth.VIEWER_USER)
    agents.add("core-01")
    agents.add("core-02")
    agents.wait(lambda s: len(s.machines) == 2)
    for name in ("one", "two"):
        (tmp_path / f"{name}.service").write_text(unit_text(name))

    started = fleetctl(cluster, admin, "start", "--block-attempts", "60", str(tmp_path / "one"))
    assert started.exit_code == 0, started.stderr
    assert "Unit one.service launched on" in started.stdout

    # Idle for longer than a token lives: every party's next request needs a new token, and
    # the agents' watch (opened with the old one) must still see the new unit.
    tokens = {name: node.agent.registry._token for name, node in agents.nodes.items()}
    time.sleep(TOKEN_TTL + 1.5)
    started = fleetctl(cluster, admin, "start", "--block-attempts", "60", str(tmp_path / "two"))
    assert started.exit_code == 0, started.stderr
    assert "Unit two.service launched on" in started.stdout
    # The machine that claimed it had to log in again to do so.
    assert any(node.agent.registry._token != tokens[n] for n, node in agents.nodes.items())
    assert sum(len(units) for units in agents.running().values()) == 2

    # The read-only user lists (lease ages included) but cannot change anything.
    listed = fleetctl(cluster, viewer, "list-units", "--no-legend", "--fields", "unit,active")
    assert listed.exit_code == 0, listed.stderr
    assert listed.stdout.split() == ["one.service", "active", "two.service", "active"]
    machines = fleetctl(cluster, viewer, "list-machines", "--no-legend", "--fields", "renewed")
    assert machines.exit_code == 0, machines.stderr
    assert all(line.endswith("s ago") for line in machines.stdout.splitlines())
    before = agents.snapshot()
    stopped = one_line(fleetctl(cluster, viewer, "stop", "one.service"))
    assert f"denied user '{auth.VIEWER_USER}' write access under /fleet/" in stopped
    assert agents.snapshot().desired == before.desired

    destroyed = fleetctl(cluster, admin, "destroy", "one.service", "two.service")
    assert destroyed.exit_code == 0, destroyed.stderr
    assert agents.running() == {"core-01": set(), "core-02": set()}


def _kw(user: tuple[str, str]) -> dict[str, str]:
    return {"username": user[0], "password": user[1]}


def test_a_new_watch_after_the_token_expired_still_sees_events(
    secured: tuple[EtcdCluster, Path],
) -> None:
    cluster, dir = secured
    agent = EtcdRegistry(cluster.endpoints, PREFIX, **_kw(login(dir, auth.AGENT_USER)))
    admin = EtcdRegistry(cluster.endpoints, PREFIX, **_kw(login(dir, auth.ADMIN_USER)))
    seen: list[str] = []
    try:
        cancel = agent.watch(agent.snapshot().revision + 1, lambda batch: None)
        cancel()
        # etcd checks a new watch against the token its stream was opened with: expired now.
        time.sleep(TOKEN_TTL + 1.5)
        agent.watch(
            agent.snapshot().revision + 1,
            lambda batch: seen.extend(e.key for e in batch) if isinstance(batch, list) else None,
        )
        admin.request_move("watched.service", "0" * 32)
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen == [f"{PREFIX}move/watched.service"]
        admin.clear_move("watched.service")
    finally:
        agent.close()
        admin.close()


def test_an_agent_refused_by_etcd_keeps_retrying_and_never_joins(
    secured: tuple[EtcdCluster, Path],
) -> None:
    cluster, dir = secured
    harness = Harness(
        list(cluster.endpoints),
        PREFIX,
        agent_login=(auth.AGENT_USER, "wrong-password"),
        client_login=login(dir, auth.VIEWER_USER),
    )
    try:
        node = harness.add("refused")
        time.sleep(1.5)
        assert node.thread.is_alive()
        assert node.agent.me not in harness.snapshot().machines
    finally:
        harness.stop_all()


def test_credentials_before_etcd_has_auth_on_are_accepted(
    etcd: EtcdCluster,  # noqa: F811
    etcd_prefix: str,  # noqa: F811
) -> None:
    """Agents can be given their user before `etcdctl auth enable`: they go without a token."""
    registry = EtcdRegistry(etcd.endpoints, etcd_prefix, username="agent", password="pw")
    try:
        registry.request_move("x.service", "0" * 32)
        assert registry.snapshot().moves == {"x.service": "0" * 32}
        registry.clear_move("x.service")
    finally:
        registry.close()


def test_a_large_read_over_http_goes_on_over_grpc_with_the_same_token(
    secured: tuple[EtcdCluster, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gRPC part of a large read (`fleetd.registry.BULK_READ_KEYS`) carries the token the
    JSON gateway's part got: a viewer reads it all, none of it falling back to HTTP."""
    cluster, dir = secured
    admin = EtcdRegistry(cluster.endpoints, PREFIX, **_kw(login(dir, auth.ADMIN_USER)))
    viewer = EtcdRegistry(
        cluster.endpoints, PREFIX, transport="http", **_kw(login(dir, auth.VIEWER_USER))
    )
    names = [f"bulk@{i}.service" for i in range(120)]
    text = unit_text()
    try:
        records = [UnitRecord(n, text, content_hash(text)) for n in names]
        assert admin.write_units(records, None, admin.snapshot())
        pages = bulk_pages(monkeypatch, spared=admin.transport)
        assert set(names) <= set(viewer.snapshot().units)
        assert len(pages) >= 5  # 120 units and their desired states, after the first page
        pages.clear()
        time.sleep(TOKEN_TTL + 1)  # both parts' token expires: the read authenticates again
        assert set(names) <= set(viewer.snapshot().units)
        assert len(pages) >= 5
    finally:
        admin.destroy(names)
        admin.close()
        viewer.close()


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_a_registry_that_outlived_its_token_authenticates_again(
    secured: tuple[EtcdCluster, Path], transport: Literal["grpc", "http"]
) -> None:
    """A long-lived client (an agent; fleetctl waiting for units to start) idle past the
    token's TTL: etcd refuses the expired token, on the request that asks for a new one too
    unless that goes without it."""
    cluster, dir = secured
    viewer = EtcdRegistry(
        cluster.endpoints, PREFIX, transport=transport, **_kw(login(dir, auth.VIEWER_USER))
    )
    try:
        viewer.snapshot()
        time.sleep(TOKEN_TTL + 1)
        viewer.snapshot()
    finally:
        viewer.close()
