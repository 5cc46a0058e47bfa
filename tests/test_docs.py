"""Every hook is documented with its current signature and has a test (as datasette does).

docs/plugin-hooks.md has one ``## <hook name>`` section per hook whose first code block is the
specification: ``@hookspec`` (with ``(firstresult=True)`` where it applies) and the ``def``
line. Each hook also needs a ``test_hook_<hook name>`` test in ``tests/`` that uses the hook.
"""
from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from robustkit.plugin import hookspecs

ROOT = Path(__file__).resolve().parents[1]
HOOKS_DOC = ROOT / "docs" / "plugin-hooks.md"
SPECS: dict[str, Callable[..., Any]] = {
    name: obj for name, obj in vars(hookspecs).items() if hasattr(obj, f"{hookspecs.PROJECT}_spec")
}


def documented_sections() -> dict[str, str]:
    """Hook name -> text of its section in docs/plugin-hooks.md."""
    parts = re.split(r"^## (\S+)\s*$", HOOKS_DOC.read_text(), flags=re.MULTILINE)
    return {name: body for name, body in zip(parts[1::2], parts[2::2]) if name.startswith("robustkit_")}


def specification(name: str) -> str:
    """The decorator and ``def`` line as the code declares them."""
    spec = SPECS[name]
    signature = inspect.signature(spec)  # annotations stay strings: hookspecs postpones them
    arguments = ", ".join(f"{p.name}: {p.annotation}" for p in signature.parameters.values())
    first_result = getattr(spec, f"{hookspecs.PROJECT}_spec")["firstresult"]
    decorator = "@hookspec(firstresult=True)" if first_result else "@hookspec"
    return f"{decorator}\ndef {name}({arguments}) -> {signature.return_annotation}"


def hook_tests() -> dict[str, str]:
    """``test_hook_*`` function name -> its source, over every test file."""
    found = {}
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_hook_"):
                found[node.name] = ast.get_source_segment(source, node) or ""
    return found


def test_hookspecs_are_found() -> None:
    assert len(SPECS) >= 7 and "robustkit_register_attacks" in SPECS


def test_every_documented_hook_exists() -> None:
    assert set(documented_sections()) <= set(SPECS), "docs/plugin-hooks.md documents a hook that is gone"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_hook_is_documented_with_its_current_signature(name: str) -> None:
    sections = documented_sections()
    assert name in sections, f"docs/plugin-hooks.md has no '## {name}' section"
    block = re.search(r"```python\n(.*?)\n```", sections[name], flags=re.DOTALL)
    assert block is not None, f"the section of {name} has no python code block"
    assert block.group(1).strip() == specification(name)
    for word in ("Arguments", "Returns", "Called", "On failure"):
        assert f"**{word}**" in sections[name], f"the section of {name} does not say '{word}'"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_hook_has_a_test(name: str) -> None:
    tests = hook_tests()
    test = f"test_hook_{name}"
    assert test in tests, f"no test named {test} in tests/"
    assert re.search(rf"def {name}\(", tests[test]), f"{test} does not implement {name}"


def test_every_doc_link_resolves() -> None:
    for doc in [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md",
                ROOT / "examples" / "robustkit-plugin-example" / "README.md"]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.relative_to(ROOT)} links to missing {target}"


def test_quick_start_and_ci_install_the_same_packages() -> None:
    """CI runs the README's test command: the quick start's two commands and ``.ci/run``
    install the same packages (a plugin added to one and not the others goes untested)."""
    installs = r"pip install (-e .*?) &&"
    readme = re.findall(installs, (ROOT / "README.md").read_text())
    ci = re.findall(installs, (ROOT / ".ci" / "run").read_text())
    assert len(readme) == 2 and len(ci) == 1, (readme, ci)
    assert readme[0] == readme[1] == ci[0]
