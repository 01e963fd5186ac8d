"""The unit-file grammar: unit names, systemd's INI dialect and every [X-Fleet] option with its
validation rules. Tables first, then Hypothesis properties: no input text may make the parser fail
with anything but `InvalidUnitFile`, and the content hash depends on the text alone."""

from __future__ import annotations

import contextlib
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetd.errors import InvalidUnitFile, InvalidUnitName
from fleetd.unitfile import (
    DEPRECATED_OPTIONS,
    KNOWN_OPTIONS,
    MAX_NAME_LENGTH,
    MetadataRule,
    Requirements,
    Spread,
    content_hash,
    default_unit_name,
    expand_specifiers,
    parse_requirements,
    parse_unit_file,
    parse_unit_name,
    parsed_unit_file,
    requirements_for,
    template_group,
)


def requirements(xfleet: str, name: str = "a.service") -> Requirements:
    text = f"[Unit]\nDescription=x\n\n[X-Fleet]\n{xfleet}\n"
    return parse_requirements(parse_unit_file(text, name), name)


def refusal(xfleet: str, name: str = "a.service") -> str:
    with pytest.raises(InvalidUnitFile) as info:
        requirements(xfleet, name)
    return str(info.value)


# ------------------------------------------------------------------------------- unit names


@pytest.mark.parametrize(
    ("name", "prefix", "instance", "suffix"),
    [
        ("a.service", "a", None, "service"),
        ("my-app_1:x.socket", "my-app_1:x", None, "socket"),
        ("a.b.c.mount", "a.b.c", None, "mount"),
        ("web@.service", "web", "", "service"),
        ("web@1.service", "web", "1", "service"),
        ("web@a.b.timer", "web", "a.b", "timer"),
        ("t@x.target", "t", "x", "target"),
        ("p@x.path", "p", "x", "path"),
        ("s@x.socket", "s", "x", "socket"),
        ("x" * (MAX_NAME_LENGTH - len(".service")) + ".service", None, None, "service"),
        # systemd's own rules: ':' and '\\' (its escapes) are unit name characters, and the
        # first '@' splits prefix and instance, the instance may hold more of them.
        ("a:b.service", "a:b", None, "service"),
        ("dev-disk-by\\x2dlabel.mount", "dev-disk-by\\x2dlabel", None, "mount"),
        ("a@b@c.service", "a", "b@c", "service"),
    ],
)
def test_valid_unit_names_split_into_their_parts(
    name: str, prefix: str | None, instance: str | None, suffix: str
) -> None:
    parsed = parse_unit_name(name)
    assert parsed.name == name
    assert parsed.suffix == suffix
    assert parsed.instance == instance
    if prefix is not None:
        assert parsed.prefix == prefix
    assert parsed.is_template == (instance == "")
    assert parsed.is_instance == bool(instance)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "empty"),
        ("x" * MAX_NAME_LENGTH + ".service", f"at most {MAX_NAME_LENGTH}"),
        ("a b.service", "invalid characters ' '"),
        ("a/b.service", "invalid characters '/'"),
        ("é.service", "invalid characters 'é'"),
        ("@foo.service", "must not start with '@'"),
        ("foo.txt", "no known unit type suffix"),
        ("foo", "no known unit type suffix"),
        (".service", "nothing before its suffix"),
        (".x.service", "must not start with '.'"),
        (".web@1.service", "must not start with '.'"),
        ("foo@1.mount", "can be templates or instances"),
        ("foo@.device", "can be templates or instances"),
        ("foo@1.slice", "can be templates or instances"),
        ("foo@1.swap", "can be templates or instances"),
    ],
)
def test_invalid_unit_names_say_what_is_wrong(name: str, message: str) -> None:
    with pytest.raises(InvalidUnitName) as info:
        parse_unit_name(name)
    assert message in str(info.value)


def test_template_group_and_stem() -> None:
    assert template_group("web@3.service") == "web@.service"
    assert template_group("web@.service") == "web@.service"
    assert template_group("web.service") is None
    assert template_group("not a unit") is None
    assert parse_unit_name("web@3.service").stem == "web@3"


@pytest.mark.parametrize(
    ("argument", "expected"),
    [
        ("hello", "hello.service"),
        ("hello.service", "hello.service"),
        ("/srv/units/hello.socket", "hello.socket"),
        ("units/web@.service", "web@.service"),
        ("dir/hello.txt", "hello.txt.service"),
        ("dir/sub/", "sub.service"),
        ("a.b", "a.b.service"),
    ],
)
def test_default_unit_name(argument: str, expected: str) -> None:
    assert default_unit_name(argument) == expected


# -------------------------------------------------------------------------------- INI grammar


def test_comments_blank_lines_and_sections_are_read() -> None:
    text = (
        "# leading comment\n"
        "; another\n"
        "\n"
        "[Unit]\n"
        "Description = spaced value \n"
        "  # indented comment\n"
        "[Service]\n"
        "ExecStart=/bin/true\n"
        "ExecStart=/bin/false\n"
    )
    unit = parse_unit_file(text)
    assert unit.sections() == ["Unit", "Service"]
    assert unit.description == "spaced value"
    assert unit.values("Service", "ExecStart") == ["/bin/true", "/bin/false"]
    assert [o.line for o in unit.options] == [5, 8, 9]
    assert unit.text == text
    assert unit.hash == hashlib.sha1(text.encode()).hexdigest()


def test_continuation_lines_join_with_a_space_and_skip_comments() -> None:
    text = "[Service]\nExecStart=/bin/sh \\\n  -c \\\n# inside\n  'sleep 1'\nUser=x\n"
    unit = parse_unit_file(text)
    assert unit.values("Service", "ExecStart") == ["/bin/sh -c 'sleep 1'"]
    assert unit.values("Service", "User") == ["x"]


def test_continuation_at_end_of_file_keeps_the_value() -> None:
    unit = parse_unit_file("[Service]\nExecStart=/bin/true \\")
    assert unit.values("Service", "ExecStart") == ["/bin/true"]


def test_empty_section_is_reported_by_has_section() -> None:
    unit = parse_unit_file("[Unit]\nDescription=x\n[X-Fleet]\n")
    assert unit.has_section("X-Fleet")
    assert not unit.has_section("Install")
    assert parse_unit_file("").options == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Description=x\n[Unit]\n", "line 1: option Description comes before any [Section]"),
        ("[Unit]\n[Broken\n", "line 2: malformed section header '[Broken'"),
        ("[Unit]\n[a[b]]\n", "line 2: malformed section header"),
        ("[Unit]\nDescription x\n", "line 2: expected Key=Value or [Section]"),
        ("[Unit]\n=value\n", "line 2: expected Key=Value or [Section]"),
        ("[Unit]\nBad Key=value\n", "line 2: expected Key=Value or [Section]"),
    ],
)
def test_malformed_files_name_the_line(text: str, message: str) -> None:
    with pytest.raises(InvalidUnitFile) as info:
        parse_unit_file(text, "x.service")
    assert str(info.value).startswith("x.service: ")
    assert message in str(info.value)


# ---------------------------------------------------------------------------------- [X-Fleet]


@pytest.mark.parametrize(
    ("xfleet", "field", "expected"),
    [
        ("MachineID=0123abcd", "machine_id", "0123abcd"),
        ("MachineOf=b.service", "machine_of", ("b.service",)),
        ("MachineOf=b.service c.service", "machine_of", ("b.service", "c.service")),
        ("MachineOf=b.service\nMachineOf=c.service", "machine_of", ("b.service", "c.service")),
        ("ZoneOf=b.service", "zone_of", ("b.service",)),
        ("RegionOf=b.service", "region_of", ("b.service",)),
        ("Conflicts=b*.service c.service", "conflicts", ("b*.service", "c.service")),
        ("ZoneConflicts=db@*.service", "zone_conflicts", ("db@*.service",)),
        ("RegionConflicts=db@*.service", "region_conflicts", ("db@*.service",)),
        ("Replaces=old.service", "replaces", ("old.service",)),
        ("Global=true", "global_", True),
        ("MaxPerMachine=2", "max_per_machine", 2),
        ("MaxPerZone=3", "max_per_zone", 3),
        ("MaxPerRegion= 4 ", "max_per_region", 4),
        ("Spread=Region", "spread", Spread.REGION),
        ("Spread=machine", "spread", Spread.MACHINE),
        ("Spread=none", "spread", Spread.NONE),
        ("Spread=zone", "spread", Spread.ZONE),
        ("Pin=yes", "pin", True),
        ("MachineID=", "machine_id", None),
        ("MaxPerZone=1\nMaxPerZone=5", "max_per_zone", 5),
    ],
)
def test_each_option_is_read(xfleet: str, field: str, expected: object) -> None:
    req = requirements(xfleet)
    assert getattr(req, field) == expected
    assert req.warnings == ()


def test_defaults_without_an_x_fleet_section() -> None:
    unit = parse_unit_file("[Unit]\nDescription=x\n")
    req = parse_requirements(unit, "a.service")
    assert req == Requirements()
    assert req.spread is Spread.ZONE
    assert not req.uses_zone and not req.uses_region


def test_units_without_x_fleet_ask_for_nothing_whatever_their_name() -> None:
    text = "[Unit]\nDescription=x %i\n\n[Service]\nExecStart=/bin/true\n\n[X-Fleet]\n"
    for name in ("a.service", "web@.service", "web@1.service", "web@2.service"):
        assert requirements_for(text, name) == Requirements()
        assert requirements_for(text, name).warnings == ()
    # The name is still checked, though the section asks for nothing.
    with pytest.raises(InvalidUnitName):
        requirements_for(text, "web@1.mount")


def test_instances_sharing_a_text_get_their_own_rules() -> None:
    text = "[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nMachineMetadata=zone=%i\n"
    assert requirements_for(text, "web@a.service").metadata == (MetadataRule("zone", "a"),)
    assert requirements_for(text, "web@b.service").metadata == (MetadataRule("zone", "b"),)
    own = "[Service]\nExecStart=/bin/true\n\n[X-Fleet]\nMachineOf=db@1.service\n"
    assert requirements_for(own, "web@1.service").machine_of == ("db@1.service",)
    with pytest.raises(InvalidUnitFile, match="names the unit itself"):
        requirements_for(own, "db@1.service")


def test_a_parse_shared_by_text_still_names_each_source_in_its_error() -> None:
    good = "[Unit]\nDescription=shared\n"
    assert parsed_unit_file(good, "a.service") is parsed_unit_file(good, "b.service")
    assert parsed_unit_file(good, "a.service").description == "shared"
    bad = "[Unit]\nnot an option\n"
    for source in ("a.service", "b.service"):
        with pytest.raises(InvalidUnitFile, match=f"^{source}: line 2"):
            parsed_unit_file(bad, source)


def test_a_refused_unit_name_is_refused_every_time() -> None:
    for _ in range(2):
        with pytest.raises(InvalidUnitName, match="unit type suffix"):
            parse_unit_name("web@1.bogus")
    assert parse_unit_name("web@1.service") is parse_unit_name("web@1.service")


def test_values_without_specifiers_are_left_as_they_are() -> None:
    name = parse_unit_name("web@1.service")
    assert expand_specifiers("plain 100% sure", name) == "plain 100% sure"
    assert expand_specifiers("no specifier", name) == "no specifier"
    assert expand_specifiers("%p on %i, %%", name) == "web on 1, %"


@pytest.mark.parametrize(
    ("xfleet", "zone", "region"),
    [
        ("ZoneOf=b.service", True, False),
        ("ZoneConflicts=b.service", True, False),
        ("MaxPerZone=1", True, False),
        ("RegionOf=b.service", False, True),
        ("RegionConflicts=b.service", False, True),
        ("MaxPerRegion=1", False, True),
        ("MaxPerMachine=1", False, False),
    ],
)
def test_level_usage(xfleet: str, zone: bool, region: bool) -> None:
    req = requirements(xfleet)
    assert (req.uses_zone, req.uses_region) == (zone, region)


@pytest.mark.parametrize(
    ("old", "new", "value", "field", "expected"),
    [
        ("X-ConditionMachineID", "MachineID", "abc123", "machine_id", "abc123"),
        ("X-ConditionMachineOf", "MachineOf", "b.service", "machine_of", ("b.service",)),
        (
            "X-ConditionMachineMetadata",
            "MachineMetadata",
            "zone=a",
            "metadata",
            (MetadataRule("zone", "a"),),
        ),
        ("X-Conflicts", "Conflicts", "b.service", "conflicts", ("b.service",)),
    ],
)
def test_deprecated_spellings_work_with_a_warning(
    old: str, new: str, value: str, field: str, expected: object
) -> None:
    req = requirements(f"{old}={value}")
    assert getattr(req, field) == expected
    assert req.warnings == (f"a.service: [X-Fleet] {old} is deprecated: use {new}",)


def test_deprecated_and_new_spellings_add_up() -> None:
    req = requirements("X-Conflicts=b.service\nConflicts=c.service")
    assert req.conflicts == ("b.service", "c.service")


def test_unknown_option_is_ignored_with_a_warning() -> None:
    req = requirements("Frobnicate=yes\nConflicts=b.service")
    assert req.conflicts == ("b.service",)
    assert req.warnings == ("a.service: unknown [X-Fleet] option Frobnicate is ignored",)


def test_options_of_other_sections_are_not_x_fleet() -> None:
    text = "[Unit]\nConflicts=b.service\nGlobal=true\n"
    req = parse_requirements(parse_unit_file(text), "a.service")
    assert req.conflicts == () and not req.global_ and req.warnings == ()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("true", True),
        ("TRUE", True),
        ("yes", True),
        ("1", True),
        ("on", True),
        ("t", True),
        ("y", True),
        ("false", False),
        ("No", False),
        ("0", False),
        ("off", False),
        ("f", False),
        ("n", False),
        ("", False),
    ],
)
def test_bool_spellings(value: str, expected: bool) -> None:
    assert requirements(f"Global={value}").global_ is expected
    assert requirements(f"Pin={value}").pin is expected


@pytest.mark.parametrize("option", ["Global", "Pin"])
def test_bad_bool_names_the_option(option: str) -> None:
    message = refusal(f"{option}=maybe")
    assert f"{option}='maybe' is not a boolean" in message


@pytest.mark.parametrize(
    ("xfleet", "expected"),
    [
        ("MachineMetadata=zone=a", [MetadataRule("zone", "a")]),
        (
            'MachineMetadata="zone=a" "region=eu"',
            [MetadataRule("zone", "a"), MetadataRule("region", "eu")],
        ),
        (
            "MachineMetadata=zone=a zone=b",
            [MetadataRule("zone", "a"), MetadataRule("zone", "b")],
        ),
        (
            "MachineMetadata=zone=a\nMachineMetadata=disk=ssd",
            [MetadataRule("zone", "a"), MetadataRule("disk", "ssd")],
        ),
        ("MachineMetadata=zone!=a", [MetadataRule("zone", "a", negated=True)]),
        (
            'MachineMetadata="role=web" "zone!=c"',
            [MetadataRule("role", "web"), MetadataRule("zone", "c", negated=True)],
        ),
        ('MachineMetadata="name=two words"', [MetadataRule("name", "two words")]),
        ("MachineMetadata=expr=a=b", [MetadataRule("expr", "a=b")]),
    ],
)
def test_machine_metadata_terms(xfleet: str, expected: list[MetadataRule]) -> None:
    assert list(requirements(xfleet).metadata) == expected


def test_metadata_rules_print_as_written() -> None:
    assert str(MetadataRule("zone", "a")) == "zone=a"
    assert str(MetadataRule("zone", "a", negated=True)) == "zone!=a"


@pytest.mark.parametrize("term", ["zone", "=a", "zone=", "zone!=", "bad key=a", "a.b=c"])
def test_bad_metadata_terms(term: str) -> None:
    message = refusal(f'MachineMetadata="{term}"')
    assert "MachineMetadata term" in message
    assert "must be key=value or key!=value" in message


def test_unbalanced_quotes_name_the_option() -> None:
    message = refusal('Conflicts="b.service')
    assert "Conflicts=" in message and "No closing quotation" in message


# ------------------------------------------------------------------------------- specifiers


@pytest.mark.parametrize(
    ("value", "name", "expected"),
    [
        ("%n", "web@3.service", "web@3.service"),
        ("%N", "web@3.service", "web@3"),
        ("%p", "web@3.service", "web"),
        ("%i", "web@3.service", "3"),
        ("%p@*.service", "web@3.service", "web@*.service"),
        ("%%i", "web@3.service", "%i"),
        ("%i", "plain.service", ""),
        ("%p", "plain.service", "plain"),
        ("%x stays", "plain.service", "%x stays"),
        ("trailing %", "plain.service", "trailing %"),
    ],
)
def test_expand_specifiers(value: str, name: str, expected: str) -> None:
    assert expand_specifiers(value, parse_unit_name(name)) == expected


def test_specifiers_expand_in_x_fleet_values() -> None:
    req = requirements(
        "Conflicts=%p@*.service\nMachineOf=db@%i.service\nMachineMetadata=shard=%i\n"
        "ZoneConflicts=%N-peer.service",
        "web@7.service",
    )
    assert req.conflicts == ("web@*.service",)
    assert req.machine_of == ("db@7.service",)
    assert req.metadata == (MetadataRule("shard", "7"),)
    assert req.zone_conflicts == ("web@7-peer.service",)
    assert requirements("Replaces=%p-old@%i.service", "web@7.service").replaces == (
        "web-old@7.service",
    )


def test_specifier_expansion_can_reveal_a_self_reference() -> None:
    message = refusal("MachineOf=%n", "web@1.service")
    assert "MachineOf=web@1.service names the unit itself" in message


# ------------------------------------------------------------------------------- validation

EXCLUSIVE = [
    ("MachineID=abc", "MachineOf=b.service", "MachineID", "MachineOf"),
    ("MachineID=abc", "Conflicts=b.service", "MachineID", "Conflicts"),
    ("MachineID=abc", "Global=true", "MachineID", "Global"),
    ("MachineID=abc", "Replaces=b.service", "MachineID", "Replaces"),
    ("Global=true", "MachineOf=b.service", "Global", "MachineOf"),
    ("Global=true", "Replaces=b.service", "Global", "Replaces"),
    ("Global=true", "MaxPerMachine=1", "Global", "MaxPerMachine"),
    ("Conflicts=b.service", "Replaces=c.service", "Conflicts", "Replaces"),
    *[
        (first, f"{level}={value}", first.split("=")[0], level)
        for first in ("MachineID=abc", "Global=true")
        for level, value in (
            ("ZoneOf", "b.service"),
            ("RegionOf", "b.service"),
            ("ZoneConflicts", "b.service"),
            ("RegionConflicts", "b.service"),
            ("MaxPerZone", "1"),
            ("MaxPerRegion", "1"),
        )
    ],
]


@pytest.mark.parametrize(("one", "other", "first", "second"), EXCLUSIVE)
def test_exclusive_options_are_refused_naming_both(
    one: str, other: str, first: str, second: str
) -> None:
    for xfleet in (f"{one}\n{other}", f"{other}\n{one}"):
        message = refusal(xfleet)
        assert f"{first} cannot be combined with {second}" in message
        assert message.startswith("a.service: [X-Fleet] ")


@pytest.mark.parametrize(
    ("xfleet", "first", "second"),
    [
        ("MachineOf=b.service\nConflicts=b.service", "MachineOf=b.service", "Conflicts=b.service"),
        ("MachineOf=b.service\nConflicts=b*", "MachineOf=b.service", "Conflicts=b*"),
        ("MachineOf=b.service\nReplaces=*.service", "MachineOf=b.service", "Replaces=*.service"),
    ],
)
def test_machine_of_target_matching_own_conflicts_or_replaces(
    xfleet: str, first: str, second: str
) -> None:
    message = refusal(xfleet)
    assert first in message and second in message


def test_machine_of_with_unrelated_conflicts_is_fine() -> None:
    req = requirements("MachineOf=b.service\nConflicts=c*.service")
    assert req.machine_of == ("b.service",) and req.conflicts == ("c*.service",)


@pytest.mark.parametrize("option", ["MaxPerMachine", "MaxPerZone", "MaxPerRegion"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_limits_below_one_are_refused(option: str, value: str) -> None:
    assert f"{option}={int(value)} must be 1 or more" in refusal(f"{option}={value}")


@pytest.mark.parametrize("option", ["MaxPerMachine", "MaxPerZone", "MaxPerRegion"])
def test_limits_must_be_numbers(option: str) -> None:
    assert f"{option}='many' is not a whole number" in refusal(f"{option}=many")


@pytest.mark.parametrize("option", ["MachineOf", "ZoneOf", "RegionOf"])
def test_self_reference_is_refused(option: str) -> None:
    assert f"{option}=a.service names the unit itself" in refusal(f"{option}=a.service")


@pytest.mark.parametrize("option", ["MachineOf", "ZoneOf", "RegionOf"])
def test_peer_must_be_a_unit_name(option: str) -> None:
    message = refusal(f"{option}=not-a-unit")
    assert f"{option}=not-a-unit" in message and "no known unit type suffix" in message


@pytest.mark.parametrize("value", ["diagonal", "zones", "1"])
def test_bad_spread(value: str) -> None:
    message = refusal(f"Spread={value}")
    assert f"Spread={value!r}" in message and "region, zone, machine or none" in message


@pytest.mark.parametrize("value", ["a_b", "a b", "a/b"])
def test_bad_machine_id(value: str) -> None:
    assert "is not a machine id" in refusal(f'MachineID="{value}"')


def test_requirements_need_a_valid_unit_name() -> None:
    with pytest.raises(InvalidUnitName):
        parse_requirements(parse_unit_file("[Unit]\n"), "bad name")


# ----------------------------------------------------------------------------- properties

_xfleet_keys = st.sampled_from(
    [*sorted(KNOWN_OPTIONS), *sorted(DEPRECATED_OPTIONS), "Unknown"]
)
_values = st.text(alphabet=st.sampled_from(list("ab.*@%nNpi=!\"' \\-01zone.service")), max_size=30)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_only_ever_raises_invalid_unit_file(text: str) -> None:
    with contextlib.suppress(InvalidUnitFile):
        parse_requirements(parse_unit_file(text), "fuzz@1.service")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_xfleet_keys, _values), max_size=6))
def test_arbitrary_x_fleet_sections_only_ever_raise_invalid_unit_file(
    options: list[tuple[str, str]],
) -> None:
    text = "[X-Fleet]\n" + "".join(f"{k}={v}\n" for k, v in options)
    with contextlib.suppress(InvalidUnitFile):
        parse_requirements(parse_unit_file(text), "fuzz@1.service")


@given(st.text(max_size=200))
def test_content_hash_is_the_sha1_of_the_text(text: str) -> None:
    assert content_hash(text) == content_hash(str(text))
    assert content_hash(text) == hashlib.sha1(text.encode()).hexdigest()


@given(st.text(max_size=100), st.text(min_size=1, max_size=5))
def test_content_hash_changes_with_the_text(text: str, extra: str) -> None:
    assert content_hash(text) != content_hash(text + extra)


# fleet's TestTemplatesWithSpecifiersInMetadata: a template's %i has no value yet, so its
# instance-dependent values are checked per instance, not refused on the template.
@pytest.mark.parametrize(
    "xfleet",
    [
        "MachineMetadata=hostname=%i",
        "MachineID=%i",
        "MachineOf=db@%i.service",
        'MachineMetadata="zone=%i" "rack!=r%i"',
    ],
)
def test_template_accepts_values_its_instances_fill_in(xfleet: str) -> None:
    requirements(xfleet, "metadata@.service")


def test_each_instance_of_a_template_gets_its_own_metadata() -> None:
    for instance in ("core-01", "smoke2"):
        req = requirements("MachineMetadata=hostname=%i", f"metadata@{instance}.service")
        assert req.metadata == (MetadataRule("hostname", instance),)


@pytest.mark.parametrize(
    ("xfleet", "fragment"),
    [
        # No instance name can make these valid: refused on the template already, naming %i.
        ("MachineMetadata=%i", "MachineMetadata term '%i' must be key=value"),
        ("MachineOf=%n", "MachineOf=web@%i.service names the unit itself"),
        ("MachineOf=%i", "MachineOf=%i"),
        ("MachineID=%i\nGlobal=true", "MachineID cannot be combined with Global"),
    ],
)
def test_template_values_no_instance_can_fix_are_refused(xfleet: str, fragment: str) -> None:
    message = refusal(xfleet, "web@.service")
    assert message.startswith("web@.service: [X-Fleet]"), message
    assert fragment in message, message
    assert "stand-in" not in message


def test_plain_unit_with_an_empty_instance_value_is_still_refused() -> None:
    assert "must be key=value" in refusal("MachineMetadata=hostname=%i", "plain.service")
