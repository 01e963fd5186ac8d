"""The agent's reports to its metrics, driven step by step on the fake registry, fake managers
and fake clock of the safety tests: claims, units by state, D-Bus calls, keep-alives, fencing and
the health verdict along one unit's life and one partition."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from fleetd.agent import Agent
from fleetd.agent.lease import LeaseFile
from fleetd.config import Config
from fleetd.fake_systemd import FakeUnitManager
from fleetd.metrics import InstrumentedUnitManager, PrometheusMetrics
from tests.unit.test_agent_safety import MARGIN, TTL, Cluster, advance_to, unit


def value(metrics: PrometheusMetrics, name: str, **labels: str) -> float:
    text = metrics.exposition().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def add_measured(cluster: Cluster, name: str) -> tuple[Agent, PrometheusMetrics]:
    machine_id = name.encode().hex().ljust(32, "0")[:32]
    metrics = PrometheusMetrics(machine_id, "test", clock=cluster.clock)
    manager = FakeUnitManager()
    agent = Agent(
        Config(machine_id=machine_id, hostname=name, agent_ttl=TTL, claim_stagger=0.0),
        cluster.registry,
        InstrumentedUnitManager(manager, metrics, clock=cluster.clock),
        clock=cluster.clock,
        wall=cluster.clock,
        owns_registry=False,
        lease_file=LeaseFile(cluster.tmp_path / name / "lease.json"),
        guard_argv=["guard", name],
        settle=0.0,
        metrics=metrics,
    )
    cluster.agents[name] = agent
    cluster.managers[name] = manager
    return agent, metrics


def test_agent_reports(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    agent, metrics = add_measured(cluster, "a")
    assert metrics.health() == (False, "not joined the cluster: no registered lease")
    agent.start_up()
    agent.keeper.tick()
    cluster.step("a")
    assert metrics.health() == (True, "")

    cluster.submit({"u.service": unit(), "v.service": unit()})
    cluster.settle()
    assert cluster.running("u.service") == {"a"} and cluster.running("v.service") == {"a"}
    assert value(metrics, "fleetd_claims_total", result="won") == 2
    assert value(metrics, "fleetd_units", state="active") == 2
    assert value(metrics, "fleetd_registry_units", desired="launched") == 2
    # The two starts of one round went to systemd as one batch.
    assert value(metrics, "fleetd_dbus_call_seconds_count", method="start_many") == 1
    assert value(metrics, "fleetd_planning_seconds_count") >= 1
    assert value(metrics, "fleetd_ready") == 1

    agent.keeper.tick()
    assert value(metrics, "fleetd_lease_keepalive_seconds_count") == 1
    deadline = agent.lease().deadline
    cluster.registry.unavailable = True
    agent.keeper.tick()
    assert value(metrics, "fleetd_lease_keepalive_failures_total") == 1
    advance_to(cluster, deadline - MARGIN)
    agent.fencer.tick()
    assert value(metrics, "fleetd_fencing_events_total") == 1
    ready, reason = metrics.health()
    assert not ready and reason.startswith("fenced:")
    assert value(metrics, "fleetd_ready") == 0
    assert value(metrics, "fleetd_dbus_call_seconds_count", method="stop_many") == 1
