"""The layout rule: code is grouped by the process it runs in, and imports only go one way.

- ``cryomae.service`` (the service processes) never imports ``cryomae.operator`` (the CLI, the operator actions,
  the demo): a service runs without the operator's code.
- The engine and the shared layers below both (model, picking, training, io, messaging, store, watching, ...)
  import neither.
Checked on the source (every import statement, also those inside functions), not on what happens to be loaded.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import cryomae

PACKAGE = Path(cryomae.__file__).parent
SERVICE, OPERATOR = "cryomae.service", "cryomae.operator"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every cryomae module a file imports (absolute names; ``from a import b`` counts as a and a.b)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n == "cryomae" or n.startswith("cryomae.")}


MODULES = {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _inside(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_layout_has_both_sides() -> None:
    services = {m for m in MODULES if _inside(m, SERVICE)}
    assert {f"{SERVICE}.{n}" for n in ("watcher", "picker", "writer", "trainer", "app")} <= services
    assert {f"{OPERATOR}.{n}" for n in ("cli", "actions", "control", "demo", "workflows")} <= set(MODULES)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _inside(m, SERVICE)))
def test_a_service_never_imports_the_operator_side(module: str) -> None:
    wrong = sorted(n for n in MODULES[module] if _inside(n, OPERATOR))
    assert not wrong, f"{module} imports {wrong}"


@pytest.mark.parametrize(
    "module", sorted(m for m in MODULES if not _inside(m, SERVICE) and not _inside(m, OPERATOR) and m != "cryomae")
)
def test_the_engine_imports_neither_side(module: str) -> None:
    wrong = sorted(n for n in MODULES[module] if _inside(n, SERVICE) or _inside(n, OPERATOR))
    assert not wrong, f"{module} imports {wrong}"
