"""The layout is the map: the import-linter contracts in .importlinter hold (each room imports only the
rooms below it; torch stays in the engine; chain libraries in the economics room and the x402 edge), no
module loads the package's own modules by name at run time, and a deliberately wrong import is caught.
The tests keep a direction too: no test module imports another (shared code lives in tests/support or
harness/), and the benchmarks and the harness never import the tests."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"]


def lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(LINT, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_layer_contracts_hold() -> None:
    r = lint(REPO)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_an_upward_import_breaks_the_contracts(tmp_path: Path) -> None:
    """Run the same contracts on a copy of the package with one upward import (the engine importing the
    API): lint-imports must fail and name it."""
    shutil.copytree(REPO / "mesh402", tmp_path / "mesh402", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / ".importlinter", tmp_path / ".importlinter")
    bad = tmp_path / "mesh402" / "engine" / "chunks.py"
    bad.write_text(bad.read_text() + "\nfrom mesh402.api import errors  # noqa: E402,F401  (a deliberate upward import)\n")
    r = subprocess.run(LINT, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert r.returncode != 0
    assert "mesh402.engine.chunks -> mesh402.api.errors" in r.stdout, r.stdout[-3000:]


def test_no_module_imports_the_package_by_name_at_run_time() -> None:
    pattern = re.compile(r"importlib\.import_module\(|__import__\(")
    hits = [f"{p.relative_to(REPO)}:{i}" for p in (REPO / "mesh402").rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


def test_the_node_and_its_api_type_check() -> None:
    """mypy on api/ and node/ (configured in pyproject.toml): zero errors."""
    r = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental"], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-4000:]


def imported(path: Path) -> Iterator[str]:
    """Every module `path` imports, at any depth (`from a import b` yields a and a.b: b may be a module)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


def test_no_test_module_imports_another() -> None:
    hits = [f"{p.relative_to(REPO)}: {m}" for p in (REPO / "tests").rglob("*.py") for m in imported(p)
            if m.split(".")[-1].startswith("test_")]
    assert hits == []


def test_benchmarks_and_the_harness_never_import_the_tests() -> None:
    files = [*(REPO / "benchmarks").rglob("*.py"), *(REPO / "harness").rglob("*.py")]
    hits = [f"{p.relative_to(REPO)}: {m}" for p in files for m in imported(p)
            if m == "tests" or m.startswith("tests.") or m.startswith("conftest")]
    assert hits == []
    # the harness is plain code the benchmarks run without pytest: fixtures live in tests/support
    assert [str(p.relative_to(REPO)) for p in (REPO / "harness").rglob("*.py") if "pytest" in set(imported(p))] == []
