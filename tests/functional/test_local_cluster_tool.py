"""The `vagrant/local-cluster` tool itself: bringing a local cluster up, driving its machines
through their life cycle (halt, start, kill, add) and tearing it down without leftovers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pyetcd
import pytest

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "vagrant" / "local-cluster"
CGROUP_TOPS = [Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified")]

pytestmark = [
    pytest.mark.functional,
    pytest.mark.skipif(os.geteuid() != 0, reason="systemd managers in own cgroups need root"),
    pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd-server is not installed"),
]

TWO_MACHINES = """
[[machine]]
name = "alpha"
metadata = { region = "us-east", zone = "us-east-1a" }

[[machine]]
name = "beta"
metadata = { region = "us-west", zone = "us-west-1a" }
"""


def run(
    *args: str | Path, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "FLEET_LOCAL_DIR"}
    proc = subprocess.run(
        [sys.executable, str(TOOL), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"local-cluster {' '.join(map(str, args))} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


@pytest.fixture
def cluster_dir() -> Iterator[Path]:
    # Short on purpose: the managers' bus sockets live under it and unix socket paths are short.
    base = Path(tempfile.mkdtemp(prefix="lc-", dir="/tmp"))
    path = base / "c"
    try:
        yield path
    finally:
        if path.exists():
            run("destroy", "--dir", path, check=False)
        shutil.rmtree(base, ignore_errors=True)


def status(dir: Path) -> dict[str, dict[str, object]]:
    data = json.loads(run("status", "--json", "--dir", dir).stdout)
    return {m["name"]: m for m in data["machines"]}


def machine_keys(dir: Path) -> set[str]:
    endpoint = json.loads(run("status", "--json", "--dir", dir).stdout)["etcd"]["endpoints"][0]
    host, _, port = endpoint.removeprefix("http://").partition(":")
    client = pyetcd.client(host=host, port=int(port))
    try:
        prefix = "/fleet/machine/"
        return {m.key.decode()[len(prefix) :] for _, m in client.get_prefix(prefix, keys_only=True)}
    finally:
        client.close()


def wait_for(predicate: object, timeout: float = 15) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.1)


def cgroups_named(fragment: str) -> list[Path]:
    return [p for top in CGROUP_TOPS if top.is_dir() for p in top.iterdir() if fragment in p.name]


def processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if text.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


# -- errors a user can make ---------------------------------------------------------------------


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_verbs_without_a_cluster_say_so(tmp_path: Path) -> None:
    for verb in (["status"], ["env"], ["halt", "x"], ["start", "x"], ["kill", "x"], ["destroy"]):
        line = one_line_error(run(*verb, "--dir", tmp_path / "none", check=False))
        assert "no cluster" in line
    line = one_line_error(run("ssh", "x", "--dir", tmp_path / "none", "--", "true", check=False))
    assert "no cluster" in line
    assert not (tmp_path / "none").exists()


def test_bad_cluster_files_are_named(tmp_path: Path) -> None:
    cases = {
        "syntax.toml": "[[machine]\nname = 1",
        "empty.toml": "",
        "noname.toml": "[[machine]]\nmetadata = { a = 'b' }\n",
        "twice.toml": "[[machine]]\nname = 'a'\n[[machine]]\nname = 'a'\n",
        "meta.toml": "[[machine]]\nname = 'a'\nmetadata = { a = 1 }\n",
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        line = one_line_error(
            run("up", "--config", tmp_path / name, "--dir", tmp_path / "c", check=False)
        )
        assert name in line
    line = one_line_error(
        run("up", "--config", tmp_path / "missing.toml", "--dir", tmp_path / "c", check=False)
    )
    assert "not found" in line
    assert not (tmp_path / "c").exists()


def test_bad_arguments_get_one_line(tmp_path: Path) -> None:
    one_line_error(run("frobnicate", check=False))
    one_line_error(run("up", "--etcd-members", "2", "--dir", tmp_path, check=False))
    one_line_error(run("status", "--", "x", "--dir", tmp_path, check=False))


# -- a cluster's life ---------------------------------------------------------------------------


def test_life_cycle_of_a_local_cluster(cluster_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "cluster.toml"
    config.write_text(TWO_MACHINES)
    up = run("up", "--config", config, "--dir", cluster_dir, "--agent-ttl", "2")
    assert "export FLEETCTL_ENDPOINT=http://127.0.0.1:" in up.stdout

    machines = status(cluster_dir)
    assert set(machines) == {"alpha", "beta"}
    alpha, beta = machines["alpha"], machines["beta"]
    assert alpha["metadata"] == {"region": "us-east", "zone": "us-east-1a"}
    assert alpha["ip"] != beta["ip"]
    assert str(alpha["ip"]).startswith("127.")
    assert {alpha["fleetd"], alpha["manager"], beta["fleetd"], beta["manager"]} == {"running"}
    assert machine_keys(cluster_dir) == {alpha["machine_id"], beta["machine_id"]}

    text = run("status", "--dir", cluster_dir, "--no-legend").stdout.splitlines()
    assert len(text) == 2 and text[0].startswith("alpha ") and "zone=us-east-1a" in text[0]

    env = run("env", "--dir", cluster_dir).stdout.strip().splitlines()
    # The endpoint comes last (scripts read it there), after the ssh settings.
    assert env[-1].startswith("export FLEETCTL_ENDPOINT=http://127.0.0.1:")
    assert all(line.startswith("export FLEETCTL_") for line in env)

    # ssh reaches that machine's own manager and passes exit codes through.
    show = run("ssh", "alpha", "--dir", cluster_dir, "--", "systemctl", "--user", "show", "-p",
               "SystemState", "--value")  # fmt: skip
    assert show.stdout.strip() in ("running", "degraded")
    run("ssh", "alpha", "--dir", cluster_dir, "--", "systemd-run", "--user", "--unit", "probe",
        "sleep", "600")  # fmt: skip
    active = run("ssh", "alpha", "--dir", cluster_dir, "--", "systemctl", "--user", "is-active",
                 "probe.service")  # fmt: skip
    assert active.stdout.strip() == "active"
    elsewhere = run("ssh", "beta", "--dir", cluster_dir, "--", "systemctl", "--user",
                    "is-active", "probe.service", check=False)  # fmt: skip
    assert elsewhere.returncode != 0
    assert run("ssh", "beta", "--dir", cluster_dir, "--", "sh", "-c", "exit 7",
               check=False).returncode == 7  # fmt: skip

    # up again starts nothing new.
    again = run("up", "--dir", cluster_dir)
    assert "0 fleetd started" in again.stdout

    # halt: fleetd leaves cleanly, the manager stays.
    run("halt", "alpha", "--dir", cluster_dir)
    machines = status(cluster_dir)
    assert machines["alpha"]["fleetd"] == "stopped"
    assert machines["alpha"]["manager"] == "running"
    wait_for(lambda: alpha["machine_id"] not in machine_keys(cluster_dir), timeout=5)

    # start brings it back under the same id.
    run("start", "alpha", "--dir", cluster_dir)
    machines = status(cluster_dir)
    assert machines["alpha"]["fleetd"] == "running"
    assert machines["alpha"]["machine_id"] == alpha["machine_id"]
    assert alpha["machine_id"] in machine_keys(cluster_dir)

    # kill: a power cut takes fleetd, the manager and the units; the key expires with the TTL.
    probe_pids_before = processes_mentioning("sleep\x00600")
    assert probe_pids_before
    fleetd_pid = int(json.loads((cluster_dir / "m" / "beta" / "fleetd.json").read_text())["pid"])
    run("kill", "alpha", "--dir", cluster_dir)
    machines = status(cluster_dir)
    assert machines["alpha"]["fleetd"] == "stopped"
    assert machines["alpha"]["manager"] == "stopped"
    assert machines["beta"]["fleetd"] == "running"
    assert not processes_mentioning("sleep\x00600")
    assert Path(f"/proc/{fleetd_pid}").exists()
    wait_for(lambda: alpha["machine_id"] not in machine_keys(cluster_dir), timeout=10)

    run("start", "alpha", "--dir", cluster_dir)
    machines = status(cluster_dir)
    assert machines["alpha"]["manager"] == "running"
    assert machines["alpha"]["fleetd"] == "running"
    assert alpha["machine_id"] in machine_keys(cluster_dir)

    # add: a third machine joins and is remembered.
    run("add", "gamma", "--metadata", "region=eu,zone=eu-1a", "--dir", cluster_dir)
    machines = status(cluster_dir)
    assert machines["gamma"]["metadata"] == {"region": "eu", "zone": "eu-1a"}
    assert machines["gamma"]["fleetd"] == "running"
    assert machines["gamma"]["ip"] not in (alpha["ip"], beta["ip"])
    assert machines["gamma"]["machine_id"] in machine_keys(cluster_dir)
    line = one_line_error(run("add", "gamma", "--dir", cluster_dir, check=False))
    assert "already exists" in line
    line = one_line_error(run("halt", "delta", "--dir", cluster_dir, check=False))
    assert "delta" in line and "alpha" in line
    line = one_line_error(run("add", "delta", "--metadata", "oops", "--dir", cluster_dir,
                              check=False))  # fmt: skip
    assert "key=value" in line

    # destroy leaves no process, cgroup or directory behind.
    cgroup_hash = _cgroup_fragment(cluster_dir)
    assert cgroups_named(cgroup_hash)
    run("destroy", "--dir", cluster_dir)
    assert not cluster_dir.exists()
    assert not processes_mentioning(str(cluster_dir))
    assert not cgroups_named(cgroup_hash)
    assert not processes_mentioning("sleep\x00600")


def _cgroup_fragment(cluster_dir: Path) -> str:
    """The part of the machines' cgroup names that is unique to this cluster."""
    handle = json.loads((cluster_dir / "m" / "alpha" / "manager.json").read_text())
    name = str(handle["cgroup"])
    return name.removesuffix("-alpha.slice")


def test_three_etcd_members_and_default_dir_from_environment(tmp_path: Path) -> None:
    base = Path(tempfile.mkdtemp(prefix="lc-", dir="/tmp"))
    config = tmp_path / "one.toml"
    config.write_text('[[machine]]\nname = "solo"\n')
    env = {**os.environ, "FLEET_LOCAL_DIR": str(base / "c")}
    try:
        proc = subprocess.run(
            [sys.executable, str(TOOL), "up", "--config", str(config), "--etcd-members", "3",
             "--fast-elections"],
            capture_output=True, text=True, env=env, timeout=120, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        endpoints = proc.stdout.strip().splitlines()[-1].split("=", 1)[1].split(",")
        assert len(endpoints) == 3
        assert (base / "c" / "cluster.json").exists()
    finally:
        subprocess.run(
            [sys.executable, str(TOOL), "destroy"], env=env, capture_output=True, check=False
        )
        shutil.rmtree(base, ignore_errors=True)
    assert not processes_mentioning(str(base))


# -- faults -------------------------------------------------------------------------------------


def alive(pid: int) -> bool:
    """Running or stopped; a zombie waiting for its parent to reap it is dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_fault_verbs(cluster_dir: Path, tmp_path: Path) -> None:
    """partition/heal, pause/resume, etcd-kill/etcd-start and restart each do what they say,
    refuse what makes no sense with one line, and destroy leaves no relay behind."""
    config = tmp_path / "two.toml"
    config.write_text(TWO_MACHINES)
    run("up", "--config", config, "--agent-ttl", "3", "--etcd-members", "3", "--fast-elections",
        "--dir", cluster_dir)  # fmt: skip
    ids = {name: str(m["machine_id"]) for name, m in status(cluster_dir).items()}
    for args, fragment in [
        (("partition", "nope"), "no machine named 'nope'"),
        (("heal", "alpha"), "alpha is not partitioned"),
        (("resume", "alpha"), "fleetd of alpha is not paused"),
        (("etcd-kill", "7"), "no etcd member '7'"),
        (("etcd-start", "0"), "etcd member 0 is already running"),
        (("partition", "alpha", "--mode", "sideways"), "invalid choice"),
    ]:
        assert fragment in one_line_error(run(*args, "--dir", cluster_dir, check=False))

    # partition: alpha's fleetd loses etcd, so its lease expires; heal: it joins again.
    run("partition", "alpha", "--dir", cluster_dir)
    assert status(cluster_dir)["alpha"]["network"] == "partitioned"
    line = one_line_error(run("partition", "alpha", "--dir", cluster_dir, check=False))
    assert "already partitioned" in line
    wait_for(lambda: ids["alpha"] not in machine_keys(cluster_dir), 20)
    assert ids["beta"] in machine_keys(cluster_dir)
    run("heal", "alpha", "--dir", cluster_dir)
    assert status(cluster_dir)["alpha"]["network"] == "connected"
    wait_for(lambda: ids["alpha"] in machine_keys(cluster_dir), 20)

    # pause: the process is stopped (state T) until resume.
    pid = json.loads((cluster_dir / "m" / "beta" / "fleetd.json").read_text())["pid"]
    run("pause", "beta", "--dir", cluster_dir)
    assert status(cluster_dir)["beta"]["fleetd"] == "paused"
    assert Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    assert "already paused" in one_line_error(run("pause", "beta", "--dir", cluster_dir,
                                                  check=False))  # fmt: skip
    run("resume", "beta", "--dir", cluster_dir)
    assert status(cluster_dir)["beta"]["fleetd"] == "running"

    # etcd-kill the leader, then start it again.
    out = run("etcd-kill", "leader", "--dir", cluster_dir).stdout
    member = int(out.split()[2])
    running = json.loads(run("status", "--json", "--dir", cluster_dir).stdout)["etcd"]["running"]
    assert running.count(False) == 1 and running[member] is False
    assert "is not running" in one_line_error(run("etcd-kill", str(member), "--dir", cluster_dir,
                                                  check=False))  # fmt: skip
    run("etcd-start", str(member), "--dir", cluster_dir)
    running = json.loads(run("status", "--json", "--dir", cluster_dir).stdout)["etcd"]["running"]
    assert running == [True, True, True]

    # restart: a new fleetd process, back in the cluster; both ways.
    for extra in ((), ("--kill",)):
        before = json.loads((cluster_dir / "m" / "alpha" / "fleetd.json").read_text())["pid"]
        run("restart", "alpha", *extra, "--dir", cluster_dir)
        after = json.loads((cluster_dir / "m" / "alpha" / "fleetd.json").read_text())["pid"]
        assert after != before
        assert not alive(before)
        assert status(cluster_dir)["alpha"]["fleetd"] == "running"
        wait_for(lambda: ids["alpha"] in machine_keys(cluster_dir), 20)
    run("halt", "alpha", "--dir", cluster_dir)
    line = one_line_error(run("restart", "alpha", "--dir", cluster_dir, check=False))
    assert "fleetd of alpha is not running" in line

    relays = [p for p in processes_mentioning(str(cluster_dir)) if b"proxy.py" in
              Path(f"/proc/{p}/cmdline").read_bytes()]  # fmt: skip
    assert len(relays) == 2
    run("partition", "beta", "--dir", cluster_dir)
    run("destroy", "--dir", cluster_dir)
    assert not processes_mentioning(str(cluster_dir))
