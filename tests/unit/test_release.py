"""core.release (version parsing and ordering, grouping targets) and the agent's selection
policy over it (updater.select)."""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tuf.api.metadata import TargetFile  # type: ignore[attr-defined]

from core import release
from core.errors import UpdateRejected
from core.release import ReleaseRejected, VersionError, parse_version
from tests.reposim import release_custom
from updater.select import select

HW = "x86_64-generic"


def target(path: str, custom: Any) -> TargetFile:
    info = TargetFile.from_data(path, path.encode(), ["sha256"])
    info.unrecognized_fields["custom"] = custom
    return info


def repo(*specs: tuple[str, str, str, tuple[str, ...]]) -> dict[str, TargetFile]:
    """Targets from (version, role, channel, hardware) tuples."""
    out = {}
    for version, role, channel, hardware in specs:
        path = f"{hardware[0]}/{version}/{role}.img"
        out[path] = target(
            path, release_custom(version, role=role, channel=channel, hardware=hardware)
        )
    return out


STD = repo(
    ("1.0.0", "root", "stable", (HW,)),
    ("1.1.0", "root", "stable", (HW, "arm64")),
    ("1.2.0-rc.1", "root", "beta", (HW,)),
    ("1.2.0", "root", "stable", (HW,)),
    ("1.3.0", "root", "stable", ("arm64",)),
)


def pick(targets: dict[str, TargetFile] = STD, **kw: Any) -> str | None:
    args: dict[str, Any] = {
        "hardware": HW,
        "channel": "stable",
        "installed_version": "1.0.0",
        "failed_versions": (),
    }
    args.update(kw)
    chosen = select(targets, **args)
    return None if chosen is None else chosen.version


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({}, "1.2.0"),
        ({"installed_version": None}, "1.2.0"),
        ({"installed_version": "1.2.0"}, None),
        ({"installed_version": "9.0.0"}, None),
        ({"failed_versions": ["1.2.0"]}, "1.1.0"),
        ({"failed_versions": ["1.2.0", "1.1.0"]}, None),
        ({"channel": "beta"}, "1.2.0-rc.1"),
        ({"channel": "beta", "installed_version": "1.2.0"}, None),
        ({"hardware": "arm64"}, "1.3.0"),
        ({"hardware": "riscv"}, None),
        ({"want_version": "1.1.0"}, "1.1.0"),
        ({"want_version": "1.2.0", "failed_versions": ["1.2.0"]}, "1.2.0"),  # explicit retry
        ({"want_version": "1.0.0", "force": True}, "1.0.0"),  # forced re-install
        ({"want_version": "1.1.0", "installed_version": "1.2.0", "force": True}, "1.1.0"),
        ({"force": True, "installed_version": "1.2.0"}, None),  # force needs a version
    ],
)
def test_select_table(kw: dict[str, Any], expected: str | None) -> None:
    assert pick(**kw) == expected


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"want_version": "1.1.0", "installed_version": "1.2.0"}, "refusing downgrade"),
        ({"want_version": "1.2.0", "installed_version": "1.2.0"}, "refusing re-install"),
        ({"want_version": "1.3.0"}, r"1\.3\.0 is not available .* available: 1\.0\.0, 1\.1"),
        ({"want_version": "banana"}, "banana is not available"),
        ({"hardware": "riscv", "want_version": "1.0.0"}, "available: none"),
    ],
)
def test_select_refusals(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ReleaseRejected, match=message):
        pick(**kw)


def test_select_invalid_installed_version_is_an_error() -> None:
    with pytest.raises(VersionError, match=r"installed version: invalid version '1\.0'"):
        pick(installed_version="1.0")


def test_releases_group_roles_and_sort_oldest_first() -> None:
    targets = {
        **repo(("2.0.0", "root", "stable", (HW,)), ("2.0.0", "boot", "stable", (HW,))),
        **repo(("10.0.0", "root", "stable", (HW,))),
    }
    found = release.releases(targets, HW, "stable")
    assert [r.version for r in found] == ["2.0.0", "10.0.0"]
    assert sorted(found[0].images) == ["boot", "root"]
    image = found[0].images["boot"]
    assert (image.path, image.compression, image.raw_length) == (f"{HW}/2.0.0/boot.img", "none", 5)
    assert image.raw_sha256 == hashlib.sha256(b"image").hexdigest()
    assert image.target is targets[image.path]


GOOD = release_custom("1.0.0")["release"]


@pytest.mark.parametrize(
    "custom",
    [
        None,
        "release",
        {},
        {"release": []},
        {"release": {**GOOD, "version": "1.0"}},
        {"release": {**GOOD, "version": 100}},
        {"release": {**GOOD, "hardware": HW}},
        {"release": {**GOOD, "hardware": []}},
        {"release": {**GOOD, "channel": None}},
        {"release": {**GOOD, "role": "../etc"}},
        {"release": {**GOOD, "compression": "lz4"}},
        {"release": {**GOOD, "raw_length": -1}},
        {"release": {**GOOD, "raw_length": 0}},
        {"release": {**GOOD, "raw_length": True}},
        {"release": {**GOOD, "raw_sha256": "ABC"}},
        {"release": {k: v for k, v in GOOD.items() if k != "role"}},
        # Hardware and channel names follow the one name rule of the schema.
        {"release": {**GOOD, "hardware": [HW, "a/b"]}},
        {"release": {**GOOD, "hardware": [HW, ""]}},
        {"release": {**GOOD, "hardware": [HW, "x" * 65]}},
        {"release": {**GOOD, "hardware": [HW, ".hidden"]}},
        {"release": {**GOOD, "hardware": [HW, None]}},
        {"release": {**GOOD, "compression": ["zstd"]}},
    ],
)
def test_malformed_custom_is_skipped_not_fatal(custom: Any) -> None:
    targets = {"bad/1.0.0/root.img": target("bad/1.0.0/root.img", custom), **STD}
    assert [r.version for r in release.releases(targets, HW, "stable")] == [
        "1.0.0",
        "1.1.0",
        "1.2.0",
    ]


@pytest.mark.parametrize(
    "path",
    [
        "x86_64-efi/../../../../tmp/pwned/evil.img",
        "../evil.img",
        "/etc/evil.img",
        "a//root.img",
        "a/./root.img",
        "a/root.img/",
        "a/root\x00.img",
        "a/root\n.img",
        "a\\..\\root.img",
    ],
)
def test_unsafe_target_path_is_skipped(path: str) -> None:
    targets = {path: target(path, release_custom("9.0.0", hardware=(HW,))), **STD}
    assert [r.version for r in release.releases(targets, HW, "stable")] == [
        "1.0.0",
        "1.1.0",
        "1.2.0",
    ]


def test_two_images_for_one_role_skip_that_version() -> None:
    targets = repo(("1.0.0", "root", "stable", (HW,)), ("1.1.0", "root", "stable", (HW,)))
    dup = f"{HW}/1.1.0/root.img.xz"
    targets[dup] = target(dup, release_custom("1.1.0"))
    assert [r.version for r in release.releases(targets, HW, "stable")] == ["1.0.0"]


def test_check_roles() -> None:
    (rel,) = release.releases(repo(("1.0.0", "root", "stable", (HW,))), HW, "stable")
    release.check_roles(rel, ["root"])
    with pytest.raises(ReleaseRejected, match=r"roles \[root\] but .* roles \[boot, root\]"):
        release.check_roles(rel, ["root", "boot"])


@pytest.mark.parametrize(
    "ordered",
    [
        [
            "1.0.0-alpha",
            "1.0.0-alpha.1",
            "1.0.0-alpha.beta",
            "1.0.0-beta",
            "1.0.0-beta.2",
            "1.0.0-beta.11",
            "1.0.0-rc.1",
            "1.0.0",
        ],  # the semver 2.0.0 spec example
        ["0.0.1", "0.1.0", "0.9.0", "0.10.0", "1.0.0", "1.2.0-rc.1", "1.2.0", "10.0.0"],
    ],
)
def test_version_order_examples(ordered: list[str]) -> None:
    parsed = [parse_version(v) for v in ordered]
    assert sorted(reversed(parsed)) == parsed
    assert all(a < b for a, b in itertools.pairwise(parsed))


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "1",
        "1.2",
        "1.2.3.4",
        "01.2.3",
        "1.2.3-",
        "1.2.3-01",
        "1.2.3+b1",
        " 1.2.3",
        "v1.2.3",
        "1.2.3-rc..1",
        "1.2.3-ü",
        "9" * 200 + ".0.0",
    ],
)
def test_invalid_versions(bad: str) -> None:
    with pytest.raises(VersionError, match="invalid version") as info:
        parse_version(bad)
    assert isinstance(info.value, ValueError) and isinstance(info.value, UpdateRejected)


numbers = st.integers(min_value=0, max_value=10**6)
identifiers = st.one_of(numbers, st.from_regex(r"[a-z][a-z0-9-]{0,5}", fullmatch=True))
versions = st.builds(
    lambda a, b, c, pre: f"{a}.{b}.{c}" + ("-" + ".".join(map(str, pre)) if pre else ""),
    numbers,
    numbers,
    numbers,
    st.lists(identifiers, max_size=3),
)


@given(versions, versions, versions)
def test_version_order_is_a_total_order(a: str, b: str, c: str) -> None:
    va, vb, vc = parse_version(a), parse_version(b), parse_version(c)
    assert (va < vb) + (va == vb) + (vb < va) == 1
    assert (va == vb) == (a == b)  # no two strings are the same version
    if va == vb:
        assert hash(va) == hash(vb)
    if va <= vb <= vc:
        assert va <= vc


@given(versions)
def test_prerelease_sorts_before_its_release(v: str) -> None:
    base = v.split("-", 1)[0]
    assert parse_version(base) >= parse_version(v)
    assert str(parse_version(v)) == v


@given(st.lists(versions, min_size=1, max_size=6, unique=True), st.sampled_from([None, "5.5.5"]))
def test_select_picks_the_maximum_upgrade(vs: list[str], installed: str | None) -> None:
    targets = repo(*((v, "root", "stable", (HW,)) for v in vs))
    chosen = pick(targets, installed_version=installed)
    newer = [
        parse_version(v)
        for v in vs
        if installed is None or parse_version(v) > parse_version(installed)
    ]
    assert chosen == (str(max(newer)) if newer else None)


# --- the schema: one parser, one writer, one message per refused field ----------------

NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True)
FIELD_VALUES = st.fixed_dictionaries(
    {
        "version": versions,
        "hardware": st.lists(NAMES, min_size=1, max_size=3),
        "channel": NAMES,
        "role": st.from_regex(r"[a-z][a-z0-9_-]{0,31}", fullmatch=True),
        "compression": st.sampled_from(release.COMPRESSIONS),
        "raw_length": st.integers(1, 2**64),
        "raw_sha256": st.from_regex(r"[0-9a-f]{64}", fullmatch=True),
    }
)


@given(FIELD_VALUES)
def test_fields_round_trip(values: dict[str, Any]) -> None:
    custom = release.build_custom(**values)
    fields = release.ReleaseFields.from_custom(custom)
    assert fields.to_custom() == custom
    assert release.ReleaseFields.from_custom(fields.to_custom()) == fields
    assert fields.version.text == values["version"] and list(fields.hardware) == values["hardware"]
    for hw in fields.hardware:
        path = fields.target_path(hw)
        assert release.check_target_path(path) == path
        suffix = {"zstd": ".zst", "xz": ".xz", "gzip": ".gz", "none": ""}[fields.compression]
        assert path == f"{hw}/{values['version']}/{values['role']}.img{suffix}"


@pytest.mark.parametrize(
    ("field", "value", "rule"),
    [
        ("version", "1.2.0+build.5", "MAJOR.MINOR.PATCH[-PRE]"),
        ("version", "1.2.0\n", "MAJOR.MINOR.PATCH[-PRE]"),
        ("hardware", ["a\x00b"], "letters, digits"),
        ("hardware", "x86_64", "non-empty list of names"),
        ("channel", "Stable Channel", "letters, digits"),
        ("role", "root.fs", "a lowercase letter"),
        ("compression", "lz4", "one of gzip, none, xz, zstd"),
        ("raw_length", 0, "positive integer"),
        ("raw_sha256", "0" * 63, "64 lowercase hex digits"),
    ],
)
def test_a_refusal_names_the_field_and_the_rule(field: str, value: Any, rule: str) -> None:
    custom = release_custom("1.0.0")
    custom["release"][field] = value
    with pytest.raises(release.FieldError) as info:
        release.ReleaseFields.from_custom(custom)
    err = info.value
    shown = repr(value[0] if field == "hardware" and isinstance(value, list) else value)
    assert err.field == field and rule in str(err) and shown in str(err)
    assert "\n" not in str(err) and "\x00" not in str(err)
    assert err.named("--x").startswith(f"--x {shown} ")


def test_served_path_is_the_consistent_snapshot_name() -> None:
    assert release.served_path("hw/1.0.0/root.img.zst", "ab") == "hw/1.0.0/ab.root.img.zst"
    assert release.served_path("root.img", "ab") == "ab.root.img"
    assert release.served_digest("ab.root.img.zst") == "ab"


def test_the_schema_imports_no_tuf() -> None:
    """The agent's fast commands import the schema: it must not pull tuf in."""
    import subprocess
    import sys

    code = "import sys, core.release; print('tuf' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)


@given(st.sampled_from(sorted(GOOD)), JSON)
def test_any_json_value_is_parsed_or_refused_naming_its_field(field: str, value: Any) -> None:
    """Whatever JSON a target carries in a field, the parser returns or raises the one
    FieldError naming that field - never another exception (a list as compression was a
    TypeError out of `releases`)."""
    custom = release_custom("1.0.0")
    custom["release"][field] = value
    try:
        fields = release.ReleaseFields.from_custom(custom)
    except release.FieldError as err:
        assert err.field == field and "\n" not in str(err)
        path = "x86_64-generic/1.0.0/root.img"
        assert release.releases({path: target(path, custom)}, HW, "stable") == []
    else:
        assert fields.to_custom()["release"][field] == value
