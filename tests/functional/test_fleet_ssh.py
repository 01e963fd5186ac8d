"""The operator's toolbox on a local cluster, over real OpenSSH to each machine's real sshd:
`fleetctl ssh`, `journal`, the remote half of `status`, host key checking, `--tunnel`; and
fleetd's Prometheus and health endpoints.

Ports of fleet's TestUnitSSHActions, TestKnownHostsVerification and
TestTunnelScheduleBatchUnits are the tests of the same names.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.functional.conftest import (
    AGENT_TTL,
    SETTLE,
    UNITS,
    Cluster,
    one_line_error,
    registry_picture,
    wait_until,
)

pytestmark = pytest.mark.functional


def start_hello(fleet: Cluster) -> str:
    """hello.service running; the name of its machine."""
    fleet.fleetctl("start", UNITS / "hello.service")
    return fleet.wait_running(["hello.service"])["hello.service"][0]


def test_unit_ssh_actions(fleet: Cluster) -> None:
    """fleet's TestUnitSSHActions: ssh to a unit's machine, its status and its journal."""
    machine = start_hello(fleet)
    out = fleet.fleetctl("--strict-host-key-checking=false", "ssh", "hello.service", "echo", "foo")
    assert out.stdout == "foo\n"

    status = fleet.fleetctl("--strict-host-key-checking=false", "status", "hello.service").stdout
    registry_part, _, machine_part = status.partition("\n\n")
    assert f"({machine})" in registry_part and "Active: active" in registry_part
    # The machine's own systemctl status, with the unit's file and its last journal lines.
    assert f"Loaded: loaded ({fleet.dir}/m/{machine}/run/systemd/user/hello.service" in machine_part
    assert "Active: active (running)" in machine_part
    assert "Hello from" in machine_part

    journal = wait_until(
        lambda: (
            (out := fleet.fleetctl("journal", "hello.service").stdout).count("Hello from") >= 2
            and out
        ),
        what="two journal lines of hello.service",
    )
    assert "unit hello.service" in journal


def test_ssh_into_a_machine(fleet: Cluster) -> None:
    """By name, id or id prefix; the session runs inside that machine, on its manager."""
    machine = start_hello(fleet)
    machine_id = fleet.ids[machine]
    for lookup in (machine, machine_id, machine_id[:6]):
        out = fleet.fleetctl(
            "ssh", lookup, "--", "systemctl", "--user", "is-active", "hello.service"
        )
        assert out.stdout == "active\n", lookup
    other = next(name for name in fleet.ids if name != machine)
    inactive = fleet.fleetctl(
        "ssh", other, "--", "systemctl", "--user", "is-active", "hello.service", check=False
    )
    assert (inactive.returncode, inactive.stdout) == (3, "inactive\n")
    # The machine's mounts: its own journal tmpfs and its manager's runtime dir.
    env = fleet.fleetctl("ssh", other, "--", "findmnt -n -o FSTYPE /run/log; echo $XDG_RUNTIME_DIR")
    fstype, runtime = env.stdout.split()
    assert fstype == "tmpfs" and runtime == str(fleet.dir / "m" / other / "run")
    # The remote command's exit status and stderr come through unchanged.
    failed = fleet.fleetctl("ssh", other, "--", "echo oops >&2; exit 7", check=False)
    assert (failed.returncode, failed.stderr) == (7, "oops\n")


def test_journal_lines_and_follow(fleet: Cluster) -> None:
    machine = start_hello(fleet)
    wait_until(
        lambda: fleet.fleetctl("journal", "-n", "3", "hello").stdout.count("\n") == 3,
        what="three journal lines",
    )
    lines = fleet.fleetctl("journal", "--lines", "3", "hello").stdout.splitlines()
    assert len(lines) == 3 and all("Hello from" in line for line in lines)

    # -f keeps printing new lines; read for a bounded time, then stop it as a user would.
    follow = subprocess.Popen(
        ["fleetctl", "journal", "-f", "-n", "1", "hello.service"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=fleet.env,
        # A suite started in the background by a shell without job control inherits SIGINT
        # ignored, and so would fleetctl (Python then installs no KeyboardInterrupt handler).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen: list[str] = []
    assert follow.stdout is not None
    try:
        deadline = time.monotonic() + SETTLE
        while len(seen) < 3 and time.monotonic() < deadline:
            ready, _, _ = select.select([follow.stdout], [], [], 1.0)
            if ready:
                seen.append(follow.stdout.readline())
        assert len(seen) >= 3, (seen, follow.poll())
        assert len(set(seen)) == len(seen)  # new lines, each once
        assert follow.poll() is None  # still following
    finally:
        follow.send_signal(signal.SIGINT)
        follow.wait(timeout=10)
    assert machine in fleet.ids


def test_ssh_and_journal_refusals(fleet: Cluster, unit_dir: Path) -> None:
    """Bad input: one line each, exit 1, and the registry is untouched."""
    start_hello(fleet)
    fleet.fleetctl("submit", UNITS / "db.service")
    before = registry_picture(fleet.snapshot())
    cases = {
        "unknown machine": (["ssh", "nosuch", "true"], "no machine or unit 'nosuch'"),
        "unit not running": (["ssh", "db.service", "true"], "db.service is not running"),
        "journal not running": (["journal", "db"], "db.service is not running"),
        "journal unknown": (["journal", "nope.service"], "nope.service not found"),
        "both options": (["ssh", "--machine", "core-01", "--unit", "x", "true"], "not both"),
        "no target": (["ssh"], "name a machine or a unit"),
        "bad strict value": (
            ["--strict-host-key-checking=maybe", "ssh", "core-01", "true"],
            "must be true or false",
        ),
        "wrong user": (
            ["--ssh-username", "nobody", "ssh", "hello.service", "true"],
            "ssh to nobody@",
        ),
        "wrong port": (["ssh", "--ssh-port", "1", "core-01", "true"], "Connection refused"),
        "status over ssh fails": (
            ["--ssh-username", "nobody", "status", "hello.service"],
            "--registry-only",
        ),
    }
    for case, (args, fragment) in cases.items():
        line = one_line_error(fleet.fleetctl(*args, check=False))
        assert line.startswith("fleetctl: ") and fragment in line, (case, line)
    assert registry_picture(fleet.snapshot()) == before
    registry_only = fleet.fleetctl("--ssh-username", "nobody", "status", "--registry-only", "hello")
    assert "Active: active" in registry_only.stdout and registry_only.stderr == ""


def test_known_hosts_verification(fleet: Cluster, tmp_path: Path) -> None:
    """fleet's TestKnownHostsVerification: a new host is accepted on "yes" and remembered; a
    replaced machine (new host key) is refused; with the old key removed it is accepted again."""
    known = tmp_path / "known-hosts"
    known.write_text("")
    args = ["--strict-host-key-checking=true", f"--known-hosts-file={known}"]

    def ssh(answer: str | None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["fleetctl", *args, "ssh", fleet.ids["core-02"], "uptime"],
            input=answer,
            capture_output=True,
            text=True,
            env=fleet.env,
            timeout=60,
            check=False,
        )

    first = ssh("yes\n")
    assert first.returncode == 0, first.stderr
    assert "Are you sure you want to continue connecting (yes/no)?" in first.stderr
    assert "load average" in first.stdout
    assert known.read_text().count("\n") == 1
    again = ssh(None)  # known now: no question asked
    assert again.returncode == 0 and "Are you sure" not in again.stderr
    refused = ssh("no\n")  # not asked, so the "no" changes nothing
    assert refused.returncode == 0

    # Replace the machine: same address, a new host key.
    fleet.kill("core-02")
    for key in (fleet.dir / "m" / "core-02" / "ssh").glob("ssh_host_*"):
        key.unlink()
    fleet.start("core-02")
    fleet.refresh()
    changed = ssh("yes\n")
    line = one_line_error(changed)
    assert "host key of" in line and "differs from the one in" in line
    assert "ssh-keygen -R" in line

    known.write_text("")
    declined = ssh("no\n")
    assert declined.returncode == 1 and "Traceback" not in declined.stderr
    last = declined.stderr.splitlines()[-1]
    assert last.endswith(f"not accepted: answer yes, or add it to {known}"), declined.stderr
    assert known.read_text() == ""
    accepted = ssh("yes\n")
    assert accepted.returncode == 0, accepted.stderr


def test_tunnel_schedule_batch_units(fleet: Cluster, tmp_path: Path) -> None:
    """fleet's TestTunnelScheduleBatchUnits: start one unit, then a batch of ten, with etcd and
    the machines reached through an ssh tunnel to one machine."""
    known = tmp_path / "known-hosts"
    known.write_text("")
    tunnel = f"127.0.0.10:{fleet.env['FLEETCTL_SSH_PORT']}"
    args = [f"--tunnel={tunnel}", "--strict-host-key-checking=true", f"--known-hosts-file={known}"]

    def fleetctl(*more: str, answer: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["fleetctl", *args, *more],
            input=answer,
            capture_output=True,
            text=True,
            env={**fleet.env, "FLEETCTL_ENDPOINT": fleet.endpoint},
            timeout=120,
            check=False,
        )

    one = fleetctl("start", str(UNITS / "hello.service"), answer="yes\n")
    assert one.returncode == 0 and "Error" not in one.stderr, one.stderr
    batch = fleetctl("start", *(str(UNITS / f"hello@{i}.service") for i in range(1, 11)))
    assert batch.returncode == 0 and "Error" not in batch.stderr, batch.stderr
    names = ["hello.service", *(f"hello@{i}.service" for i in range(1, 11))]
    assert len(fleet.wait_running(names)) == 11
    # Through the tunnel host to another machine: its key is asked for, then remembered.
    far = fleet.where()["hello@1.service"]
    out = fleetctl(
        "ssh", "hello@1.service", "--", "hostname; echo $XDG_RUNTIME_DIR", answer="yes\n"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == str(fleet.dir / "m" / far / "run")
    # A tunnel host that does not answer: one line, nothing written.
    before = registry_picture(fleet.snapshot())
    args[0] = "--tunnel=127.0.0.10:1"
    assert "Connection refused" in one_line_error(fleetctl("stop", "hello.service"))
    assert registry_picture(fleet.snapshot()) == before


# ------------------------------------------------------------------------------ metrics


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metrics_addresses(fleet: Cluster) -> dict[str, str]:
    return {name: str(m["metrics"]) for name, m in fleet.status().items()}


def scrape(address: str) -> Samples:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def health(address: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://{address}/health", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def total(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and want <= set(lbl))


def test_metrics_match_the_cluster(fleet: Cluster) -> None:
    fleet.fleetctl("start", UNITS / "hello.service", UNITS / "hello@1.service")
    fleet.fleetctl("submit", UNITS / "db.service")
    running = fleet.wait_running(["hello.service", "hello@1.service"])
    addresses = metrics_addresses(fleet)
    assert set(addresses) == set(fleet.ids)

    def settled() -> dict[str, Samples] | None:
        scraped = {name: scrape(address) for name, address in addresses.items()}
        active = {name: total(s, "fleetd_units", state="active") for name, s in scraped.items()}
        expected = {name: 0.0 for name in addresses}
        for machines in running.values():
            expected[machines[0]] += 1
        return scraped if active == expected else None

    scraped = wait_until(settled, what="fleetd_units{state=active} matching the running units")
    for name, samples in scraped.items():
        # Every agent sees the same registry: two launched, one inactive (submitted only).
        assert total(samples, "fleetd_registry_units", desired="launched") == 2, name
        assert total(samples, "fleetd_registry_units", desired="inactive") == 1, name
        assert total(samples, "fleetd_info", machine_id=fleet.ids[name]) == 1
        assert total(samples, "fleetd_planning_seconds_count") > 0
        assert total(samples, "fleetd_lease_keepalive_seconds_count") > 0
        assert total(samples, "fleetd_fencing_events_total") == 0
        assert total(samples, "fleetd_ready") == 1
    won = sum(total(s, "fleetd_claims_total", result="won") for s in scraped.values())
    assert won >= 2  # each running unit was claimed once (earlier tests' claims add up too)
    for machines in running.values():
        on = scraped[machines[0]]
        starts = sum(
            total(on, "fleetd_dbus_call_seconds_count", method=method)
            for method in ("start", "start_many")
        )
        assert starts >= 1
    for address in addresses.values():
        assert health(address) == (200, {"ready": True, "reason": ""})


def test_health_says_why_not_ready(fleet: Cluster) -> None:
    """With etcd frozen, every agent fences itself: /health says so (503 and the reason), the
    fencing counter moves; once etcd answers again the agents are ready again."""
    addresses = metrics_addresses(fleet)
    etcd_json = json.loads((fleet.dir / "etcd" / "etcd.json").read_text())
    pids = [int(m["pid"]) for m in etcd_json["members"]]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:

        def all_fenced() -> bool:
            return all(
                health(a)[0] == 503 and "fenced" in str(health(a)[1]["reason"])
                for a in addresses.values()
            )

        wait_until(all_fenced, AGENT_TTL + SETTLE, "every agent fenced and not ready")
        for address in addresses.values():
            assert total(scrape(address), "fleetd_fencing_events_total") >= 1
            assert total(scrape(address), "fleetd_ready") == 0
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    wait_until(
        lambda: all(health(a)[0] == 200 for a in addresses.values()),
        AGENT_TTL + SETTLE,
        "every agent ready again",
    )
