"""`updater layout apply/show/repair` through click's CliRunner and the console script:
output, --json keys, refusals, and the target left untouched on every error."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import run_tool
from updater.cli import cli
from updater.disk import gpt

LAYOUTS = Path(__file__).resolve().parents[2] / "partition-layouts"
UPDATER = Path(sys.executable).parent / "updater"
GIB = 1 << 30
JSON_KEYS = {
    "number",
    "name",
    "type_guid",
    "unique_guid",
    "first_lba",
    "last_lba",
    "size_bytes",
    "priority",
    "tries",
    "successful",
    "attributes",
}


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [UPDATER, *map(str, args)], capture_output=True, text=True, check=False, timeout=60
    )


def sparse_digest(path: Path) -> str:
    """SHA-256 of a sparse file's size and every data extent (holes read as zeros, so
    this covers every byte without reading a GiB of them)."""
    if not path.exists():
        return "absent"
    h = hashlib.sha256()
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(size.to_bytes(8, "little"))
        pos = 0
        while pos < size:
            try:
                start = os.lseek(f.fileno(), pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole remains
                break
            end = os.lseek(f.fileno(), start, os.SEEK_HOLE)
            f.seek(start)
            h.update(start.to_bytes(8, "little"))
            h.update(f.read(end - start))
            pos = end
    return h.hexdigest()


def test_apply_show_repair_through_the_console_script(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    out = _run("layout", "apply", LAYOUTS / "gptprio-ab.toml", disk, "--size", "1G")
    assert out.returncode == 0, out.stderr
    assert disk.stat().st_size == GIB
    assert disk.stat().st_blocks * 512 < 4 << 20  # sparse
    assert list(tmp_path.iterdir()) == [disk]  # no temporary file left behind

    shown = _run("layout", "show", disk)
    assert shown.returncode == 0 and shown.stderr == ""
    lines = shown.stdout.splitlines()
    assert "root_a" in lines[3] and "root-x86-64" in lines[3] and "384.0 MiB" in lines[3]
    assert lines[3].split()[-3:] == ["1", "0", "1"]  # priority tries successful

    for argv in (("--json", "layout", "show", disk), ("layout", "show", "--json", disk)):
        shown_json = json.loads(_run(*argv).stdout)  # one object: the disk and its partitions
        assert shown_json["target"] == str(disk) and shown_json["damaged"] == []
        rows = shown_json["partitions"]
        assert [r["name"] for r in rows] == ["esp", "root_a", "root_b", "data"]
        assert all(set(r) >= JSON_KEYS for r in rows)
        assert rows[1]["successful"] is True and rows[1]["priority"] == 1
        assert rows[0]["size_bytes"] == 64 << 20

    with disk.open("r+b") as f:  # break the primary header
        f.seek(512 + 24)
        f.write(b"\xff\xff")
    shown = _run("layout", "show", disk)
    assert shown.returncode == 0
    assert "damaged: primary GPT: header CRC32 mismatch" in shown.stderr
    fixed = _run("layout", "repair", disk)
    assert fixed.returncode == 0 and "repaired: primary GPT" in fixed.stdout
    assert _run("layout", "show", disk).stderr == ""
    assert "No problems found" in run_tool("sgdisk", "-v", disk).stdout
    assert "nothing to repair" in _run("layout", "repair", disk).stdout


def test_existing_table_is_refused_without_force(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    runner = CliRunner()
    first = runner.invoke(
        cli, ["layout", "apply", str(LAYOUTS / "grub-efi-ab.toml"), str(disk), "--size", "1G"]
    )
    assert first.exit_code == 0, first.output
    before = sparse_digest(disk)
    again = _run("layout", "apply", LAYOUTS / "gptprio-ab.toml", disk)
    assert again.returncode != 0
    assert (
        again.stderr == f"updater: error: {disk}: already holds a GPT (use --force to overwrite)\n"
    )
    assert sparse_digest(disk) == before
    forced = runner.invoke(
        cli, ["layout", "apply", str(LAYOUTS / "gptprio-ab.toml"), str(disk), "--force"]
    )
    assert forced.exit_code == 0, forced.output
    assert gpt.read_gpt(disk).find("root_a").successful


def test_mbr_disk_is_refused_without_force(tmp_path: Path) -> None:
    disk = tmp_path / "mbr.img"
    with disk.open("wb") as f:
        f.truncate(GIB)
    subprocess.run(
        [run_tool("sfdisk", "--version").args[0], "-q", str(disk)],
        input="label: dos\n,100M\n",
        text=True,
        check=True,
        capture_output=True,
    )
    before = sparse_digest(disk)
    out = _run("layout", "apply", LAYOUTS / "grub-efi-ab.toml", disk)
    assert out.returncode != 0 and "already holds an MBR partition table" in out.stderr
    assert sparse_digest(disk) == before


PART = '[[partition]]\nname = "{}"\ntype = "{}"\nsize = "{}"\n'
BAD = {
    "unknown alias": (PART.format("a", "root-sparc", "1M"), "partition 1 ('a').type"),
    "duplicate name": (PART.format("a", "esp", "1M") * 2, "partition 2 ('a').name"),
    "missing field": ('[[partition]]\nname = "a"\ntype = "esp"\n', "partition 1.size"),
    "rest not last": (
        PART.format("a", "esp", "rest") + PART.format("b", "esp", "1M"),
        "partition 1 ('a').size",
    ),
    "bad size": (PART.format("a", "esp", "lots"), "partition 1 ('a').size"),
    "oversized": (
        PART.format("a", "esp", "900M") + PART.format("b", "var", "200M"),
        "partition 2 ('b').size: does not fit",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("existing", [True, False], ids=["existing-image", "new-image"])
def test_bad_layout_fails_cleanly_and_touches_nothing(
    tmp_path: Path, case: str, existing: bool
) -> None:
    text, field = BAD[case]
    layout = tmp_path / "bad.toml"
    layout.write_text(text)
    disk = tmp_path / "disk.img"
    if existing:
        with disk.open("wb") as f:
            f.truncate(GIB)
    before = sparse_digest(disk)
    out = _run("layout", "apply", layout, disk, "--size", "1G", "--force")
    assert out.returncode == 2, out.stderr  # ConfigError
    assert out.stdout == ""
    (line,) = out.stderr.splitlines()
    assert line.startswith(f"updater: error: {layout}: ") and field in line, line
    assert "Traceback" not in out.stderr
    assert sparse_digest(disk) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["bad.toml"] + (["disk.img"] if existing else [])
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["layout", "show", "{tmp}/absent.img"], "cannot open"),
        (["layout", "show", "{tmp}/zeros.img"], "no valid GPT"),
        (["layout", "repair", "{tmp}/zeros.img"], "no valid GPT"),
        (["layout", "apply", "{layouts}/grub-efi-ab.toml", "{tmp}/new.img"], "give --size"),
        (
            ["layout", "apply", "{layouts}/grub-efi-ab.toml", "{tmp}/new.img", "--size", "1X"],
            "--size: bad size",
        ),
        (
            ["layout", "apply", "{layouts}/grub-efi-ab.toml", "{tmp}/zeros.img", "--size", "1M"],
            "refusing to shrink",
        ),
    ],
)
def test_environment_errors_are_one_line(tmp_path: Path, argv: list[str], message: str) -> None:
    zeros = tmp_path / "zeros.img"
    with zeros.open("wb") as f:
        f.truncate(8 << 20)
    before = sparse_digest(zeros)
    args = [a.format(tmp=tmp_path, layouts=LAYOUTS) for a in argv]
    result = CliRunner().invoke(cli, args, prog_name="updater")
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception
    (line,) = result.output.splitlines()
    assert line.startswith("updater: error: ") and message in line, line
    assert sparse_digest(zeros) == before
    assert not (tmp_path / "new.img").exists()


def test_grow_an_existing_image_only_when_asked(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(512 << 20)
    out = _run("layout", "apply", LAYOUTS / "grub-efi-ab.toml", disk)
    assert out.returncode == 2 and "does not fit the target" in out.stderr
    assert disk.stat().st_size == 512 << 20
    out = _run("layout", "apply", LAYOUTS / "grub-efi-ab.toml", disk, "--size", "1G")
    assert out.returncode == 0, out.stderr
    assert disk.stat().st_size == GIB
    assert "No problems found" in run_tool("sgdisk", "-v", disk).stdout


@pytest.mark.parametrize(
    ("size", "why"),
    [
        ("9999999T", "--size: size '9999999T' is over the limit of 9223372036854775807 bytes"),
        ("9" * 5000 + "G", "--size: size '999999999999999999999999' is over the limit of "),
        ("0", "--size: bad size '0'"),
        ("0G", "--size: bad size '0G'"),
        ("-1G", "--size: bad size '-1G'"),
    ],
)
def test_sizes_no_file_can_have_are_one_line(tmp_path: Path, size: str, why: str) -> None:
    out = _run(
        "layout", "apply", LAYOUTS / "grub-efi-ab.toml", tmp_path / "new.img", "--size", size
    )
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.splitlines()
    assert line.startswith(f"updater: error: {why}"), line
    assert len(line) < 200
    assert list(tmp_path.iterdir()) == []


def _not_a_disk(tmp_path: Path, kind: str) -> Path:
    if kind == "directory":
        return tmp_path
    if kind == "character device":
        return Path("/dev/null")
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("kind", ["directory", "FIFO", "character device"])
@pytest.mark.parametrize("command", ["show", "repair", "apply"])
def test_show_repair_apply_on_what_is_not_a_disk(tmp_path: Path, kind: str, command: str) -> None:
    target = _not_a_disk(tmp_path, kind)
    args: list[str | Path] = ["layout", command, target]
    if command == "apply":
        args[2:2] = [LAYOUTS / "grub-efi-ab.toml"]
    before = sorted(tmp_path.iterdir())
    out = _run(*args)  # bounded: _run's subprocess timeout
    assert out.returncode == 4, out.stderr
    (line,) = out.stderr.splitlines()
    if command == "apply":
        assert line == f"updater: error: {target}: neither a block device nor a regular file"
    else:
        assert line == (
            f"updater: error: cannot open {target}: not a disk: a {kind} "
            "(a disk is a block device or an image file)"
        )
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize("kind", ["directory", "FIFO", "character device", "deep", "types"])
def test_layout_file_that_is_not_a_layout_is_one_line(tmp_path: Path, kind: str) -> None:
    if kind == "deep":
        layout, why = tmp_path / "deep.toml", "not valid TOML: nested too deeply"
        layout.write_text("a = " + "[" * 3000 + "]" * 3000 + "\n")
    elif kind == "types":
        layout, why = tmp_path / "types.toml", "partition 1 (5).name: must be a non-empty"
        layout.write_text("[[partition]]\nname = 5\nsize = []\ntype = {}\npriority = 99\n")
    else:
        layout = _not_a_disk(tmp_path, kind)
        why = f"cannot read layout: not a regular file (a {kind})"
    disk = tmp_path / "new.img"
    out = _run("layout", "apply", layout, disk, "--size", "1G")
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.splitlines()
    assert line.startswith(f"updater: error: {layout}: {why}"), line
    assert not disk.exists()
