"""Ranking without evaluating every machine: the plan of a *plain* unit read from count buckets.

Most units at scale are plain: template instances whose only rules are the machine-static ones
(MachineID, MachineMetadata, zone/region presence) and a spread, and whose name no other unit's
pattern matches. For such a unit every dynamic checker of `fleetd.placement` passes on every
machine, and its score on machine m is the spread terms of m (placed instances of its template
group in m's region, zone and on m, then m's load) followed by the ring tiebreak. Units of one
template with the same rules form a class; all of a class share the static verdicts and the
spread terms, and differ only in where the ring starts for them.

So a class keeps its machines in a tree shaped like the spread: regions, then zones, then per
zone (the leaf) buckets of machines with equal (instances on the machine, load), each bucket
sorted by ring position. Counts at the region and zone levels are read from the View when asked;
the leaf buckets follow the View's placements (it tells its listeners which machine changed).
The best machines for one unit are then a walk of the tree in score order that stops after
`depth` machines: a few dozen steps instead of one checker pipeline and one score per machine.

The answer is exactly `placement._evaluate` for the unit (ranked machines cut to `depth`): the
incremental planner uses it, and its property test against the full pass covers it.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections import OrderedDict
from collections.abc import Iterator

from fleetd.model import shared_value
from fleetd.placement import (
    RING,
    STATIC_CHECKERS,
    Placement,
    View,
    is_plain,
    ring_position,
)
from fleetd.unitfile import Requirements, Spread, template_group

# Classes kept at once; past that the least recently used is dropped (and built again if asked).
MAX_CLASSES = 16

Key = tuple[int, ...]
Ranked = Iterator[tuple[Key, int, str]]  # (spread terms, ring distance, machine), ascending


class _Leaf:
    """The machines of one zone (or of the whole class when the spread reads no zone), in
    buckets of equal leaf terms, each bucket sorted by ring position."""

    def __init__(self) -> None:
        self.keys: list[Key] = []
        self.buckets: dict[Key, list[int]] = {}

    def add(self, key: Key, ring: int) -> None:
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = []
            bisect.insort(self.keys, key)
        bisect.insort(bucket, ring)

    def discard(self, key: Key, ring: int) -> None:
        bucket = self.buckets[key]
        del bucket[bisect.bisect_left(bucket, ring)]
        if not bucket:
            del self.buckets[key]
            del self.keys[bisect.bisect_left(self.keys, key)]

    def walk(self, start: int, names: dict[int, str]) -> Ranked:
        for key in self.keys:
            bucket = self.buckets[key]
            split = bisect.bisect_left(bucket, start)
            for ring in itertools.chain(bucket[split:], bucket[:split]):
                yield key, (ring - start) % RING, names[ring]


_Node = dict[str | None, "_Node | _Leaf"]


class _Class:
    """One class: its statically feasible machines, arranged for the spread's levels."""

    def __init__(self, view: View, group: str | None, req: Requirements, example: str) -> None:
        self.view = view
        self.group = group
        spread = req.spread if group is not None else Spread.NONE
        self.levels: tuple[str, ...] = {
            Spread.ZONE: ("zone",),
            Spread.REGION: ("region", "zone"),
        }.get(spread, ())
        self.per_machine = group is not None and spread is not Spread.NONE
        self.refusals: dict[str, str] = {}
        self.names: dict[int, str] = {}
        self.key_of: dict[str, Key] = {}
        self.leaf_of: dict[str, _Leaf] = {}
        self.root: _Node | _Leaf = _Leaf() if not self.levels else {}
        for machine_id, machine in view.machines.items():
            for check in STATIC_CHECKERS:
                verdict = check(example, req, machine, view, None)
                if not verdict.ok:
                    self.refusals[machine_id] = verdict.reason
                    break
            else:
                self._add(machine_id)

    def _path(self, machine_id: str) -> list[str | None]:
        machine = self.view.machines[machine_id]
        return [machine.zone if level == "zone" else machine.region for level in self.levels]

    def _add(self, machine_id: str) -> None:
        path = self._path(machine_id)
        node = self.root
        if path:
            assert isinstance(node, dict)
            for part in path[:-1]:
                child = node.setdefault(part, {})
                assert isinstance(child, dict)
                node = child
            node = node.setdefault(path[-1], _Leaf())
        assert isinstance(node, _Leaf)
        ring = ring_position(machine_id)
        self.names[ring] = machine_id
        key = self._key(machine_id)
        node.add(key, ring)
        self.key_of[machine_id] = key
        self.leaf_of[machine_id] = node

    def _key(self, machine_id: str) -> Key:
        view = self.view
        load = view.load(machine_id)
        if not self.per_machine:
            return (load,)
        members = view.group_at.get(("machine", machine_id, self.group or ""))
        return (len(members) if members else 0, load)

    def changed(self, machine_id: str) -> None:
        leaf = self.leaf_of.get(machine_id)
        if leaf is None:
            return
        key = self._key(machine_id)
        old = self.key_of[machine_id]
        if key != old:
            ring = ring_position(machine_id)
            leaf.discard(old, ring)
            leaf.add(key, ring)
            self.key_of[machine_id] = key

    def _count(self, level: str, key: str | None) -> int:
        if key is None or self.group is None:
            return 0
        members = self.view.group_at.get((level, key, self.group))
        return len(members) if members else 0

    def walk(self, node: _Node | _Leaf, level_index: int, start: int) -> Ranked:
        if isinstance(node, _Leaf):
            yield from node.walk(start, self.names)
            return
        level = self.levels[level_index]
        counted = sorted(
            ((self._count(level, key), child) for key, child in node.items()),
            key=lambda item: item[0],
        )
        for count, tied in itertools.groupby(counted, key=lambda item: item[0]):
            children = [child for _, child in tied]
            if len(children) == 1:
                walks: Ranked = self.walk(children[0], level_index + 1, start)
            else:
                walks = heapq.merge(*(self.walk(c, level_index + 1, start) for c in children))
            for key, distance, machine_id in walks:
                yield (count, *key), distance, machine_id


class Rankings:
    """The classes of plain units over one View, kept current as the View's placements change."""

    def __init__(self, view: View) -> None:
        self.view = view
        self._classes: OrderedDict[tuple[str | None, Requirements], _Class] = OrderedDict()
        view.listeners.append(self._changed)

    def clear(self) -> None:
        """Every load may have changed (global units moved): build classes afresh."""
        self._classes.clear()

    def _changed(self, machine_id: str) -> None:
        for cls in self._classes.values():
            cls.changed(machine_id)

    def placement(self, unit: str, req: Requirements, depth: int | None) -> Placement:
        """What `placement._evaluate` returns for a plain unit, ranked machines cut to
        `depth` (None: all of them)."""
        group = template_group(unit)
        key = (group, req)
        cls = self._classes.get(key)
        if cls is None:
            cls = self._classes[key] = _Class(self.view, group, req, unit)
            if len(self._classes) > MAX_CLASSES:
                self._classes.popitem(last=False)
        else:
            self._classes.move_to_end(key)
        ranked = cls.walk(cls.root, 0, ring_position(unit))
        if depth is not None:
            ranked = itertools.islice(ranked, depth)
        # Units of a class rank the same few machines, mostly in the same few orders: one tuple
        # for each order (a window of 4,000 waiting units held 4,000 copies).
        return Placement(unit, shared_value(tuple(m for _, _, m in ranked)), cls.refusals)


__all__ = ["MAX_CLASSES", "Rankings", "is_plain"]
