"""The import order of design.md section 1: fl_compams < tasks < {clients, strategies} < simulations.

Every import statement of every module counts, including those inside functions and under TYPE_CHECKING: an
import hidden in a function still makes the package depend on the one it imports.
"""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: What each package may import from the project (its own package is always allowed).
ALLOWED = {
    "fl_compams": set(),
    "tasks": {"fl_compams"},
    "clients": {"fl_compams", "tasks"},
    "strategies": {"fl_compams", "tasks"},
    "simulations": {"fl_compams", "tasks", "clients", "strategies"},
}
PROJECT = set(ALLOWED)
#: Third-party packages the core may use (design.md section 1: torch + numpy only).
CORE_THIRD_PARTY = {"torch", "numpy"}


def imported_modules(path: Path, package: str | None = None) -> list[tuple[int, str]]:
    """(line, top-level package) of every import in a file, relative imports resolved against its package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = package or path.relative_to(ROOT).parts[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            top = package if node.level else (node.module or "").split(".")[0]
            found.append((node.lineno, top))
    return found


def modules_of(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_only_point_down(package):
    paths = modules_of(package)
    assert paths, f"package {package} has no modules"
    bad = []
    for path in paths:
        for line, top in imported_modules(path):
            if top in PROJECT and top != package and top not in ALLOWED[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {top}")
    assert not bad, f"{package} may import only {sorted(ALLOWED[package])}:\n" + "\n".join(bad)


def test_core_imports_only_torch_numpy_and_the_standard_library():
    bad = []
    for path in modules_of("fl_compams"):
        for line, top in imported_modules(path):
            if (
                top in PROJECT
                or top in CORE_THIRD_PARTY
                or top in sys.stdlib_module_names
                or top == "__future__"
            ):
                continue
            bad.append(f"{path.relative_to(ROOT)}:{line} imports {top}")
    assert not bad, "fl_compams is torch + numpy only (never flwr or ray):\n" + "\n".join(bad)


def test_clients_and_strategies_never_import_each_other():
    for a, b in (("clients", "strategies"), ("strategies", "clients")):
        for path in modules_of(a):
            assert b not in {top for _, top in imported_modules(path)}, f"{path} imports {b}"


def test_the_checker_sees_imports_inside_functions(tmp_path):
    # A function-level import is an import: the rule cannot be dodged by moving it into a function.
    source = "def f():\n    from strategies.server_app import run_server\n    return run_server\n"
    fake = tmp_path / "probe.py"
    fake.write_text(source + "from . import sibling\n")
    assert sorted(imported_modules(fake, "tasks")) == [(2, "strategies"), (4, "tasks")]
