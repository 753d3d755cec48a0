"""`sign-release add` and the node agree on every release field, in both directions.

For generated field values - valid ones and near-valid ones (build metadata, a
trailing newline, uppercase, dots, empty, NUL, over-long, arbitrary text) - `add`
(the library function, and a handful through the CLI) accepts exactly the values a
node accepts, and the targets it stages are found by the node's grouping
(`core.release.releases`, what the agent and the mirror select from) with the same
fields. The node side is asked through its public path only: a target carrying the
custom this test writes by hand (DESIGN.md, "Trust"), at the path `add` would use.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tuf.api.metadata import Metadata, TargetFile, Targets  # type: ignore[attr-defined]

from core import release
from signing import create
from signing import repository as ops
from signing.errors import SigningError
from tests.signing_helpers import ROOT_JSON, TARGETS_KEY, tree_digest

# The file suffix of each compression, as DESIGN.md documents target paths.
SUFFIX = {"zstd": ".zst", "xz": ".xz", "gzip": ".gz", "none": ""}
FIELD_WORDS = ("version", "role", "hardware", "channel", "compress", "raw_length", "image")


@dataclass(frozen=True)
class Fields:
    version: str
    hardware: tuple[str, ...]
    role: str
    channel: str
    compression: str
    raw: bytes


def node_custom(f: Fields, hw: str) -> dict[str, Any]:
    custom: dict[str, Any] = {
        "release": {
            "version": f.version,
            "hardware": [hw],
            "channel": f.channel,
            "role": f.role,
            "compression": f.compression,
            "raw_length": len(f.raw),
            "raw_sha256": hashlib.sha256(f.raw).hexdigest(),
        }
    }
    if f.compression == "zstd":  # seekable, with its chunk index (docs/delta.md)
        custom["release"]["index"] = f"{hw}/{f.version}/{f.role}.index"
    return custom


def node_accepts(f: Fields) -> bool:
    """Whether a node on each hardware of `f` (and its channel) sees this release."""
    if not f.hardware or len(set(f.hardware)) != len(f.hardware):
        return False  # `add` makes one target per hardware name: a name is given once
    for hw in f.hardware:
        path = f"{hw}/{f.version}/{f.role}.img{SUFFIX.get(f.compression, '')}"
        info = TargetFile(1, {"sha256": "0" * 64}, path, {"custom": node_custom(f, hw)})
        found = release.releases({path: info}, hw, f.channel)
        if [(r.version, list(r.images)) for r in found] != [(f.version, [f.role])]:
            return False
    return True


def mostly(valid: st.SearchStrategy[str], *bad: Callable[[str], str]) -> st.SearchStrategy[str]:
    """`valid` 6 times in 8, else a valid value broken by one of `bad`, or any text."""
    broken = st.tuples(valid, st.sampled_from(bad)).map(lambda vb: vb[1](vb[0]))
    return st.integers(0, 7).flatmap(
        lambda i: valid if i < 6 else broken if i == 6 else st.text(max_size=12)
    )


NUMBER = st.integers(0, 10**4).map(str)
IDENT = st.one_of(NUMBER, st.from_regex(r"[0-9]*[A-Za-z-][0-9A-Za-z-]{0,5}", fullmatch=True))
SEMVER = st.builds(
    lambda a, b, c, pre: f"{a}.{b}.{c}" + ("-" + ".".join(pre) if pre else ""),
    NUMBER,
    NUMBER,
    NUMBER,
    st.lists(IDENT, max_size=3),
)
COMMON_BREAKS: tuple[Callable[[str], str], ...] = (
    lambda s: s + "\n",
    lambda s: s + "\x00",
    lambda s: "",
    lambda s: " " + s,
    lambda s: s * 40,
    lambda s: s + "/x",
    lambda s: "." + s,
    lambda s: s + "ü",
)
VERSIONS = mostly(
    SEMVER,
    *COMMON_BREAKS,
    lambda s: s + "+build.5",
    lambda s: "v" + s,
    lambda s: "0" + s,
    lambda s: s.replace(".", "..", 1),
    lambda s: s.rsplit(".", 1)[0],
    lambda s: s + "-",
    lambda s: s + "-01",
    lambda s: s.upper() + "-RC",
)
ROLES = mostly(
    st.from_regex(r"[a-z][a-z0-9_-]{0,31}", fullmatch=True),
    *COMMON_BREAKS,
    str.upper,
    lambda s: s + ".fs",
    lambda s: "1" + s,
    lambda s: s + "x" * 32,
    lambda s: s.capitalize() + "A",
)
NAMES = mostly(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True),
    *COMMON_BREAKS,
    lambda s: "-" + s,
    lambda s: s + " b",
    lambda s: s + "x" * 64,
    lambda s: "../" + s,
    lambda s: s + "\\x",
)
COMPRESSIONS = st.one_of(
    st.sampled_from(sorted(SUFFIX)),
    st.sampled_from(sorted(SUFFIX)),
    st.sampled_from(["lz4", "ZSTD", "", "none\n", "gz", "zst", "xz\x00"]),
)
FIELDS = st.builds(
    Fields,
    version=VERSIONS,
    hardware=st.lists(NAMES, min_size=1, max_size=3).map(tuple),
    role=ROLES,
    channel=NAMES,
    compression=COMPRESSIONS,
    raw=st.one_of(st.binary(min_size=1, max_size=64), st.just(b"")),
)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An initialised repository (the example keys) to copy for each example."""
    repo = tmp_path_factory.mktemp("schema") / "repo"
    create.init_from_root(repo, ROOT_JSON, allow_example_keys=True)
    return repo


def staged_targets(repo: Path) -> dict[str, TargetFile]:
    md: Metadata[Targets] = Metadata.from_file(str(repo / "staged" / "targets.json"))
    return dict(md.signed.targets)


def check_staged_as_node_sees_it(repo: Path, f: Fields) -> None:
    """Every staged target is found by the node's grouping with the fields given."""
    targets = staged_targets(repo)
    indexes = {p for p in targets if release.is_index_path(p)}
    assert len(targets) - len(indexes) == len(f.hardware)
    if f.compression == "zstd":
        assert indexes == {f"{hw}/{f.version}/{f.role}.index" for hw in f.hardware}
    else:
        assert not indexes
    for hw in f.hardware:
        (found,) = release.releases(targets, hw, f.channel)
        assert found.version == f.version
        (image,) = found.images.values()
        assert image.role == f.role
        assert image.path == f"{hw}/{f.version}/{f.role}.img{SUFFIX[f.compression]}"
        assert (image.compression, image.raw_length) == (f.compression, len(f.raw))
        assert image.raw_sha256 == hashlib.sha256(f.raw).hexdigest()
        assert image.target.custom == node_custom(f, hw)


def refusal_line(message: str) -> None:
    assert "\n" not in message and message, message
    assert any(word in message for word in FIELD_WORDS), message


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(f=FIELDS)
def test_add_accepts_exactly_what_the_node_accepts(template: Path, f: Fields) -> None:
    expected = node_accepts(f)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        shutil.copytree(template, repo)
        image = Path(tmp) / "image"
        image.write_bytes(f.raw)
        before = tree_digest(repo)
        spec = ops.Release(image, f.version, f.hardware, f.role, f.channel, f.compression)
        try:
            ops.add_release(repo, spec, [str(TARGETS_KEY)], allow_example_keys=True)
        except SigningError as e:
            event("refused by add")
            refusal_line(str(e))
            assert not expected, f"add refused what a node installs: {e}"
            assert tree_digest(repo) == before
            return
        event("accepted by add")
        assert expected, "add accepted what a node skips"
        check_staged_as_node_sees_it(repo, f)


CLI_FIELDS = st.builds(
    Fields,
    version=VERSIONS,
    hardware=st.lists(NAMES, min_size=1, max_size=2).map(tuple),
    role=ROLES,
    channel=NAMES,
    # click's Choice refuses any other --compress before the library sees it.
    compression=st.sampled_from(sorted(SUFFIX)),
    raw=st.one_of(st.binary(min_size=1, max_size=16), st.just(b"")),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(f=CLI_FIELDS)
def test_cli_add_accepts_exactly_what_the_node_accepts(template: Path, f: Fields) -> None:
    from signing.cli import cli

    expected = node_accepts(f)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        shutil.copytree(template, repo)
        image = Path(tmp) / "image"
        image.write_bytes(f.raw)
        before = tree_digest(repo)
        args = ["--allow-example-keys", "add", str(repo), str(image), f"--version={f.version}"]
        args += [f"--hardware={hw}" for hw in f.hardware]
        args += [f"--role={f.role}", f"--channel={f.channel}", f"--compress={f.compression}"]
        args += ["--sign-with", str(TARGETS_KEY)]
        result = CliRunner().invoke(cli, args, prog_name="sign-release")
        assert "Traceback" not in result.output + result.stderr
        if expected:
            event("accepted by the CLI")
            assert result.exit_code == 0, result.stderr
            check_staged_as_node_sees_it(repo, f)
        else:
            event("refused by the CLI")
            assert result.exit_code == 2, (result.stdout, result.stderr)
            (line,) = result.stderr.splitlines()
            assert line.startswith("sign-release: error: ")
            refusal_line(line)
            assert tree_digest(repo) == before
