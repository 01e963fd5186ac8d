"""The container part of a unit's published state: how it travels through the registry (encode,
then the snapshot's parser), and how the adapter's probe finds it from podman's cidfile with a
stand-in `podman` executable (no container runtime needed; the probe's worker thread is waited
for with `drain`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fleetd.keys import KeyLayout
from fleetd.model import Container, PublishedState
from fleetd.podman import PodmanProbe
from fleetd.snapshot import Snapshot, encode_state

M = "2f9e13a1" + "0" * 24
CID = "5210e58a269e" + "f" * 52


def published(container: Container | None) -> PublishedState:
    return PublishedState(M, "loaded", "active", "running", "abc", 1000.0, container=container)


def parsed(value: str) -> PublishedState | None:
    layout = KeyLayout("/fleet/")
    snap = Snapshot()
    snap.apply(layout, layout.state("web.service", M), value.encode(), 7)
    return snap.states.get("web.service", {}).get(M)


@pytest.mark.parametrize("container", [None, Container(CID, "localhost/fleet-demo:latest")])
def test_published_state_round_trips(container: Container | None) -> None:
    assert parsed(encode_state(published(container))) == published(container)


@pytest.mark.parametrize(
    "extra",
    [{}, {"container": None}, {"container": "oops"}, {"container": {"image": "x"}}],
    ids=["older agent", "null", "not an object", "no id"],
)
def test_a_state_without_a_usable_container_reads_as_none(extra: dict[str, object]) -> None:
    data = {"load": "loaded", "active": "active", "sub": "running", "hash": "abc", "since": 1000.0}
    assert parsed(json.dumps({**data, **extra})) == published(None)


@pytest.fixture
def fake_podman(tmp_path: Path) -> Path:
    """A `podman` that logs its arguments and knows one container."""
    script = tmp_path / "podman"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {tmp_path}/calls\n'
        f'[ "$5" = "{CID}" ] || exit 125\n'
        "echo localhost/fleet-demo:latest\n"
    )
    script.chmod(0o755)
    return script


def calls(tmp_path: Path) -> list[str]:
    path = tmp_path / "calls"
    return path.read_text().splitlines() if path.exists() else []


def test_probe_reads_the_cidfile_and_asks_podman_once(tmp_path: Path, fake_podman: Path) -> None:
    probe = PodmanProbe(tmp_path, podman=str(fake_podman))
    assert probe.container("web.service") is None  # no cidfile: not a container unit
    (tmp_path / "web.service.ctr-id").write_text(CID + "\n")
    # The id at once; the image once podman has answered, off the caller's thread.
    assert probe.container("web.service") == Container(CID, "")
    probe.drain(timeout=10)
    expected = Container(CID, "localhost/fleet-demo:latest")
    assert probe.container("web.service") == expected
    assert probe.container("web.service") == expected
    assert calls(tmp_path) == [f"container inspect --format {{{{.ImageName}}}} {CID}"]
    probe.close()


def test_probe_asks_again_when_podman_did_not_answer(tmp_path: Path, fake_podman: Path) -> None:
    probe = PodmanProbe(tmp_path, podman=str(fake_podman))
    (tmp_path / "old.service.ctr-id").write_text("deadbeef")
    for _ in range(2):
        assert probe.container("old.service") == Container("deadbeef", "")
        probe.drain(timeout=10)
    assert len(calls(tmp_path)) == 2
    (tmp_path / "empty.service.ctr-id").write_text("")
    assert probe.container("empty.service") is None
    probe.close()


def test_probe_without_podman_stops_asking(tmp_path: Path) -> None:
    probe = PodmanProbe(tmp_path, podman=os.fspath(tmp_path / "no-such-podman"))
    (tmp_path / "web.service.ctr-id").write_text(CID)
    assert probe.container("web.service") == Container(CID, "")
    probe.drain(timeout=10)
    assert probe.container("web.service") == Container(CID, "")
    probe.drain(timeout=10)
    assert probe._missing
    probe.close()


def test_probe_finds_the_containers_of_many_units_from_one_listing(
    tmp_path: Path, fake_podman: Path
) -> None:
    runtime = tmp_path / "runtime"
    probe = PodmanProbe(runtime, podman=str(fake_podman))
    assert probe.containers(["web.service"]) == {}  # no runtime directory yet
    runtime.mkdir()
    (runtime / "web.service.ctr-id").write_text(CID + "\n")
    (runtime / "empty.service.ctr-id").write_text("")
    (runtime / "other.service.ctr-id").write_text("deadbeef")  # not asked for
    (runtime / "plain.service").write_text("")  # not a cidfile
    asked = ["web.service", "empty.service", "plain.service", "absent.service"]
    assert probe.containers(asked) == {"web.service": Container(CID, "")}
    probe.drain(timeout=10)
    assert probe.containers(asked) == {
        "web.service": Container(CID, "localhost/fleet-demo:latest")
    }
    probe.close()
