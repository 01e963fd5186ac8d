"""The unit-file grammar: unit names, systemd's INI dialect, and the [X-Fleet] options.

This is the one place that knows how text becomes a unit: fleetctl uses it to refuse bad input
before anything reaches the registry, and fleetd uses it again before running anything, so a unit
written by an older or foreign client cannot bypass validation.

Semantics follow CoreOS fleet (MachineID, MachineOf, MachineMetadata, Conflicts, Global, Replaces
and the deprecated X-Condition* spellings) plus the topology options of this project (ZoneOf,
RegionOf, ZoneConflicts, RegionConflicts, MaxPer*, Spread, Pin) and `!=` in MachineMetadata.
"""

from __future__ import annotations

import enum
import functools
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field

from fleetd.errors import InvalidUnitFile, InvalidUnitName
from fleetd.model import shared

# --------------------------------------------------------------------------------------------
# Unit names

UNIT_TYPES = frozenset(
    {
        "service",
        "socket",
        "device",
        "mount",
        "automount",
        "swap",
        "target",
        "path",
        "timer",
        "slice",
        "scope",
    }
)
_SUFFIXES = {suffix: suffix for suffix in UNIT_TYPES}
# systemd only instantiates these types from templates.
TEMPLATE_TYPES = frozenset({"service", "socket", "target", "timer", "path"})
# systemd's UNIT_NAME_MAX counts the terminating NUL: names have at most 255 characters.
MAX_NAME_LENGTH = 255
# systemd's VALID_CHARS plus '@' (unit-name.c); the backslash carries its \x2d escapes.
_NAME_CHARS = re.compile(r"^[A-Za-z0-9:_.@\\-]+$")


@dataclass(frozen=True, slots=True)
class UnitName:
    """A validated unit name split into systemd's parts: prefix@instance.suffix."""

    name: str
    prefix: str
    instance: str | None  # None: not templated; "": a template; else: an instance
    suffix: str
    # The template an instance comes from (foo@1.service -> foo@.service; a template's is
    # itself), None for a plain unit: made once per parse, one string for every instance of a
    # template (`template_group` asks for it on every placement).
    template: str | None = field(init=False, default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.instance is not None:
            object.__setattr__(self, "template", shared(f"{self.prefix}@.{self.suffix}"))

    @property
    def is_template(self) -> bool:
        return self.instance == ""

    @property
    def is_instance(self) -> bool:
        return bool(self.instance)

    @property
    def stem(self) -> str:
        """The name without its suffix (systemd's %N)."""
        return self.name[: -len(self.suffix) - 1]


def default_unit_name(argument: str) -> str:
    """The unit name fleetctl derives from a command-line argument: the basename, with
    `.service` appended when its suffix is not a systemd unit type."""
    base = argument.rstrip("/").rsplit("/", 1)[-1]
    _, dot, suffix = base.rpartition(".")
    if not dot or suffix not in UNIT_TYPES:
        base += ".service"
    return base


# Cached: every layer validates the same names again and again (each registry key of a unit, each
# listing row, each placement); a refused name raises anew each time. A plain map, emptied when
# full, rather than an LRU cache: one parse per unit of a large registry is held either way,
# and the LRU's links cost more than the map's entries (about 0.7 MB per 10,000 names).
_NAMES_LIMIT = 1 << 16
_names: dict[str, UnitName] = {}


def parse_unit_name(name: str) -> UnitName:
    """Validate `name` as systemd validates a unit file name and split it; InvalidUnitName says
    what is wrong (see `_parse_unit_name`)."""
    parsed = _names.get(name)
    if parsed is None:
        parsed = _parse_unit_name(name)
        if len(_names) >= _NAMES_LIMIT:
            _names.clear()
        _names[name] = parsed
    return parsed


def _parse_unit_name(name: str) -> UnitName:
    """Validate `name` as systemd validates a unit file name and split it; InvalidUnitName says
    what is wrong.

    The one validator of unit names: fleetctl refuses input with it, the agent refuses registry
    entries with it and both unit managers refuse to write files with it, so all three agree.
    It follows systemd's unit_name_is_valid() (characters, length, a known type suffix, the
    '@' rules: the first '@' splits prefix and instance, the instance may hold more) and adds
    the one rule of a unit *file* name: systemd skips hidden files when it scans a unit
    directory, so a name starting with '.' could be linked but never loaded.
    """
    if not name:
        raise InvalidUnitName("unit name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidUnitName(
            f"unit name {name[:40]}... is {len(name)} characters long: at most "
            f"{MAX_NAME_LENGTH} are allowed"
        )
    if not _NAME_CHARS.match(name):
        bad = sorted({c for c in name if not _NAME_CHARS.match(c)})
        raise InvalidUnitName(
            f"unit name {name!r} has invalid characters {''.join(bad)!r}: use only "
            "letters, digits and ':_.@-\\'"
        )
    if name.startswith("@"):
        raise InvalidUnitName(f"unit name {name!r} must not start with '@'")
    base, dot, suffix = name.rpartition(".")
    if not dot or suffix not in UNIT_TYPES:
        raise InvalidUnitName(
            f"unit name {name!r} has no known unit type suffix: end it with one of "
            + ", ".join(f".{t}" for t in sorted(UNIT_TYPES))
        )
    if not base:
        raise InvalidUnitName(f"unit name {name!r} has nothing before its suffix")
    if name.startswith("."):
        raise InvalidUnitName(
            f"unit name {name!r} must not start with '.': systemd ignores hidden unit files"
        )
    # The cache holds a parse per unit of the registry: the suffix and a template's prefix are
    # one string for all of them.
    suffix = _SUFFIXES[suffix]
    if "@" not in base:
        return UnitName(name, base, None, suffix)
    prefix, _, instance = base.partition("@")
    if suffix not in TEMPLATE_TYPES:
        raise InvalidUnitName(
            f"unit name {name!r}: only {', '.join(sorted(TEMPLATE_TYPES))} units can be "
            "templates or instances"
        )
    return UnitName(name, shared(prefix), instance, suffix)


def template_group(name: str) -> str | None:
    """The template an instance belongs to, used to group instances for limits and spread.
    Not cached on its own: the parse is, and holds the answer (a second cache of every unit
    name cost about 1 MB per 10,000 units)."""
    try:
        return parse_unit_name(name).template
    except InvalidUnitName:
        return None


# --------------------------------------------------------------------------------------------
# systemd's INI dialect


@dataclass(frozen=True, slots=True)
class UnitOption:
    """One `Key=Value` line of a unit file, in its section, with its line number for messages."""

    section: str
    key: str
    value: str
    line: int


# No slots: `description` is cached on the instance, and there is one per distinct text.
@dataclass(frozen=True)
class UnitFile:
    """A parsed unit file. The text is kept verbatim: `fleetctl cat` prints it unchanged and
    its sha1 is the content hash every layer compares."""

    text: str
    options: tuple[UnitOption, ...]

    @property
    def hash(self) -> str:
        return content_hash(self.text)

    def sections(self) -> list[str]:
        seen: dict[str, None] = {}
        for option in self.options:
            seen.setdefault(option.section, None)
        return list(seen)

    def values(self, section: str, key: str) -> list[str]:
        return [o.value for o in self.options if o.section == section and o.key == key]

    def has_section(self, section: str) -> bool:
        return has_section(self.text, section)

    # Cached (frozen dataclasses allow it: the value lands in the instance dict, not a field):
    # one parsed text serves every instance of a template in a listing.
    @functools.cached_property
    def description(self) -> str:
        values = self.values("Unit", "Description")
        return values[-1] if values else ""


def content_hash(text: str) -> str:
    import hashlib  # on first use: loading OpenSSL is a cost every fleetctl listing would pay

    return hashlib.sha1(text.encode()).hexdigest()


def has_section(text: str, section: str) -> bool:
    """Whether the text has a `[section]` header line, even one with no options (systemd enables a
    unit from its [Install] section; the adapters need only this, not a full parse)."""
    return re.search(rf"^\s*\[{re.escape(section)}\]\s*$", text, re.MULTILINE) is not None


_SECTION = re.compile(r"^\[([^\[\]]+)\]$")
_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def parse_unit_file(text: str, source: str = "unit file") -> UnitFile:
    """Parse systemd's INI dialect: [Section] headers, Key=Value lines, '#' and ';' comments,
    a trailing backslash continues a value on the next line."""
    options: list[UnitOption] = []
    section: str | None = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        number = i + 1
        line = lines[i].strip()
        i += 1
        if not line or line[0] in "#;":
            continue
        header = _SECTION.match(line)
        if header:
            section = header.group(1)
            continue
        if line.startswith("["):
            raise InvalidUnitFile(f"{source}: line {number}: malformed section header {line!r}")
        key, eq, value = line.partition("=")
        key = key.strip()
        if not eq or not _KEY.match(key):
            raise InvalidUnitFile(
                f"{source}: line {number}: expected Key=Value or [Section], got {line!r}"
            )
        if section is None:
            raise InvalidUnitFile(
                f"{source}: line {number}: option {key} comes before any [Section] header"
            )
        value = value.strip()
        # Continuations join with a space, as systemd does; comment lines inside are skipped.
        while value.endswith("\\"):
            value = value[:-1].rstrip()
            while i < len(lines) and lines[i].lstrip()[:1] in ("#", ";"):
                i += 1
            if i >= len(lines):
                break
            value = f"{value} {lines[i].strip()}".strip()
            i += 1
        options.append(UnitOption(section, key, value, number))
    return UnitFile(text, tuple(options))


@functools.lru_cache(maxsize=1 << 12)
def _parsed(text: str) -> UnitFile:
    return parse_unit_file(text)


def parsed_unit_file(text: str, source: str = "unit file") -> UnitFile:
    """`parse_unit_file`, once per distinct text. The instances of a template share its text, and
    listings and the placement loop ask for every one of them; the parse does not depend on the
    source, which only names the file in an error (so a text that fails is parsed again, to
    name this source)."""
    try:
        return _parsed(text)
    except InvalidUnitFile:
        return parse_unit_file(text, source)


# --------------------------------------------------------------------------------------------
# [X-Fleet]

XFLEET = "X-Fleet"


class Spread(enum.StrEnum):
    REGION = "region"
    ZONE = "zone"
    MACHINE = "machine"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class MetadataRule:
    """One `key=value` or `key!=value` term of MachineMetadata."""

    key: str
    value: str
    negated: bool = False

    def __str__(self) -> str:
        return f"{self.key}{'!=' if self.negated else '='}{self.value}"


@dataclass(frozen=True, slots=True)
class Requirements:
    """What a unit's [X-Fleet] section asks of the machine that runs it, specifiers expanded."""

    machine_id: str | None = None
    machine_of: tuple[str, ...] = ()
    zone_of: tuple[str, ...] = ()
    region_of: tuple[str, ...] = ()
    metadata: tuple[MetadataRule, ...] = ()
    conflicts: tuple[str, ...] = ()
    zone_conflicts: tuple[str, ...] = ()
    region_conflicts: tuple[str, ...] = ()
    replaces: tuple[str, ...] = ()
    global_: bool = False
    max_per_machine: int | None = None
    max_per_zone: int | None = None
    max_per_region: int | None = None
    spread: Spread = Spread.ZONE
    pin: bool = False
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def self_contained(self) -> bool:
        """Whether these rules read only the machine the unit runs on (MachineID,
        MachineMetadata), the spread and Pin: no pattern or peer names another unit, no limit
        counts its template group, and it is not global. Such a unit cannot make another
        unit's placement break a hard rule by merely existing."""
        return not (
            self.global_
            or self.machine_of
            or self.zone_of
            or self.region_of
            or self.conflicts
            or self.zone_conflicts
            or self.region_conflicts
            or self.replaces
            or self.max_per_machine is not None
            or self.max_per_zone is not None
            or self.max_per_region is not None
        )

    @property
    def uses_zone(self) -> bool:
        return bool(self.zone_of or self.zone_conflicts or self.max_per_zone is not None)

    @property
    def uses_region(self) -> bool:
        return bool(self.region_of or self.region_conflicts or self.max_per_region is not None)


_NO_REQUIREMENTS = Requirements()

DEPRECATED_OPTIONS = {
    "X-ConditionMachineID": "MachineID",
    "X-ConditionMachineOf": "MachineOf",
    "X-ConditionMachineMetadata": "MachineMetadata",
    "X-Conflicts": "Conflicts",
}
KNOWN_OPTIONS = frozenset(
    {
        "MachineID",
        "MachineOf",
        "MachineMetadata",
        "Conflicts",
        "Global",
        "Replaces",
        "ZoneOf",
        "RegionOf",
        "ZoneConflicts",
        "RegionConflicts",
        "MaxPerMachine",
        "MaxPerZone",
        "MaxPerRegion",
        "Spread",
        "Pin",
    }
)
_TRUE = frozenset({"true", "yes", "1", "on", "t", "y"})
_FALSE = frozenset({"false", "no", "0", "off", "f", "n", ""})


def expand_specifiers(value: str, name: UnitName) -> str:
    """Expand %n %N %p %i (and %%) the way systemd would for this unit name."""
    if "%" not in value:
        return value
    table = {
        "n": name.name,
        "N": name.stem,
        "p": name.prefix,
        "i": name.instance or "",
        "%": "%",
    }

    def repl(match: re.Match[str]) -> str:
        return table.get(match.group(1), match.group(0))

    return re.sub(r"%(.)", repl, value)


def _words(value: str, option: str, source: str) -> list[str]:
    try:
        return shlex.split(value)
    except ValueError as exc:
        raise InvalidUnitFile(f"{source}: [X-Fleet] {option}={value!r}: {exc}") from None


def _bool(value: str, option: str, source: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise InvalidUnitFile(
        f"{source}: [X-Fleet] {option}={value!r} is not a boolean: use true or false"
    )


def _limit(value: str, option: str, source: str) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        raise InvalidUnitFile(
            f"{source}: [X-Fleet] {option}={value!r} is not a whole number: use 1 or more"
        ) from None
    if number < 1:
        raise InvalidUnitFile(f"{source}: [X-Fleet] {option}={number} must be 1 or more")
    return number


def _metadata_rule(word: str, source: str) -> MetadataRule:
    if "!=" in word:
        key, _, value = word.partition("!=")
        negated = True
    else:
        key, _, value = word.partition("=")
        negated = False
    if not key or not value or not _KEY.match(key):
        raise InvalidUnitFile(
            f"{source}: [X-Fleet] MachineMetadata term {word!r} must be key=value or key!=value"
        )
    return MetadataRule(key, value, negated)


def parse_requirements(unit: UnitFile, name: str) -> Requirements:
    """Read and validate the [X-Fleet] section of `unit`, run as `name`.

    Raises InvalidUnitFile naming the option(s) at fault. Unknown and deprecated keys are
    warnings, carried in `Requirements.warnings`, never errors: a fleet user's files must load.
    """
    unit_name = parse_unit_name(name)
    if not any(option.section == XFLEET for option in unit.options):
        # Nothing to expand or validate: every unit without the section asks for nothing, and
        # most units of a large registry are such instances of one template.
        return _NO_REQUIREMENTS
    if unit_name.is_template:
        return _template_requirements(unit, unit_name)
    return _parse_requirements(unit, unit_name, name)


# A template's %i has no value yet. fleet accepts `MachineMetadata=hostname=%i` in a template and
# matches each instance's expanded value, so a template is checked as one would-be instance with
# this stand-in (made only of characters valid in unit names, machine ids and metadata) and any
# message names %i again. The requirements returned are the stand-in's: a template is never
# placed, only its instances are, each with its own values.
_STAND_IN_INSTANCE = "fleet-instance-stand-in"


def _template_requirements(unit: UnitFile, template: UnitName) -> Requirements:
    stand_in = UnitName(
        f"{template.prefix}@{_STAND_IN_INSTANCE}.{template.suffix}",
        template.prefix,
        _STAND_IN_INSTANCE,
        template.suffix,
    )
    try:
        return _parse_requirements(unit, stand_in, template.name)
    except InvalidUnitFile as exc:
        raise InvalidUnitFile(str(exc).replace(_STAND_IN_INSTANCE, "%i")) from None


def _parse_requirements(unit: UnitFile, unit_name: UnitName, source: str) -> Requirements:
    name = source
    warnings: list[str] = []
    collected: dict[str, list[str]] = {}
    for option in unit.options:
        if option.section != XFLEET:
            continue
        key = option.key
        if key in DEPRECATED_OPTIONS:
            warnings.append(f"{name}: [X-Fleet] {key} is deprecated: use {DEPRECATED_OPTIONS[key]}")
            key = DEPRECATED_OPTIONS[key]
        elif key not in KNOWN_OPTIONS:
            warnings.append(f"{name}: unknown [X-Fleet] option {key} is ignored")
            continue
        collected.setdefault(key, []).append(expand_specifiers(option.value, unit_name))

    def words(key: str) -> tuple[str, ...]:
        out: list[str] = []
        for value in collected.get(key, []):
            out.extend(_words(value, key, source))
        return tuple(out)

    def last(key: str) -> str | None:
        values = collected.get(key)
        return values[-1].strip() if values else None

    machine_id = last("MachineID") or None
    metadata = tuple(_metadata_rule(w, source) for w in words("MachineMetadata"))
    global_text = last("Global")
    pin_text = last("Pin")
    spread_text = last("Spread")
    spread = Spread.ZONE
    if spread_text is not None:
        try:
            spread = Spread(spread_text.lower())
        except ValueError:
            raise InvalidUnitFile(
                f"{source}: [X-Fleet] Spread={spread_text!r}: use region, zone, machine or none"
            ) from None

    def limit(key: str) -> int | None:
        text = last(key)
        return None if text is None else _limit(text, key, source)

    req = Requirements(
        machine_id=machine_id,
        machine_of=words("MachineOf"),
        zone_of=words("ZoneOf"),
        region_of=words("RegionOf"),
        metadata=metadata,
        conflicts=words("Conflicts"),
        zone_conflicts=words("ZoneConflicts"),
        region_conflicts=words("RegionConflicts"),
        replaces=words("Replaces"),
        global_=_bool(global_text, "Global", source) if global_text is not None else False,
        max_per_machine=limit("MaxPerMachine"),
        max_per_zone=limit("MaxPerZone"),
        max_per_region=limit("MaxPerRegion"),
        spread=spread,
        pin=_bool(pin_text, "Pin", source) if pin_text is not None else False,
        warnings=tuple(warnings),
    )
    _validate(req, unit_name, source)
    return req


def _validate(req: Requirements, unit_name: UnitName, source: str) -> None:
    def fail(message: str) -> None:
        raise InvalidUnitFile(f"{source}: [X-Fleet] {message}")

    present = {
        "MachineID": req.machine_id is not None,
        "MachineOf": bool(req.machine_of),
        "Conflicts": bool(req.conflicts),
        "Global": req.global_,
        "Replaces": bool(req.replaces),
        "ZoneOf": bool(req.zone_of),
        "RegionOf": bool(req.region_of),
        "ZoneConflicts": bool(req.zone_conflicts),
        "RegionConflicts": bool(req.region_conflicts),
        "MaxPerZone": req.max_per_zone is not None,
        "MaxPerRegion": req.max_per_region is not None,
    }
    # Rules that name a zone or region make no sense for a unit pinned to one machine or run on
    # all of them.
    level_rules = (
        "ZoneOf",
        "RegionOf",
        "ZoneConflicts",
        "RegionConflicts",
        "MaxPerZone",
        "MaxPerRegion",
    )
    exclusive = [
        ("MachineID", ("MachineOf", "Conflicts", "Global", "Replaces", *level_rules)),
        ("Global", ("MachineOf", "Replaces", *level_rules)),
        ("Conflicts", ("Replaces",)),
    ]
    for first, others in exclusive:
        if not present[first]:
            continue
        for other in others:
            if present[other]:
                fail(f"{first} cannot be combined with {other}: remove one of them")
    if req.global_ and req.max_per_machine is not None:
        fail("Global cannot be combined with MaxPerMachine: remove one of them")
    for option, targets in (
        ("MachineOf", req.machine_of),
        ("ZoneOf", req.zone_of),
        ("RegionOf", req.region_of),
    ):
        for target in targets:
            try:
                parse_unit_name(target)
            except InvalidUnitName as exc:
                fail(f"{option}={target}: {exc}")
            if target == unit_name.name:
                fail(f"{option}={target} names the unit itself: name another unit")
    for target in req.machine_of:
        for option, patterns in (("Conflicts", req.conflicts), ("Replaces", req.replaces)):
            for pattern in patterns:
                if glob_match(pattern, target):
                    fail(
                        f"MachineOf={target} matches the unit's own {option}={pattern}: "
                        "a unit cannot follow a unit it conflicts with or replaces"
                    )
    if req.machine_id is not None and not re.fullmatch(r"[0-9A-Za-z-]+", req.machine_id):
        fail(f"MachineID={req.machine_id!r} is not a machine id")


# fnmatch semantics differ from Go's path.Match on '/', which unit names never contain, so a
# cached translation to a regex is both faithful and cheap in the placement hot loop.
@functools.lru_cache(maxsize=4096)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    import fnmatch

    return re.compile(fnmatch.translate(pattern))


def glob_match(pattern: str, name: str) -> bool:
    return _glob_regex(pattern).match(name) is not None


def any_glob_match(patterns: Iterable[str], name: str) -> str | None:
    """The first pattern that matches `name`, or None."""
    for pattern in patterns:
        if glob_match(pattern, name):
            return pattern
    return None


# The registry's records keep their own parse (`fleetd.snapshot.UnitRecord`); this cache serves
# the same content read again (a unit re-written, a fresh read of the registry) and other callers.
@functools.lru_cache(maxsize=1024)
def requirements_for(text: str, name: str) -> Requirements:
    """Parse and validate once per (content, name). Equal answers are one object: the instances
    of a template mostly ask the same of their machine."""
    req = parse_requirements(parsed_unit_file(text, name), name)
    # Warnings do not take part in equality, so they are part of the key.
    key = (req, req.warnings)
    found = _requirements.get(key)
    if found is not None:
        return found
    if len(_requirements) >= 4096:
        _requirements.clear()
    _requirements[key] = req
    return req


_requirements: dict[tuple[Requirements, tuple[str, ...]], Requirements] = {}
