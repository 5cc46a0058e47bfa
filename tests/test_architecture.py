"""The house rules of ``robustkit/`` (docs/architecture.md), checked on the source.

Imports point down only: cli -> builtins -> jobs (export -> harden -> audit) -> components
(attacks, models, data, train) -> plugin -> base modules. No import circles (all imports count,
function-level and ``TYPE_CHECKING`` ones too); no import from a lower layer to a higher one
(annotation-only imports under ``TYPE_CHECKING`` are exempt: they run nothing); nothing but the
host (by name) loads ``robustkit.builtins``.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

import robustkit

PACKAGE = Path(robustkit.__file__).parent

#: Layer of each top-level room; a module may import its own layer and those below.
LAYERS = {
    **dict.fromkeys(
        ("errors", "threat", "params", "console", "distributed", "modules", "io", "environment", "precision"), 0
    ),
    "plugin": 1,
    **dict.fromkeys(("data", "attacks", "models", "train"), 2),
    "audit": 3,
    "harden": 4,
    "export": 5,
    **dict.fromkeys(("builtins", "testing"), 6),
    "cli": 7,
    "__main__": 8,
}


@dataclass(frozen=True)
class Import:
    source: str  #: importing module, dotted
    target: str  #: imported robustkit module, dotted
    annotation_only: bool  #: inside ``if TYPE_CHECKING:``
    line: int


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports() -> list[Import]:
    modules = _modules()
    result = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        guarded = {
            id(node)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for stmt in block.body
            for node in ast.walk(stmt)
        }
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
                candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
            else:
                continue
            for candidate in candidates:
                target = candidate
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target != "robustkit":
                    result.append(Import(name, target, id(node) in guarded, node.lineno))
                    break
    return result


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "robustkit"


def test_every_room_has_a_layer() -> None:
    rooms = {_room(m) for m in _modules()} - {"robustkit"}
    assert rooms <= set(LAYERS), f"give these rooms a layer in LAYERS and docs/architecture.md: {rooms - set(LAYERS)}"


def test_imports_point_down_only() -> None:
    upward = [
        f"{i.source}:{i.line} imports {i.target}"
        for i in _imports()
        if not i.annotation_only and LAYERS[_room(i.target)] > LAYERS[_room(i.source)]
    ]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_nothing_imports_the_builtin_plugin() -> None:
    offenders = [f"{i.source}:{i.line}" for i in _imports()
                 if _room(i.target) == "builtins" and _room(i.source) != "builtins"]
    assert not offenders, f"the core loads robustkit.builtins only through the host, by name: {offenders}"


def test_no_import_circles() -> None:
    edges: dict[str, set[str]] = {}
    for i in _imports():
        edges.setdefault(i.source, set()).add(i.target)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for module in sorted(edges):
        if module not in state and (cycle := visit(module)):
            pytest.fail("import circle: " + " -> ".join(cycle))


def test_the_checker_sees_imports() -> None:
    """The walk above finds imports at all (a checker that sees nothing passes everything)."""
    found = {(i.source, i.target) for i in _imports()}
    assert ("robustkit.audit.run", "robustkit.audit.engine") in found
    assert ("robustkit.plugin.hookspecs", "robustkit.models.base") in found  # TYPE_CHECKING import, seen
    assert any(i.annotation_only for i in _imports())
