"""pytest fixtures that give tests a real etcd: one shared member, or a fresh three-member cluster.

Use from a conftest with ``pytest_plugins = ["tests.support.etcd_fixtures"]`` or by importing the
fixtures. The one-member server is shared by a whole session (per xdist worker), so every test
gets its own key prefix instead of its own server.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

_VAGRANT_DIR = Path(__file__).resolve().parents[2] / "vagrant"
if str(_VAGRANT_DIR) not in sys.path:
    sys.path.insert(0, str(_VAGRANT_DIR))

from localcluster.etcd import EtcdCluster  # noqa: E402


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One etcd member for the whole session; tests isolate themselves with `etcd_prefix`."""
    cluster = EtcdCluster.start(tmp_path_factory.mktemp("etcd"), members=1)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def etcd_prefix(etcd: EtcdCluster) -> str:
    """A key prefix no other test uses, with leading and trailing slash."""
    return f"/test-{uuid.uuid4().hex[:12]}/"


@pytest.fixture
def etcd3(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A fresh three-member cluster with fast elections, for tests that kill members."""
    cluster = EtcdCluster.start(tmp_path / "etcd3", members=3, fast=True)
    try:
        yield cluster
    finally:
        cluster.stop()
