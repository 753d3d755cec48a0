"""A damaged mirror manifest (DIR/manifests/N.json) is one `MirrorRejected` line naming
the file and the field, from every command that reads it (status, export, verify, and
sync's publish, which carries the previous state over) - never a traceback.

The mirror is filled by a real sync over file:// from a repository made by the signing
tools; the manifest is then edited on disk. A property-based test throws generated
manifests (valid ones mutated field by field, and arbitrary text) at the parser and
at `status`, and accepts only the project's own errors."""

from __future__ import annotations

import contextlib
import copy
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mirror
from core.errors import UpdaterError
from mirror.cli import cli
from mirror.store import Manifest, MirrorDir, MirrorRejected
from tests.signing_helpers import ROOT_JSON, ImageSpec, make_repo, write_image

Doc = dict[str, Any]


def fill(tmp: Path) -> tuple[Path, Path]:
    """(upstream repository, mirror directory synced from it over file://)."""
    repo = make_repo(tmp / "upstream", [ImageSpec(write_image(tmp / "img", 20_000), "1.0.0")])
    mdir = tmp / "mirror"
    mirror.sync(
        f"file://{repo}/metadata",
        f"file://{repo}/targets",
        mdir,
        ROOT_JSON,
        allow_example_keys=True,
    )
    return repo, mdir


@pytest.fixture(scope="module")
def synced(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return fill(tmp_path_factory.mktemp("manifest"))


def manifest_path(mdir: Path) -> Path:
    return mdir / "manifests" / f"{MirrorDir(mdir).current_number()}.json"


def _set(doc: Doc, **fields: Any) -> None:
    doc.update(fields)


def _row(doc: Doc) -> Doc:
    row: Doc = doc["releases"][0]
    return row


EDITS: dict[str, tuple[Callable[[Doc], object], str]] = {
    "number a string": (lambda d: _set(d, number="1"), "number"),
    "number a bool": (lambda d: _set(d, number=True), "number"),
    "metadata a dict": (lambda d: _set(d, metadata={"1.root.json": 1}), "metadata"),
    "metadata name climbs": (lambda d: _set(d, metadata=["../../x.json"]), r"metadata\[0\]"),
    "targets a list": (lambda d: _set(d, targets=list(d["targets"])), "targets"),
    "target sha not hex": (
        lambda d: _set(d, targets=dict.fromkeys(d["targets"], "../" * 21 + "a")),
        "targets",
    ),
    "releases a dict": (lambda d: _set(d, releases={}), "releases"),
    "row missing channel": (lambda d: _row(d).pop("channel"), r"releases\[0\].*channel"),
    "row version a number": (lambda d: _row(d).update(version=2), r"releases\[0\]\.version"),
    "row images a list": (lambda d: _row(d).update(images=[]), r"releases\[0\]\.images"),
    "image file a number": (
        lambda d: _row(d)["images"]["root"].update(file=7),
        r"releases\[0\]\.images\.root\.file",
    ),
    "image file not served": (
        lambda d: _row(d)["images"]["root"].update(file="x86_64-efi/other.img"),
        r"releases\[0\]\.images\.root\.file",
    ),
    "synced_at a list": (lambda d: _set(d, synced_at=[]), "synced_at"),
    "missing upstream": (lambda d: d.pop("upstream"), "upstream"),
}
RAW: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "NaN": (lambda t: t.replace(b'"number": 1', b'"number": NaN', 1), "NaN"),
    "not UTF-8": (lambda t: b"\xff" + t, "UTF-8"),
    "not an object": (lambda t: b"[]", "expected an object"),
    "deep nesting": (
        lambda t: b'{"releases": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        "nested too deeply",
    ),
    "truncated": (lambda t: t[: len(t) // 2], "manifest"),
}


def damage(mdir: Path, case: str) -> None:
    path = manifest_path(mdir)
    if case in RAW:
        path.write_bytes(RAW[case][0](path.read_bytes()))
        return
    doc = json.loads(path.read_text())
    EDITS[case][0](doc)
    path.write_text(json.dumps(doc))


def commands(repo: Path, mdir: Path, dest: Path) -> dict[str, list[str]]:
    up = [f"file://{repo}/metadata", f"file://{repo}/targets"]
    return {
        "status": ["status", str(mdir)],
        "export": ["export", str(mdir), str(dest)],
        "verify": ["verify", str(mdir), "--root", str(ROOT_JSON), "--allow-example-keys"],
        "sync": ["sync", *up, str(mdir), "--root", str(ROOT_JSON), "--allow-example-keys"],
    }


@pytest.mark.parametrize("case", [*EDITS, *RAW])
def test_damaged_manifest_is_one_line_from_every_command(
    case: str, synced: tuple[Path, Path], tmp_path: Path
) -> None:
    repo, clean = synced
    mdir = tmp_path / "mirror"
    shutil.copytree(clean, mdir, symlinks=True)
    path = manifest_path(mdir)
    damage(mdir, case)
    field = (EDITS.get(case) or RAW[case])[1]
    for name, argv in commands(repo, mdir, tmp_path / "dest").items():
        result = CliRunner().invoke(cli, argv, prog_name="update-mirror")
        assert isinstance(result.exception, SystemExit), (name, result.exception)
        assert result.exit_code == 3, (name, result.output)
        assert result.stdout == "" and result.stderr.count("\n") == 1, (name, result.stderr)
        assert result.stderr.startswith(f"update-mirror: error: manifest {path}"), name
        assert re.search(field, result.stderr), (name, result.stderr)
    assert (mdir / "current").resolve().name == path.stem  # sync published nothing
    assert not (tmp_path / "dest" / "targets").exists()


def test_a_manifest_of_another_number_is_refused(synced: tuple[Path, Path], tmp_path: Path) -> None:
    mdir = tmp_path / "mirror"
    shutil.copytree(synced[1], mdir, symlinks=True)
    damage_doc = json.loads(manifest_path(mdir).read_text())
    damage_doc["number"] += 1
    manifest_path(mdir).write_text(json.dumps(damage_doc))
    with pytest.raises(MirrorRejected, match=r"number: 2, not 1"):
        mirror.status(mdir)


def test_manifest_round_trips(synced: tuple[Path, Path]) -> None:
    path = manifest_path(synced[1])
    manifest = Manifest.from_json(path.read_bytes(), str(path))
    assert Manifest.from_json(json.dumps(manifest.to_json()), "again") == manifest


# --- property: only the project's own errors ----------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
_paths = st.sampled_from(
    ["", ".", "..", "a/../b", "/etc/passwd", "a//b", "a\x00b", "a\\b", "x" * 1100, "ok/a.img"]
) | st.text(max_size=16)
_field_values = _json | _paths


@st.composite
def manifest_inputs(draw: st.DrawFn, valid: Doc) -> bytes:
    """A valid manifest mutated in 1-3 places, or arbitrary text/bytes."""
    kind = draw(st.sampled_from(["mutate", "mutate", "mutate", "text", "bytes", "token"]))
    if kind == "text":
        return draw(st.text(max_size=200)).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    doc = copy.deepcopy(valid)
    if kind == "token":  # a number turned into what Python's json would accept
        token = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "9" * 5000]))
        return json.dumps(doc).replace('"number": 1', f'"number": {token}', 1).encode()
    for _ in range(draw(st.integers(1, 3))):
        row = (
            doc["releases"][0]
            if isinstance(doc.get("releases"), list) and doc["releases"]
            else None
        )
        images = row.get("images") if isinstance(row, dict) else None
        image = images.get("root") if isinstance(images, dict) else None
        holders = [h for h in (doc, row, images, image, doc.get("targets")) if isinstance(h, dict)]
        holder = draw(st.sampled_from(holders))
        action = draw(st.sampled_from(["replace", "delete", "add", "rename"]))
        keys = sorted(holder)
        if action == "add" or not keys:
            holder[draw(_paths)] = draw(_field_values)
            continue
        key = draw(st.sampled_from(keys))
        if action == "replace":
            holder[key] = draw(_field_values)
        elif action == "delete":
            del holder[key]
        else:
            holder[draw(_paths)] = holder.pop(key)
    return json.dumps(doc).encode()


EXAMPLES = {"run": 0, "accepted": 0}


def test_generated_manifests_give_only_project_errors(
    synced: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    clean = synced[1]
    mdir = tmp_path_factory.mktemp("prop") / "mirror"
    shutil.copytree(clean, mdir, symlinks=True)
    path = manifest_path(mdir)
    valid = json.loads(path.read_text())

    @settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(manifest_inputs(valid))
    def check(data: bytes) -> None:
        EXAMPLES["run"] += 1
        try:
            manifest = Manifest.from_json(data, str(path))
        except UpdaterError:
            pass
        else:
            EXAMPLES["accepted"] += 1
            assert Manifest.from_json(json.dumps(manifest.to_json()), "again") == manifest
        path.write_bytes(data)
        with contextlib.suppress(UpdaterError):
            mirror.status(mdir)

    check()
    print(f"manifest property: {EXAMPLES['run']} examples, {EXAMPLES['accepted']} accepted")
    assert EXAMPLES["run"] >= 1000
