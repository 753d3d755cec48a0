"""The one command-line convention of the three programs (`updater`, `sign-release`,
`update-mirror`), through their console scripts on real disks, repositories and mirrors:

- every group and every command takes `--json`, before or after the command name, and
  both places mean the same;
- each JSON document is one compact line on stdout with sorted keys; `install` prints
  `{"event": "progress", ...}` lines before its result;
- an error is one object `{"error", "kind", "exit_code", ...details}` on stdout and one
  line `<program>: error: <message>` on stderr, with the exit code of its class;
- no command module picks an exit code; `import updater.cli` imports no heavy library.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from core.errors import SlotFailed, UpdateRejected
from tests.agentnode import BIN, LAYOUTS, Node, node
from tests.httpserver import HTTPTestServer
from tests.signing_helpers import ROOT_JSON, ImageSpec, make_repo, write_image

__all__ = ["node"]

REPO_ROOT = Path(__file__).resolve().parents[2]
PROGRAMS = ("updater", "sign-release", "update-mirror")
# Imported by no path of `updater` that only reads (docs/architecture.md, "fast start").
HEAVY = (
    "tuf",
    "securesystemslib",
    "requests",
    "urllib3",
    "cryptography",
    "zstandard",
    "pyudev",
    "core.repository",
    "core.fetcher",
    "core.decompress",
)


def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    program_name, *args = map(str, argv)
    return subprocess.run(
        [str(BIN / program_name), *args], capture_output=True, text=True, timeout=120
    )


def documents(stdout: str) -> list[dict[str, Any]]:
    """Every line of stdout, each one JSON document in the one compact, sorted form."""
    docs = []
    for line in stdout.splitlines():
        doc = json.loads(line)
        assert line == json.dumps(doc, sort_keys=True, separators=(",", ":")), line
        assert isinstance(doc, dict), line
        docs.append(doc)
    return docs


def the_error(done: subprocess.CompletedProcess[str], prog: str) -> dict[str, Any]:
    """The error of a failed --json run: one document on stdout, one line on stderr,
    and they agree with each other and with the exit status."""
    assert done.returncode != 0
    (doc,) = documents(done.stdout)
    # The agent's log lines may come before it; the error is the one last line.
    (line,) = [x for x in done.stderr.splitlines() if x.startswith(f"{prog}: error: ")]
    assert done.stderr.endswith(line + "\n")
    assert line == f"{prog}: error: {doc['error']}", (line, doc)
    assert doc["exit_code"] == done.returncode and isinstance(doc["kind"], str), doc
    return doc


def walk(group: click.Group, path: str) -> Iterator[tuple[str, click.Command]]:
    yield path, group
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None, (path, name)
        if isinstance(command, click.Group):
            yield from walk(command, f"{path} {name}")
        else:
            yield f"{path} {name}", command


def test_every_group_and_command_of_every_program_takes_json() -> None:
    from mirror.cli import cli as mirror_cli
    from signing.cli import cli as signing_cli
    from updater.cli import cli as updater_cli

    seen = 0
    for prog, root in zip(PROGRAMS, (updater_cli, signing_cli, mirror_cli), strict=True):
        for path, command in walk(root, prog):
            flags = [p for p in command.params if "--json" in getattr(p, "opts", ())]
            assert len(flags) == 1, f"{path}: no --json"
            seen += 1
    assert seen >= 30  # 16 of updater, 10 of sign-release, 6 of update-mirror


@pytest.fixture
def signed_repo(tmp_path: Path) -> Path:
    image = write_image(tmp_path / "img", 50_000, seed=3)
    return make_repo(tmp_path / "repo", [ImageSpec(image, "1.0.0")])


def test_json_before_and_after_the_command_are_the_same_one_line(
    tmp_path: Path, signed_repo: Path
) -> None:
    disk = tmp_path / "disk.img"
    laid = run("updater", "layout", "apply", LAYOUTS / "grub-efi-ab.toml", disk, "--size", "1G")
    assert laid.returncode == 0, laid.stderr
    root = ("--root", ROOT_JSON)
    commands = [  # each run with --json before and after the command's words
        ("updater", ("layout", "show", disk)),
        ("sign-release", ("status", signed_repo)),
        ("sign-release", ("verify", signed_repo, *root)),
        ("update-mirror", ("status", tmp_path / "none")),
    ]
    pairs = [((prog, "--json", *words), (prog, *words, "--json")) for prog, words in commands]
    for before, after in pairs:
        first, second = run(*before), run(*after)
        assert (first.returncode, first.stdout) == (second.returncode, second.stdout), before
        assert len(documents(first.stdout)) == 1, (before, first.stdout)
    shown = documents(run(*pairs[0][0]).stdout)[0]
    assert [p["name"] for p in shown["partitions"]] == ["esp", "root_a", "root_b", "data"]
    assert shown["damaged"] == [] and shown["sector_size"] == 512


def test_mirror_sync_and_status_print_one_compact_document(
    tmp_path: Path, signed_repo: Path
) -> None:
    mdir = tmp_path / "mirror"
    with HTTPTestServer(signed_repo) as server:
        urls = (f"{server.url}/metadata", f"{server.url}/targets")
        done = run("update-mirror", "sync", *urls, mdir, "--root", ROOT_JSON,
                   "--allow-example-keys", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    (synced,) = documents(done.stdout)
    assert synced["state"] == 1
    (status,) = documents(run("update-mirror", "status", mdir, "--json").stdout)
    assert documents(run("update-mirror", "--json", "status", mdir).stdout) == [status]
    assert status["state"] == 1


@pytest.mark.parametrize(
    ("argv", "kind", "exit_code", "words"),
    [
        (("updater", "--json", "--config", "/none", "status"), "ConfigError", 2, "cannot read"),
        (("updater", "status", "--config", "x"), None, 2, "No such option"),
        (("sign-release", "status", "/none", "--json"), "RepositoryStateError", 2, "not a repo"),
        (("update-mirror", "status", "/none", "--json"), "MirrorRejected", 3, "no synced"),
        (("updater", "layout", "show", "/none", "--json"), "DeviceError", 4, "cannot open"),
    ],
)
def test_an_error_is_one_document_and_one_line(
    argv: tuple[str, ...], kind: str | None, exit_code: int, words: str
) -> None:
    done = run(*argv)
    assert done.returncode == exit_code, done.stderr
    if kind is None:  # not --json: click's own usage message, nothing on stdout
        assert done.stdout == "" and words in done.stderr
        return
    doc = the_error(done, argv[0])
    assert doc["kind"] == kind and words in doc["error"], doc
    assert set(doc) == {"error", "kind", "exit_code"}


def test_a_usage_error_after_json_is_a_document_too() -> None:
    done = run("updater", "--json", "install", "--force")
    assert done.returncode == 2
    (doc,) = documents(done.stdout)
    assert doc == {"error": "--force needs --version", "kind": "UsageError", "exit_code": 2}
    assert "Usage: updater install" in done.stderr  # click's usual message stays


def test_a_usage_error_in_a_group_of_a_group_is_one_document() -> None:
    done = run("updater", "--json", "tuf-client", "--metadata-dir", "md", "no-such-command")
    assert done.returncode == 2
    (doc,) = documents(done.stdout)
    assert doc["kind"] == "NoSuchCommand" and "no-such-command" in doc["error"], doc


def test_details_are_merged_but_never_replace_the_error_keys() -> None:
    from core.cli import program

    @program("demo")
    def demo() -> None:
        """A program with one failing command."""

    @demo.command()
    @click.argument("what")
    def fail(what: str) -> None:
        details = {"action": "rolled-back", "slot": "B", "error": "x", "kind": "y"}
        if what == "slot":
            raise SlotFailed("slot B failed its health checks", details=details)
        raise UpdateRejected("bad data")

    for argv in (["--json", "fail", "slot"], ["fail", "slot", "--json"]):
        result = CliRunner().invoke(demo, argv)
        assert result.exit_code == 5
        (doc,) = documents(result.stdout)
        assert doc == {
            "error": "slot B failed its health checks",
            "kind": "SlotFailed",
            "exit_code": 5,
            "action": "rolled-back",
            "slot": "B",
        }
        assert result.stderr == "demo: error: slot B failed its health checks\n"
    plain = CliRunner().invoke(demo, ["fail", "data"])
    assert plain.exit_code == 3 and plain.stdout == ""
    assert plain.stderr == "demo: error: bad data\n"


def test_agent_documents_progress_result_and_a_failed_health_check(node: Node) -> None:
    done = node.run("install", "--no-reboot")  # node.run passes --json at the group
    assert done.returncode == 0, done.stderr
    events = documents(done.stdout)
    assert {e["event"] for e in events[:-1]} == {"progress"}
    assert events[-1]["event"] == "result" and events[-1]["version"] == "2.0.0"
    node.grub_boots("B")
    (node.root / "unhealthy").touch()
    done = node.run("health-check", booted="B")
    doc = the_error(done, "updater")
    assert (doc["kind"], doc["exit_code"], doc["action"], doc["slot"]) == (
        "SlotFailed",
        5,
        "rolled-back",
        "B",
    )
    assert documents(node.run("status").stdout) == documents(
        subprocess.run(
            [BIN / "updater", "--config", node.config, "status", "--json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )


EXIT_PICKING = re.compile(r"ctx\.exit\(|sys\.exit\(|\bExit\(|EXIT_[A-Z]")


def test_no_command_module_picks_an_exit_code() -> None:
    modules = [
        *sorted((REPO_ROOT / "updater" / "cli").glob("*.py")),
        REPO_ROOT / "signing" / "cli.py",
        REPO_ROOT / "mirror" / "cli.py",
    ]
    assert len(modules) >= 4
    for path in modules:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not EXIT_PICKING.search(line), f"{path}:{number}: {line.strip()}"
    # The one place that ends a process with an error's code, and only with that code.
    handler = (REPO_ROOT / "core" / "cli.py").read_text()
    assert [m.group(0) for m in EXIT_PICKING.finditer(handler)] == ["Exit("]
    assert "Exit(err.exit_code)" in handler


def imported_modules(code: str, *args: str | Path, cwd: Path) -> set[str]:
    """The modules a fresh interpreter has imported when `code` is done (even if it
    exits through SystemExit, as a click program does)."""
    out = cwd / "modules.txt"
    probe = (
        "import atexit, sys\n"
        f"atexit.register(lambda: open({str(out)!r}, 'w').write('\\n'.join(sys.modules)))\n"
        f"{code}\n"
    )
    subprocess.run([sys.executable, "-c", probe, *map(str, args)], cwd=cwd, capture_output=True,
                   timeout=120)  # fmt: skip
    return set(out.read_text().split())


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


def test_the_command_tree_imports_no_heavy_library(tmp_path: Path) -> None:
    build_tree = (
        "import click\n"
        "from updater.cli import cli\n"
        "def walk(group):\n"
        "    ctx = click.Context(group)\n"
        "    for name in group.list_commands(ctx):\n"
        "        command = group.get_command(ctx, name)\n"
        "        if isinstance(command, click.Group):\n"
        "            walk(command)\n"
        "walk(cli)\n"
    )
    modules = imported_modules(build_tree, cwd=tmp_path)
    assert "updater.cli" in modules and "click" in modules
    assert heavy(modules) == []
    helped = imported_modules("from updater.cli import main; main()", "--help", cwd=tmp_path)
    assert heavy(helped) == []


def test_status_and_health_check_import_no_heavy_library(node: Node) -> None:
    node.write_config("A")
    for command in ("status", "health-check"):
        modules = imported_modules(
            "from updater.cli import main; main()",
            "--config",
            node.config,
            "--json",
            command,
            cwd=node.root,
        )
        assert "updater.agent" in modules or "updater.node" in modules, command
        assert heavy(modules) == [], command
        # The command registry is lazy: the other groups' modules are not even loaded.
        assert {"updater.cli.layout", "updater.cli.tufclient"}.isdisjoint(modules), command
