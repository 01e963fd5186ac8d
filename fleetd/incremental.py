"""Incremental placement: `fleetd.placement.plan_placements`, kept current from the snapshot's
changes instead of recomputed from scratch on every watch event.

The full pass evaluates every pending unit against every machine, in planning order, overlaying
each decision before the next unit is looked at. This module keeps, per pending unit, the verdict
and the score of every machine from the previous pass, and replays the pass: a unit is evaluated
again only on the machines whose contents differ from what it saw last time, and a unit whose
machines all look the same keeps its placement as it was.

What a unit saw is the registry's placements plus the decisions of the units before it in the
previous pass; what it sees now is the same for the current pass. The replay walks both passes in
step and keeps their difference (`_Diff`): the units whose location differs, plus units whose
content changed. A difference on machine m makes m dirty for every unit (its load, the units
present there); it makes the rest of m's zone or region dirty only for the units whose rules or
spread read that level about that unit (the same template group, a zone or region conflict). A
unit whose followed peer (MachineOf/ZoneOf/RegionOf) moved, or a replacing unit when another
replacing unit moved, is evaluated again on every machine.

Machine changes (join, leave, new metadata) and changes to global units re-plan everything: they
are rare, and they change what every unit can see.

The full pass stays the reference: tests/unit/test_incremental.py checks on random event
sequences that this planner always returns exactly what `plan_placements` returns.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from fleetd.keys import Kind
from fleetd.placement import (
    Placement,
    Score,
    Verdict,
    View,
    _peers,
    cut,
    feasible,
    follower_order,
    is_pending,
    score,
    unit_blocked,
    window_cost,
)
from fleetd.ranking import Rankings, is_plain
from fleetd.snapshot import Snapshot
from fleetd.unitfile import Requirements, Spread, template_group

Change = tuple[Kind, str]


@dataclass
class _Entry:
    """What the previous pass computed for one unit: every machine's verdict, the scores of the
    feasible ones in ranking order, and the resulting placement."""

    verdicts: dict[str, Verdict]
    scores: dict[str, Score]  # of the feasible machines
    keys: list[tuple[Score, str]]  # (score, machine id) of the feasible machines, sorted
    placement: Placement


@dataclass
class _Level:
    """A machine's zone and region (its metadata), looked up once per reset."""

    zone: str | None
    region: str | None


@dataclass
class _Pass:
    """The previous pass, as the replay needs it."""

    order: list[str] = field(default_factory=list)
    position: dict[str, int] = field(default_factory=dict)
    decision: dict[str, str] = field(default_factory=dict)


class IncrementalPlanner:
    """The plan of `plan_placements`, maintained across snapshot changes.

    Call `update` with each new snapshot and the keys that changed since the last one (the
    snapshot's journal), then `plan`. Not thread-safe: one owner calls it.
    """

    def __init__(self, snapshot: Snapshot) -> None:
        self.resets = 0  # how often it started over (the next plan is then a full pass)
        self.reset(snapshot)
        self.evaluations = 0  # (unit, machine) verdicts computed, for benchmarks

    # ------------------------------------------------------------------------------ updates

    def reset(self, snapshot: Snapshot) -> None:
        """Forget everything and start from `snapshot` (the next plan is a full pass)."""
        self.resets += 1
        self.view = View(snapshot)
        self.rankings = Rankings(self.view)
        self._machine_levels = {
            m: _Level(machine.zone, machine.region) for m, machine in self.view.machines.items()
        }
        self._in_zone: dict[str, list[str]] = {}
        self._in_region: dict[str, list[str]] = {}
        for m, level in self._machine_levels.items():
            if level.zone is not None:
                self._in_zone.setdefault(level.zone, []).append(m)
            if level.region is not None:
                self._in_region.setdefault(level.region, []).append(m)
        self._pending = sorted(n for n in snapshot.units if is_pending(snapshot, self.view, n))
        self._pending_set = set(self._pending)
        reqs = self.view.requirements
        self._followers = {n for n in self._pending if n in reqs and _has_peers(reqs[n])}
        # Every unit some rule follows (a superset is safe: it only costs precision).
        self._followed = {p for r in reqs.values() for p in _peers(r)}
        self._globals = {n for n, r in self.view.requirements.items() if r.global_}
        self._cache: dict[str, _Entry] = {}
        self._last = _Pass()
        self._base_before: dict[str, str | None] = {}  # unit -> location at the last pass
        self._touched: set[str] = set()  # units whose content changed since the last pass
        # The last plan and the arguments it was made with, while no change came since: a
        # revision that brought only published states (not journaled: no plan reads them)
        # plans nothing again.
        self._made: tuple[tuple[int | None, int | None, int], dict[str, Placement]] | None = None

    def update(self, snapshot: Snapshot, changes: Iterable[Change]) -> None:
        """Take in `snapshot`, which differs from the previous one by the keys in `changes`."""
        view = self.view
        view.snapshot = snapshot
        changed = set(changes)
        if changed:
            self._made = None
        if any(kind is Kind.MACHINE for kind, _ in changed) or snapshot.machines.keys() != (
            view.machines.keys()
        ):
            self.reset(snapshot)
            return
        globals_before = view.globals_on
        names: set[str] = set()
        for kind, name in changed:
            if kind is Kind.UNIT:
                self._content_changed(snapshot, name)
            elif kind is Kind.OWNER:
                self._owner_changed(snapshot, name)
            elif kind is Kind.MOVE:
                self._cache.pop(name, None)
            if kind is not Kind.STATE:
                names.add(name)
        for name in names:
            self._refresh_pending(snapshot, name)
        if self._globals:
            view._compute_globals()
            if view.globals_on != globals_before:
                self._cache.clear()
                self.rankings.clear()

    def _anonymous(self, name: str) -> bool:
        """No rule can tell this unit from another of its template group: nobody declares
        patterns and nobody follows it."""
        view = self.view
        return not (
            view.conflictors
            or view.replacers
            or view.zone_conflictors
            or view.region_conflictors
            or name in self._followed
        )

    def _located(self, snapshot: Snapshot, name: str) -> tuple[str, int] | None:
        """Where the registry says a unit runs, as the view counts it."""
        owner = snapshot.owners.get(name)
        if owner is None or owner.machine_id not in self.view.machines:
            return None
        if name not in self.view.requirements:
            return None
        return owner.machine_id, owner.revision

    def _move_base(self, name: str, target: tuple[str, int] | None) -> None:
        view = self.view
        if name not in self._base_before:
            self._base_before[name] = view.location.get(name)
        view.remove(name)
        if target is not None:
            view.place(name, target[0], target[1])

    def _content_changed(self, snapshot: Snapshot, name: str) -> None:
        view = self.view
        record = snapshot.units.get(name)
        req = record.requirements if record is not None else None
        old = view.requirements.get(name)
        if old == req:
            return
        if (old is not None and old.global_) or (req is not None and req.global_):
            self._globals.add(name)
            self._cache.clear()
        # Out of the indexes under its old rules, back in under the new ones.
        if name not in self._base_before:
            self._base_before[name] = view.location.get(name)
        view.remove(name)
        view.set_requirements(name, req)
        if req is not None:
            self._followed.update(_peers(req))
        target = self._located(snapshot, name)
        if target is not None:
            view.place(name, target[0], target[1])
        self._touched.add(name)
        self._cache.pop(name, None)

    def _owner_changed(self, snapshot: Snapshot, name: str) -> None:
        target = self._located(snapshot, name)
        current = self.view.location.get(name)
        if (target[0] if target else None) == current:
            if target is not None:
                self.view.revision[name] = target[1]
            return
        self._move_base(name, target)

    def _refresh_pending(self, snapshot: Snapshot, name: str) -> None:
        now = is_pending(snapshot, self.view, name)
        req = self.view.requirements.get(name)
        if now and req is not None and _has_peers(req):
            self._followers.add(name)
        else:
            self._followers.discard(name)
        if now and name not in self._pending_set:
            bisect.insort(self._pending, name)
            self._pending_set.add(name)
        elif not now and name in self._pending_set:
            del self._pending[bisect.bisect_left(self._pending, name)]
            self._pending_set.discard(name)

    # --------------------------------------------------------------------------------- plan

    def order(self) -> list[str]:
        """Pending units in planning order, as `placement.pending_units` gives them."""
        if self._followers:
            return follower_order(list(self._pending), self.view.requirements)
        return self._pending

    def plan(
        self, limit: int | None = None, depth: int | None = None, plain_share: int = 1
    ) -> dict[str, Placement]:
        """The same plan as `plan_placements(snapshot, limit=limit, depth=depth,
        plain_share=plain_share)` for the latest snapshot. The result is shared with later calls
        that find nothing changed: callers only read it."""
        args = (limit, depth, plain_share)
        if self._made is not None and self._made[0] == args:
            return self._made[1]
        view = self.view
        last = self._last
        diff = _Diff(view, self._touched, self._anonymous)
        for name, before in self._base_before.items():
            diff.old_over[name] = before
            diff.refresh(name)
        for name in self._touched:
            diff.refresh(name)
        current = _Pass()
        plan: dict[str, Placement] = {}
        cache: dict[str, _Entry] = {}
        spent = 0  # of the limit, in units of 1/plain_share (as plan_placements counts)
        cursor = 0  # how far the previous pass has been replayed
        try:
            for unit in self.order():
                if limit is not None and spent >= limit * plain_share:
                    break
                j = last.position.get(unit)
                entry = self._cache.get(unit)
                if j is not None and j >= cursor:
                    while cursor < j:
                        diff.old_passes(last.order[cursor], last.decision)
                        cursor += 1
                else:
                    entry = None  # what it saw last time cannot be lined up with now
                placement, entry = self._evaluate(unit, entry, diff, depth)
                if entry is not None:
                    cache[unit] = entry
                if j is not None and j >= cursor:
                    diff.old_passes(unit, last.decision)
                    cursor = j + 1
                current.position[unit] = len(current.order)
                current.order.append(unit)
                if placement.ranked:
                    top = placement.ranked[0]
                    view.place(unit, top)
                    diff.new_decisions.add(unit)
                    current.decision[unit] = top
                    spent += window_cost(view, unit, plain_share)
                diff.refresh(unit)
                plan[unit] = cut(placement, depth)
        finally:
            for unit in current.decision:
                view.remove(unit)
        self._cache = cache
        self._last = current
        self._base_before = {}
        self._touched = set()
        self._made = (args, plan)
        return plan

    def _evaluate(
        self, unit: str, entry: _Entry | None, diff: _Diff, depth: int | None = None
    ) -> tuple[Placement, _Entry | None]:
        view = self.view
        blocked = unit_blocked(view.snapshot, view, unit)
        if blocked:
            return Placement(unit, blocked=blocked), None
        req = view.requirements[unit]
        if is_plain(view, unit, req):
            # Read from the count buckets, which follow the view: nothing to replay or cache.
            return self.rankings.placement(unit, req, depth), None
        if entry is None:
            return self._full(unit, req)
        dirty = self._dirty(unit, req, diff)
        if dirty is None:
            return self._full(unit, req)
        recheck, rescore = dirty
        if not recheck and not rescore:
            return entry.placement, entry
        machines = view.machines
        keys, scores, verdicts = entry.keys, entry.scores, entry.verdicts
        for m in recheck:
            old = scores.pop(m, None)
            if old is not None:
                del keys[bisect.bisect_left(keys, (old, m))]
            verdict = feasible(unit, req, machines[m], view)
            self.evaluations += 1
            verdicts[m] = verdict
            if verdict.ok:
                scores[m] = score(unit, req, machines[m], view)
                bisect.insort(keys, (scores[m], m))
        for m in rescore - recheck:
            old = scores.get(m)
            if old is None:
                continue  # refused: only a check could change that, and none is due
            new = score(unit, req, machines[m], view)
            if new != old:
                del keys[bisect.bisect_left(keys, (old, m))]
                scores[m] = new
                bisect.insort(keys, (new, m))
        refusals = (
            {m: v.reason for m, v in verdicts.items() if not v.ok}
            if recheck
            else entry.placement.refusals  # no verdict changed: the same reasons
        )
        placement = Placement(unit, tuple(m for _, m in keys), refusals)
        entry.placement = placement
        return placement, entry

    def _full(self, unit: str, req: Requirements) -> tuple[Placement, _Entry]:
        view = self.view
        verdicts: dict[str, Verdict] = {}
        scores: dict[str, Score] = {}
        refusals: dict[str, str] = {}
        for machine_id, machine in view.machines.items():
            verdict = feasible(unit, req, machine, view)
            verdicts[machine_id] = verdict
            if verdict.ok:
                scores[machine_id] = score(unit, req, machine, view)
            else:
                refusals[machine_id] = verdict.reason
        self.evaluations += len(view.machines)
        keys = sorted((s, m) for m, s in scores.items())
        placement = Placement(unit, tuple(m for _, m in keys), refusals)
        return placement, _Entry(verdicts, scores, keys, placement)

    def _dirty(
        self, unit: str, req: Requirements, diff: _Diff
    ) -> tuple[set[str], set[str]] | None:
        """Machines whose verdict for `unit` may differ from last time, and machines where only
        its score may (the spread counts of its template group); None: every machine."""
        recheck: set[str] = set()
        rescore: set[str] = set()
        if not diff.entries and not diff.load and not diff.groups:
            return recheck, rescore
        view = self.view
        peers = _peers(req)
        group = template_group(unit)
        zone_rules = bool(req.zone_conflicts) or req.max_per_zone is not None
        region_rules = bool(req.region_conflicts) or req.max_per_region is not None
        zone_spread = req.spread in (Spread.ZONE, Spread.REGION)
        region_spread = req.spread is Spread.REGION
        replacer = unit in view.replacers
        for other, (before, now) in diff.entries.items():
            if other in peers:
                return None
            touched = other in diff.touched
            if replacer and (touched or other in view.replacers):
                return None
            same_group = group is not None and template_group(other) == group
            zone = touched or zone_rules or other in view.zone_conflictors
            region = touched or region_rules or other in view.region_conflictors
            for m in (before, now):
                if m is None or m not in self._machine_levels:
                    continue
                recheck.add(m)
                level = self._machine_levels[m]
                if level.zone is not None:
                    if zone:
                        recheck.update(self._in_zone[level.zone])
                    elif same_group and zone_spread:
                        rescore.update(self._in_zone[level.zone])
                if level.region is not None:
                    if region:
                        recheck.update(self._in_region[level.region])
                    elif same_group and region_spread:
                        rescore.update(self._in_region[level.region])
        if diff.load or diff.groups:
            self._counted_dirty(req, group, diff, recheck, rescore)
        return recheck, rescore

    def _counted_dirty(
        self,
        req: Requirements,
        group: str | None,
        diff: _Diff,
        recheck: set[str],
        rescore: set[str],
    ) -> None:
        """Machines where the counts of interchangeable units differ: a unit's load score reads
        the machine's count, its limits and spread read its own group's count on the machine,
        in the zone and in the region."""
        limited = (
            req.max_per_machine is not None
            or req.max_per_zone is not None
            or req.max_per_region is not None
        )
        into = recheck if limited else rescore
        into.update(m for m in diff.load if m in self._machine_levels)
        if group is None:
            return
        zones: dict[str, int] = {}
        regions: dict[str, int] = {}
        for (m, g), step in diff.groups.items():
            level = self._machine_levels.get(m)
            if g != group or level is None:
                continue
            into.add(m)
            if level.zone is not None:
                zones[level.zone] = zones.get(level.zone, 0) + step
            if level.region is not None:
                regions[level.region] = regions.get(level.region, 0) + step
        zone_reads = req.max_per_zone is not None or req.spread in (Spread.ZONE, Spread.REGION)
        region_reads = req.max_per_region is not None or req.spread is Spread.REGION
        for zone, step in zones.items():
            if step and zone_reads:
                into.update(self._in_zone[zone])
        for region, step in regions.items():
            if step and region_reads:
                into.update(self._in_region[region])


def _has_peers(req: Requirements) -> bool:
    return bool(req.machine_of or req.zone_of or req.region_of)


class _Diff:
    """How the state a unit saw in the previous pass differs from the state it sees in this one.

    Units that a rule can name (some unit declares patterns, follows them, or their content
    changed) are kept by name: where they were, where they are. The others are interchangeable
    for every check and score, so only their counts are kept, per machine and template group:
    when two such units swap machines between the passes (the usual ripple of a load-balanced
    plan), the counts cancel and nothing is dirty.
    """

    def __init__(self, view: View, touched: set[str], anonymous: Callable[[str], bool]) -> None:
        self.view = view
        self.touched = touched
        self.anonymous = anonymous
        self.old_over: dict[str, str | None] = {}  # location in the old state, where not base
        self.new_decisions: set[str] = set()
        self.entries: dict[str, tuple[str | None, str | None]] = {}  # named units
        self._counted: dict[str, tuple[str | None, str | None]] = {}  # the others
        # new minus old count: per machine, per (machine, group)
        self.load: dict[str, int] = {}
        self.groups: dict[tuple[str, str | None], int] = {}

    def old_location(self, name: str) -> str | None:
        if name in self.old_over:
            return self.old_over[name]
        # Units decided in this pass were pending, so the registry has them nowhere.
        return None if name in self.new_decisions else self.view.location.get(name)

    def refresh(self, name: str) -> None:
        before = self.old_location(name)
        now = self.view.location.get(name)
        differs = before != now
        if name in self.touched or not self.anonymous(name):
            if differs or name in self.touched:
                self.entries[name] = (before, now)
            else:
                self.entries.pop(name, None)
            return
        previous = self._counted.pop(name, None)
        if previous is not None:
            self._count(name, previous, -1)
        if differs:
            self._counted[name] = (before, now)
            self._count(name, (before, now), 1)

    def _count(self, name: str, where: tuple[str | None, str | None], sign: int) -> None:
        group = template_group(name)
        for machine, step in ((where[0], -sign), (where[1], sign)):
            if machine is None:
                continue
            left = self.load.get(machine, 0) + step
            if left:
                self.load[machine] = left
            else:
                self.load.pop(machine, None)
            key = (machine, group)
            left = self.groups.get(key, 0) + step
            if left:
                self.groups[key] = left
            else:
                self.groups.pop(key, None)

    def old_passes(self, name: str, decision: dict[str, str]) -> None:
        """The replay of the previous pass moves past `name`: its old decision now counts."""
        if name in decision:
            self.old_over[name] = decision[name]
            self.refresh(name)


__all__ = ["Change", "IncrementalPlanner"]
