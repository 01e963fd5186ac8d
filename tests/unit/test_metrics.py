"""fleetd's metrics and health: what each report changes in the Prometheus exposition, how
health follows the agent's life, the D-Bus wrapper, and the HTTP endpoint on a real socket."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleetd.config import load_config
from fleetd.errors import ConfigError, SystemdError
from fleetd.fake_systemd import FakeUnitManager
from fleetd.metrics import (
    STALL_AFTER,
    InstrumentedUnitManager,
    MetricsServer,
    NullMetrics,
    PrometheusMetrics,
)
from fleetd.model import SystemdState

MACHINE = "a" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def samples(metrics: PrometheusMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition text, keyed by name and sorted labels."""
    text = metrics.exposition().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: PrometheusMetrics, name: str, **labels: str) -> float:
    return samples(metrics).get((name, tuple(sorted(labels.items()))), float("nan"))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def metrics(clock: Clock) -> PrometheusMetrics:
    return PrometheusMetrics(MACHINE, "9.9.9", clock=clock)


def test_counters_and_histograms(metrics: PrometheusMetrics) -> None:
    assert value(metrics, "fleetd_info", machine_id=MACHINE, version="9.9.9") == 1
    assert value(metrics, "fleetd_claims_total", result="won") == 0
    for won in (True, True, False):
        metrics.claim(won)
    metrics.planned(0.02)
    metrics.planned(0.2)
    metrics.keepalive(0.004, ok=True)
    metrics.keepalive(3.0, ok=False)
    metrics.fenced()
    assert value(metrics, "fleetd_claims_total", result="won") == 2
    assert value(metrics, "fleetd_claims_total", result="lost") == 1
    assert value(metrics, "fleetd_planning_seconds_count") == 2
    assert value(metrics, "fleetd_planning_seconds_sum") == pytest.approx(0.22)
    assert value(metrics, "fleetd_planning_seconds_bucket", le="0.025") == 1
    assert value(metrics, "fleetd_lease_keepalive_seconds_count") == 2
    assert value(metrics, "fleetd_lease_keepalive_seconds_bucket", le="0.005") == 1
    assert value(metrics, "fleetd_lease_keepalive_failures_total") == 1
    assert value(metrics, "fleetd_fencing_events_total") == 1


def test_units_by_state_forget_nothing_they_counted(metrics: PrometheusMetrics) -> None:
    metrics.units({"active": 2, "failed": 1}, {"launched": 3, "loaded": 1})
    assert value(metrics, "fleetd_units", state="active") == 2
    assert value(metrics, "fleetd_units", state="failed") == 1
    assert value(metrics, "fleetd_registry_units", desired="launched") == 3
    metrics.units({"active": 1}, {"launched": 1})
    # A state that vanished reads 0, not its last count.
    assert value(metrics, "fleetd_units", state="failed") == 0
    assert value(metrics, "fleetd_units", state="active") == 1
    assert value(metrics, "fleetd_registry_units", desired="loaded") == 0


def test_health_follows_the_agent(metrics: PrometheusMetrics, clock: Clock) -> None:
    assert metrics.health() == (False, "the agent has not started")
    assert value(metrics, "fleetd_ready") == 0
    verdict = ["not joined the cluster yet"]
    metrics.health_source(lambda: verdict[0])
    assert metrics.health() == (False, "not joined the cluster yet")
    verdict[0] = ""
    metrics.loop_turned()
    assert metrics.health() == (True, "")
    assert value(metrics, "fleetd_ready") == 1

    verdict[0] = "fenced: the lease could not be renewed"
    assert metrics.health() == (False, "fenced: the lease could not be renewed")
    assert value(metrics, "fleetd_ready") == 0  # the exposition asks the agent each time
    verdict[0] = ""
    assert metrics.health()[0]

    metrics.dbus_call("start", 0.01, ok=False)
    assert metrics.health() == (False, "the last systemd call (start) failed")
    metrics.dbus_call("states", 0.01, ok=True)
    assert metrics.health()[0]

    clock.now += STALL_AFTER + 1
    ready, reason = metrics.health()
    assert not ready and "reconcile loop has not turned" in reason
    assert value(metrics, "fleetd_ready") == 0  # the exposition looks at the clock itself
    metrics.loop_turned()
    assert metrics.health()[0]

    verdict[0] = "shutting down"
    assert metrics.health() == (False, "shutting down")


def test_null_metrics_accept_every_report() -> None:
    null = NullMetrics()
    null.health_source(lambda: "never asked")
    null.claim(True)
    null.dbus_call("start", 0.1, ok=False)
    null.units({"active": 1}, {})
    assert null.health() == (True, "")


class BrokenStart(FakeUnitManager):
    def start(self, name: str) -> None:
        raise SystemdError(f"start {name}: refused")


def test_unit_manager_calls_are_measured(metrics: PrometheusMetrics, clock: Clock) -> None:
    inner = BrokenStart()
    manager = InstrumentedUnitManager(inner, metrics, clock=clock)
    text = "[Service]\nExecStart=/bin/sleep 100\n"
    manager.load("a.service", text)
    manager.reload()
    with pytest.raises(SystemdError):
        manager.start("a.service")
    states: dict[str, SystemdState] = manager.states(["a.service"])
    assert states["a.service"].load == "loaded"
    assert manager.loaded_units() == inner.loaded_units()
    assert value(metrics, "fleetd_dbus_call_seconds_count", method="load") == 1
    assert value(metrics, "fleetd_dbus_call_seconds_count", method="start") == 1
    assert value(metrics, "fleetd_dbus_errors_total", method="start") == 1
    assert value(metrics, "fleetd_dbus_errors_total", method="load") != 1


@pytest.fixture
def server(metrics: PrometheusMetrics) -> Iterator[MetricsServer]:
    served = MetricsServer("127.0.0.1:0", metrics)
    yield served
    served.close()


def get(server: MetricsServer, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://{server.address}{path}", timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_http_endpoint(server: MetricsServer, metrics: PrometheusMetrics) -> None:
    metrics.claim(True)
    code, kind, body = get(server, "/metrics")
    assert code == 200 and kind.startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(body)}
    assert {"fleetd_claims", "fleetd_dbus_call_seconds", "fleetd_ready"} <= names

    code, kind, body = get(server, "/health")
    assert (code, kind) == (503, "application/json")
    assert json.loads(body) == {"ready": False, "reason": "the agent has not started"}
    metrics.health_source(lambda: "")
    code, _, body = get(server, "/health")
    assert code == 200 and json.loads(body) == {"ready": True, "reason": ""}

    assert get(server, "/nothing")[0] == 404


def test_address_in_use_is_a_config_error(metrics: PrometheusMetrics) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"metrics_address 127.0.0.1:{port}: cannot listen"):
            MetricsServer(f"127.0.0.1:{port}", metrics)


@pytest.mark.parametrize("bad", ["9100", "host:", ":9100", "host:http", "h:99999"])
def test_bad_metrics_address(bad: str) -> None:
    with pytest.raises(ConfigError, match="metrics_address"):
        load_config(None, {"FLEET_METRICS_ADDRESS": bad, "FLEET_MACHINE_ID": MACHINE}, {})


def test_metrics_off_by_default() -> None:
    config = load_config(None, {"FLEET_MACHINE_ID": MACHINE}, {})
    assert config.metrics_address == ""
