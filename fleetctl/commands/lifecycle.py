"""The commands that change what the cluster runs: submit, load, start, stop, unload, restart and
destroy.

Each command works in three steps. First every argument is checked against the local disk (name,
file, [X-Fleet] rules) without touching the registry, so a bad argument fails fast. Then all units
of the command are written in one guarded transaction against one snapshot; if another client
changed those units meanwhile the plan is made again on a fresh snapshot. Last, unless told not
to, the command polls the registry until every unit reports the requested state, and when it
gives up it says why, using the same placement rules the agents use.
"""

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import typer

from fleetctl import output
from fleetctl.client import Registry, registry
from fleetctl.options import BlockAttempts, NoBlock, Replace, UnitArgs, UnitNames
from fleetd.errors import (
    FleetError,
    InvalidUnitFile,
    TemplateNotStartable,
    Temporary,
    UnitNotFound,
)
from fleetd.model import DesiredState, PublishedState
from fleetd.placement import explain, machines_running_global
from fleetd.snapshot import Snapshot, UnitRecord, check_unit_size
from fleetd.unitfile import (
    UnitName,
    content_hash,
    default_unit_name,
    parse_requirements,
    parse_unit_file,
    parse_unit_name,
)

# How often the registry is polled while waiting, in seconds (fleet polls about twice a second).
POLL_INTERVAL = 0.5
# A guarded write that loses to another client is planned again; after this many losses in a row
# the registry is too busy to be worth racing.
WRITE_ATTEMPTS = 5


class WaitGaveUp(FleetError):
    """Waiting for units to reach a state ran out of attempts."""


class InvalidTransition(FleetError):
    """A unit is in a state the command cannot move it out of."""


# ------------------------------------------------------------------------- local arguments


@dataclass(frozen=True)
class LocalUnit:
    """One command-line argument as found on disk; nothing here has looked at the registry."""

    arg: str
    name: UnitName
    path: Path
    text: str | None
    template_path: Path | None = None
    template_text: str | None = None


def _read_unit_file(path: Path) -> str | None:
    if not path.is_file():
        return None
    # Bytes, not text mode: universal newlines would change the content and so its hash.
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidUnitFile(f"{path}: not UTF-8 text (byte {exc.start})") from None


def refuse_template(name: UnitName) -> None:
    """A template names no unit that could run: only its instances can be activated."""
    if name.is_template:
        raise TemplateNotStartable(
            f"cannot activate template {name.name}: start an instance such as "
            f"{name.prefix}@1.{name.suffix}"
        )


def read_local(
    arg: str, activating: bool, templates: dict[Path, str | None] | None = None
) -> LocalUnit:
    """Name the unit an argument stands for and read its file (or its template's) if present.
    `templates` keeps the template files read so far: `start hello@{1..1000}.service` reads
    hello@.service once."""
    name = parse_unit_name(default_unit_name(arg))
    if activating:
        refuse_template(name)
    folder = Path(os.path.dirname(arg))
    path = folder / name.name
    text = _read_unit_file(path)
    template_path: Path | None = None
    template_text: str | None = None
    if text is None and name.is_instance and name.template:
        template_path = folder / name.template
        if templates is None:
            template_text = _read_unit_file(template_path)
        else:
            if template_path not in templates:
                templates[template_path] = _read_unit_file(template_path)
            template_text = templates[template_path]
    return LocalUnit(arg, name, path, text, template_path, template_text)


def read_arguments(args: Iterable[str], activating: bool) -> list[LocalUnit]:
    """Every argument read and named, duplicates of a unit dropped (the first one counts)."""
    seen: set[str] = set()
    units = []
    templates: dict[Path, str | None] = {}
    for arg in args:
        unit = read_local(arg, activating, templates)
        if unit.name.name not in seen:
            seen.add(unit.name.name)
            units.append(unit)
    return units


def unit_names(args: Iterable[str]) -> list[str]:
    # A dict keeps the first of each name, in order (a list's `in` would make 10,000 names
    # cost 50 million comparisons).
    names: dict[str, None] = {}
    for arg in args:
        names.setdefault(parse_unit_name(default_unit_name(arg)).name)
    return list(names)


# ----------------------------------------------------------------------------------- plans

@dataclass
class Plan:
    """What one command writes: every unit it names, with the content it should have."""

    records: list[UnitRecord] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)


def _validated(text: str, name: str, source: Path, plan: Plan) -> str:
    unit = parse_unit_file(text, str(source))
    requirements = parse_requirements(unit, name)
    plan.notices.extend(requirements.warnings)
    return text


def _not_found(unit: LocalUnit) -> UnitNotFound:
    name = unit.name.name
    if unit.template_path is not None:
        return UnitNotFound(
            f"unit {name} not found: no file {unit.path}, no template {unit.name.template} "
            f"in the registry or at {unit.template_path}, and no such unit in the registry"
        )
    return UnitNotFound(
        f"unit {name} not found: no file {unit.path} and no such unit in the registry"
    )


def plan_units(units: Sequence[LocalUnit], snapshot: Snapshot, replace: bool) -> Plan:
    """Decide the content of every unit against one snapshot. Raises before anything is written
    when any unit is invalid or cannot be found."""
    plan = Plan()
    for unit in units:
        name = unit.name.name
        existing = snapshot.units.get(name)
        local_text, local_path = unit.text, unit.path
        if local_text is None and unit.template_text is not None and unit.template_path:
            local_text, local_path = unit.template_text, unit.template_path
        if existing is None:
            template = snapshot.units.get(unit.name.template or "") if unit.text is None else None
            if unit.text is not None:
                text = _validated(unit.text, name, unit.path, plan)
            elif template is not None:
                if local_text is not None and content_hash(local_text) != template.hash:
                    plan.notices.append(_differs(template.name, local_path, template=True))
                text = _validated(template.text, name, Path(template.name), plan)
            elif local_text is not None:
                text = _validated(local_text, name, local_path, plan)
            else:
                raise _not_found(unit)
            plan.records.append(UnitRecord(name, text, content_hash(text)))
            plan.created.append(name)
            continue
        if local_text is None:
            plan.records.append(existing)
            continue
        _validated(local_text, name, local_path, plan)
        if content_hash(local_text) == existing.hash:
            plan.records.append(existing)
        elif not replace:
            plan.notices.append(_differs(name, local_path, template=local_path != unit.path))
            plan.records.append(existing)
        else:
            # The new content keeps the unit's desired state: the owner of a running unit
            # stops it, loads the new file and starts it again.
            plan.records.append(UnitRecord(name, local_text, content_hash(local_text)))
    for record in plan.records:
        # Only content this command would send; a stored unit passed etcd's limit already.
        if snapshot.units.get(record.name) is not record:
            check_unit_size(record)
    return plan


def _differs(name: str, path: Path, template: bool) -> str:
    kind = "local template unit file" if template else "local unit file"
    return f"Unit {name} in registry differs from {kind} {path}. Add --replace to override."


def write(
    reg: Registry,
    make_plan: Callable[[Snapshot], Plan],
    desired: DesiredState | None,
) -> tuple[Plan, Snapshot]:
    """Plan against a fresh snapshot and write it in one guarded transaction, again if another
    client got in between. Notices are printed once, before the first write."""
    printed: set[str] = set()
    for _ in range(WRITE_ATTEMPTS):
        snapshot = reg.snapshot()
        plan = make_plan(snapshot)
        for notice in plan.notices:
            if notice not in printed:
                printed.add(notice)
                output.warn(notice)
        if reg.write_units(plan.records, desired, snapshot):
            return plan, snapshot
    raise Temporary(
        f"other clients kept changing these units while writing them ({WRITE_ATTEMPTS} "
        "attempts): try again"
    )


def existing_records(snapshot: Snapshot, names: Sequence[str]) -> list[UnitRecord]:
    records = []
    for name in names:
        record = snapshot.units.get(name)
        if record is None:
            raise UnitNotFound(f"unit {name} not found in the registry")
        records.append(record)
    return records


# ---------------------------------------------------------------------------------- waiting


# A failure published this long before fleetctl began waiting is an earlier run's, not the
# outcome of this command (the slack absorbs clock differences between this host and the agent's).
FAILED_SLACK = 1.0


def _failed_since(state: PublishedState, record: UnitRecord, failed_since: float | None) -> bool:
    return (
        failed_since is not None
        and state.active == "failed"
        and state.hash == record.hash
        and state.since >= failed_since
    )


def _state_ok(
    state: PublishedState | None,
    record: UnitRecord,
    target: DesiredState,
    failed_since: float | None = None,
) -> bool:
    if state is None:
        return False
    if target is DesiredState.LAUNCHED:
        # A unit that failed after it was launched got as far as it will: waiting on would hang
        # until the operator gives up (fleet, too, returns once the agent launched it).
        return (state.active == "active" and state.hash == record.hash) or _failed_since(
            state, record, failed_since
        )
    return state.load == "loaded" and state.active != "active"


def reached(
    snapshot: Snapshot, name: str, target: DesiredState, failed_since: float | None = None
) -> bool:
    """Whether the cluster reports `name` in `target`, as published by the machines. With
    `failed_since`, a unit launched but failed since then counts as launched."""
    per = snapshot.states.get(name, {})
    if target is DesiredState.INACTIVE:
        return snapshot.owner_of(name) is None and not per
    record = snapshot.units.get(name)
    if record is None:
        return False
    if output.is_global(record):
        return all(
            _state_ok(per.get(m), record, target, failed_since)
            for m in machines_running_global(snapshot, name)
        )
    owner = snapshot.owner_of(name)
    return owner is not None and _state_ok(per.get(owner), record, target, failed_since)


def _label(snapshot: Snapshot, machine_id: str) -> str:
    machine = snapshot.machines.get(machine_id)
    return machine.label if machine else machine_id[:8]


def _reported(state: PublishedState) -> str:
    return f"{state.active} ({state.sub}), load {state.load}"


def why_not(snapshot: Snapshot, name: str, target: DesiredState) -> str:
    """One line saying why `name` is not in `target`, in the agents' own terms."""
    per = snapshot.states.get(name, {})
    if target is DesiredState.INACTIVE:
        owner = snapshot.owner_of(name)
        if owner is not None:
            return f"still held by {_label(snapshot, owner)}"
        shown = ", ".join(f"{_label(snapshot, m)} ({_reported(s)})" for m, s in sorted(per.items()))
        return f"still reported by {shown}"
    record = snapshot.units.get(name)
    if record is None:
        return "it is no longer in the registry"
    if output.is_global(record):
        lagging = [
            m
            for m in machines_running_global(snapshot, name)
            if not _state_ok(per.get(m), record, target)
        ]
        shown = ", ".join(
            f"{_label(snapshot, m)} ({_reported(per[m]) if m in per else 'nothing published yet'})"
            for m in lagging
        )
        return f"not yet {target.value} on {shown}"
    owner = snapshot.owner_of(name)
    if owner is None:
        placement = explain(snapshot, name)
        if placement.blocked:
            return placement.blocked
        if placement.ranked:
            able = ", ".join(_label(snapshot, m) for m in placement.ranked)
            return f"no machine has claimed it yet ({able} can run it)"
        _, verdicts = output.machine_verdicts(snapshot, name)
        return f"no machine can run it: {'; '.join(verdicts)}"
    where = f"{_label(snapshot, owner)} ({output.machine_legend(snapshot, owner)})"
    state = per.get(owner)
    if state is None:
        return f"placed on {where}, which has published no state for it yet"
    if target is DesiredState.LAUNCHED and state.hash != record.hash:
        return (
            f"placed on {where}, which still runs content {state.hash[:7]} instead of "
            f"{record.hash[:7]} ({_reported(state)})"
        )
    return f"placed on {where}, which reports {_reported(state)}"


VERBS = {
    DesiredState.LAUNCHED: "start",
    DesiredState.LOADED: "load",
    DesiredState.INACTIVE: "unload",
}


def reached_message(snapshot: Snapshot, name: str, target: DesiredState, verb: str) -> str:
    record = snapshot.units.get(name)
    if record is not None and output.is_global(record):
        return f"Triggered global unit {name} {verb}"
    if target is DesiredState.INACTIVE:
        return f"Unit {name} inactive"
    owner = snapshot.owner_of(name)
    where = output.machine_legend(snapshot, owner) if owner else "-"
    state = snapshot.states.get(name, {}).get(owner or "")
    if target is DesiredState.LAUNCHED and state is not None and state.active == "failed":
        return f"Unit {name} {target.value} on {where}, but failed: see fleetctl status {name}"
    return f"Unit {name} {target.value} on {where}"


def _stage(snapshot: Snapshot, name: str, target: DesiredState) -> int:
    """How far a unit got towards `target`: 0 nobody took it (or, to stop, still owned), 1 an
    owner but nothing published, 2 published but not there yet. The lowest is the slowest."""
    owner = snapshot.owner_of(name)
    if target is DesiredState.INACTIVE:
        return 0 if owner is not None else 2
    if owner is None:
        return 0
    return 1 if owner not in snapshot.states.get(name, {}) else 2


def wait_for(
    reg: Registry,
    names: Sequence[str],
    target: DesiredState,
    attempts: int,
    verb: str,
    sleep: Callable[[float], None] = time.sleep,
    announce: bool = True,
) -> None:
    """Poll until every unit reports `target`, printing each as it gets there (unless not
    `announce`); after `attempts` polls (0: never) give up, naming the first unit left and why
    it is not there. On a terminal, a progress line shows while several units are pending."""
    pending = list(names)
    polls = 0
    failed_since = time.time() - FAILED_SLACK
    progress = output.Progress.on_stdout() if len(names) > 1 else output.Progress(None)
    try:
        while True:
            snapshot = reg.snapshot()
            polls += 1
            for name in list(pending):
                if reached(snapshot, name, target, failed_since):
                    if announce:
                        progress.clear()
                        output.echo(reached_message(snapshot, name, target, verb))
                    pending.remove(name)
            if not pending:
                return
            if attempts and polls >= attempts:
                progress.clear()
                first = pending[0]
                message = f"Unit {first} not {target.value}: {why_not(snapshot, first, target)}"
                if len(pending) > 1:
                    message += f" (also not {target.value}: {', '.join(pending[1:])})"
                raise WaitGaveUp(message)
            if progress.enabled:
                slowest = min(pending, key=lambda n: _stage(snapshot, n, target))
                progress.show(
                    output.progress_text(
                        len(names) - len(pending),
                        len(names),
                        slowest,
                        why_not(snapshot, slowest, target),
                    )
                )
            sleep(POLL_INTERVAL)
    finally:
        progress.clear()


def triggered(snapshot: Snapshot, names: Sequence[str], verb: str) -> None:
    for name in names:
        record = snapshot.units.get(name)
        kind = "global unit" if record is not None and output.is_global(record) else "unit"
        output.echo(f"Triggered {kind} {name} {verb}")


def settle(
    reg: Registry,
    snapshot: Snapshot,
    names: Sequence[str],
    target: DesiredState,
    no_block: bool,
    attempts: int,
    verb: str,
) -> None:
    if no_block:
        triggered(snapshot, names, verb)
    else:
        wait_for(reg, names, target, attempts, verb)


# --------------------------------------------------------------------------------- commands


def _activate(
    ctx: typer.Context,
    units: list[str],
    target: DesiredState,
    replace: bool,
    no_block: bool,
    attempts: int,
    command: str,
) -> None:
    local = read_arguments(units, activating=True)
    reg = registry(ctx)
    plan, snapshot = write(reg, lambda snap: plan_units(local, snap, replace), target)
    names = [r.name for r in plan.records]
    settle(reg, snapshot, names, target, no_block, attempts, command)


def submit(ctx: typer.Context, units: UnitArgs, replace: Replace = False) -> None:
    """Put units into the cluster without scheduling them (desired state inactive)."""
    local = read_arguments(units, activating=False)
    reg = registry(ctx)
    plan, _ = write(reg, lambda snap: plan_units(local, snap, replace), None)
    for name in plan.created:
        output.echo(f"Unit {name} inactive")


def load(
    ctx: typer.Context,
    units: UnitArgs,
    replace: Replace = False,
    no_block: NoBlock = False,
    block_attempts: BlockAttempts = 0,
) -> None:
    """Schedule units onto machines and load them, without starting them."""
    _activate(ctx, units, DesiredState.LOADED, replace, no_block, block_attempts, "load")


def start(
    ctx: typer.Context,
    units: UnitArgs,
    replace: Replace = False,
    no_block: NoBlock = False,
    block_attempts: BlockAttempts = 0,
) -> None:
    """Schedule units onto machines and start them (submitting them first if needed)."""
    _activate(ctx, units, DesiredState.LAUNCHED, replace, no_block, block_attempts, "start")


def _set_existing(
    ctx: typer.Context,
    units: list[str],
    target: DesiredState,
    check: Callable[[Snapshot, str], None],
) -> tuple[list[str], Snapshot, Registry]:
    names = unit_names(units)
    reg = registry(ctx)

    def make_plan(snapshot: Snapshot) -> Plan:
        records = existing_records(snapshot, names)
        for name in names:
            check(snapshot, name)
        return Plan(records=records)

    _, snapshot = write(reg, make_plan, target)
    return names, snapshot, reg


def _must_be_loaded(verb: str) -> Callable[[Snapshot, str], None]:
    def check(snapshot: Snapshot, name: str) -> None:
        if snapshot.desired_state(name) is DesiredState.INACTIVE:
            raise InvalidTransition(
                f"cannot {verb} unit {name}: it is inactive (load or start it first)"
            )

    return check


def _any_state(snapshot: Snapshot, name: str) -> None:
    return None


def stop(
    ctx: typer.Context,
    units: UnitNames,
    no_block: NoBlock = False,
    block_attempts: BlockAttempts = 0,
) -> None:
    """Stop units, leaving them loaded on their machines."""
    names, snapshot, reg = _set_existing(ctx, units, DesiredState.LOADED, _must_be_loaded("stop"))
    settle(reg, snapshot, names, DesiredState.LOADED, no_block, block_attempts, "stop")


def unload(
    ctx: typer.Context,
    units: UnitNames,
    no_block: NoBlock = False,
    block_attempts: BlockAttempts = 0,
) -> None:
    """Unload units from their machines; they stay in the registry (desired state inactive)."""
    names, snapshot, reg = _set_existing(ctx, units, DesiredState.INACTIVE, _any_state)
    settle(reg, snapshot, names, DesiredState.INACTIVE, no_block, block_attempts, "unload")


def restart(
    ctx: typer.Context,
    units: UnitNames,
    no_block: NoBlock = False,
    block_attempts: BlockAttempts = 0,
) -> None:
    """Stop units, wait until they are stopped, then start them again."""
    for arg in units:
        refuse_template(parse_unit_name(default_unit_name(arg)))
    names, _, reg = _set_existing(ctx, units, DesiredState.LOADED, _must_be_loaded("restart"))
    # The start must not overtake the stop, or the owner would see no change at all.
    wait_for(reg, names, DesiredState.LOADED, block_attempts, "stop")
    names, snapshot, reg = _set_existing(ctx, units, DesiredState.LAUNCHED, _any_state)
    settle(reg, snapshot, names, DesiredState.LAUNCHED, no_block, block_attempts, "start")


def destroy(
    ctx: typer.Context,
    units: UnitNames,
    no_block: NoBlock = False,
    block_attempts: BlockAttempts = 0,
) -> None:
    """Remove units from the cluster: their owners stop and forget them; waits until they did."""
    names = unit_names(units)
    reg = registry(ctx)
    existing_records(reg.snapshot(), names)
    reg.destroy(names)
    for name in names:
        output.echo(f"Destroyed {name}")
    if not no_block:
        # As fleet does: the command returns once no machine holds or reports the units.
        wait_for(reg, names, DesiredState.INACTIVE, block_attempts, "destroy", announce=False)


def register(app: typer.Typer) -> None:
    for command in (submit, load, start, stop, unload, restart, destroy):
        app.command(command.__name__)(command)
