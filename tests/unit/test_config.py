"""updater.config: the documented example parses; every mistake is one line naming file
and key; defaults; the bootloader names are the registry's."""

from __future__ import annotations

import contextlib
import copy
import datetime
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import ConfigError
from tests.bounded import fifo, within
from updater.boot.base import REGISTRY
from updater.boot.registry import known_bootloaders
from updater.config import Config, HealthCheck, load_config, parse_config

EXAMPLE = """
[repository]
metadata_url = "http://127.0.0.1:8080/metadata"
targets_url  = "http://127.0.0.1:8080/targets"
trusted_root = "/etc/updater/root.json"
[device]
hardware   = "x86_64-efi"
channel    = "stable"
disk       = "/dev/vda"
bootloader = "grub"
grubenv    = "/boot/efi/EFI/BOOT/grubenv"
booted_slot = "auto"
state_dir  = "/var/lib/updater"
[slots.A]
root = "root_a"
[slots.B]
root = "root_b"
[health]
deadline = 600
checks = [ { command = ["systemctl", "is-active", "kubelet"] },
           { http = "http://127.0.0.1:10248/healthz" } ]
[hooks]
pre_reboot = ["kubectl", "drain", "--ignore-daemonsets", "node-1"]
reboot     = ["systemctl", "reboot"]
"""

CFG = Path("/etc/updater/config.toml")


def parse(text: str) -> Config:
    return parse_config(text, CFG)


def edit(old: str, new: str, text: str = EXAMPLE) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"config {CFG}: ")
    return message


def test_issue_example_parses() -> None:
    config = parse(EXAMPLE)
    assert config.repository.metadata_url == "http://127.0.0.1:8080/metadata"
    assert config.repository.trusted_root == Path("/etc/updater/root.json")
    assert config.device.disk == Path("/dev/vda")
    assert config.device.bootloader == "grub"
    assert config.device.grubenv == Path("/boot/efi/EFI/BOOT/grubenv")
    assert dict(config.slots["A"]) == {"root": "root_a"}
    assert config.roles == ("root",)
    assert config.health.deadline == 600
    assert config.health.checks == (
        HealthCheck(command=("systemctl", "is-active", "kubelet"), http=None, timeout=10.0),
        HealthCheck(command=None, http="http://127.0.0.1:10248/healthz", timeout=10.0),
    )
    assert config.hooks.pre_reboot[0] == "kubectl"
    assert config.hooks.post_commit == ()


def test_defaults() -> None:
    text = EXAMPLE.split("[health]")[0].replace('channel    = "stable"\n', "")
    for line in ('booted_slot = "auto"\n', 'state_dir  = "/var/lib/updater"\n'):
        text = text.replace(line, "")
    config = parse(text)
    assert config.device.channel == "stable"
    assert config.device.booted_slot == "auto"
    assert config.device.state_dir == Path("/var/lib/updater")
    assert config.repository.timeout == 30 and config.repository.retries == 3
    assert config.repository.proxy is None and config.repository.ca_bundle is None
    repo = config.repository
    assert (repo.metadata_deadline, repo.min_rate, repo.rate_window) == (120, 1024, 60)
    assert repo.allow_example_keys is False  # production trusts no published key
    assert (config.health.deadline, config.health.interval, config.health.checks) == (600, 10, ())
    assert (config.daemon.interval, config.daemon.jitter) == (3600, 300)
    assert config.hooks.reboot == ("systemctl", "reboot")


def test_optional_keys_and_relative_paths() -> None:
    text = (
        EXAMPLE
        + """
post_commit = ["logger", "committed"]
timeout = 120
[daemon]
interval = 900
jitter = 0
"""
    )
    text = edit(
        'trusted_root = "/etc/updater/root.json"',
        'trusted_root = "root.json"\ntimeout = 5.5\nretries = 0\n'
        'proxy = "http://proxy.example:3128"\nca_bundle = "ca.pem"\n'
        "metadata_deadline = 5\nmin_rate = 0\nrate_window = 2.5\nallow_example_keys = true",
        text,
    )
    text = edit("deadline = 600", "deadline = 60\ninterval = 2\ntimeout = 3", text)
    text = edit(
        '{ http = "http://127.0.0.1:10248/healthz" }',
        '{ http = "https://127.0.0.1:10248/healthz", timeout = 1 }',
        text,
    )
    config = parse_config(text, Path("/srv/node/config.toml"))
    assert config.repository.trusted_root == Path("/srv/node/root.json")
    assert config.repository.ca_bundle == Path("/srv/node/ca.pem")
    assert config.repository.proxy == "http://proxy.example:3128"
    assert (config.repository.timeout, config.repository.retries) == (5.5, 0)
    repo = config.repository
    assert (repo.metadata_deadline, repo.min_rate, repo.rate_window) == (5, 0, 2.5)
    assert repo.allow_example_keys is True
    assert [c.timeout for c in config.health.checks] == [3.0, 1.0]
    assert config.health.interval == 2
    assert config.daemon.jitter == 0 and config.daemon.interval == 900
    assert config.hooks.post_commit == ("logger", "committed") and config.hooks.timeout == 120


def test_gptprio_needs_no_grubenv() -> None:
    text = edit('bootloader = "grub"', 'bootloader = "gptprio"')
    assert error_of(text).endswith(
        "[device] grubenv: only used by bootloader = \"grub\", not 'gptprio'"
    )
    text = edit('grubenv    = "/boot/efi/EFI/BOOT/grubenv"\n', "", text)
    assert parse(text).device.grubenv is None


def test_bootloaders_come_from_the_registry() -> None:
    known = known_bootloaders()
    assert "grub" in known and "gptprio" in known
    assert set(REGISTRY) <= set(known)


def test_file_url_accepted() -> None:
    text = edit('"http://127.0.0.1:8080/metadata"', '"file:///media/usb/metadata"')
    assert parse(text).repository.metadata_url == "file:///media/usb/metadata"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            'bootloader = "grub"',
            'bootloader = "foo"',
            "[device] bootloader: unknown bootloader 'foo' (known: ",
        ),
        (
            'grubenv    = "/boot/efi/EFI/BOOT/grubenv"\n',
            "",
            '[device] grubenv: missing (required when bootloader = "grub")',
        ),
        ('hardware   = "x86_64-efi"\n', "", "[device] hardware: missing (required)"),
        ('hardware   = "x86_64-efi"', "hardware = 3", "[device] hardware: must be a string"),
        ('channel    = "stable"', 'chanel = "stable"', "[device] chanel: unknown key (known:"),
        # Names no signed release can carry: the node would skip every release, silently.
        ('hardware   = "x86_64-efi"', 'hardware = "x86 64/efi"', "[device] hardware: hardware"),
        ('channel    = "stable"', 'channel = "Stable!"', "[device] channel: channel 'Stable!'"),
        ('channel    = "stable"', 'channel = ".beta"', "is not a valid name (letters, digits"),
        ('booted_slot = "auto"', 'booted_slot = "C"', "[device] booted_slot: 'C' is not one of"),
        (
            '"http://127.0.0.1:8080/metadata"',
            '"ftp://x/metadata"',
            "[repository] metadata_url: 'ftp://x/metadata' is not a URL",
        ),
        (
            '"http://127.0.0.1:8080/targets"',
            '"http:///targets"',
            "[repository] targets_url: 'http:///targets' has no host",
        ),
        ("deadline = 600", "deadline = -1", "[health] deadline: -1 is out of range"),
        (
            "[device]",
            "metadata_deadline = 0\n[device]",
            "[repository] metadata_deadline: 0 is out of range (0.1 to 86400)",
        ),
        ("[device]", "min_rate = -1\n[device]", "[repository] min_rate: -1 is out of range"),
        (
            "[device]",
            "allow_example_keys = 1\n[device]",
            "[repository] allow_example_keys: must be true or false, not an integer",
        ),
        (
            "[device]",
            'rate_window = "60"\n[device]',
            "[repository] rate_window: must be a number, not a string",
        ),
        ("deadline = 600", "deadline = true", "[health] deadline: must be a number, not a boolean"),
        ("deadline = 600", "deadline = nan", "[health] deadline: nan is out of range"),
        (
            '{ http = "http://127.0.0.1:10248/healthz" }',
            '{ http = "x", command = ["true"] }',
            "[health] checks[1]: needs exactly one of",
        ),
        (
            '{ http = "http://127.0.0.1:10248/healthz" }',
            '{ http = "http://h/", timout = 3 }',
            "[health] checks[1].timout: unknown key (known: command, http, timeout)",
        ),
        (
            '{ command = ["systemctl", "is-active", "kubelet"] }',
            '{ command = "systemctl" }',
            "[health] checks[0].command: must be a non-empty array of strings",
        ),
        (
            '{ http = "http://127.0.0.1:10248/healthz" }',
            '{ http = "file:///x" }',
            "[health] checks[1].http: 'file:///x' is not a URL",
        ),
        (
            'reboot     = ["systemctl", "reboot"]',
            "reboot = []",
            "[hooks] reboot: must be a non-empty array of strings",
        ),
        (
            'reboot     = ["systemctl", "reboot"]',
            'reboot = ["systemctl", 1]',
            "[hooks] reboot: every element of the command must be a string",
        ),
        (
            'root = "root_b"',
            'root = "root_b"\nboot = "boot_b"',
            "[slots.A] boot: missing (slots.A and slots.B must name the same roles)",
        ),
        ('root = "root_b"', 'root = "root_a"', "[slots]: partition 'root_a' is named twice"),
        ('[slots.B]\nroot = "root_b"\n', "", "[slots.B]: missing (required)"),
        ("[hooks]", "[hook]", "[hook]: unknown table (known: "),
        ("[health]", "[health]\nretries = 3", "[health] retries: unknown key"),
        ("deadline = 600", "deadline = 600\ndeadline = 5", "not valid TOML"),
    ],
)
def test_errors_name_file_table_and_key(old: str, new: str, expected: str) -> None:
    message = error_of(edit(old, new))
    assert expected in message, message


def test_unknown_bootloader_lists_known_ones() -> None:
    message = error_of(edit('bootloader = "grub"', 'bootloader = "foo"'))
    assert re.search(r"\(known: [a-z, -]+\)$", message), message
    for name in known_bootloaders():
        assert name in message


def test_load_config_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(EXAMPLE)
    assert load_config(path).path == path
    with pytest.raises(ConfigError, match=r"^config .*missing.toml: cannot read: "):
        load_config(tmp_path / "missing.toml")
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(path)


def test_missing_table_is_named() -> None:
    text = EXAMPLE.replace("[repository]", "[other]")
    assert error_of(text).endswith("[repository]: missing (required)")
    assert error_of("repository = 3").endswith("[repository]: must be a table, not an integer")


def test_the_documented_example_is_valid() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", doc, flags=re.DOTALL)
    config = parse(blocks[0])
    assert config.hooks.post_commit == ("kubectl", "uncordon", "node-1")
    assert config.health.checks[1].timeout == 5
    # Every other snippet is a valid replacement of its table in the full example.
    for block in blocks[1:]:
        table = re.match(r"\[([a-z.AB]+)\]", block)
        assert table is not None, block
        name = table.group(1)
        kept = re.split(r"(?m)^(?=\[)", blocks[0])
        family = name.split(".")[0]
        others = [t for t in kept if not t.startswith((f"[{family}]", f"[{family}."))]
        text = "".join(others) + "\n" + block
        parse(text)


TOML_VALUES = [
    '"x"',
    '""',
    "0",
    "-5",
    "1e309",
    "true",
    "[]",
    '["a"]',
    "[1, 2]",
    "{}",
    "{ a = 1 }",
    '"file:///x"',
    '"http://h/p"',
    "2026-01-01",
]


@settings(deadline=None)
@given(
    line=st.integers(min_value=0, max_value=200),
    value=st.sampled_from(TOML_VALUES),
)
def test_any_wrong_value_is_a_config_error(line: int, value: str) -> None:
    lines = EXAMPLE.splitlines()
    assignments = [i for i, text in enumerate(lines) if re.match(r"^[a-z_]+ *=", text)]
    index = assignments[line % len(assignments)]
    key = lines[index].split("=")[0].strip()
    lines[index] = f"{key} = {value}"
    try:
        parse("\n".join(lines))
    except ConfigError as err:
        assert "\n" not in str(err) and str(err).startswith(f"config {CFG}: ")


# --- hostile input: one ConfigError line, never a traceback or a hang -------------------

STRING_LITERALS = [m.start() for m in re.finditer(r'"[^"\n]+"', EXAMPLE)]


@pytest.mark.parametrize("start", STRING_LITERALS)
def test_nul_byte_in_any_string_is_refused(start: int) -> None:
    """Paths, URLs, names, every argv element: a NUL would reach open(2) or execve(2)."""
    end = EXAMPLE.index('"', start + 1)
    text = EXAMPLE[:end] + "\\u0000" + EXAMPLE[end:]
    assert "contains a NUL byte" in error_of(text)


def test_nul_byte_in_a_slot_role_name_is_refused() -> None:
    message = error_of(edit('root = "root_a"', '"ro\\u0000ot" = "root_a"'))
    assert "\x00" not in message and "not a valid role name" in message


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://[::1", "[repository] metadata_url: 'http://[::1' is not a valid URL"),
        ("http://h:99999/m", "[repository] metadata_url: 'http://h:99999/m' is not a valid URL"),
        ("http://h:x/m", "[repository] metadata_url: 'http://h:x/m' is not a valid URL"),
    ],
)
def test_unparsable_url_is_one_line(url: str, expected: str) -> None:
    assert expected in error_of(edit('"http://127.0.0.1:8080/metadata"', f'"{url}"'))


@pytest.mark.parametrize("depth", [3000, 100_000])
def test_toml_nested_thousands_deep_is_one_line(depth: int) -> None:
    for value in ("[" * depth + "]" * depth, "{a=" * depth + "1" + "}" * depth):
        assert "not valid TOML: nested too deeply" in error_of(f"x = {value}\n" + EXAMPLE)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("deadline = 600", "deadline = " + "9" * 400, "[health] deadline: 9999999999"),
        ("deadline = 600", "deadline = -" + "9" * 4000, "[health] deadline: -999999999"),
        ("retries = 3", "retries = " + "9" * 4000, "[repository] retries: 999999999"),
        ("checks = [", "checks = 0\nx = [", "[health] checks: must be an array of tables"),
        ("checks = [", 'checks = ""\nx = [', "[health] checks: must be an array of tables"),
    ],
)
def test_huge_numbers_and_falsy_wrong_types(old: str, new: str, expected: str) -> None:
    text = edit("[device]", "retries = 3\n[device]")
    message = error_of(edit(old, new, text))
    assert expected in message and len(message) < 300, message


def test_config_that_is_a_directory_or_too_large(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read: not a regular file \(a directory\)$"):
        load_config(tmp_path)
    big = tmp_path / "big.toml"
    big.write_text(EXAMPLE + "#" * (2 << 20))
    with pytest.raises(ConfigError, match="cannot read: larger than"):
        load_config(big)


def test_config_that_is_a_fifo_does_not_hang(tmp_path: Path) -> None:
    with fifo(tmp_path / "config.toml") as path, pytest.raises(ConfigError) as info:
        within(lambda: load_config(path))
    assert str(info.value) == f"config {path}: cannot read: not a regular file (a FIFO)"


# --- property: whatever the input, only ConfigError comes out ---------------------------


@dataclass(frozen=True)
class Deep:
    """A value nested `depth` deep: arrays, or inline tables."""

    depth: int
    tables: bool


def toml_key(key: str) -> str:
    return toml_value(key)


def toml_value(value: object) -> str:
    """TOML text for `value` (tomllib has no writer): inline tables and arrays only."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return (
            "nan"
            if math.isnan(value)
            else {math.inf: "inf", -math.inf: "-inf"}.get(value, repr(value))
        )
    if isinstance(value, str):
        # Escape what TOML forbids raw in a basic string: quote, backslash, controls.
        escaped = "".join(
            f"\\u{ord(c):04x}" if c in '"\\' or ord(c) < 0x20 or ord(c) == 0x7F else c
            for c in value
        )
        return f'"{escaped}"'
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, Deep):
        if value.tables:
            return "{a = " * value.depth + "1" + "}" * value.depth
        return "[" * value.depth + "]" * value.depth
    raise TypeError(value)


def toml_document(data: dict[str, Any]) -> str:
    return "".join(f"{toml_key(k)} = {toml_value(v)}\n" for k, v in data.items())


EXAMPLE_DATA = tomllib.loads(EXAMPLE)
NAMES = st.sampled_from(
    sorted({k for t in EXAMPLE_DATA.values() for k in t} | set(EXAMPLE_DATA) | {"A", "B"})
)
STRINGS = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["\0", "a\0b", "http://[::1", "http://h:99999/", "file://", " ", "../x"]),
    st.builds("{}://{}/{}".format, st.sampled_from(["http", "file", "ftp"]), st.text(), st.text()),
)
SCALARS = st.one_of(
    STRINGS,
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**4000), max_value=10**4000),
    st.floats(),
    st.datetimes(),
    st.builds(Deep, st.integers(min_value=1, max_value=5000), st.booleans()),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(NAMES | st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path of a parsed document, tables and array items included."""
    found: list[tuple[Any, ...]] = []
    items = data.items() if isinstance(data, dict) else enumerate(data)
    for key, value in items:
        found.append((*prefix, key))
        if isinstance(value, dict | list):
            found.extend(paths(value, (*prefix, key)))
    return found


EXAMPLE_PATHS = paths(EXAMPLE_DATA)
MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(EXAMPLE_PATHS),
        st.sampled_from(["set", "delete", "add"]),
        NAMES | st.text(max_size=8),
        VALUES,
    ),
    min_size=1,
    max_size=3,
)
COUNTS: dict[str, int] = {}


def mutated(mutations: list[tuple[tuple[Any, ...], str, str, Any]]) -> dict[str, Any]:
    data = copy.deepcopy(EXAMPLE_DATA)
    for path, action, name, value in mutations:
        parent: Any = data
        try:
            for key in path[:-1]:
                parent = parent[key]
            last = path[-1]
            if action == "set":
                parent[last] = value
            elif action == "delete":
                del parent[last]
            elif isinstance(parent[last], dict):
                parent[last][name] = value
            else:
                parent[last] = [parent[last], value]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced this path
    return data


def only_config_error(text: str, kind: str) -> None:
    COUNTS[kind] = COUNTS.get(kind, 0) + 1
    try:
        parse(text)
    except ConfigError as err:
        assert "\n" not in str(err) and str(err).startswith(f"config {CFG}: ")
        assert len(str(err)) < 2000


def test_the_toml_writer_round_trips_the_example() -> None:
    assert tomllib.loads(toml_document(EXAMPLE_DATA)) == EXAMPLE_DATA
    parse(toml_document(EXAMPLE_DATA))


@settings(max_examples=1000, deadline=None)
@given(MUTATIONS)
def test_mutated_documents_give_only_config_errors(
    mutations: list[tuple[tuple[Any, ...], str, str, Any]],
) -> None:
    only_config_error(toml_document(mutated(mutations)), "mutated")


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(NAMES | st.text(max_size=8), VALUES, max_size=6))
def test_arbitrary_documents_give_only_config_errors(data: dict[str, Any]) -> None:
    only_config_error(toml_document(data), "arbitrary")


@settings(max_examples=1000, deadline=None)
@given(st.text() | st.builds("".join, st.lists(st.sampled_from(EXAMPLE.splitlines(True)))))
def test_arbitrary_text_gives_only_config_errors(text: str) -> None:
    only_config_error(text, "text")


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2000))
def test_arbitrary_bytes_from_a_file_give_only_config_errors(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    COUNTS["bytes"] = COUNTS.get("bytes", 0) + 1
    path = tmp_path_factory.mktemp("cfg") / "config.toml"
    path.write_bytes(data)
    with contextlib.suppress(ConfigError):
        load_config(path)


def test_report_example_counts(capsys: pytest.CaptureFixture[str]) -> None:
    """Printed with `-s`: how many inputs the property tests above tried in this run."""
    with capsys.disabled():
        print(f"\nconfig property tests, examples tried: {COUNTS}")
