"""The one direction of imports between the parts of the tree (docs/architecture.md).

    tests/  ->  tools/, bench/  ->  updater/, signing/, mirror/  ->  core/

core imports none of the programs; a program imports core and itself, never another
program; nothing shipped imports tools/, bench/ or tests/; tools/ and bench/ import no
test helper (tests/ may import anything). Every import counts, module level or inside
a function (the lazy ones of the fast start), and so does `importlib.import_module`
with a literal name: the rule is about what a part needs, not when it loads it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("core", "updater", "signing", "mirror", "tools", "bench", "tests")
# What each part may import of the others (it may always import itself).
ALLOWED: dict[str, frozenset[str]] = {
    "core": frozenset(),
    "updater": frozenset({"core"}),
    "signing": frozenset({"core"}),
    "mirror": frozenset({"core"}),
    "tools": frozenset({"core", "updater", "signing", "mirror"}),
    "bench": frozenset({"core", "updater", "signing", "mirror", "tools"}),
}


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, a module of `package`."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            # A relative import stays inside the importing package.
            module = (node.module or "") if node.level == 0 else package
            found.append((node.lineno, module))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return sorted(found)


def violations(part: str, root: Path = ROOT) -> list[str]:
    """`file:line imports module` for each import of `part` that breaks the rule."""
    problems = []
    for path in sorted((root / part).rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        for line, module in imported_modules(path.read_text(encoding="utf-8"), part):
            target = module.split(".")[0]
            if target in PARTS and target != part and target not in ALLOWED[part]:
                problems.append(f"{path.relative_to(root)}:{line} imports {module}")
    return problems


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_imports_go_one_way(part: str) -> None:
    assert (ROOT / part).is_dir()
    assert violations(part) == []


def test_the_checker_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The rule can fail: a core module importing a program in each way is caught."""
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "bad.py").write_text(
        "import updater.config\n"
        "from signing import keys\n"
        "def lazy() -> None:\n"
        "    from mirror.store import Store\n"
        "    importlib.import_module('updater.boot.grub')\n"
        "from . import fsutil\n"
        "from tests.reposim import RepositorySimulator\n"
    )
    assert violations("core", tmp_path) == [
        "core/bad.py:1 imports updater.config",
        "core/bad.py:2 imports signing",
        "core/bad.py:4 imports mirror.store",
        "core/bad.py:5 imports updater.boot.grub",
        "core/bad.py:7 imports tests.reposim",
    ]
