"""Placement as a pipeline of pure checkers and scorers.

A checker answers, for one unit and one machine, whether the unit may run there and if not why
(`Verdict`). Scorers order the machines that pass. Both read a `View`: indexes derived once per
planning pass from a registry snapshot, onto which the decisions of the same pass are overlaid, so
that two anti-affine units never land together because they were planned in one pass (as Nomad
does).

The same checkers serve three callers:
- `plan_placements`: every agent computes the same ranked plan for all unowned units; the machine
  ranked first bids at once, the others later (see fleetd.planner);
- `recheck`: an owner asks whether a unit it runs may stay (older claims win over newer ones);
- `explain`: fleetctl shows, per machine, why a waiting unit cannot run there.

Nothing here does I/O.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from fleetd.model import DesiredState, Machine
from fleetd.snapshot import Snapshot, UnitRecord
from fleetd.unitfile import (
    Requirements,
    Spread,
    any_glob_match,
    parse_unit_name,
    template_group,
)

# An overlaid (planned, not yet claimed) placement is newer than every real claim.
PLANNED = 1 << 62


@dataclass(frozen=True)
class Verdict:
    """A checker's answer for one unit on one machine: ok, or the reason it may not run there."""

    ok: bool
    reason: str = ""


OK = Verdict(True)


def refuse(reason: str) -> Verdict:
    return Verdict(False, reason)


@dataclass(frozen=True)
class Placement:
    """The plan for one unowned unit: feasible machines best first, and why the others refuse.

    `blocked` is a reason that holds for every machine (an invalid unit file, no machines).
    """

    unit: str
    ranked: tuple[str, ...] = ()
    refusals: Mapping[str, str] = field(default_factory=dict)
    blocked: str = ""


# --------------------------------------------------------------------------------------- view


class View:
    """Indexes over one snapshot for one planning pass, plus the pass's own decisions.

    Besides where each unit is, the view keeps, per machine, zone and region, the placed units of
    each template group and the placed units that declare Conflicts, so a limit, a spread score
    or a conflict check costs the units it can concern, not every unit of the machine.
    """

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.machines: dict[str, Machine] = dict(sorted(snapshot.machines.items()))
        self.requirements: dict[str, Requirements] = {}
        for name, record in snapshot.units.items():
            req = record.requirements
            if req is not None:
                self.requirements[name] = req
        # Where each non-global unit runs, and the claim revision that got it there.
        self.location: dict[str, str] = {}
        self.revision: dict[str, int] = {}
        self.on_machine: dict[str, set[str]] = {m: set() for m in self.machines}
        # Placed units by zone and by region, so level rules cost the units of one zone, not of
        # the whole cluster, per check.
        self.in_zone: dict[str, set[str]] = {}
        self.in_region: dict[str, set[str]] = {}
        # (level, key, template group) -> placed instances of that group there.
        self.group_at: dict[tuple[str, str, str], set[str]] = {}
        # machine -> placed units there that declare Conflicts.
        self.conflictors_on: dict[str, set[str]] = {}
        self._sorted: dict[tuple[str, str], list[str]] = {}
        # Told the machine whose placed units changed (fleetd.ranking keeps buckets by it).
        self.listeners: list[Callable[[str], None]] = []
        self.index_rules()
        # The registry's owner keys by machine (sorted names), whatever the unit or machine:
        # an agent looks at its own units without scanning everyone's.
        self.owned_by: dict[str, list[str]] = {}
        for name, owner in snapshot.owners.items():
            self.owned_by.setdefault(owner.machine_id, []).append(name)
            if owner.machine_id in self.machines and name in self.requirements:
                self._put(name, owner.machine_id, owner.revision)
        for names in self.owned_by.values():
            names.sort()
        self.globals_on: dict[str, list[str]] = {}
        self._compute_globals()

    def index_rules(self) -> None:
        """The sets of units that declare the rarer rules, so checks skip them when empty."""
        reqs = self.requirements
        self.replacers = {n for n, r in reqs.items() if r.replaces}
        self.conflictors = {n for n, r in reqs.items() if r.conflicts}
        self.zone_conflictors = {n for n, r in reqs.items() if r.zone_conflicts}
        self.region_conflictors = {n for n, r in reqs.items() if r.region_conflicts}

    def declarers(self) -> set[str]:
        """Units whose patterns (Conflicts, ZoneConflicts, RegionConflicts, Replaces) can name
        other units: the only ones that can make a unit's placement depend on its name."""
        return self.conflictors | self.zone_conflictors | self.region_conflictors | self.replacers

    def set_requirements(self, name: str, req: Requirements | None) -> None:
        """A unit's content changed (None: gone or invalid). The unit must not be placed in the
        view meanwhile: take it out first and put it back after."""
        if req is None:
            self.requirements.pop(name, None)
        else:
            self.requirements[name] = req
        rules = (
            (self.replacers, bool(req and req.replaces)),
            (self.conflictors, bool(req and req.conflicts)),
            (self.zone_conflictors, bool(req and req.zone_conflicts)),
            (self.region_conflictors, bool(req and req.region_conflicts)),
        )
        for members, declares in rules:
            if declares:
                members.add(name)
            else:
                members.discard(name)

    # -- overlay

    def _levels(self, machine_id: str) -> list[tuple[str, str]]:
        levels = [("machine", machine_id)]
        machine = self.machines.get(machine_id)
        if machine is not None and machine.zone is not None:
            levels.append(("zone", machine.zone))
        if machine is not None and machine.region is not None:
            levels.append(("region", machine.region))
        return levels

    def _put(self, unit: str, machine_id: str, revision: int) -> None:
        self.location[unit] = machine_id
        self.revision[unit] = revision
        group = template_group(unit)
        index = {"machine": self.on_machine, "zone": self.in_zone, "region": self.in_region}
        for level, key in self._levels(machine_id):
            index[level].setdefault(key, set()).add(unit)
            self._sorted.pop((level, key), None)
            if group is not None:
                self.group_at.setdefault((level, key, group), set()).add(unit)
        if unit in self.conflictors:
            self.conflictors_on.setdefault(machine_id, set()).add(unit)
        for listener in self.listeners:
            listener(machine_id)

    def place(self, unit: str, machine_id: str, revision: int = PLANNED) -> None:
        """Overlay a decision of this pass (or put a unit back where it was, with its revision)."""
        self.remove(unit)
        self._put(unit, machine_id, revision)

    def remove(self, unit: str) -> None:
        machine_id = self.location.pop(unit, None)
        self.revision.pop(unit, None)
        if machine_id is None:
            return
        group = template_group(unit)
        index = {"machine": self.on_machine, "zone": self.in_zone, "region": self.in_region}
        for level, key in self._levels(machine_id):
            index[level].get(key, set()).discard(unit)
            self._sorted.pop((level, key), None)
            if group is not None:
                self.group_at.get((level, key, group), set()).discard(unit)
        self.conflictors_on.get(machine_id, set()).discard(unit)
        for listener in self.listeners:
            listener(machine_id)

    # -- global units

    def _compute_globals(self) -> None:
        """Global units run on every machine that matches and where nothing placed conflicts;
        among conflicting global units the first by name wins. Owned units take precedence."""
        self.globals_on = {}
        names = sorted(
            n
            for n, req in self.requirements.items()
            if req.global_ and self.snapshot.desired_state(n) is not DesiredState.INACTIVE
        )
        for machine_id, machine in self.machines.items():
            chosen: list[str] = []
            for name in names:
                req = self.requirements[name]
                if not check_metadata(name, req, machine, self).ok:
                    continue
                blockers = list(self.on_machine.get(machine_id, ())) + chosen
                if any(_conflict_pattern(self, name, other) for other in blockers):
                    continue
                chosen.append(name)
            self.globals_on[machine_id] = chosen

    # -- queries

    def zone_of_machine(self, machine_id: str) -> str | None:
        machine = self.machines.get(machine_id)
        return machine.zone if machine else None

    def region_of_machine(self, machine_id: str) -> str | None:
        machine = self.machines.get(machine_id)
        return machine.region if machine else None

    def present(self, machine_id: str, before: int | None = None) -> list[str]:
        """Units running (or planned) on a machine. With `before`, only claims older than that
        revision count, and global units do not: an owner re-checking its unit yields only to
        what was there first."""
        owned = self.placed_at("machine", machine_id, before)
        if before is not None:
            return owned
        return owned + list(self.globals_on.get(machine_id, ()))

    def load(self, machine_id: str) -> int:
        """How many units run (or are planned) on a machine, global ones included."""
        return len(self.on_machine.get(machine_id, ())) + len(self.globals_on.get(machine_id, ()))

    def present_conflictors(self, machine_id: str, before: int | None = None) -> list[str]:
        """The units of `present` that declare Conflicts, in the same order."""
        mine = self.conflictors_on.get(machine_id, set())
        owned = sorted(
            u for u in mine if before is None or self.revision.get(u, PLANNED) < before
        )
        if before is not None:
            return owned
        return owned + [g for g in self.globals_on.get(machine_id, ()) if g in self.conflictors]

    def placed_at(self, level: str, key: str | None, before: int | None = None) -> list[str]:
        """Non-global units placed on one machine, zone or region (level "machine", "zone",
        "region"); with `before`, only claims older than that revision."""
        if key is None:
            return []
        cached = self._sorted.get((level, key))
        if cached is None:
            index = {"machine": self.on_machine, "zone": self.in_zone, "region": self.in_region}
            cached = self._sorted[(level, key)] = sorted(index[level].get(key, ()))
        if before is None:
            return list(cached)
        return [u for u in cached if self.revision.get(u, PLANNED) < before]

    def group_count(
        self, unit: str, group: str, level: str, key: str | None, before: int | None = None
    ) -> int:
        """Placed instances of template `group` on one machine, zone or region, `unit` itself
        not counted; with `before`, only claims older than that revision."""
        if key is None:
            return 0
        members = self.group_at.get((level, key, group))
        if not members:
            return 0
        if before is None:
            return len(members) - (unit in members)
        return sum(
            1 for u in members if u != unit and self.revision.get(u, PLANNED) < before
        )

    def label(self, machine_id: str) -> str:
        machine = self.machines.get(machine_id)
        return machine.label if machine else machine_id[:8]


def _conflict_pattern(view: View, unit: str, other: str) -> str | None:
    """The Conflicts pattern, either way round, that keeps `unit` and `other` apart."""
    if unit == other:
        return None
    mine = view.requirements.get(unit)
    theirs = view.requirements.get(other)
    if mine is not None:
        hit = any_glob_match(mine.conflicts, other)
        if hit:
            return hit
    if theirs is not None:
        hit = any_glob_match(theirs.conflicts, unit)
        if hit:
            return hit
    return None


# ---------------------------------------------------------------------------------- checkers

Checker = Callable[[str, Requirements, Machine, View, "int | None"], Verdict]


def check_machine_id(
    unit: str, req: Requirements, machine: Machine, view: View, before: int | None = None
) -> Verdict:
    if req.machine_id is None or machine.id.startswith(req.machine_id):
        return OK
    return refuse(f"unit is pinned to MachineID={req.machine_id}")


def check_metadata(
    unit: str, req: Requirements, machine: Machine, view: View, before: int | None = None
) -> Verdict:
    """Positive values of one key are OR, keys are AND; `key!=value` excludes that value and
    passes a machine that lacks the key."""
    wanted: dict[str, list[str]] = {}
    for rule in req.metadata:
        if rule.negated:
            if machine.metadata.get(rule.key) == rule.value:
                return refuse(f"metadata {rule} excluded")
        else:
            wanted.setdefault(rule.key, []).append(rule.value)
    for key, values in wanted.items():
        have = machine.metadata.get(key)
        if have not in values:
            shown = " or ".join(f"{key}={v}" for v in values)
            return refuse(f"metadata {shown} not matched")
    return OK


def check_topology(
    unit: str, req: Requirements, machine: Machine, view: View, before: int | None = None
) -> Verdict:
    if req.uses_zone and machine.zone is None:
        return refuse("machine has no zone metadata, which the unit's zone rules need")
    if req.uses_region and machine.region is None:
        return refuse("machine has no region metadata, which the unit's region rules need")
    return OK


def _replaces(view: View, replacer: str, replaced: str) -> str | None:
    req = view.requirements.get(replacer)
    return any_glob_match(req.replaces, replaced) if req else None


def check_replaced(
    unit: str, req: Requirements, machine: Machine, view: View, before: int | None = None
) -> Verdict:
    """A unit may not run where a unit that replaces it runs. Two units that replace each other
    never run at the same time anywhere: the one placed first keeps running."""
    if not view.replacers:
        return OK
    for other in view.present(machine.id):
        if other == unit or other not in view.replacers:
            continue
        pattern = _replaces(view, other, unit)
        if pattern and not _replaces(view, unit, other):
            return refuse(f"replaced by {other} (Replaces={pattern})")
    if unit not in view.replacers:
        return OK
    for other in sorted(view.replacers):
        where = view.location.get(other)
        if where is None or other == unit:
            continue
        if before is not None and view.revision.get(other, PLANNED) >= before:
            continue
        if _replaces(view, other, unit) and _replaces(view, unit, other):
            return refuse(f"{other} runs on {view.label(where)} and the two replace each other")
    return OK


def _peer_verdict(
    unit: str,
    peers: Iterable[str],
    option: str,
    machine: Machine,
    view: View,
    same: Callable[[str, str], bool],
    level: str,
) -> Verdict:
    for peer in peers:
        where = view.location.get(peer)
        if where is None:
            holders = [m for m, units in view.globals_on.items() if peer in units]
            if machine.id in holders:
                continue
            return refuse(f"waits for {peer} to be scheduled ({option}={peer})")
        if not same(where, machine.id):
            return refuse(f"{option}={peer}: {peer} runs in another {level} ({view.label(where)})")
    return OK


def check_machine_of(
    unit: str, req: Requirements, machine: Machine, view: View, before: int | None = None
) -> Verdict:
    return _peer_verdict(
        unit, req.machine_of, "MachineOf", machine, view, lambda a, b: a == b, "machine"
    )


def _same_level(view: View, level: str) -> Callable[[str, str], bool]:
    """Whether two machines share a zone (or region); a machine without the key shares none."""

    def same(a: str, b: str) -> bool:
        key = view.zone_of_machine if level == "zone" else view.region_of_machine
        mine = key(a)
        return mine is not None and mine == key(b)

    return same


def check_zone_of(
    unit: str, req: Requirements, machine: Machine, view: View, before: int | None = None
) -> Verdict:
    return _peer_verdict(
        unit, req.zone_of, "ZoneOf", machine, view, _same_level(view, "zone"), "zone"
    )


def check_region_of(
    unit: str, req: Requirements, machine: Machine, view: View, before: int | None = None
) -> Verdict:
    return _peer_verdict(
        unit, req.region_of, "RegionOf", machine, view, _same_level(view, "region"), "region"
    )


def check_conflicts(
    unit: str, req: Requirements, machine: Machine, view: View, before: int | None = None
) -> Verdict:
    """Conflicts hold both ways: a one-way declaration keeps both units apart. Without patterns
    of its own a unit can only meet the patterns of units that declare some."""
    if req.conflicts:
        others = view.present(machine.id, before)
    else:
        others = view.present_conflictors(machine.id, before)
    for other in others:
        pattern = _conflict_pattern(view, unit, other)
        if pattern:
            return refuse(f"conflicts with {other} (Conflicts={pattern})")
    return OK


def _level_patterns(req: Requirements | None, level: str) -> tuple[str, ...]:
    if req is None:
        return ()
    return req.zone_conflicts if level == "zone" else req.region_conflicts


def _level_conflicts(
    unit: str,
    machine: Machine,
    view: View,
    before: int | None,
    level: str,
) -> Verdict:
    option = "ZoneConflicts" if level == "zone" else "RegionConflicts"
    mine = machine.zone if level == "zone" else machine.region
    if mine is None:
        return OK
    own = _level_patterns(view.requirements.get(unit), level)
    declaring = view.zone_conflictors if level == "zone" else view.region_conflictors
    if not own and not declaring:
        return OK
    for other in view.placed_at(level, mine, before):
        if other == unit:
            continue
        # Only units that declare level conflicts can match; skip the rest cheaply.
        pattern = any_glob_match(own, other) if own else None
        if pattern is None and other in declaring:
            pattern = any_glob_match(_level_patterns(view.requirements.get(other), level), unit)
        if pattern:
            return refuse(f"{level} {mine} already runs {other} ({option}={pattern})")
    return OK


def check_zone_conflicts(
    unit: str, req: Requirements, machine: Machine, view: View, before: int | None = None
) -> Verdict:
    return _level_conflicts(unit, machine, view, before, "zone")


def check_region_conflicts(
    unit: str, req: Requirements, machine: Machine, view: View, before: int | None = None
) -> Verdict:
    return _level_conflicts(unit, machine, view, before, "region")


def check_limits(
    unit: str, req: Requirements, machine: Machine, view: View, before: int | None = None
) -> Verdict:
    """MaxPerMachine/Zone/Region count running instances of the unit's template group."""
    group = template_group(unit)
    if group is None:
        return OK
    limits = (
        ("MaxPerMachine", req.max_per_machine, "machine", machine.id),
        ("MaxPerZone", req.max_per_zone, "zone", machine.zone),
        ("MaxPerRegion", req.max_per_region, "region", machine.region),
    )
    for option, limit, level, key in limits:
        if limit is None:
            continue
        if view.group_count(unit, group, level, key, before) >= limit:
            where = f"on {machine.label}" if level == "machine" else f"in {key}"
            return refuse(f"{option}={limit} reached {where}")
    return OK


# Cheapest first: most refusals come from the first three.
CHECKERS: tuple[Checker, ...] = (
    check_machine_id,
    check_metadata,
    check_topology,
    check_machine_of,
    check_zone_of,
    check_region_of,
    check_conflicts,
    check_zone_conflicts,
    check_region_conflicts,
    check_limits,
    check_replaced,
)


def names_by_pattern(req: Requirements, unit: str) -> str | None:
    """The first of `req`'s patterns (every kind) that matches `unit`, if any."""
    return any_glob_match(
        req.conflicts + req.zone_conflicts + req.region_conflicts + req.replaces, unit
    )


# What decides alone for a plain unit (below): the machine's own properties.
STATIC_CHECKERS: tuple[Checker, ...] = (check_machine_id, check_metadata, check_topology)


def is_plain(view: View, unit: str, req: Requirements) -> bool:
    """Whether only machine-static rules and the spread decide where `unit` goes."""
    if not req.self_contained or unit in view.snapshot.moves:
        return False
    for other in view.declarers():
        theirs = view.requirements.get(other)
        if theirs is not None and names_by_pattern(theirs, unit):
            return False
    return True


def feasible(
    unit: str, req: Requirements, machine: Machine, view: View, before: int | None = None
) -> Verdict:
    for checker in CHECKERS:
        verdict = checker(unit, req, machine, view, before)
        if not verdict.ok:
            return verdict
    return OK


# ----------------------------------------------------------------------------------- scorers

Score = tuple[int, ...]
Scorer = Callable[[str, Requirements, Machine, View], Score]


def score_move(unit: str, req: Requirements, machine: Machine, view: View) -> Score:
    """The machine a rebalance chose for the unit comes first (if it can run the unit at all)."""
    return (0 if view.snapshot.moves.get(unit) == machine.id else 1,)


def score_replaces(unit: str, req: Requirements, machine: Machine, view: View) -> Score:
    """A replacing unit goes where the unit it replaces runs."""
    if not req.replaces:
        return (1,)
    for other in view.present(machine.id):
        if other != unit and _replaces(view, unit, other) and not _replaces(view, other, unit):
            return (0,)
    return (1,)


def score_spread(unit: str, req: Requirements, machine: Machine, view: View) -> Score:
    """Instances of one template prefer the region/zone, then the machine, with fewest of them;
    other units prefer the machine that runs fewest units."""
    group = template_group(unit)
    load = view.load(machine.id)
    if group is None or req.spread is Spread.NONE:
        return (load,)
    on_machine = view.group_count(unit, group, "machine", machine.id)
    if req.spread is Spread.MACHINE:
        return (on_machine, load)
    in_zone = view.group_count(unit, group, "zone", machine.zone)
    if req.spread is Spread.ZONE:
        return (in_zone, on_machine, load)
    return (view.group_count(unit, group, "region", machine.region), in_zone, on_machine, load)


RING = 1 << 64


@functools.lru_cache(maxsize=1 << 16)
def ring_position(name: str) -> int:
    """Where a unit or machine sits on the tiebreak ring (a hash: the same on every agent)."""
    import hashlib  # on first use: loading OpenSSL is a cost every fleetctl listing would pay

    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big")


def score_tiebreak(unit: str, req: Requirements, machine: Machine, view: View) -> Score:
    """Equal machines are ordered by their distance on a hash ring, clockwise from the unit:
    stable on every agent, yet different per unit, so equal units do not all prefer the same
    machine; and the machines of a bucket of equals, kept sorted by ring position, give any
    unit its order by one search (`fleetd.ranking`)."""
    return ((ring_position(machine.id) - ring_position(unit)) % RING,)


SCORERS: tuple[Scorer, ...] = (score_move, score_replaces, score_spread, score_tiebreak)


def score(unit: str, req: Requirements, machine: Machine, view: View) -> Score:
    """Every scorer's terms in order: machines sort by this, then by id."""
    terms: Score = ()
    for scorer in SCORERS:
        terms += scorer(unit, req, machine, view)
    return terms


def rank(unit: str, req: Requirements, machines: Iterable[Machine], view: View) -> list[str]:
    scored = [(score(unit, req, m, view), m.id) for m in machines]
    scored.sort()
    return [machine_id for _, machine_id in scored]


# ------------------------------------------------------------------------------------ passes


def unit_blocked(snapshot: Snapshot, view: View, unit: str) -> str:
    """A reason that keeps `unit` off every machine, or "" when only machines can refuse it."""
    record = snapshot.units.get(unit)
    if record is None:
        return "unit is not in the registry"
    invalid = record.invalid_reason
    if invalid:
        return invalid
    if parse_unit_name(unit).is_template:
        return "cannot activate a template: start an instance such as " + unit.replace(
            "@.", "@1.", 1
        )
    if snapshot.desired_state(unit) is DesiredState.INACTIVE:
        return "desired state is inactive"
    if not view.machines:
        return "no machines are in the cluster"
    return ""


def _evaluate(unit: str, view: View, before: int | None = None) -> Placement:
    blocked = unit_blocked(view.snapshot, view, unit)
    if blocked:
        return Placement(unit, blocked=blocked)
    req = view.requirements[unit]
    ok: list[Machine] = []
    refusals: dict[str, str] = {}
    for machine_id, machine in view.machines.items():
        verdict = feasible(unit, req, machine, view, before)
        if verdict.ok:
            ok.append(machine)
        else:
            refusals[machine_id] = verdict.reason
    return Placement(unit, tuple(rank(unit, req, ok, view)), refusals)


def _peers(req: Requirements) -> tuple[str, ...]:
    return req.machine_of + req.zone_of + req.region_of


def is_pending(snapshot: Snapshot, view: View, name: str) -> bool:
    """Whether a unit wants a machine and has none (global units never wait for one)."""
    return (
        name in snapshot.units
        and name not in view.location
        and snapshot.desired_state(name) is not DesiredState.INACTIVE
        and not (name in view.requirements and view.requirements[name].global_)
    )


def pending_units(snapshot: Snapshot, view: View) -> list[str]:
    """Non-global units that want a machine and have none, in planning order: by name, with
    every follower (MachineOf/ZoneOf/RegionOf) after the units it follows."""
    pending = sorted(name for name in snapshot.units if is_pending(snapshot, view, name))
    return follower_order(pending, view.requirements)


def follower_order(pending: list[str], requirements: Mapping[str, Requirements]) -> list[str]:
    """`pending` (sorted by name) with every follower moved after the pending units it follows."""
    ordered: list[str] = []
    placed: set[str] = set()
    remaining = pending
    while remaining:
        current = set(remaining)
        later: list[str] = []
        for name in remaining:
            req = requirements.get(name)
            deps = [p for p in (_peers(req) if req else ()) if p in current and p != name]
            if any(d not in placed for d in deps):
                later.append(name)
            else:
                ordered.append(name)
                placed.add(name)
        if len(later) == len(remaining):
            # A cycle of followers (mutual MachineOf): none can ever be placed; keep them so
            # their reasons are reported.
            ordered.extend(later)
            break
        remaining = later
    return ordered


def plan_placements(
    snapshot: Snapshot,
    view: View | None = None,
    limit: int | None = None,
    depth: int | None = None,
    plain_share: int = 1,
) -> dict[str, Placement]:
    """The ranked plan for unowned units, each decision overlaid before the next.

    With `limit`, planning stops after that many placeable units: a pass then costs
    O(limit x machines) however many units wait, and since every agent cuts the same prefix of
    the same order, agents still agree on who bids first. The rest follow in later passes, as
    the claims of this one land. A placeable plain unit (`is_plain`) counts as 1/`plain_share`
    of a unit against the limit: it is ranked without a verdict per machine. With `depth`,
    each unit's ranking is cut to its best `depth` machines (only those ever bid:
    fleetd.planner.BID_DEPTH).
    """
    view = view or View(snapshot)
    plan: dict[str, Placement] = {}
    spent = 0  # placeable units so far, each plain one counting 1, any other plain_share
    for unit in pending_units(snapshot, view):
        if limit is not None and spent >= limit * plain_share:
            break
        placement = _evaluate(unit, view)
        if placement.ranked:
            view.place(unit, placement.ranked[0])
            spent += window_cost(view, unit, plain_share)
        plan[unit] = cut(placement, depth)
    return plan


def window_cost(view: View, unit: str, plain_share: int) -> int:
    """What a placeable unit spends of a pass's limit (in units of 1/plain_share): 1 for a
    plain unit, plain_share for any other."""
    if plain_share == 1:
        return 1
    req = view.requirements.get(unit)
    return 1 if req is not None and is_plain(view, unit, req) else plain_share


def cut(placement: Placement, depth: int | None) -> Placement:
    """`placement` with its ranking cut to the best `depth` machines (None: as it is)."""
    if depth is None or len(placement.ranked) <= depth:
        return placement
    return Placement(placement.unit, placement.ranked[:depth], placement.refusals)


def recheck(snapshot: Snapshot, unit: str, machine_id: str, view: View | None = None) -> Verdict:
    """May the owner of `unit` keep running it on `machine_id`? Claims older than this one win
    conflicts and limits; a unit that replaces this one always wins."""
    view = view or View(snapshot)
    blocked = unit_blocked(snapshot, view, unit)
    if blocked:
        return refuse(blocked)
    machine = view.machines.get(machine_id)
    if machine is None:
        return refuse("machine is not in the cluster")
    req = view.requirements[unit]
    if is_plain(view, unit, req):
        # Every other checker passes a plain unit everywhere, whatever was there first.
        for checker in STATIC_CHECKERS:
            verdict = checker(unit, req, machine, view, None)
            if not verdict.ok:
                return verdict
        return OK
    before = view.revision.get(unit, PLANNED)
    return feasible(unit, req, machine, view, before)


def explain(snapshot: Snapshot, unit: str) -> Placement:
    """Why `unit` runs where it runs or waits: every machine's verdict against the cluster as it
    is, with the unit itself taken out."""
    view = View(snapshot)
    view.remove(unit)
    return _evaluate(unit, view)


def machines_running_global(snapshot: Snapshot, unit: str, view: View | None = None) -> list[str]:
    view = view or View(snapshot)
    return [m for m, units in view.globals_on.items() if unit in units]


@dataclass(frozen=True)
class Guards:
    """The facts a claim of one unit relied on, to be re-checked inside the claim transaction.

    `exact`: units whose owner key must still have the mod revision the planner saw (0: absent),
    used where a key vanishing matters (the peers a follower goes to). `prefixes`: unit-name
    prefixes under which no owner key may have changed since the snapshot, used where only a new
    claim could break a rule (conflict patterns, template groups): one range compare then covers
    every unit the pattern can match, known to the agent or not.
    """

    exact: Mapping[str, int]
    prefixes: frozenset[str]


NO_GUARDS = Guards({}, frozenset())


def glob_literal_prefix(pattern: str) -> str:
    """The part of a glob before its first wildcard: every match starts with it."""
    for i, ch in enumerate(pattern):
        if ch in "*?[":
            return pattern[:i]
    return pattern


def moves_units_changed(record: UnitRecord, old: UnitRecord | None) -> bool:
    """Whether writing `record`'s content (over `old`, or new) must fail the claims planned
    before it, by moving the `meta/units-changed` mark they compare (fleetd.keys). A claim
    guards on the owners of every unit its own rules name and of every unit whose rules name it,
    as its picture shows them. A new self-contained unit is neither: it names nobody, limits
    nobody, and until it is placed it is nowhere, and its own claim guards on what it needs. Any
    other write may add a rule the claims in flight did not guard on: a pattern naming their
    unit, a global unit on their machine, a changed text of their own unit or of a neighbour.
    So a submission of thousands of plain template instances leaves the claims of the first
    ones standing while the rest are written."""
    if old is not None:
        return True
    req = record.requirements
    return req is None or not req.self_contained


def claim_guards(snapshot: Snapshot, unit: str, view: View | None = None) -> Guards:
    """What a claim of `unit` must compare so that racing agents never break a hard rule.
    With the snapshot's `view`, only the units that declare patterns are looked at for the ones
    that name `unit` (a claim then costs those, not every unit of the registry)."""
    record = snapshot.units.get(unit)
    req = record.requirements if record else None
    exact: dict[str, int] = {}
    prefixes: set[str] = set()

    def seen(name: str) -> None:
        owner = snapshot.owners.get(name)
        exact[name] = owner.mod_revision if owner else 0

    if req is None:
        return Guards(exact, frozenset())
    for peer in _peers(req):
        seen(peer)
    for pattern in req.conflicts + req.zone_conflicts + req.region_conflicts + req.replaces:
        prefixes.add(glob_literal_prefix(pattern))
    limited = (
        req.max_per_machine is not None
        or req.max_per_zone is not None
        or req.max_per_region is not None
    )
    name = parse_unit_name(unit)
    if limited and name.instance is not None:
        prefixes.add(name.prefix + "@")
    # The other direction: units whose own patterns name this one. They are all known, since a
    # claim also requires that no unit content changed after the snapshot, other than new
    # self-contained units (`moves_units_changed`), which name nobody.
    if view is not None:
        candidates = [(n, view.requirements.get(n)) for n in sorted(view.declarers())]
    else:
        candidates = [(n, r.requirements) for n, r in snapshot.units.items()]
    for other, theirs in candidates:
        if other == unit or theirs is None:
            continue
        if names_by_pattern(theirs, unit):
            seen(other)
    return Guards(exact, frozenset(prefixes))
