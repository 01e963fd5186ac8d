"""Everything fleetctl prints: aligned tables, field selection, status blocks and messages.

Tables are aligned the way fleet's Go tabwriter aligns them (cells padded with tabs to multiples
of eight columns), so scripts written against fleet's output keep working. Commands never format
by themselves: they hand a snapshot to a function here and print the string it returns. Messages
for people (warnings, errors) go to stderr, data goes to stdout.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime

import typer

from fleetd.errors import FleetError, InvalidUnitFile, InvalidUnitName
from fleetd.model import PublishedState
from fleetd.placement import explain
from fleetd.snapshot import Snapshot, UnitRecord
from fleetd.unitfile import expand_specifiers, parse_unit_file, parse_unit_name

TAB_WIDTH = 8
PADDING = 1
SHORT_ID = 8
SHORT_HASH = 7


class UnknownField(FleetError):
    """A --fields value names a column the listing does not have."""


# ------------------------------------------------------------------------------------ tables


def _tab_padding(text: str, width: int) -> str:
    if width == 0:
        return ""
    cell = -(-width // TAB_WIDTH) * TAB_WIDTH
    return "\t" * -(-(cell - len(text)) // TAB_WIDTH)


def tabulate(lines: Sequence[Sequence[str]]) -> str:
    """Align rows of cells as fleet's tabwriter does: every cell but the last of a row is padded
    with tabs up to the column's width rounded to a tab stop. All rows have the same length."""
    if not lines:
        return ""
    count = len(lines[0])
    widths = [0] * count
    for line in lines:
        if len(line) != count:
            raise ValueError("every row of a table needs the same number of cells")
        for i, cell in enumerate(line[:-1]):
            if cell:
                widths[i] = max(widths[i], len(cell) + PADDING)
    out = []
    for line in lines:
        cells = [cell + _tab_padding(cell, widths[i]) for i, cell in enumerate(line[:-1])]
        out.append("".join(cells) + line[-1] + "\n")
    return "".join(out)


def parse_fields(spec: str, valid: Sequence[str]) -> list[str]:
    """The columns a --fields value asks for, in its order; UnknownField names the valid ones."""
    fields = [f.strip() for f in spec.split(",") if f.strip()]
    choices = ", ".join(valid)
    if not fields:
        raise UnknownField(f"--fields is empty: valid fields are {choices}")
    for name in fields:
        if name not in valid:
            raise UnknownField(f"unknown field {name!r} in --fields: valid fields are {choices}")
    return fields


Row = Mapping[str, str]


def render(rows: Sequence[Row], fields: Sequence[str], legend: bool) -> str:
    lines: list[list[str]] = [[f.upper() for f in fields]] if legend else []
    lines.extend([row[f] for f in fields] for row in rows)
    return tabulate(lines)


# ------------------------------------------------------------------------------ cell formats


def machine_id_legend(machine_id: str, full: bool) -> str:
    return machine_id if full else f"{machine_id[:SHORT_ID]}..."


def machine_legend(snapshot: Snapshot, machine_id: str, full: bool = False) -> str:
    """`<id8>.../<ip>`, as fleet names a machine in unit listings and messages."""
    legend = machine_id_legend(machine_id, full)
    machine = snapshot.machines.get(machine_id)
    if machine is not None and machine.public_ip:
        legend = f"{legend}/{machine.public_ip}"
    return legend


def format_metadata(metadata: Mapping[str, str]) -> str:
    if not metadata:
        return "-"
    return ",".join(f"{key}={metadata[key]}" for key in sorted(metadata))


def format_hash(value: str, full: bool) -> str:
    if not value:
        return "-"
    return value if full else value[:SHORT_HASH]


def description(record: UnitRecord) -> str:
    """The [Unit] Description, with specifiers expanded as systemd shows it ("Web %i" of
    web@1.service reads "Web 1")."""
    try:
        text = parse_unit_file(record.text, record.name).description
        return expand_specifiers(text, parse_unit_name(record.name))
    except (InvalidUnitFile, InvalidUnitName):
        return ""


def is_global(record: UnitRecord) -> bool:
    req = record.requirements
    return bool(req and req.global_)


def reached_state(snapshot: Snapshot, name: str) -> str:
    """What the owner reports: launched when active, loaded when merely loaded, else inactive."""
    owner = snapshot.owner_of(name)
    state = snapshot.states.get(name, {}).get(owner) if owner else None
    if state is None:
        return "inactive"
    if state.active == "active":
        return "launched"
    if state.load == "loaded":
        return "loaded"
    return "inactive"


# ---------------------------------------------------------------------------------- listings

MACHINE_FIELDS = ("machine", "ip", "metadata")
DEFAULT_MACHINE_FIELDS = "machine,ip,metadata"
UNIT_FIELDS = ("unit", "load", "active", "sub", "machine", "hash")
DEFAULT_UNIT_FIELDS = "unit,machine,active,sub"
UNIT_FILE_FIELDS = ("unit", "global", "dstate", "state", "target", "hash", "desc")
DEFAULT_UNIT_FILE_FIELDS = "unit,hash,dstate,state,target"


def machines_table(
    snapshot: Snapshot,
    fields: str = DEFAULT_MACHINE_FIELDS,
    full: bool = False,
    legend: bool = True,
) -> str:
    columns = parse_fields(fields, MACHINE_FIELDS)
    rows = [
        {
            "machine": machine_id_legend(m.id, full),
            "ip": m.public_ip or "-",
            "metadata": format_metadata(m.metadata),
        }
        for _, m in sorted(snapshot.machines.items())
    ]
    return render(rows, columns, legend)


def _unit_row(
    snapshot: Snapshot, name: str, state: PublishedState | None, full: bool
) -> dict[str, str]:
    if state is None:
        return dict.fromkeys(UNIT_FIELDS, "-") | {"unit": name}
    return {
        "unit": name,
        "load": state.load or "-",
        "active": state.active or "-",
        "sub": state.sub or "-",
        "machine": machine_legend(snapshot, state.machine_id, full),
        "hash": format_hash(state.hash, full),
    }


def units_table(
    snapshot: Snapshot, fields: str = DEFAULT_UNIT_FIELDS, full: bool = False, legend: bool = True
) -> str:
    """One row per published state; a unit that should run but has published nothing yet gets
    one row of dashes, so a freshly started unit does not look forgotten."""
    columns = parse_fields(fields, UNIT_FIELDS)
    names = set(snapshot.states)
    names.update(
        name
        for name in snapshot.units
        if snapshot.desired_state(name).value != "inactive" and not snapshot.states.get(name)
    )
    rows = []
    for name in sorted(names):
        per = snapshot.states.get(name, {})
        if not per:
            rows.append(_unit_row(snapshot, name, None, full))
        for machine_id in sorted(per):
            rows.append(_unit_row(snapshot, name, per[machine_id], full))
    return render(rows, columns, legend)


def _target(snapshot: Snapshot, record: UnitRecord, full: bool) -> str:
    if is_global(record):
        return "global"
    owner = snapshot.owner_of(record.name)
    return machine_legend(snapshot, owner, full) if owner else "-"


def unit_files_table(
    snapshot: Snapshot,
    fields: str = DEFAULT_UNIT_FILE_FIELDS,
    full: bool = False,
    legend: bool = True,
) -> str:
    """One row per unit; a unit the agents refuse (text that does not parse, or a registry key
    no agent accepts, shown by its key) reads "refused", with the reason as its description."""
    columns = parse_fields(fields, UNIT_FILE_FIELDS)
    rows = []
    for name, record in sorted(snapshot.units.items()):
        global_ = is_global(record)
        refused = record.invalid_reason
        state_cell = "-" if global_ else reached_state(snapshot, name)
        rows.append(
            {
                "unit": name,
                "global": "true" if global_ else "false",
                "dstate": snapshot.desired_state(name).value,
                "state": "refused" if refused else state_cell,
                "target": _target(snapshot, record, full),
                "hash": format_hash(record.hash, full),
                "desc": refused or description(record) or "-",
            }
        )
    for key, reason in sorted(snapshot.refused.items()):
        if "/unit/" not in key:
            continue
        rows.append(
            dict.fromkeys(UNIT_FILE_FIELDS, "-") | {"unit": key, "state": "refused", "desc": reason}
        )
    return render(rows, columns, legend)


def refused_messages(snapshot: Snapshot, names: Sequence[str] | None = None) -> list[str]:
    """One line per registry entry the agents refuse (all, or those of the named units): what
    the operator must fix or destroy."""
    lines = []
    for name, record in sorted(snapshot.units.items()):
        reason = record.invalid_reason
        if reason and (names is None or name in names):
            lines.append(
                f"unit {name} is refused by every agent: {reason} (fix it and submit it with "
                f"--replace, or destroy it)"
            )
    for key, reason in sorted(snapshot.refused.items()):
        if names is None or any(key.endswith("/" + n) or f"/{n}/" in key for n in names):
            lines.append(
                f"registry entry {key} is refused by every agent: {reason} (not written by "
                f"fleetctl; remove it with: etcdctl del '{key}')"
            )
    return lines


# ------------------------------------------------------------------------------------ status


def machine_verdicts(snapshot: Snapshot, name: str) -> tuple[str, list[str]]:
    """Why `name` can or cannot run on each machine: a reason that holds for every machine (then
    no per-machine lines), else one `label: reason` per machine, by label."""
    placement = explain(snapshot, name)
    if placement.blocked:
        return placement.blocked, []
    lines = []
    for machine_id, machine in sorted(snapshot.machines.items(), key=lambda m: (m[1].label, m[0])):
        reason = placement.refusals.get(machine_id)
        lines.append(f"{machine.label}: {reason or 'can run it'}")
    return "", lines


def format_ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s ago"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}min {secs}s ago"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes}min ago"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h ago"


def _key(label: str) -> str:
    return f"{label:>10}:"


def _active_line(state: PublishedState, now: float) -> str:
    text = f"{state.active} ({state.sub})"
    if state.since > 0:
        when = datetime.fromtimestamp(state.since).astimezone().isoformat(timespec="seconds")
        text += f" since {when}; {format_ago(now - state.since)}"
    return text


def status_block(snapshot: Snapshot, record: UnitRecord, now: float | None = None) -> str:
    """A systemctl-like block per machine that published the unit, or the reasons it runs
    nowhere."""
    now = time.time() if now is None else now
    name = record.name
    desc = description(record)
    head = f"● {name}" + (f" - {desc}" if desc else "")
    desired = snapshot.desired_state(name).value
    per = snapshot.states.get(name, {})
    owner = snapshot.owner_of(name)
    machine_ids = sorted(per)
    if owner and owner not in per:
        machine_ids = [owner, *machine_ids]
    blocks: list[str] = []
    for machine_id in machine_ids:
        machine = snapshot.machines.get(machine_id)
        where = machine_legend(snapshot, machine_id)
        if machine is not None and machine.name:
            where += f" ({machine.name})"
        lines = [head, f"{_key('Machine')} {where}"]
        state = per.get(machine_id)
        if state is None:
            lines.append(f"{_key('Loaded')} -")
            lines.append(f"{_key('Active')} unknown (no state published yet)")
        else:
            lines.append(f"{_key('Loaded')} {state.load}")
            lines.append(f"{_key('Active')} {_active_line(state, now)}")
        if state is not None and state.active == "deactivating":
            label = machine.label if machine is not None else machine_id[:SHORT_ID]
            why = f": {state.reason}" if state.reason else ""
            lines.append(f"{_key('Moving')} stopping on {label}{why}")
        lines.append(f"{_key('Desired')} {desired}")
        lines.append(f"{_key('Hash')} {record.hash}")
        if state is not None and state.hash and state.hash != record.hash:
            lines.append(f"{_key('Running')} {state.hash} (an older version)")
        blocks.append("\n".join(lines) + "\n")
    refused = record.invalid_reason
    if not blocks and refused:
        lines = [head, f"{_key('Desired')} {desired}", f"{_key('Hash')} {record.hash}"]
        lines.append(f"Refused by every agent: {refused}")
        blocks.append("\n".join(lines) + "\n")
    if not blocks:
        lines = [head, f"{_key('Desired')} {desired}", f"{_key('Hash')} {record.hash}"]
        blocked, verdicts = machine_verdicts(snapshot, name)
        if blocked:
            lines.append(f"Not scheduled: {blocked}")
        else:
            lines.append("Not scheduled:")
            lines.extend(f"  {verdict}" for verdict in verdicts)
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


# ---------------------------------------------------------------------------------- messages


def echo(text: str) -> None:
    typer.echo(text)


def table(text: str) -> None:
    typer.echo(text, nl=False)


def raw(text: str) -> None:
    """Write `text` exactly: no newline added, nothing stripped (echo would drop ANSI codes
    when stdout is not a terminal)."""
    sys.stdout.write(text)
    sys.stdout.flush()


def warn(message: str) -> None:
    typer.echo(message if message.startswith("WARNING: ") else f"WARNING: {message}", err=True)


def error(message: str) -> None:
    typer.echo(f"fleetctl: {message}", err=True)
