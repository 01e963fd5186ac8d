"""fleetctl's decisions without etcd: which content each unit gets, when a unit has reached a
state, and the one-line reason when it has not."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import pytest

from fleetctl.commands import lifecycle
from fleetctl.commands.lifecycle import (
    LocalUnit,
    plan_units,
    reached,
    reached_message,
    read_local,
    why_not,
)
from fleetd.errors import (
    InvalidUnitFile,
    InvalidUnitName,
    TemplateNotStartable,
    Temporary,
    UnitNotFound,
)
from fleetd.keys import KeyLayout, Kind
from fleetd.model import DesiredState, Machine, Owner, PublishedState
from fleetd.snapshot import Desired, Snapshot, UnitRecord
from fleetd.unitfile import content_hash, parse_unit_name

V1 = "[Service]\nExecStart=/bin/true\n"
V2 = "[Service]\nExecStart=/bin/false\n"
A = "a" * 32
B = "b" * 32


def rec(name: str, text: str) -> UnitRecord:
    return UnitRecord(name, text, content_hash(text), 3)


def local(name: str, text: str | None, template_text: str | None = None) -> LocalUnit:
    parsed = parse_unit_name(name)
    template = Path(parsed.template) if parsed.is_instance and parsed.template else None
    return LocalUnit(name, parsed, Path(name), text, template, template_text)


def snap(
    units: dict[str, str] | None = None, desired: dict[str, DesiredState] | None = None
) -> Snapshot:
    s = Snapshot()
    s.units = {n: rec(n, t) for n, t in (units or {}).items()}
    s.desired = {n: Desired(d, 4) for n, d in (desired or {}).items()}
    s.machines = {
        A: Machine(A, "10.0.0.1", {"zone": "a"}, "", "core-01"),
        B: Machine(B, "10.0.0.2", {"zone": "b"}, "", "core-02"),
    }
    return s


@pytest.mark.parametrize(
    ("unit", "registry", "desired", "replace", "text", "notice"),
    [
        (local("a.service", V1), {}, {}, False, V1, ""),
        (local("a.service", V1), {"a.service": V1}, {}, False, V1, ""),
        (local("a.service", V2), {"a.service": V1}, {}, False, V1, "differs from local"),
        (local("a.service", V2), {"a.service": V1}, {}, True, V2, ""),
        (
            local("a.service", V2),
            {"a.service": V1},
            {"a.service": DesiredState.LAUNCHED},
            True,
            V2,
            "",
        ),
        (
            local("a.service", V2),
            {"a.service": V1},
            {"a.service": DesiredState.LAUNCHED},
            True,
            V2,
            "",
        ),
        (local("a.service", None), {"a.service": V1}, {}, False, V1, ""),
        (local("w@1.service", None), {"w@.service": V1}, {}, False, V1, ""),
        (local("w@1.service", None, V2), {"w@.service": V1}, {}, False, V1, "template"),
        (local("w@1.service", None, V2), {}, {}, False, V2, ""),
        (local("w@1.service", V2), {"w@.service": V1}, {}, False, V2, ""),
    ],
    ids=[
        "new",
        "same",
        "differs-keeps-registry",
        "replace",
        "submit-replaces-launched",
        "start-replaces-launched",
        "registry-copy",
        "registry-template",
        "registry-template-wins-over-local",
        "local-template",
        "local-instance-file-wins",
    ],
)
def test_plan_units(
    unit: LocalUnit,
    registry: dict[str, str],
    desired: dict[str, DesiredState],
    replace: bool,
    text: str,
    notice: str,
) -> None:
    plan = plan_units([unit], snap(registry, desired), replace)
    assert [r.text for r in plan.records] == [text]
    assert [r.name for r in plan.records] == [unit.name.name]
    if notice:
        assert len(plan.notices) == 1 and notice in plan.notices[0]
    else:
        assert plan.notices == []


def test_plan_units_raises_before_writing_anything() -> None:
    units = [local("ok.service", V1), local("bad.service", "[Service\n")]
    with pytest.raises(InvalidUnitFile, match=r"bad\.service"):
        plan_units(units, snap(), False)
    with pytest.raises(UnitNotFound, match=r"no template w@\.service in the registry"):
        plan_units([local("w@2.service", None)], snap(), False)


def test_requirement_warnings_become_notices() -> None:
    text = V1 + "\n[X-Fleet]\nX-Conflicts=other.service\n"
    plan = plan_units([local("a.service", text)], snap(), False)
    assert plan.notices == ["a.service: [X-Fleet] X-Conflicts is deprecated: use Conflicts"]


def test_read_local_names_and_refuses(tmp_path: Path) -> None:
    (tmp_path / "hello.service").write_bytes(b"[Service]\r\nExecStart=/bin/true")
    unit = read_local(str(tmp_path / "hello"), activating=True)
    assert unit.name.name == "hello.service"
    assert unit.text == "[Service]\r\nExecStart=/bin/true"
    with pytest.raises(TemplateNotStartable, match=r"start an instance such as x@1\.service"):
        read_local("x@.service", activating=True)
    assert read_local(str(tmp_path / "x@.service"), activating=False).text is None
    with pytest.raises(InvalidUnitName):
        read_local("bad$name.service", activating=False)


def test_many_instances_read_their_template_once_and_their_own_files_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "web@.service").write_text(V1)
    (tmp_path / "web@2.service").write_text(V2)  # an instance's own file wins over the template
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "web@.service").write_text(V2)  # another folder, another template
    reads: list[Path] = []
    real = lifecycle._read_unit_file
    monkeypatch.setattr(lifecycle, "_read_unit_file", lambda p: reads.append(p) or real(p))
    args = [str(tmp_path / f"web@{i}.service") for i in range(1, 6)]
    args += [str(tmp_path / "other" / "web@9.service"), str(tmp_path / "web@1.service")]
    units = lifecycle.read_arguments(args, activating=True)
    assert [u.name.name for u in units] == [f"web@{i}.service" for i in (1, 2, 3, 4, 5, 9)]
    assert [(u.text, u.template_text) for u in units] == [
        (None, V1), (V2, None), (None, V1), (None, V1), (None, V1), (None, V2)
    ]
    templates = [p for p in reads if p.name == "web@.service"]
    assert sorted(templates) == [tmp_path / "other" / "web@.service", tmp_path / "web@.service"]
    assert lifecycle.unit_names(["b", "a.service", "b.service", "a"]) == ["b.service", "a.service"]


def state(machine: str, active: str, text: str = V1, load: str = "loaded") -> PublishedState:
    return PublishedState(
        machine, load, active, "running" if active == "active" else "dead", content_hash(text), 1.0
    )


def running(s: Snapshot, name: str, machine: str, published: PublishedState | None) -> Snapshot:
    s.owners[name] = Owner(machine, 7, 7)
    if published is not None:
        s.states.setdefault(name, {})[machine] = published
    return s


L = DesiredState.LAUNCHED


@pytest.mark.parametrize(
    ("snapshot", "target", "ok", "reason"),
    [
        (
            running(snap({"u.service": V1}, {"u.service": L}), "u.service", A, state(A, "active")),
            L,
            True,
            "",
        ),
        (
            running(snap({"u.service": V1}, {"u.service": L}), "u.service", A, None),
            L,
            False,
            "placed on core-01 (aaaaaaaa.../10.0.0.1), which has published no state",
        ),
        (
            running(
                snap({"u.service": V1}, {"u.service": L}), "u.service", A, state(A, "active", V2)
            ),
            L,
            False,
            f"still runs content {content_hash(V2)[:7]} instead of",
        ),
        (
            running(snap({"u.service": V1}, {"u.service": L}), "u.service", A, state(A, "failed")),
            L,
            False,
            "which reports failed (dead), load loaded",
        ),
        (
            snap({"u.service": V1}, {"u.service": L}),
            L,
            False,
            "no machine has claimed it yet (core-0",
        ),
        (
            snap({"u.service": V1 + "[X-Fleet]\nMachineMetadata=zone=c\n"}, {"u.service": L}),
            L,
            False,
            "no machine can run it: core-01: metadata zone=c not matched; "
            "core-02: metadata zone=c not matched",
        ),
        (snap({"u.service": V1}, {}), L, False, "desired state is inactive"),
        (
            running(
                snap({"u.service": V1}, {"u.service": L}), "u.service", A, state(A, "inactive")
            ),
            DesiredState.LOADED,
            True,
            "",
        ),
        (
            running(snap({"u.service": V1}), "u.service", B, None),
            DesiredState.INACTIVE,
            False,
            "still held by core-02",
        ),
        (snap({"u.service": V1}), DesiredState.INACTIVE, True, ""),
        (snap({}), L, False, "it is no longer in the registry"),
    ],
    ids=[
        "launched",
        "no-state-yet",
        "old-content",
        "failed",
        "unclaimed",
        "no-machine",
        "blocked",
        "loaded",
        "still-owned",
        "inactive",
        "destroyed",
    ],
)
def test_reached_and_why_not(
    snapshot: Snapshot, target: DesiredState, ok: bool, reason: str
) -> None:
    assert reached(snapshot, "u.service", target) is ok
    if not ok:
        assert reason in why_not(snapshot, "u.service", target)


def test_a_unit_that_failed_after_the_command_began_counts_as_launched() -> None:
    """`start` of a unit that fails at once returns (saying so) instead of waiting forever; a
    failure published before the command began is an earlier run's and is waited past."""
    s = running(snap({"u.service": V1}, {"u.service": L}), "u.service", A, state(A, "failed"))
    published_at = s.states["u.service"][A].since
    assert not reached(s, "u.service", L)
    assert not reached(s, "u.service", L, failed_since=published_at + 0.5)
    assert reached(s, "u.service", L, failed_since=published_at - 0.5)
    assert reached_message(s, "u.service", L, "start").endswith(
        "but failed: see fleetctl status u.service"
    )
    # Failed with other content is not this command's outcome either.
    s.states["u.service"][A] = state(A, "failed", V2)
    assert not reached(s, "u.service", L, failed_since=0.0)


def test_global_unit_reaches_launched_only_on_every_eligible_machine() -> None:
    text = V1 + "[X-Fleet]\nGlobal=true\nMachineMetadata=zone=a\n"
    s = snap({"g.service": text}, {"g.service": L})
    assert not reached(s, "g.service", L)
    assert why_not(s, "g.service", L) == "not yet launched on core-01 (nothing published yet)"
    s.states["g.service"] = {A: state(A, "active", text)}
    assert reached(s, "g.service", L)


class Polled:
    """A registry whose snapshot never changes, counting the polls."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snap = snapshot
        self.polls = 0

    def snapshot(self, kinds: Collection[Kind] | None = None) -> Snapshot:
        self.polls += 1
        return self.snap if kinds is None else self.snap.only(KeyLayout(), kinds)

    def write_units(self, records: object, desired: object, seen: object) -> bool:
        return False

    def destroy(self, names: object) -> None:
        raise AssertionError("not expected")

    def close(self) -> None:
        """Nothing to close: the fake holds no connection."""


def test_wait_for_polls_exactly_the_attempts() -> None:
    reg = Polled(snap({"u.service": V1}, {"u.service": L}))
    sleeps: list[float] = []
    with pytest.raises(lifecycle.WaitGaveUp, match=r"^Unit u.service not launched: no machine"):
        lifecycle.wait_for(reg, ["u.service"], L, 3, "start", sleep=sleeps.append)
    assert reg.polls == 3
    assert sleeps == [lifecycle.POLL_INTERVAL] * 2


def test_write_gives_up_when_the_registry_keeps_changing() -> None:
    reg = Polled(snap())
    with pytest.raises(Temporary, match="kept changing"):
        lifecycle.write(reg, lambda s: lifecycle.Plan(), L)
    assert reg.polls == lifecycle.WRITE_ATTEMPTS
