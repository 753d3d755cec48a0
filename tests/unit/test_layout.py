"""updater.disk.layout: loading, validating and planning partition layouts (no I/O on
disks; writing them to disks is in tests/integration/)."""

from __future__ import annotations

import contextlib
import datetime
import json
import tempfile
import uuid
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from core.errors import LayoutError, UpdaterError
from tests.bounded import fifo, within
from updater.disk.layout import (
    TYPE_ALIASES,
    layout_from_dict,
    load_layout,
    parse_size,
    plan_layout,
)

LAYOUTS = Path(__file__).resolve().parents[2] / "partition-layouts"
GIB = 1 << 30
MIB = 1 << 20


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "layout.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "size"),
    [("512M", 512 * MIB), ("2G", 2 * GIB), ("64MiB", 64 * MIB), ("4k", 4096), ("1T", 1 << 40)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text", ["", "0M", "12", "1.5G", "-1M", "5X", "M", "rest", "1\u212a", "1M\n1M", "\u0661M"]
)
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="bad size"):
        parse_size(text)


def test_shipped_layouts_fit_one_gib() -> None:
    for name in ("grub-efi-ab", "gptprio-ab", "systemd-boot-ab"):
        disk = plan_layout(load_layout(LAYOUTS / f"{name}.toml"), GIB)
        assert [p.name for p in disk.partitions] == ["esp", "root_a", "root_b", "data"]
        assert all(p.first_lba % 2048 == 0 for p in disk.partitions)
        assert disk.find("root_a").size_bytes(512) == 384 * MIB
        assert disk.find("root_a").type_guid == TYPE_ALIASES["root-x86-64"]
        assert disk.find("data").last_lba <= disk.last_usable_lba


def test_gptprio_layout_boot_bits() -> None:
    disk = plan_layout(load_layout(LAYOUTS / "gptprio-ab.toml"), GIB)
    a, b = disk.find("root_a"), disk.find("root_b")
    assert (a.priority, a.tries, a.successful) == (1, 0, True)
    assert (b.priority, b.tries, b.successful) == (0, 0, False)


def test_fixed_guids_raw_attributes_and_type_guid(tmp_path: Path) -> None:
    disk_guid, part_guid, odd_type = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    path = _write(
        tmp_path,
        f"""
[layout]
disk_guid = "{disk_guid}"
[[partition]]
name = "x"
type = "{odd_type}"
size = "1M"
uuid = "{part_guid}"
attributes = 0x1000000000000001
tries = 3
""",
    )
    disk = plan_layout(load_layout(path), 8 * MIB)
    (p,) = disk.partitions
    assert disk.disk_guid == disk_guid
    assert (p.unique_guid, p.type_guid) == (part_guid, odd_type)
    assert p.attributes == 0x1000000000000001 | (3 << 52)
    assert (p.first_lba, p.last_lba) == (2048, 4095)


PART = '[[partition]]\nname = "{name}"\ntype = "{type}"\nsize = "{size}"\n'


def _parts(*rows: tuple[str, str, str]) -> str:
    return "".join(PART.format(name=n, type=t, size=s) for n, t, s in rows)


BAD = {
    "unknown alias": (_parts(("a", "root-sparc", "1M")), "partition 1 ('a').type: unknown type"),
    "duplicate name": (
        _parts(("a", "esp", "1M"), ("a", "esp", "1M")),
        "partition 2 ('a').name: duplicate name 'a'",
    ),
    "missing field": ('[[partition]]\nname = "a"\ntype = "esp"\n', "partition 1.size: missing"),
    "rest not last": (
        _parts(("a", "esp", "rest"), ("b", "esp", "1M")),
        "partition 1 ('a').size: \"rest\" is only allowed for the last",
    ),
    "bad size": (_parts(("a", "esp", "12 bananas")), "partition 1 ('a').size: bad size"),
    "too big": (_parts(("a", "esp", "2G")), "partition 1 ('a').size: does not fit the target"),
    "second too big": (
        _parts(("a", "esp", "30M"), ("b", "var", "30M")),
        "partition 2 ('b').size: does not fit the target",
    ),
    "no partitions": ('[layout]\ndescription = "x"\n', "partition: missing"),
    "unknown field": (
        _parts(("a", "esp", "1M")) + 'colour = "red"\n',
        "partition 1 ('a').colour: unknown field",
    ),
    "bad priority": (
        _parts(("a", "esp", "1M")) + "priority = 16\n",
        "partition 1 ('a').priority: must be an integer 0-15",
    ),
    "bad uuid": (
        _parts(("a", "esp", "1M")) + 'uuid = "nope"\n',
        "partition 1 ('a').uuid: not a GUID",
    ),
    "long name": (_parts(("n" * 37, "esp", "1M")), ".name: must be a non-empty string"),
    "not toml": ("[[partition]\n", "not valid TOML"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_layouts_name_file_and_field(tmp_path: Path, case: str) -> None:
    text, message = BAD[case]
    path = _write(tmp_path, text)
    with pytest.raises(LayoutError) as err:
        plan_layout(load_layout(path), 48 * MIB)
    assert str(err.value).startswith(f"{path}: "), str(err.value)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


# --- hostile input: limits, wrong types, what is not a file, arbitrary documents --------


@pytest.mark.parametrize(
    "text", ["9999999T", "8388608T", "9" * 20 + "K", "9" * 5000 + "M", "1" + "0" * 4400 + "G"]
)
def test_parse_size_refuses_sizes_no_file_can_have(text: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_size(text)
    assert str(err.value).startswith(f"size {text[:24]!r}"), str(err.value)
    assert "over the limit of 9223372036854775807 bytes" in str(err.value)
    assert len(str(err.value)) < 200 and "\n" not in str(err.value)


def test_parse_size_largest_accepted() -> None:
    assert parse_size("8388607T") == 8388607 << 40 < 1 << 63


def test_plan_refuses_a_target_no_file_can_be() -> None:
    layout = load_layout(LAYOUTS / "grub-efi-ab.toml")
    with pytest.raises(LayoutError, match="target of 9223372036854775808 bytes: over the limit"):
        plan_layout(layout, 1 << 63)


def test_duplicate_uuids_name_both_partitions(tmp_path: Path) -> None:
    guid = uuid.uuid4()
    text = (
        _parts(("a", "esp", "1M"), ("b", "esp", "1M"))
        .replace('name = "b"', f'name = "b"\nuuid = "{guid}"')
        .replace('name = "a"', f'name = "a"\nuuid = "{str(guid).upper()}"')
    )
    path = _write(tmp_path, text)
    with pytest.raises(LayoutError) as err:
        load_layout(path)
    assert str(err.value) == (
        f"{path}: partition 2 ('b').uuid: {guid} is also the uuid of partition 1 ('a')"
    )


WRONG_TYPES = {
    "size = []": "partition 1 ('a').size: must be a string",
    "name = 5": "partition 1 (5).name: must be a non-empty string",
    'name = ""': "partition 1 ('').name: must be a non-empty string",
    'name = "a\\u0000b"': "partition 1 ('a\\x00b').name: must not contain NUL",
    'attributes = "x"': "partition 1 ('a').attributes: must be an integer in 0..2^64-1",
    "attributes = -1": "partition 1 ('a').attributes: must be an integer in 0..2^64-1",
    "priority = 99": "partition 1 ('a').priority: must be an integer 0-15, not 99",
    "tries = true": "partition 1 ('a').tries: must be an integer 0-15, not True",
    "type = {}": "partition 1 ('a').type: must be a string, not {}",
    'type = "00000000-0000-0000-0000-000000000000"': "type: the empty type GUID marks",
    "uuid = 5": "partition 1 ('a').uuid: must be a string, not 5",
    "uuid = [1]": "partition 1 ('a').uuid: must be a string, not [1]",
    'successful = "yes"': "partition 1 ('a').successful: must be true/false, not 'yes'",
    "successful = 2": "partition 1 ('a').successful: must be true/false, not 2",
    "[layout]\ndescription = 5": "layout.description: must be a string, not 5",
    "[layout]\nname = []": "layout.name: must be a string, not []",
    "[layout]\ndisk_guid = 7": "layout.disk_guid: must be a string, not 7",
    "layout = []": "layout: must be a table",
    "partition = 5": "partition: missing",
    "partition = [5]": "partition 1: must be a table",
    "partition = [[]]": "partition 1: must be a table",
}


@pytest.mark.parametrize("line", sorted(WRONG_TYPES))
def test_wrong_types_name_the_field(tmp_path: Path, line: str) -> None:
    base = PART.format(name="a", type="esp", size="1M")
    key = line.split(" =")[0]
    if key.startswith("[layout]") or key in ("layout", "partition"):
        text = (line + "\n" + base) if key.startswith("[layout]") else line + "\n"
    else:
        text = "".join(row for row in base.splitlines(True) if not row.startswith(key + " "))
        text += line + "\n"
    path = _write(tmp_path, text)
    with pytest.raises(LayoutError) as err:
        plan_layout(load_layout(path), 48 * MIB)
    assert str(err.value).startswith(f"{path}: "), str(err.value)
    assert WRONG_TYPES[line] in str(err.value), str(err.value)


def test_deeply_nested_toml_is_one_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "x = " + "[" * 3000 + "]" * 3000 + "\n")
    with pytest.raises(LayoutError, match=r"layout\.toml: not valid TOML: nested too deeply"):
        load_layout(path)
    path.write_text("x = " + "{a = " * 3000 + "1" + "}" * 3000 + "\n")
    with pytest.raises(LayoutError, match="not valid TOML"):
        load_layout(path)


def test_not_utf8_is_one_error(tmp_path: Path) -> None:
    path = tmp_path / "layout.toml"
    path.write_bytes(b'[[partition]]\nname = "\xff"\n')
    with pytest.raises(LayoutError, match=r"layout\.toml: not UTF-8 text"):
        load_layout(path)


@pytest.mark.parametrize("kind", ["directory", "FIFO", "character device", "huge file"])
def test_a_layout_must_be_a_regular_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "layout.toml"
    with contextlib.ExitStack() as stack:
        if kind == "directory":
            path.mkdir()
        elif kind == "FIFO":
            stack.enter_context(fifo(path))
        elif kind == "character device":
            path = Path("/dev/null")
        else:
            with path.open("wb") as f:
                f.truncate(4 << 20)
        with pytest.raises(LayoutError) as err:
            within(lambda: load_layout(path))
    why = "larger than 1048576 bytes" if kind == "huge file" else f"not a regular file (a {kind})"
    assert str(err.value) == f"{path}: cannot read layout: {why}"


# Arbitrary TOML-like values, and documents that are mostly right with one thing wrong.
SCALARS = st.one_of(
    st.text(max_size=6),
    st.text(st.characters(categories=["Cs", "Cc"]), max_size=3),
    st.integers(min_value=-(2**65), max_value=2**65),
    st.floats(),
    st.booleans(),
    st.datetimes(),
    st.sampled_from(["rest", "1M", "0M", "64MiB", "9999999T", "esp", "root-x86-64", ""]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
GUID_POOL = [str(uuid.UUID(int=n)) for n in range(1, 4)] + [f"{{{uuid.UUID(int=1)}}}"]
# Per field: values that are right, and values that are wrong in the ways people get
# them wrong; `_field` mixes them with arbitrary values.
RIGHT_VALUES: dict[str, st.SearchStrategy[object]] = {
    "name": st.sampled_from(["a", "b", "root_a", "n" * 36, "ü"]),
    "type": st.sampled_from([*TYPE_ALIASES, GUID_POOL[1], "ESP"]),
    "size": st.sampled_from(["1M", "4k", "2MiB", "7M", "rest"]),
    "uuid": st.sampled_from(GUID_POOL),
    "attributes": st.integers(min_value=0, max_value=2**64 - 1),
    "priority": st.integers(min_value=0, max_value=15),
    "tries": st.integers(min_value=0, max_value=15),
    "successful": st.sampled_from([True, False, 0, 1]),
}
WRONG_VALUES: dict[str, st.SearchStrategy[object]] = {
    "name": st.sampled_from(["", "n" * 37, "a\0", "\udc80", "\u0000"]),
    "type": st.sampled_from([str(uuid.UUID(int=0)), "x", "root-sparc"]),
    "size": st.sampled_from(["0M", "513", "8388608T", "9" * 30 + "K", "1.5G", "3G"]),
    "uuid": st.sampled_from(["nope", "", str(uuid.UUID(int=0))[:-1]]),
    "attributes": st.sampled_from([-1, 2**64, True]),
    "priority": st.sampled_from([-1, 16, True, 1.0]),
    "tries": st.sampled_from([-1, 16, False]),
    "successful": st.sampled_from([2, -1, "yes", 0.5]),
}


def _rare(draw: st.DrawFn, one_in: int = 20) -> bool:
    # A middle value, not 0: hypothesis draws the ends of a range more often.
    return bool(draw(st.integers(0, one_in - 1)) == one_in // 2)


@st.composite
def _field(draw: st.DrawFn, key: str) -> object:
    if _rare(draw):
        return draw(VALUES)
    return draw(WRONG_VALUES[key] if _rare(draw, 16) else RIGHT_VALUES[key])


@st.composite
def _documents(draw: st.DrawFn) -> dict[str, object]:
    parts: list[object] = []
    for n in range(draw(st.integers(1, 4)) if not _rare(draw) else 0):
        item: dict[str, object] = {}
        for key in RIGHT_VALUES:
            if key in ("name", "type", "size"):
                if not _rare(draw):
                    item[key] = f"p{n}" if key == "name" and _rare(draw, 2) else draw(_field(key))
            elif _rare(draw, 4):
                item[key] = draw(_field(key))
        if _rare(draw):
            item["colour"] = "red"
        parts.append(draw(VALUES) if _rare(draw) else item)
    doc: dict[str, object] = {"partition": draw(VALUES) if _rare(draw) else parts}
    if draw(st.booleans()):
        head = {"description": "d", "disk_guid": draw(_field("uuid"))}
        doc["layout"] = draw(VALUES) if _rare(draw, 10) else head
    if _rare(draw):
        doc[draw(st.text(max_size=4))] = draw(VALUES)
    return doc


SIZES = (
    st.sampled_from([48 * MIB, GIB])
    | st.sampled_from([0, 1, 512, 1 << 40, (1 << 63) - 1, 1 << 63])
    | st.integers(min_value=-1, max_value=1 << 64)
)
LAYOUT_EXAMPLES = 600


@settings(max_examples=LAYOUT_EXAMPLES, deadline=None)
@given(_documents(), SIZES)
def test_any_layout_document_gives_a_plan_or_our_error(doc: dict[str, object], size: int) -> None:
    try:
        disk = plan_layout(layout_from_dict(doc, "l.toml"), size)
    except UpdaterError as err:
        event(type(err).__name__)
        assert str(err).startswith("l.toml: ") and "\n" not in str(err), str(err)
        return
    event("planned")
    guids = [p.unique_guid for p in disk.partitions]
    assert len(set(guids)) == len(guids)


def _toml(value: object) -> str:
    """`value` as a TOML value (inline), for the text property below."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return (
            "nan"
            if value != value
            else ("inf" if value > 0 else "-inf")
            if abs(value) == float("inf")
            else repr(value)
        )
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"


def _render(doc: dict[str, object]) -> list[str]:
    """A layout document as the lines of a TOML file."""
    lines = [
        f"{json.dumps(k)} = {_toml(v)}" for k, v in doc.items() if k not in ("layout", "partition")
    ]
    head, parts = doc.get("layout"), doc.get("partition")
    if isinstance(head, dict):
        lines += ["[layout]", *(f"{json.dumps(k)} = {_toml(v)}" for k, v in head.items())]
    elif head is not None:
        lines.insert(0, f"layout = {_toml(head)}")
    if isinstance(parts, list) and all(isinstance(p, dict) for p in parts):
        for part in parts:
            assert isinstance(part, dict)
            lines += ["[[partition]]", *(f"{json.dumps(k)} = {_toml(v)}" for k, v in part.items())]
    elif parts is not None:
        lines.insert(0, f"partition = {_toml(parts)}")
    return lines


@st.composite
def _layout_texts(draw: st.DrawFn) -> str:
    """Rendered documents with a line dropped, repeated or replaced now and then, and
    arbitrary text."""
    if _rare(draw, 5):
        return draw(st.text(max_size=200))
    lines = _render(draw(_documents()))
    for _ in range(1 if _rare(draw, 3) else 0):
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["drop", "repeat", "replace"]))
        if op == "drop":
            del lines[i]
        elif op == "repeat":
            lines.insert(i, lines[i])
        else:
            lines[i] = draw(
                st.sampled_from(["a = [[[", "}", "[[partition]", "x", "= 1"]) | st.text(max_size=20)
            )
    return "\n".join(lines) + "\n"


@settings(max_examples=LAYOUT_EXAMPLES, deadline=None)
@given(_layout_texts(), st.binary(max_size=4), SIZES)
def test_any_layout_text_gives_a_plan_or_our_error(text: str, junk: bytes, size: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "l.toml"
        path.write_bytes(text.encode("utf-8", "surrogatepass") + junk)
        try:
            plan_layout(load_layout(path), size)
        except UpdaterError as err:
            event(type(err).__name__)
            assert str(err).startswith(f"{path}: ") and "\n" not in str(err), str(err)
            return
        event("planned")
