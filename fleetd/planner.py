"""The agent's planning step: from a registry snapshot and the local systemd picture to an ordered
list of tasks, each with the reason it is needed. Pure functions; `fleetd.agent` executes.

Two plans per round:
- `plan_claims`: which unowned units this machine bids for now. Every agent computes the same
  ranked placement (`fleetd.placement.plan_placements`); the machine ranked first bids at once,
  the one ranked r-th only after r stagger steps, so a dead or slow favourite costs seconds, and
  equal machines end up balanced because the ranking is load-aware and overlays the pass's own
  decisions.
- `plan_local`: what to do with systemd so that it runs exactly the units this machine owns (and
  the global units it is eligible for), in fleet's order: stop what must go, unload it, load
  what is new, one daemon-reload (when the manager would not see the new files without one),
  stop what should only be loaded, start what should run, and only then release ownership of
  what was taken down, so a unit never runs twice.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fleetd.model import DesiredState, SystemdState
from fleetd.placement import Placement, View, recheck
from fleetd.snapshot import Snapshot, UnitRecord
from fleetd.unitfile import has_section

ACTIVE_STATES = frozenset({"active", "activating", "reloading", "deactivating"})


class TaskKind(enum.StrEnum):
    CLAIM = "claim"
    STOP = "stop"
    UNLOAD = "unload"
    LOAD = "load"
    RELOAD = "reload"
    START = "start"
    RELEASE = "release"


@dataclass(frozen=True)
class Task:
    kind: TaskKind
    unit: str
    reason: str
    text: str = ""
    hash: str = ""

    def __str__(self) -> str:
        return f"{self.kind.value} {self.unit}: {self.reason}" if self.unit else self.reason


@dataclass(frozen=True)
class Wanted:
    """A unit this machine should have, at `target` (loaded or launched)."""

    record: UnitRecord
    target: DesiredState
    reason: str


# --------------------------------------------------------------------------------- claiming


@dataclass(frozen=True)
class ClaimPlan:
    claims: tuple[Task, ...]
    # unit -> (its favourite machine, since when this agent has seen that favourite)
    first_seen: Mapping[str, tuple[str, float]]
    next_wake: float | None  # when a staggered bid falls due


# Only the machines ranked this high bid for a unit: deeper ones would wait BID_DEPTH stagger
# steps, by when the plan has changed (a dead machine leaves it with its lease). It also keeps
# a round's cost independent of the number of machines.
BID_DEPTH = 8


def plan_claims(
    placements: Mapping[str, Placement],
    me: str,
    first_seen: Mapping[str, tuple[str, float]],
    now: float,
    step: float,
) -> ClaimPlan:
    """The machine ranked r-th bids once the same favourite has held the unit for r steps
    without claiming it. The clock restarts when the favourite changes: while claims land the
    plan shifts, and a machine that just became favourite is not a slow one."""
    seen: dict[str, tuple[str, float]] = {}
    for unit, placement in placements.items():
        top = placement.ranked[0] if placement.ranked else ""
        known = first_seen.get(unit)
        seen[unit] = known if known is not None and known[0] == top else (top, now)
    claims: list[Task] = []
    next_wake: float | None = None
    for unit, placement in placements.items():
        bidders = placement.ranked[:BID_DEPTH]
        if me not in bidders:
            continue
        rank = bidders.index(me)
        since = seen[unit][1]
        due = since + rank * step
        if now >= due:
            reason = (
                "ranked first for placement"
                if rank == 0
                else f"ranked {rank + 1}; nobody better claimed it in {now - since:.1f}s"
            )
            claims.append(Task(TaskKind.CLAIM, unit, reason))
        else:
            next_wake = due if next_wake is None else min(next_wake, due)
    return ClaimPlan(tuple(claims), seen, next_wake)


# ------------------------------------------------------------------------------ local state


def still_started(
    snapshot: Snapshot, states: Mapping[str, SystemdState], names: Iterable[str]
) -> frozenset[str]:
    """Of the units the agent started, those it keeps counting as launched by itself: while the
    operator asks for launched, and after a drop to loaded until the unit is seen down (so its
    stop is planned, and retried if it failed). Once forgotten, a later start starts it again."""
    kept = set()
    for name in names:
        desired = snapshot.desired_state(name)
        state = states.get(name)
        if desired is DesiredState.LAUNCHED or (
            desired is DesiredState.LOADED and state is not None and state.active in ACTIVE_STATES
        ):
            kept.add(name)
    return frozenset(kept)


def wanted_units(snapshot: Snapshot, me: str, view: View) -> dict[str, Wanted]:
    """Units this machine should have loaded or running now, and why."""
    wanted: dict[str, Wanted] = {}
    for name in view.owned_by.get(me, ()):
        record = snapshot.units.get(name)
        state = snapshot.desired_state(name)
        if record is None or state is DesiredState.INACTIVE:
            continue
        if moving_away(snapshot, name, me) or not recheck(snapshot, name, me, view).ok:
            continue
        wanted[name] = Wanted(record, state, f"owned here, desired {state.value}")
    for name in view.globals_on.get(me, ()):
        record = snapshot.units[name]
        state = snapshot.desired_state(name)
        wanted[name] = Wanted(record, state, f"global unit, desired {state.value}")
    return wanted


def moving_away(snapshot: Snapshot, name: str, me: str) -> bool:
    """A rebalance asked for the unit elsewhere, on a live machine, and the unit is not pinned
    (Pin=true units only move when their machine dies)."""
    target = snapshot.moves.get(name)
    if target is None or target == me or target not in snapshot.machines:
        return False
    record = snapshot.units.get(name)
    req = record.requirements if record else None
    return req is not None and not req.pin


def release_reasons(snapshot: Snapshot, me: str, view: View) -> dict[str, str]:
    """Units this machine owns but must give up, with the reason."""
    out: dict[str, str] = {}
    for name in view.owned_by.get(me, ()):
        if name not in snapshot.units:
            out[name] = "unit was destroyed"
        elif snapshot.desired_state(name) is DesiredState.INACTIVE:
            out[name] = "desired state is inactive"
        elif moving_away(snapshot, name, me):
            target = snapshot.machines[snapshot.moves[name]]
            out[name] = f"rebalance moves it to {target.label}"
        else:
            verdict = recheck(snapshot, name, me, view)
            if not verdict.ok:
                out[name] = f"may no longer run here: {verdict.reason}"
    return out


def _reload_reason(
    unloads: list[Task],
    loads: list[Task],
    states: Mapping[str, SystemdState],
    wanted: Mapping[str, Wanted],
    loaded: Mapping[str, str],
) -> str:
    """Why this round needs a daemon-reload ("" when it does not).

    A unit systemd does not know (load state "not-found") is read from disk when it is next
    needed, once its link has changed the unit search path (systemd retries a not-found unit
    then, without a reload): a round that only loads such units needs none, and with a couple
    of hundred units loaded a reload costs the manager 0.2-1 s. A reload is due when a file
    went away, when a unit systemd has in memory gets a new file (it would keep its old text),
    when a new unit has an [Install] section (its .wants links are read at a reload), and when
    a unit we have linked still reads "not-found" (a link systemd has not seen: read it now,
    rather than fail its start round after round).
    """
    if unloads:
        return "unit files changed"
    for task in loads:
        state = states.get(task.unit)
        if state is None or state.load != "not-found" or has_section(task.text, "Install"):
            return "unit files changed"
    for name in wanted:
        state = states.get(name)
        if name in loaded and state is not None and state.load == "not-found":
            return f"systemd does not see the file of {name}"
    return ""


def plan_local(
    snapshot: Snapshot,
    me: str,
    view: View,
    loaded: Mapping[str, str],
    states: Mapping[str, SystemdState],
    started: frozenset[tuple[str, str]],
) -> list[Task]:
    """Tasks that bring systemd to the wanted picture, in a safe order, each with its reason.

    `loaded` maps the units we wrote to their content hash; `states` is systemd's view of them;
    `started` holds (unit, hash) pairs this agent started already, so a unit that failed is not
    restarted in a loop (systemd's Restart= is the tool for that). As in fleet, only a unit this
    agent launched is stopped when its desired state drops to loaded: a loaded unit that systemd
    started as another unit's dependency (its [Install] WantedBy= enabled at load) keeps running.
    """
    wanted = wanted_units(snapshot, me, view)
    releasing = release_reasons(snapshot, me, view)

    def is_active(name: str) -> bool:
        state = states.get(name)
        return state is not None and state.active in ACTIVE_STATES

    stops: list[Task] = []
    unloads: list[Task] = []
    loads: list[Task] = []
    for name in sorted(loaded):
        if name in wanted:
            want = wanted[name]
            if loaded[name] == want.record.hash:
                continue
            reason = "unit content changed"
        else:
            reason = releasing.get(name, "not scheduled here")
        if is_active(name):
            stops.append(Task(TaskKind.STOP, name, reason))
        unloads.append(Task(TaskKind.UNLOAD, name, reason))
    for name, want in sorted(wanted.items()):
        if loaded.get(name) != want.record.hash:
            loads.append(Task(TaskKind.LOAD, name, want.reason, want.record.text, want.record.hash))
    tasks = stops + unloads + loads
    reload_reason = _reload_reason(unloads, loads, states, wanted, loaded)
    if reload_reason:
        tasks.append(Task(TaskKind.RELOAD, "", reload_reason))
    changed = {t.unit for t in unloads}
    launched_here = {name for name, _ in started}
    for name, want in sorted(wanted.items()):
        if want.target is DesiredState.LOADED:
            if name in launched_here and is_active(name) and name not in changed:
                tasks.append(Task(TaskKind.STOP, name, "desired state is loaded"))
        elif (name, want.record.hash) not in started and (not is_active(name) or name in changed):
            tasks.append(
                Task(TaskKind.START, name, "desired state is launched", hash=want.record.hash)
            )
    for name, reason in releasing.items():
        tasks.append(Task(TaskKind.RELEASE, name, reason))
    return tasks
