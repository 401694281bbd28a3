"""The layers of docs/ARCHITECTURE.md, checked on the source (from the AST) and at run time.

    app        guard.http.app: the composition root, mounting the API and the pages
    edges      guard.http, guard.review, guard.cli      (review and cli build on http)
    pipeline   guard.pipeline, guard.offline
    parts      guard.judges, guard.audit, guard.imagestore, guard.provenance
    contracts  guard.plugins (every Protocol and registry), guard.testing's fakes sit above
    core       guard.core
    support    guard.support

A module imports its own package or a lower tier, never a higher one; packages of one tier do not
import each other (they meet through guard.plugins). `adapters/` may not import the edges or the
pipeline. Modules stay small and few sit flat at guard/'s top.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUARD = sorted((ROOT / "guard").rglob("*.py"))
ADAPTERS = sorted((ROOT / "adapters").rglob("*.py"))

TIER = {
    "guard.support": 0,
    "guard.core": 1,
    "guard.plugins": 2,
    "guard.judges": 3, "guard.audit": 3, "guard.imagestore": 3, "guard.provenance": 3,
    "guard.pipeline": 4, "guard.offline": 4,
    "guard.testing": 5,
    "guard.http": 6, "guard.review": 6, "guard.cli": 6,
    "guard.http.app": 7,
}
# Within the edges: the pages render errors through the HTTP edge's map; `safeedit serve` runs
# the app and its Drain.
EDGE_USES = {("guard.review", "guard.http"), ("guard.cli", "guard.http")}
ADAPTERS_NEVER = ("guard.http", "guard.review", "guard.cli", "guard.pipeline", "guard.offline",
                  "guard.testing")
# The public face (`guard/__init__.py`) re-exports what plugin authors import.
PUBLIC_MAY_USE = ("guard.support", "guard.core", "guard.plugins")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Full names of the modules a module imports, wherever the statement sits (relative imports
    resolved; type-checking-only imports count too: they are a dependency all the same)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            submodules = [a.name for a in node.names if (ROOT / "guard" / a.name).exists()
                          or (ROOT / "guard" / f"{a.name}.py").exists()]
            if not (module == "guard" and len(submodules) == len(node.names)):
                names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def unit(module: str) -> str | None:
    """The layer unit (a package of TIER, or guard's public face) a guard module belongs to."""
    if module == "guard":
        return "guard"
    for name in sorted(TIER, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return name
    return None


def guard_units(path: Path) -> set[str]:
    own = unit(module_name(path))
    found = {unit(m) for m in imported(path) if m == "guard" or m.startswith("guard.")}
    return {u for u in found if u is not None and u != own}


@pytest.mark.parametrize("path", GUARD, ids=lambda p: str(p.relative_to(ROOT)))
def test_guard_imports_only_its_own_package_or_lower(path: Path) -> None:
    own = unit(module_name(path))
    assert not {m.split(".")[0] for m in imported(path)} & {"adapters", "proxy"}
    for other in guard_units(path):
        if own == "guard":
            assert other in PUBLIC_MAY_USE, f"the public face imports {other}"
            continue
        assert own is not None, f"{module_name(path)} is in no layer: add its package to TIER"
        assert other != "guard", f"{own} imports guard's public face; import the module instead"
        if (own, other) in EDGE_USES:
            continue
        assert TIER[other] < TIER[own], (
            f"{module_name(path)} ({own}, tier {TIER[own]}) imports {other} (tier {TIER[other]})")


@pytest.mark.parametrize("path", ADAPTERS, ids=lambda p: str(p.relative_to(ROOT)))
def test_adapters_import_neither_the_edges_nor_the_pipeline(path: Path) -> None:
    names = imported(path)
    assert "proxy" not in {m.split(".")[0] for m in names}
    assert not [m for m in names if m.startswith(ADAPTERS_NEVER)]


def test_no_cycles_between_packages() -> None:
    graph: dict[str, set[str]] = {}
    for path in GUARD:
        own = unit(module_name(path))
        if own is not None:
            graph.setdefault(own, set()).update(guard_units(path) - {"guard"})
    done: set[str] = set()

    def visit(node: str, stack: tuple[str, ...]) -> None:
        assert node not in stack, " -> ".join([*stack, node])
        if node in done:
            return
        for nxt in graph.get(node, ()):
            visit(nxt, (*stack, node))
        done.add(node)

    for node in graph:
        visit(node, ())


def test_few_modules_sit_flat_at_the_top() -> None:
    flat = sorted(p.name for p in (ROOT / "guard").glob("*.py"))
    assert len(flat) <= 8, flat
    assert {p.name for p in (ROOT / "guard").iterdir() if p.is_dir() and
            (p / "__init__.py").exists()} <= {name.split(".")[1] for name in TIER}


@pytest.mark.parametrize("path", [*GUARD, *ADAPTERS], ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_stay_small(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= 520, "split this module by concern"


def test_proxy_is_a_thin_entry() -> None:
    assert len((ROOT / "proxy.py").read_text().splitlines()) <= 20


def test_the_core_loads_without_the_web_stack() -> None:
    """Importing every module of the pipeline, the judges and the audit stores loads neither
    Starlette nor uvicorn: only guard.http (and the pages and CLI above it) know HTTP."""
    code = (
        "import importlib, pkgutil, sys\n"
        "import guard.pipeline, guard.judges, guard.audit, guard.imagestore, guard.offline\n"
        "for pkg in (guard.pipeline, guard.judges, guard.audit, guard.imagestore, guard.offline):\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        importlib.import_module(m.name)\n"
        "loaded = sorted({n.split('.')[0] for n in sys.modules} & {'starlette', 'uvicorn'})\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={"LITELLM_LOCAL_MODEL_COST_MAP": "True",
                                           "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
