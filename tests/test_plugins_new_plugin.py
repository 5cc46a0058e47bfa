"""``robustkit new-plugin``: the skeleton registers, passes its own tests and lint as written."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from robustkit.cli import cli
from robustkit.cli.new_plugin import KINDS, Names
from robustkit.plugin.host import Host


def new_plugin(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["new-plugin", *args])
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("kind", KINDS)
def test_skeleton_registers_and_its_tests_pass(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"scaffold-{kind}"  # a distinct package per kind: modules stay cached in sys.modules
    root = tmp_path / "plugin"
    code, stdout, _ = new_plugin(name, "--kind", kind, "--dir", str(root))
    assert code == 0, stdout
    package = f"robustkit_scaffold_{kind}"
    written = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert written == sorted(["README.md", "pyproject.toml", f"{package}/__init__.py", f"{package}/plugin.py",
                              f"{package}/{kind}.py", f"{package}/py.typed", f"tests/test_{package}.py"])
    assert f"pip install -e {root}" in stdout
    assert f'{name} = "{package}.plugin"' in (root / "pyproject.toml").read_text()

    monkeypatch.syspath_prepend(str(root))
    module = importlib.import_module(f"{package}.plugin")
    host = Host(entry_points=False)
    record = host.register(module, name)
    assert record.ok, record.status
    assert record.hooks == [f"robustkit_register_{kind}s"]
    entry = host.registries[f"{kind}s"].resolve(f"{name}:{name}")
    assert entry.plugin == name and entry.summary

    env = {**os.environ, "ROBUSTKIT_NO_PROGRESS": "1", "ROBUSTKIT_STRICT_PLUGINS": "1"}
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"],
                           cwd=root, env=env, capture_output=True, text=True)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    assert " passed" in tests.stdout and "skipped" not in tests.stdout
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=root,
                          capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_names_derived_from_the_provider_name() -> None:
    assert Names.parse("my-attacks") == Names("my-attacks", "robustkit_my_attacks", "robustkit-my-attacks",
                                              "MyAttacks")
    assert Names.parse("jpeg_2").package == "robustkit_jpeg_2"


@pytest.mark.parametrize("name", ["My-Plugin", "1st", "my plugin", "a--b", "trailing-", "robustkit", "builtin",
                                  "robustkit-foo"])
def test_invalid_names_are_refused_in_one_line(name: str, tmp_path: Path) -> None:
    code, _, stderr = new_plugin(name, "--dir", str(tmp_path / "out"))
    assert code == 1
    assert stderr.startswith(f"Error: plugin name {name!r} is ") and stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_non_empty_folder_is_refused_and_an_empty_one_used(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    code, _, stderr = new_plugin("foo", "--dir", str(tmp_path))
    assert (code, stderr) == (1, f"Error: {tmp_path} exists and is not empty; choose another --dir or remove it\n")
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert new_plugin("foo", "--dir", str(empty))[0] == 0
    assert (empty / "robustkit_foo" / "attack.py").is_file()


def test_default_folder_is_named_after_the_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert new_plugin("bar", "--kind", "exporter")[0] == 0
    assert (tmp_path / "robustkit-bar" / "robustkit_bar" / "exporter.py").is_file()
