"""Everything fleetctl prints: aligned tables, field selection, status blocks and messages.

Tables are aligned the way fleet's Go tabwriter aligns them (cells padded with tabs to multiples
of eight columns), so scripts written against fleet's output keep working. Commands never format
by themselves: they hand a snapshot to a function here and print the string it returns. Messages
for people (warnings, errors) go to stderr, data goes to stdout.

`--output json` gives one JSON document per command instead of the table. Its field names are a
stable interface (listed in README "JSON output"): full machine ids and hashes, states as the
registry holds them, times as epoch seconds; a value that is unknown is null, never "-".
The progress line of waiting commands is drawn here too, on stderr and only on a terminal.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, TextIO

import typer

from fleetd.errors import FleetError, InvalidUnitFile, InvalidUnitName
from fleetd.model import PublishedState
from fleetd.placement import explain
from fleetd.rebalance import Move
from fleetd.snapshot import Snapshot, UnitRecord
from fleetd.unitfile import expand_specifiers, parse_unit_name, parsed_unit_file

TAB_WIDTH = 8
PADDING = 1
SHORT_ID = 8
SHORT_HASH = 7


class UnknownField(FleetError):
    """A --fields value names a column the listing does not have."""


class UnknownFormat(FleetError):
    """An --output value that is not a format fleetctl writes."""


OUTPUT_FORMATS = ("table", "json")


def parse_output(value: str) -> str:
    """The --output format; UnknownFormat names the valid ones."""
    if value not in OUTPUT_FORMATS:
        raise UnknownFormat(
            f"unknown output format {value!r}: use --output {' or '.join(OUTPUT_FORMATS)}"
        )
    return value


def document(data: Mapping[str, Any]) -> str:
    """One JSON document, keys in the order built (the order documented), newline-terminated."""
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


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
    if any(len(line) != count for line in lines):
        raise ValueError("every row of a table needs the same number of cells")
    widths = [
        max((len(cell) + PADDING for cell in column if cell), default=0)
        for column in list(zip(*lines, strict=True))[:-1]
    ]
    # A cell's padding depends only on its length: one string per length and column, looked up
    # (listings have tens of thousands of rows).
    pads = [[_tab_padding(" " * size, width) for size in range(width + 1)] for width in widths]
    out = []
    for line in lines:
        # The last cell has no padding: zip stops at the shorter pads.
        cells = "".join([cell + pad[len(cell)] for cell, pad in zip(line, pads, strict=False)])
        out.append(cells + line[-1] + "\n")
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
        text = parsed_unit_file(record.text, record.name).description
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

MACHINE_FIELDS = ("machine", "ip", "metadata", "version", "renewed")
DEFAULT_MACHINE_FIELDS = "machine,ip,metadata"
FULL_MACHINE_FIELDS = "machine,ip,metadata,version,renewed"
UNIT_FIELDS = ("unit", "load", "active", "sub", "machine", "hash")
DEFAULT_UNIT_FIELDS = "unit,machine,active,sub"
UNIT_FILE_FIELDS = ("unit", "global", "dstate", "state", "target", "hash", "desc")
DEFAULT_UNIT_FILE_FIELDS = "unit,hash,dstate,state,target"


def machine_fields(fields: str | None, full: bool) -> str:
    """fleet's three columns by default; --full adds the version and the lease renewal."""
    if fields is not None:
        return fields
    return FULL_MACHINE_FIELDS if full else DEFAULT_MACHINE_FIELDS


def format_renewed(age: float | None) -> str:
    return "-" if age is None else format_ago(age)


def machines_table(
    snapshot: Snapshot,
    fields: str = DEFAULT_MACHINE_FIELDS,
    full: bool = False,
    legend: bool = True,
    ages: Mapping[str, float] | None = None,
) -> str:
    """`ages`: seconds since each machine renewed its lease (the `renewed` column)."""
    columns = parse_fields(fields, MACHINE_FIELDS)
    ages = ages or {}
    rows = [
        {
            "machine": machine_id_legend(m.id, full),
            "ip": m.public_ip or "-",
            "metadata": format_metadata(m.metadata),
            "version": m.version or "-",
            "renewed": format_renewed(ages.get(m.id)),
        }
        for _, m in sorted(snapshot.machines.items())
    ]
    return render(rows, columns, legend)


def machines_document(snapshot: Snapshot, ages: Mapping[str, float]) -> dict[str, Any]:
    return {
        "machines": [
            {
                "id": m.id,
                "name": m.name or None,
                "ip": m.public_ip or None,
                "metadata": dict(sorted(m.metadata.items())),
                "version": m.version or None,
                "lease_renewed_seconds_ago": ages.get(m.id),
            }
            for _, m in sorted(snapshot.machines.items())
        ]
    }


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


def _listed_units(snapshot: Snapshot) -> set[str]:
    """Units with a published state, and units whose desired state asks for them to be loaded
    or to run (a unit's desired state is written and deleted with its content, so list-units
    needs no unit texts to know them)."""
    names = set(snapshot.states)
    names.update(
        name
        for name, desired in snapshot.desired.items()
        if desired.state.value != "inactive" and not snapshot.states.get(name)
    )
    return names


def units_table(
    snapshot: Snapshot, fields: str = DEFAULT_UNIT_FIELDS, full: bool = False, legend: bool = True
) -> str:
    """One row per published state; a unit that should run but has published nothing yet gets
    one row of dashes, so a freshly started unit does not look forgotten."""
    columns = parse_fields(fields, UNIT_FIELDS)
    rows = []
    for name in sorted(_listed_units(snapshot)):
        per = snapshot.states.get(name, {})
        if not per:
            rows.append(_unit_row(snapshot, name, None, full))
        for machine_id in sorted(per):
            rows.append(_unit_row(snapshot, name, per[machine_id], full))
    return render(rows, columns, legend)


def _state_entry(name: str, machine_id: str | None, state: PublishedState | None) -> dict[str, Any]:
    return {
        "unit": name,
        "machine": machine_id,
        "load": state.load if state else None,
        "active": state.active if state else None,
        "sub": state.sub if state else None,
        "hash": (state.hash or None) if state else None,
        "since": (state.since or None) if state else None,
    }


def units_document(snapshot: Snapshot) -> dict[str, Any]:
    """The rows of list-units: one per published state, and one with nulls for a unit that
    should run but has published nothing yet."""
    entries = []
    for name in sorted(_listed_units(snapshot)):
        per = snapshot.states.get(name, {})
        if not per:
            entries.append(_state_entry(name, None, None))
        for machine_id in sorted(per):
            entries.append(_state_entry(name, machine_id, per[machine_id]))
    return {"units": entries}


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


def unit_files_document(snapshot: Snapshot) -> dict[str, Any]:
    entries = []
    for name, record in sorted(snapshot.units.items()):
        global_ = is_global(record)
        entries.append(
            {
                "unit": name,
                "global": global_,
                "desired_state": snapshot.desired_state(name).value,
                "state": None if global_ else reached_state(snapshot, name),
                "machine": None if global_ else snapshot.owner_of(name),
                "hash": record.hash,
                "description": description(record) or None,
                "refused": record.invalid_reason,
            }
        )
    # Entries no agent acts on (a bad name, an undecodable or oversized value): by key.
    refused = [{"key": key, "reason": reason} for key, reason in sorted(snapshot.refused.items())]
    return {"unit_files": entries, "refused_entries": refused}


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
        if state is not None and state.container is not None:
            lines.append(
                f"{_key('Container')} {state.container.short_id} "
                f"(image {state.container.image or 'unknown'})"
            )
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


def status_document(snapshot: Snapshot, records: Sequence[UnitRecord]) -> dict[str, Any]:
    """What `status` shows, per unit: the machines that published it, or why none runs it."""
    units = []
    for record in records:
        name = record.name
        per = snapshot.states.get(name, {})
        owner = snapshot.owner_of(name)
        machine_ids = sorted(per)
        if owner and owner not in per:
            machine_ids = [owner, *machine_ids]
        machines = []
        for machine_id in machine_ids:
            machine = snapshot.machines.get(machine_id)
            entry = _state_entry(name, machine_id, per.get(machine_id))
            del entry["unit"]
            entry["name"] = machine.name or None if machine else None
            entry["ip"] = machine.public_ip or None if machine else None
            machines.append(entry)
        not_scheduled: dict[str, Any] | None = None
        if not machines:
            blocked, _ = machine_verdicts(snapshot, name)
            refusals = explain(snapshot, name).refusals if not blocked else {}
            not_scheduled = {
                "reason": blocked or None,
                "machines": {m: refusals.get(m) for m in sorted(snapshot.machines)}
                if not blocked
                else {},
            }
        units.append(
            {
                "unit": name,
                "description": description(record) or None,
                "desired_state": snapshot.desired_state(name).value,
                "hash": record.hash,
                "owner": owner,
                "machines": machines,
                "not_scheduled": not_scheduled,
                "refused": record.invalid_reason,
            }
        )
    return {"units": units}


# --------------------------------------------------------------------------------- rebalance


def rebalance_document(moves: Sequence[Move], imbalance: int) -> dict[str, Any]:
    return {
        "imbalance": imbalance,
        "moves": [
            {"unit": m.unit, "from": m.source, "to": m.target, "reason": m.reason} for m in moves
        ],
    }


# ---------------------------------------------------------------------------------- progress


class Progress:
    """One status line that a waiting command rewrites in place, on a terminal only.

    It lives on stdout, where the command's own lines go, so it can be erased before each of
    them: what remains on the screen is exactly what a pipe would have received. Off a terminal
    it draws nothing, so scripts and logs see the output they always did.
    """

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream
        self._shown = False

    @classmethod
    def on_stdout(cls) -> Progress:
        stream = sys.stdout
        try:
            terminal = stream.isatty()
        except (AttributeError, ValueError):
            terminal = False
        return cls(stream if terminal else None)

    @property
    def enabled(self) -> bool:
        return self.stream is not None

    def show(self, text: str) -> None:
        if self.stream is None:
            return
        width = shutil.get_terminal_size((100, 24)).columns - 1
        if len(text) > width:
            text = text[: max(0, width - 3)] + "..."
        # Carriage return, then erase to the end of the line: the new text replaces the old.
        self.stream.write("\r\x1b[K" + text)
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        if self.stream is None or not self._shown:
            return
        self.stream.write("\r\x1b[K")
        self.stream.flush()
        self._shown = False


def progress_text(done: int, total: int, slowest: str, reason: str) -> str:
    return f"[{done}/{total} done] waiting for {slowest}: {reason}"


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
