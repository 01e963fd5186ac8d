"""The topology options on a real six-machine local cluster (vagrant/cluster-6.toml: two regions,
three zones, two machines per zone): ZoneConflicts, MaxPerZone, ZoneOf, RegionConflicts, negated
metadata, the default zone spread, their validation, and `fleetctl rebalance` after machines
joined (on a cluster of its own)."""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from conftest import (
    REPO,
    UNITS,
    Cluster,
    assert_refused,
    registry_picture,
    wait_until,
    write_unit,
)

pytestmark = pytest.mark.functional

CLUSTER_CONFIG = REPO / "vagrant" / "cluster-6.toml"
ZONES = {
    "core-01": "us-east-1a",
    "core-02": "us-east-1a",
    "core-03": "us-east-1b",
    "core-04": "us-east-1b",
    "core-05": "us-west-1a",
    "core-06": "us-west-1a",
}
REGIONS = {m: z.rsplit("-", 1)[0] for m, z in ZONES.items()}


def by_zone(placed: dict[str, str], prefix: str) -> Counter[str]:
    return Counter(ZONES[m] for u, m in placed.items() if u.startswith(prefix))


def waiting_status(fleet: Cluster, unit: str, fragment: str) -> str:
    """`status` of a unit that runs nowhere, once it names `fragment` as the reason."""

    def check() -> str | None:
        text = fleet.fleetctl("status", unit).stdout
        ok = "Not scheduled" in text and fragment in text and unit not in fleet.running()
        return text if ok else None

    return wait_until(check, what=f"{unit} waiting because of {fragment!r}")


def test_zone_conflicts_one_web_server_per_zone(fleet: Cluster) -> None:
    webs = [UNITS / f"web@{i}.service" for i in range(1, 4)]
    fleet.fleetctl("start", *webs)
    placed = fleet.where()
    assert sorted(by_zone(placed, "web@").items()) == [
        ("us-east-1a", 1),
        ("us-east-1b", 1),
        ("us-west-1a", 1),
    ]
    fleet.fleetctl("start", "--no-block", UNITS / "web@4.service")
    text = waiting_status(fleet, "web@4.service", "already runs web@")
    for machine, zone in ZONES.items():
        assert f"{machine}: zone {zone} already runs web@" in text, text
    assert "(ZoneConflicts=web@*.service)" in text

    # Halting a zone's machines moves its web server nowhere: every other zone has one.
    emptied = ZONES[placed["web@1.service"]]
    for machine, zone in ZONES.items():
        if zone == emptied:
            fleet.halt(machine)
    wait_until(
        lambda: "web@1.service" not in fleet.where() or None, what="web@1 taken down with its zone"
    )
    waiting_status(fleet, "web@1.service", "already runs web@")
    now = fleet.where()
    assert sorted(by_zone(now, "web@").values()) == [1, 1], now
    assert "web@4.service" not in now


def test_max_per_zone(fleet: Cluster, unit_dir: Path) -> None:
    write_unit(unit_dir, "mz@.service", "MaxPerZone=2")
    fleet.fleetctl("start", *(unit_dir / f"mz@{i}.service" for i in range(1, 7)))
    assert set(by_zone(fleet.where(), "mz@").values()) == {2}
    fleet.fleetctl("start", "--no-block", unit_dir / "mz@7.service")
    text = waiting_status(fleet, "mz@7.service", "MaxPerZone=2 reached in")
    for zone in set(ZONES.values()):
        assert f"MaxPerZone=2 reached in {zone}" in text


def test_zone_of_follows_into_the_new_zone(fleet: Cluster) -> None:
    fleet.fleetctl("start", UNITS / "db.service", UNITS / "cache.service")
    placed = fleet.where()
    zone = ZONES[placed["db.service"]]
    assert zone != "us-east-1a"
    assert ZONES[placed["cache.service"]] == zone
    # Halt db's whole zone, so that db has to change zone.
    for machine, z in ZONES.items():
        if z == zone:
            fleet.halt(machine)

    def followed() -> dict[str, str] | None:
        now = fleet.where()
        db, cache = now.get("db.service"), now.get("cache.service")
        ok = db and cache and ZONES[db] != zone and ZONES[cache] == ZONES[db]
        return now if ok else None

    after = wait_until(followed, what="cache in db's new zone")
    assert ZONES[after["db.service"]] not in (zone, "us-east-1a")


def test_region_conflicts(fleet: Cluster, unit_dir: Path) -> None:
    write_unit(unit_dir, "rc@.service", "RegionConflicts=rc@*.service")
    fleet.fleetctl("start", unit_dir / "rc@1.service", unit_dir / "rc@2.service")
    placed = fleet.where()
    assert {REGIONS[placed["rc@1.service"]], REGIONS[placed["rc@2.service"]]} == {
        "us-east",
        "us-west",
    }
    fleet.fleetctl("start", "--no-block", unit_dir / "rc@3.service")
    text = waiting_status(fleet, "rc@3.service", "(RegionConflicts=rc@*.service)")
    assert "region us-east already runs rc@" in text
    assert "region us-west already runs rc@" in text


def test_negated_metadata(fleet: Cluster, unit_dir: Path) -> None:
    write_unit(unit_dir, "east@.service", "MachineMetadata=region=us-east zone!=us-east-1a")
    units = [unit_dir / f"east@{i}.service" for i in range(1, 5)]
    fleet.fleetctl("start", *units)
    placed = fleet.where()
    assert {ZONES[placed[u.name]] for u in units} == {"us-east-1b"}
    text = fleet.fleetctl("status", "east@1.service").stdout
    assert "Machine:" in text


def test_default_spread_three_per_zone(fleet: Cluster) -> None:
    fleet.fleetctl("start", *(UNITS / f"hello@{i}.service" for i in range(1, 10)))
    placed = fleet.where()
    assert sorted(by_zone(placed, "hello@").values()) == [3, 3, 3]


INVALID = {
    "MaxPerZone=0": ("MaxPerZone=0", "must be 1 or more"),
    "MaxPerRegion=-1": ("MaxPerRegion=-1", "must be 1 or more"),
    "MaxPerMachine=x": ("MaxPerMachine=x", "not a whole number"),
    "Global+ZoneConflicts": ("Global=true\nZoneConflicts=x@*.service", "Global cannot"),
    "Global+MaxPerZone": ("Global=true\nMaxPerZone=1", "Global cannot"),
    "Global+MaxPerMachine": ("Global=true\nMaxPerMachine=1", "Global cannot"),
    "MachineID+RegionOf": ("MachineID={id}\nRegionOf=x.service", "MachineID cannot"),
    "MachineID+MaxPerRegion": ("MachineID={id}\nMaxPerRegion=1", "MachineID cannot"),
    "ZoneOf itself": ("ZoneOf=bad.service", "names the unit itself"),
    "RegionOf itself": ("RegionOf=%n", "names the unit itself"),
    "Spread": ("Spread=rack", "Spread="),
    "Pin": ("Pin=sometimes", "not a boolean"),
}


def test_invalid_topology_options_are_refused(fleet: Cluster, unit_dir: Path) -> None:
    assert_refused(fleet, unit_dir, INVALID)


# -- rebalance, on a cluster of its own ---------------------------------------------------------

THREE_ZONES = """
[[machine]]
name = "rb-01"
metadata = { region = "r1", zone = "z1" }

[[machine]]
name = "rb-02"
metadata = { region = "r1", zone = "z2" }

[[machine]]
name = "rb-03"
metadata = { region = "r2", zone = "z3" }
"""


def test_rebalance_after_machines_joined(tmp_path: Path) -> None:
    config = tmp_path / "three.toml"
    config.write_text(THREE_ZONES)
    base = Path(tempfile.mkdtemp(prefix="lc-", dir="/tmp"))
    cluster = Cluster(base / "c", config)
    try:
        cluster.up()
        units = tmp_path / "units"
        units.mkdir()
        write_unit(units, "rb@.service")
        write_unit(units, "pinned.service", "Pin=true")
        cluster.fleetctl("start", units / "pinned.service")
        cluster.fleetctl("start", *(units / f"rb@{i}.service" for i in range(1, 12)))
        placed = cluster.where()
        assert len(placed) == 12
        assert sorted(Counter(placed.values()).values()) == [4, 4, 4]
        pinned_on = placed["pinned.service"]
        pinned_since = pinned_state(cluster)

        for name, zone in (("rb-04", "z1"), ("rb-05", "z2"), ("rb-06", "z3")):
            region = "r2" if zone == "z3" else "r1"
            cluster.add(name, f"region={region},zone={zone}")
        wait_until(lambda: len(cluster.machines_up()) == 6, what="six machines registered")

        owners = registry_picture(cluster.snapshot())
        plan = cluster.fleetctl("rebalance", "--dry-run").stdout.splitlines()
        assert plan and all(line.startswith("move rb@") for line in plan), plan
        assert registry_picture(cluster.snapshot()) == owners

        cluster.fleetctl("rebalance", timeout=300)
        after = cluster.where()
        assert set(after) == set(placed)
        per_machine = Counter(after.values())
        counts = [per_machine.get(m, 0) for m in cluster.ids]
        assert max(counts) - min(counts) <= 1, per_machine
        assert after["pinned.service"] == pinned_on
        assert pinned_state(cluster) == pinned_since
    finally:
        cluster.close()
        if cluster.dir.exists():
            cluster.lc("destroy", check=False)
        shutil.rmtree(base, ignore_errors=True)


def pinned_state(cluster: Cluster) -> tuple[str | None, float]:
    """Who owns pinned.service and since when it has been active there."""
    snap = cluster.snapshot()
    owner = snap.owner_of("pinned.service")
    state = snap.states.get("pinned.service", {}).get(owner or "")
    return owner, state.since if state else 0.0
