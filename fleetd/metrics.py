"""fleetd's Prometheus metrics and health endpoint (`metrics_address`, off by default).

The agent reports what happens through the small `Metrics` interface below and never touches
prometheus_client itself; with no address configured it gets `NullMetrics`, whose methods do
nothing, so the agent calls the same methods either way. `MetricsServer` serves

    GET /metrics   the Prometheus text format
    GET /health    200 {"ready": true, ...} or 503 {"ready": false, "reason": "..."}

Health: the agent hands over a function that says why it cannot run units now ("" when it can:
joined, lease good, not fenced, not shutting down); on top of that the agent is not ready when its
reconcile loop has stopped turning or its last D-Bus call failed.

D-Bus calls are measured by wrapping the unit manager (`InstrumentedUnitManager`), so the agent
needs no timing code around them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from fleetd.errors import ConfigError, SystemdError
from fleetd.model import SystemdState
from fleetd.ports import UnitManager

if TYPE_CHECKING:
    from http.server import BaseHTTPRequestHandler

    from prometheus_client import Gauge

Clock = Callable[[], float]

# Seconds: from a fast local D-Bus call to a keep-alive that barely beat the request timeout.
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# A reconcile loop that has not turned for this long is stuck (it wakes at least once a second).
STALL_AFTER = 30.0


class Metrics:
    """What the agent reports. This base class records nothing (`NullMetrics`)."""

    def health_source(self, why_not: Callable[[], str]) -> None:
        """The agent's own verdict: "" when it may run units, else why not."""

    def fenced(self) -> None:
        """The agent began stopping its units because its lease could not be renewed."""

    def loop_turned(self) -> None:
        """One round of the reconcile loop finished."""

    def planned(self, seconds: float) -> None:
        """One planning pass took `seconds`."""

    def claim(self, won: bool) -> None:
        """A claim transaction was won or lost."""

    def keepalive(self, seconds: float, ok: bool) -> None:
        """One lease keep-alive call, successful or not, took `seconds`."""

    def units(self, local: Mapping[str, int], desired: Mapping[str, int]) -> None:
        """Units this machine runs by systemd ActiveState, and the cluster's units by desired
        state."""

    def dbus_call(self, method: str, seconds: float, ok: bool) -> None:
        """One call of the unit manager over D-Bus."""

    def health(self) -> tuple[bool, str]:
        """(ready, why not)."""
        return True, ""


NullMetrics = Metrics


class PrometheusMetrics(Metrics):
    """Metrics kept in a registry of their own (several agents may share a process)."""

    def __init__(self, machine_id: str, version: str, clock: Clock = time.monotonic) -> None:
        # Imported here: prometheus_client and its HTTP modules take about 12 MB of a fleetd
        # that serves no metrics.
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.clock = clock
        self._lock = threading.Lock()
        self._why_not: Callable[[], str] = lambda: "the agent has not started"
        self._last_loop: float | None = None
        self._dbus_error = ""
        self._labels: dict[int, set[str]] = {}
        r = self.registry
        info = Gauge("fleetd_info", "This agent.", ["machine_id", "version"], registry=r)
        info.labels(machine_id, version).set(1)
        self._ready = Gauge("fleetd_ready", "1 when /health says ready.", registry=r)
        self._local = Gauge(
            "fleetd_units", "Units this machine runs, by systemd ActiveState.", ["state"],
            registry=r,
        )  # fmt: skip
        self._desired = Gauge(
            "fleetd_registry_units", "Units in the registry, by desired state.", ["desired"],
            registry=r,
        )  # fmt: skip
        self._claims = Counter(
            "fleetd_claims", "Claim transactions, by result.", ["result"], registry=r
        )
        for result in ("won", "lost"):
            self._claims.labels(result)
        self._planning = Histogram(
            "fleetd_planning_seconds", "Time of one planning pass.", registry=r,
            buckets=_LATENCY_BUCKETS,
        )  # fmt: skip
        self._keepalive = Histogram(
            "fleetd_lease_keepalive_seconds", "Latency of lease keep-alive calls.", registry=r,
            buckets=_LATENCY_BUCKETS,
        )  # fmt: skip
        self._keepalive_failures = Counter(
            "fleetd_lease_keepalive_failures", "Lease keep-alive calls that failed.", registry=r
        )
        self._fencing = Counter(
            "fleetd_fencing_events", "Times the agent fenced itself (stopped every unit).",
            registry=r,
        )  # fmt: skip
        self._dbus = Histogram(
            "fleetd_dbus_call_seconds", "Latency of systemd D-Bus calls, by method.", ["method"],
            registry=r, buckets=_LATENCY_BUCKETS,
        )  # fmt: skip
        self._dbus_errors = Counter(
            "fleetd_dbus_errors", "systemd D-Bus calls that failed, by method.", ["method"],
            registry=r,
        )  # fmt: skip
        self._update_ready()

    # -- reports

    def health_source(self, why_not: Callable[[], str]) -> None:
        with self._lock:
            self._why_not = why_not
        self._update_ready()

    def fenced(self) -> None:
        self._fencing.inc()

    def loop_turned(self) -> None:
        with self._lock:
            self._last_loop = self.clock()
        self._update_ready()

    def planned(self, seconds: float) -> None:
        self._planning.observe(seconds)

    def claim(self, won: bool) -> None:
        self._claims.labels("won" if won else "lost").inc()

    def keepalive(self, seconds: float, ok: bool) -> None:
        self._keepalive.observe(seconds)
        if not ok:
            self._keepalive_failures.inc()

    def units(self, local: Mapping[str, int], desired: Mapping[str, int]) -> None:
        self._set_all(self._local, local)
        self._set_all(self._desired, desired)

    def _set_all(self, gauge: Gauge, values: Mapping[str, int]) -> None:
        # A state seen before but absent now reads 0, rather than keeping its last count.
        with self._lock:
            labels = self._labels.setdefault(id(gauge), set())
            labels.update(values)
            current = sorted(labels)
        for label in current:
            gauge.labels(label).set(values.get(label, 0))

    def dbus_call(self, method: str, seconds: float, ok: bool) -> None:
        self._dbus.labels(method).observe(seconds)
        if not ok:
            self._dbus_errors.labels(method).inc()
        with self._lock:
            self._dbus_error = "" if ok else f"the last systemd call ({method}) failed"
        self._update_ready()

    # -- reading

    def health(self) -> tuple[bool, str]:
        with self._lock:
            why_not = self._why_not
        reason = why_not()
        if reason:
            return False, reason
        with self._lock:
            if self._last_loop is not None:
                idle = self.clock() - self._last_loop
                if idle > STALL_AFTER:
                    return False, f"the reconcile loop has not turned for {idle:.0f}s"
            if self._dbus_error:
                return False, self._dbus_error
        return True, ""

    def _update_ready(self) -> None:
        self._ready.set(1 if self.health()[0] else 0)

    def exposition(self) -> bytes:
        self._update_ready()  # a stalled loop reports nothing: look at the clock now
        from prometheus_client import generate_latest

        return bytes(generate_latest(self.registry))


def count_by(values: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


# ---------------------------------------------------------------------------------- D-Bus


class InstrumentedUnitManager:
    """A UnitManager that reports each call's latency and failure to `metrics`."""

    def __init__(self, inner: UnitManager, metrics: Metrics, clock: Clock = time.monotonic):
        self.inner = inner
        self.metrics = metrics
        self.clock = clock

    @contextmanager
    def _measure(self, method: str) -> Iterator[None]:
        start = self.clock()
        try:
            yield
        except SystemdError:
            self.metrics.dbus_call(method, self.clock() - start, ok=False)
            raise
        self.metrics.dbus_call(method, self.clock() - start, ok=True)

    def load(self, name: str, text: str) -> None:
        with self._measure("load"):
            self.inner.load(name, text)

    def load_many(self, units: Mapping[str, str]) -> dict[str, Exception]:
        # A batch's latency is not a single call's: its own label.
        with self._measure("load_many"):
            return self.inner.load_many(units)

    def reload(self) -> None:
        with self._measure("reload"):
            self.inner.reload()

    def start(self, name: str) -> None:
        with self._measure("start"):
            self.inner.start(name)

    def start_many(self, names: Sequence[str]) -> dict[str, Exception]:
        with self._measure("start_many"):
            return self.inner.start_many(names)

    def stop(self, name: str) -> None:
        with self._measure("stop"):
            self.inner.stop(name)

    def stop_many(self, names: Sequence[str]) -> dict[str, Exception]:
        with self._measure("stop_many"):
            return self.inner.stop_many(names)

    def unload_many(self, names: Sequence[str]) -> dict[str, Exception]:
        with self._measure("unload_many"):
            return self.inner.unload_many(names)

    def unload(self, name: str) -> None:
        with self._measure("unload"):
            self.inner.unload(name)

    def kill(self, name: str) -> None:
        with self._measure("kill"):
            self.inner.kill(name)

    def loaded_units(self) -> dict[str, str]:
        with self._measure("loaded_units"):
            return self.inner.loaded_units()

    def states(self, names: Iterable[str], patient: bool = False) -> dict[str, SystemdState]:
        with self._measure("states"):
            return self.inner.states(names, patient)

    def main_pids(self, names: Iterable[str]) -> dict[str, int]:
        with self._measure("main_pids"):
            return self.inner.main_pids(names)

    def start_guard(self, name: str, argv: Sequence[str]) -> None:
        with self._measure("start_guard"):
            self.inner.start_guard(name, argv)


# ---------------------------------------------------------------------------------- server


class MetricsServer:
    """The HTTP endpoint, serving from a daemon thread until `close()`."""

    def __init__(self, address: str, metrics: PrometheusMetrics) -> None:
        # The config validated the shape (HOST:PORT, IPv6 in brackets).
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        from http.server import ThreadingHTTPServer

        handler = _handler(metrics)
        try:
            self._server = ThreadingHTTPServer((host, int(port)), handler)
        except OSError as exc:
            raise ConfigError(
                f"metrics_address {address}: cannot listen there ({exc.strerror}); "
                "pick a free address or leave metrics_address unset"
            ) from None
        self._server.daemon_threads = True
        self.address = f"{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(metrics: PrometheusMetrics) -> type[BaseHTTPRequestHandler]:
    from http.server import BaseHTTPRequestHandler

    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, metrics.exposition())
            elif path in ("/health", "/healthz"):
                ready, reason = metrics.health()
                body = json.dumps({"ready": ready, "reason": reason}) + "\n"
                self._send(200 if ready else 503, "application/json", body.encode())
            else:
                self._send(404, "text/plain", b"not found: try /metrics or /health\n")

        def _send(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            # A scrape every few seconds would drown the agent's own log.
            pass

    return Handler
