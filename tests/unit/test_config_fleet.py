"""updater.config, the fleet keys of issue 12: `[daemon] windows`/`timezone`, `[device]
machine_id`, `[coordination]`, `[metrics]` - defaults, good values, and every bad kind is
one line naming file, table and key; whatever the input, only ConfigError comes out."""

from __future__ import annotations

import copy
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import ConfigError
from tests.unit.test_config import CFG, EXAMPLE, VALUES, error_of, parse, paths, toml_document
from updater.config import CoordinationConfig, MetricsConfig
from updater.windows import parse_windows

ETCD = """
[coordination]
backend = "etcd"
endpoints = ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]
"""
FLEET = (
    EXAMPLE
    + """
[daemon]
windows = ["Mon-Fri 02:00-04:00", "Sat 00:00-06:00"]
timezone = "Europe/Berlin"
[coordination]
backend = "etcd"
endpoints = ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]
ca = "ca.pem"
cert = "/etc/updater/client.pem"
key = "/etc/updater/client.key"
group = "workers"
max_concurrent = 2
prefix = "/fleet/locks"
timeout = 5
node_id = "node-17.example"
etcd_member = "cp-1"
quorum_endpoints = ["http://10.0.1.1:2379"]
[metrics]
path = "textfile/updater.prom"
"""
)
COUNTS: dict[str, int] = {}


def test_defaults_without_the_new_tables() -> None:
    config = parse(EXAMPLE)
    assert config.daemon.windows == () and config.daemon.timezone == "UTC"
    assert config.device.machine_id == Path("/etc/machine-id")
    assert config.coordination == CoordinationConfig()
    assert config.coordination.backend == "none"
    assert config.coordination.group == "default" and config.coordination.max_concurrent == 1
    assert config.coordination.prefix == "/ab-updater/reboot-lock"
    assert config.metrics == MetricsConfig() and config.metrics.path is None


def test_every_fleet_key_parses() -> None:
    config = parse(FLEET.replace("[device]\n", '[device]\nmachine_id = "id/machine-id"\n'))
    assert config.device.machine_id == Path("/etc/updater/id/machine-id")  # relative: config dir
    assert config.daemon.windows == ("Mon-Fri 02:00-04:00", "Sat 00:00-06:00")
    assert config.daemon.timezone == "Europe/Berlin"
    windows = parse_windows(config.daemon.windows, config.daemon.timezone)  # the agent's way
    assert windows.is_open(datetime(2026, 12, 7, 3, tzinfo=ZoneInfo("Europe/Berlin")))
    assert not windows.is_open(datetime(2026, 12, 7, 3, tzinfo=UTC))  # 04:00 in Berlin
    assert config.coordination == CoordinationConfig(
        backend="etcd",
        endpoints=("https://10.0.0.1:2379", "https://10.0.0.2:2379"),
        ca=Path("/etc/updater/ca.pem"),
        cert=Path("/etc/updater/client.pem"),
        key=Path("/etc/updater/client.key"),
        group="workers",
        max_concurrent=2,
        prefix="/fleet/locks",
        timeout=5.0,
        node_id="node-17.example",
        etcd_member="cp-1",
        quorum_endpoints=("http://10.0.1.1:2379",),
    )
    assert config.metrics.path == Path("/etc/updater/textfile/updater.prom")


def test_etcd_with_only_endpoints_and_backend_none_explicitly() -> None:
    config = parse(EXAMPLE + ETCD)
    assert config.coordination.endpoints == ("https://10.0.0.1:2379", "https://10.0.0.2:2379")
    assert config.coordination.node_id is None and config.coordination.etcd_member is None
    assert parse(EXAMPLE + '[coordination]\nbackend = "none"\n').coordination.backend == "none"


def test_windows_edge_values_are_accepted() -> None:
    specs = '["* 00:00-24:00", "Fri-Mon 22:00-02:00", "Sun 23:00-01:00", "Sat,Sun 1:00-2:00"]'
    config = parse(EXAMPLE + f'[daemon]\nwindows = {specs}\ntimezone = "UTC"\n')
    assert len(config.daemon.windows) == 4
    assert parse(EXAMPLE + "[daemon]\nwindows = []\n").daemon.windows == ()


WITH_ETCD = EXAMPLE + ETCD


BAD_VALUES = [
    # [daemon] windows / timezone
    (
        '[daemon]\nwindows = "Mon 01:00-02:00"',
        "[daemon] windows",
        "must be an array of strings, not a string",
    ),
    ("[daemon]\nwindows = [1]", "[daemon] windows[0]", "must be a string, not an integer"),
    ('[daemon]\nwindows = [""]', "[daemon] windows[0]", "must not be empty"),
    (
        '[daemon]\nwindows = ["Mon\\u0000 01:00-02:00"]',
        "[daemon] windows[0]",
        "'Mon\\x00 01:00-02:00' contains a NUL byte",
    ),
    (
        '[daemon]\nwindows = ["Mon 01:00-02:00", "Tue 01:00-02:00", "Wed 02:00-02:00"]',
        "[daemon] windows[2]",
        "'Wed 02:00-02:00': starts and ends at 02:00: a",
    ),
    (
        '[daemon]\nwindows = ["Mon 25:00-02:00"]',
        "[daemon] windows[0]",
        "'Mon 25:00-02:00': 25:00 is not a time of day",
    ),
    (
        '[daemon]\nwindows = ["Funday 01:00-02:00"]',
        "[daemon] windows[0]",
        "'Funday 01:00-02:00': 'Funday' is not a day",
    ),
    (
        '[daemon]\nwindows = ["01:00-02:00"]',
        "[daemon] windows[0]",
        "'01:00-02:00': must be DAYS HH:MM-HH:MM",
    ),
    ('[daemon]\ntimezone = "Mars/Base"', "[daemon] timezone", "unknown time zone 'Mars/Base'"),
    (
        '[daemon]\ntimezone = "/etc/localtime"',
        "[daemon] timezone",
        "'/etc/localtime' is not a time zone name",
    ),
    ("[daemon]\ntimezone = 1", "[daemon] timezone", "must be a string, not an integer"),
    ('[daemon]\ntimezone = ""', "[daemon] timezone", "must not be empty"),
    ('[daemon]\nwindow = ["Mon 01:00-02:00"]', "[daemon] window", "unknown key"),
    # [device] machine_id
    ("D:machine_id = 7", "[device] machine_id", "must be a string, not an integer"),
    ('D:machine_id = "a\\u0000"', "[device] machine_id", "'a\\x00' contains a NUL byte"),
    # [coordination]
    ("[coordination]\nbackend = 1", "[coordination] backend", "must be a string, not an integer"),
    (
        '[coordination]\nbackend = "zookeeper"',
        "[coordination] backend",
        "'zookeeper' is not a coordination backend",
    ),
    (
        '[coordination]\nendpoints = ["http://h:2379"]',
        "[coordination] endpoints",
        'only used with backend = "etcd"',
    ),
    (
        '[coordination]\nbackend = "none"\ngroup = "g"',
        "[coordination] group",
        'only used with backend = "etcd"',
    ),
    (
        '[coordination]\nbackend = "etcd"',
        "[coordination] endpoints",
        'missing (required with backend = "etcd")',
    ),
    ('[coordination]\nbackend = "etcd"\nendpoints = []', "[coordination] endpoints", "missing"),
    (
        '[coordination]\nbackend = "etcd"\nendpoints = "http://h:2379"',
        "[coordination] endpoints",
        "must be an array of strings",
    ),
    (
        '[coordination]\nbackend = "etcd"\nendpoints = ["ftp://h"]',
        "[coordination] endpoints[0]",
        "'ftp://h' is not a URL this tool can use",
    ),
    (
        '[coordination]\nbackend = "etcd"\nendpoints = ["http://h:1", "file:///x"]',
        "[coordination] endpoints[1]",
        "'file:///x' is not a URL",
    ),
    (
        '[coordination]\nbackend = "etcd"\nendpoints = ["http://h:99999"]',
        "[coordination] endpoints[0]",
        "'http://h:99999' is not a valid URL",
    ),
    (
        '[coordination]\nbackend = "etcd"\nendpoints = ["http://[::1"]',
        "[coordination] endpoints[0]",
        "'http://[::1' is not a valid URL",
    ),
    (
        '[coordination]\nbackend = "etcd"\nendpoints = ["http://"]',
        "[coordination] endpoints[0]",
        "'http://' has no host",
    ),
    (
        '[coordination]\nbackend = "etcd"\nendpoints = ["http://h:1", "http://h:1"]',
        "[coordination] endpoints[1]",
        "'http://h:1' is listed twice",
    ),
    ('C:cert = "c.pem"', "[coordination] key", "missing (required with cert"),
    ('C:key = "k.pem"', "[coordination] cert", "missing (required with key"),
    (
        '[coordination]\nbackend = "etcd"\nendpoints = ["http://h:1"]\nca = "ca.pem"',
        "[coordination] ca",
        "only used with https:// endpoints",
    ),
    (
        '[coordination]\nbackend = "etcd"\nendpoints = ["http://h:1"]\ncert = "c"\nkey = "k"',
        "[coordination] cert",
        "only used with https:// endpoints",
    ),
    ('C:group = "-bad"', "[coordination] group", "group '-bad' is not a valid name"),
    ('C:group = "a/b"', "[coordination] group", "group 'a/b' is not a valid name"),
    ("C:max_concurrent = 0", "[coordination] max_concurrent", "0 is out of range (1 to 10000)"),
    (
        "C:max_concurrent = 10001",
        "[coordination] max_concurrent",
        "10001 is out of range (1 to 10000)",
    ),
    ("C:max_concurrent = 2.0", "[coordination] max_concurrent", "must be an integer, not a number"),
    (
        "C:max_concurrent = true",
        "[coordination] max_concurrent",
        "must be an integer, not a boolean",
    ),
    (
        "C:max_concurrent = 99999999999999999999999999999999999999999999999999",
        "[coordination] max_concurrent",
        "9999999999999999999999999999999999999999... is",
    ),
    ('C:prefix = "locks"', "[coordination] prefix", "'locks' does not start with '/'"),
    ('C:prefix = "/locks/"', "[coordination] prefix", "'/locks/' ends with '/'"),
    ('C:prefix = "/"', "[coordination] prefix", "'/' ends with '/'"),
    (
        'C:prefix = "/a\\nb"',
        "[coordination] prefix",
        "'/a\\nb' contains the control character '\\n'",
    ),
    (
        'C:prefix = "/a\\u007fb"',
        "[coordination] prefix",
        "'/a\\x7fb' contains the control character '\\x7f'",
    ),
    ('C:prefix = "/a\\u0000b"', "[coordination] prefix", "'/a\\x00b' contains a NUL byte"),
    ("C:timeout = 0", "[coordination] timeout", "0 is out of range (0.1 to 3600)"),
    ('C:timeout = "10"', "[coordination] timeout", "must be a number, not a string"),
    ('C:node_id = "node 1"', "[coordination] node_id", "node_id 'node 1' is not a valid name"),
    ('C:node_id = ""', "[coordination] node_id", "must not be empty"),
    (
        'C:etcd_member = "cp/1"',
        "[coordination] etcd_member",
        "etcd_member 'cp/1' is not a valid name",
    ),
    (
        'C:quorum_endpoints = ["http://h:1"]',
        "[coordination] quorum_endpoints",
        "only used with etcd_member",
    ),
    (
        'C:etcd_member = "cp-1"\nquorum_endpoints = ["gopher://h"]',
        "[coordination] quorum_endpoints[0]",
        "'gopher://h' is not a URL",
    ),
    ('C:lock = "x"', "[coordination] lock", "unknown key (known: "),
    # [metrics]
    ("[metrics]\npath = 1", "[metrics] path", "must be a string, not an integer"),
    (
        '[metrics]\npath = "/var/lib/node_exporter/updater.txt"',
        "[metrics] path",
        "'/var/lib/node_exporter/updater.txt' does not",
    ),
    (
        '[metrics]\npath = "/var/lib/node_exporter/"',
        "[metrics] path",
        "'/var/lib/node_exporter' does not end in .prom",
    ),
    ('[metrics]\nfile = "x.prom"', "[metrics] file", "unknown key (known: path)"),
    ("T:metrics = 1", "[metrics]", "must be a table, not an integer"),
    ("T:coordination = []", "[coordination]", "must be a table, not an array"),
]


def document(text: str) -> str:
    """The EXAMPLE with `text` added: C: keys of an etcd [coordination] table, D: keys of
    [device], T: top-level keys, else whole tables."""
    kind, _, rest = text.partition(":")
    if kind == "C":
        return WITH_ETCD + rest
    if kind == "D":
        return EXAMPLE.replace("[device]\n", f"[device]\n{rest}\n", 1)
    if kind == "T":
        return rest + "\n" + EXAMPLE
    return EXAMPLE + text


@pytest.mark.parametrize(("text", "key", "why"), BAD_VALUES)
def test_bad_fleet_values_are_one_line_naming_the_key(text: str, key: str, why: str) -> None:
    message = error_of(document(text))  # one line, starting "config FILE: "
    assert message.startswith(f"config {CFG}: {key}: "), message
    assert why in message, message


def test_errors_never_fall_back_to_a_default_silently() -> None:
    # A typo in the backend name is not "none": that would reboot the fleet uncoordinated.
    assert "is not a coordination backend" in error_of(EXAMPLE + '[coordination]\nbackend = "ETCD"')
    # An empty string is not the default either.
    assert "must not be empty" in error_of(EXAMPLE + '[coordination]\nbackend = ""')
    assert "must not be empty" in error_of(WITH_ETCD + 'group = ""')


# --- property: mutated fleet documents give only one-line ConfigErrors ----------------

FLEET_DATA = tomllib.loads(FLEET)
FLEET_PATHS = [p for p in paths(FLEET_DATA) if p[0] in ("daemon", "coordination", "metrics")]
FLEET_NAMES = st.sampled_from(
    sorted({k for t in ("daemon", "coordination", "metrics") for k in FLEET_DATA[t]})
)
FLEET_STRINGS = st.sampled_from(
    [
        "Mon 02:00-02:00", "Fri-Mon 22:00-02:00", "* 00:00-24:00", "Sun 24:00-01:00",
        "Europe/Berlin", "America/New_York", "Etc/../UTC", "right/UTC", "none", "etcd",
        "/", "/x/", "https://h:2379", "http://[::1", "x.prom", "/x/y.prom", "-", "\0",
    ]
)  # fmt: skip
MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(FLEET_PATHS),
        st.sampled_from(["set", "delete", "add"]),
        FLEET_NAMES | st.text(max_size=8),
        VALUES | FLEET_STRINGS | st.lists(FLEET_STRINGS, max_size=3),
    ),
    min_size=1,
    max_size=3,
)


def mutated(mutations: list[tuple[tuple[Any, ...], str, str, Any]]) -> dict[str, Any]:
    data = copy.deepcopy(FLEET_DATA)
    for path, action, name, value in mutations:
        parent: Any = data
        try:
            for key in path[:-1]:
                parent = parent[key]
            if action == "set":
                parent[path[-1]] = value
            elif action == "delete":
                del parent[path[-1]]
            elif isinstance(parent[path[-1]], dict):
                parent[path[-1]][name] = value
            else:
                parent[path[-1]] = [parent[path[-1]], value]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced this path
    return data


@settings(max_examples=1000, deadline=None)
@given(MUTATIONS)
def test_mutated_fleet_documents_give_only_config_errors(
    mutations: list[tuple[tuple[Any, ...], str, str, Any]],
) -> None:
    COUNTS["mutated"] = COUNTS.get("mutated", 0) + 1
    try:
        parse(toml_document(mutated(mutations)))
        COUNTS["accepted"] = COUNTS.get("accepted", 0) + 1
    except ConfigError as err:
        assert "\n" not in str(err) and str(err).startswith(f"config {CFG}: ")
        assert len(str(err)) < 2000


def test_the_fleet_document_round_trips() -> None:
    parse(toml_document(FLEET_DATA))


def test_report_example_counts(capsys: pytest.CaptureFixture[str]) -> None:
    """Printed with `-s`: how many inputs the property test above tried in this run."""
    with capsys.disabled():
        print(f"\nconfig fleet property tests, examples tried: {COUNTS}")
