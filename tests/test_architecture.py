"""The import rule of docs/ARCHITECTURE.md, checked on the source: the core (`guard/`) depends
on neither its plugins (`adapters/`) nor its HTTP face (`proxy.py`), and modules stay small."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUARD = sorted((ROOT / "guard").rglob("*.py"))
ADAPTERS = sorted((ROOT / "adapters").rglob("*.py"))


def imported(path: Path) -> set[str]:
    """Top-level package names a module imports, wherever the import statement sits."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", GUARD, ids=lambda p: str(p.relative_to(ROOT)))
def test_guard_imports_neither_adapters_nor_proxy(path: Path) -> None:
    assert not imported(path) & {"adapters", "proxy"}


@pytest.mark.parametrize("path", ADAPTERS, ids=lambda p: str(p.relative_to(ROOT)))
def test_adapters_do_not_import_the_http_face(path: Path) -> None:
    assert "proxy" not in imported(path)


@pytest.mark.parametrize("path", [*GUARD, *ADAPTERS], ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_stay_small(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= 520, "split this module by concern"


def test_proxy_is_routes_and_rendering() -> None:
    assert len((ROOT / "proxy.py").read_text().splitlines()) <= 300
