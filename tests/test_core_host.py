"""The plugin host: a broken plugin is recorded as failed and never breaks anything else."""

from __future__ import annotations

import importlib.metadata
import json
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from robustkit.cli import cli
from robustkit.errors import RobustkitError
from robustkit.plugin.hookspecs import hookimpl
from robustkit.plugin.host import Host, PluginRecord

GOOD_PLUGIN = """
from robustkit import Attack, Norm, hookimpl

class Shove(Attack):
    '''Moves every input by eps.'''
    name = "shove"
    norms = frozenset({Norm.LINF})

    def run(self, model, x, labels, threat):
        return x + threat.eps

@hookimpl
def robustkit_register_attacks(registry):
    registry.add(Shove)
"""


def write_plugins(folder: Path, **files: str) -> Path:
    folder.mkdir(exist_ok=True)
    for stem, source in files.items():
        (folder / f"{stem}.py").write_text(textwrap.dedent(source))
    return folder


def statuses(host: Host) -> dict[str, str]:
    return {r.name: r.status for r in host.plugins()}


def builtins_still_work(host: Host) -> None:
    assert host.attacks.resolve("pgd").qualified_name == "robustkit:pgd"
    assert host.datasets.resolve("digits").qualified_name == "robustkit:digits"


def test_builtins_are_loaded_from_code(host: Host) -> None:
    (record,) = host.plugins()
    assert (record.provider, record.source, record.status) == ("robustkit", "built-in", "ok")
    assert "robustkit_register_attacks" in record.hooks and "robustkit_load_model" in record.hooks
    assert {"robustkit:fgsm", "robustkit:pgd"} <= {e.qualified_name for e in host.attacks}


def test_plugins_dir_file_that_fails_to_import(host: Host, tmp_path: Path) -> None:
    folder = write_plugins(
        tmp_path / "p", broken="import not_a_module_anywhere_xyz\n", good=GOOD_PLUGIN
    )
    host.load_plugins_dir(folder)
    status = statuses(host)
    assert status["broken"].startswith("failed: ModuleNotFoundError")
    assert "not_a_module_anywhere_xyz" in status["broken"]
    assert status["good"] == "ok"
    assert host.attacks.resolve("shove").qualified_name == "good:shove"
    builtins_still_work(host)


def test_hook_with_a_wrong_signature(
    host: Host, register_plugin: Callable[..., PluginRecord]
) -> None:
    class WrongSignature:
        @hookimpl
        def robustkit_register_attacks(self, registry: Any, colour: str) -> None:
            raise AssertionError("never called")

    record = register_plugin(WrongSignature(), "wrongsig")
    assert record.status.startswith("failed: PluginValidationError")
    assert (
        "{'colour'} are declared in the hookimpl but can not be found in the hookspec"
        in record.status
    )
    assert "\n" not in record.status
    assert host.pm.get_plugin("wrongsig") is None
    builtins_still_work(host)


def test_unknown_hook_name(host: Host, register_plugin: Callable[..., PluginRecord]) -> None:
    class Typo:
        @hookimpl
        def robustkit_register_attack(self, registry: Any) -> None:  # missing "s"
            raise AssertionError("never called")

    record = register_plugin(Typo(), "typo")
    assert record.status.startswith("failed: RobustkitError")
    assert "robustkit_register_attack" in record.status
    builtins_still_work(host)


def test_register_hook_that_raises_is_rolled_back(
    host: Host,
    make_attack: Callable[..., type],
    register_plugin: Callable[..., PluginRecord],
    tmp_path: Path,
) -> None:
    early = make_attack("early")

    class HalfWay:
        @hookimpl
        def robustkit_register_attacks(self, registry: Any) -> None:
            registry.add(early)
            raise ValueError("lost my config")

        @hookimpl
        def robustkit_load_model(self, ref: str, options: Any) -> Any:
            raise AssertionError("a failed plugin must not be asked to load models")

    register_plugin(HalfWay(), "halfway")
    assert statuses(host)["halfway"] == "failed: ValueError: lost my config"
    assert host.attacks.list("halfway:*") == []  # what it registered before failing is gone
    unknown_format = tmp_path / "model.xyz"
    unknown_format.write_bytes(b"not a model")
    assert host.first_result("robustkit_load_model", ref=str(unknown_format), options=None) is None
    builtins_still_work(host)


def test_register_hook_failing_after_registries_exist(
    host: Host, register_plugin: Callable[..., PluginRecord]
) -> None:
    builtins_still_work(host)  # registries built first: the late plugin registers at once

    class Late:
        @hookimpl
        def robustkit_register_datasets(self, registry: Any) -> None:
            raise KeyError("late")

    record = register_plugin(Late(), "late")
    assert record.status == "failed: KeyError: 'late'"
    builtins_still_work(host)


def test_duplicate_name_charged_to_the_later_plugin(
    host: Host, make_attack: Callable[..., type], register_attacks: Callable[..., PluginRecord]
) -> None:
    register_attacks("first", make_attack("zap"), provider="shared")
    register_attacks("second", make_attack("zap"), make_attack("zip"), provider="shared")
    status = statuses(host)
    assert status["first"] == "ok"
    assert status["second"].startswith("failed: DuplicateNameError")
    assert "'first'" in status["second"] and "'second'" in status["second"]
    assert host.attacks.resolve("zap").plugin == "first"
    assert host.attacks.list("zip") == []


def test_a_plugin_claiming_the_builtin_provider_cannot_knock_out_builtins(
    host: Host, make_attack: Callable[..., type], register_attacks: Callable[..., PluginRecord]
) -> None:
    register_attacks("impostor", make_attack("pgd"), make_attack("novel"), provider="robustkit")
    status = statuses(host)
    assert status["robustkit.builtins.plugin"] == "ok"
    assert status["impostor"].startswith("failed: the provider name 'robustkit' is reserved")
    builtins_still_work(host)
    assert host.attacks.resolve("pgd").plugin == "robustkit.builtins.plugin"
    assert host.attacks.list("novel") == []  # nothing registers under the core's name


def test_a_plugins_dir_file_named_robustkit_is_refused(tmp_path: Path) -> None:
    (tmp_path / "robustkit.py").write_text(
        "from robustkit import hookimpl\n"
        "from robustkit.attacks.native import PGD\n"
        "class Impostor(PGD):\n    name = 'apgd'\n"
        "@hookimpl\ndef robustkit_register_attacks(registry):\n    registry.add(Impostor)\n"
    )
    host = Host(plugins_dirs=[tmp_path])
    record = next(r for r in host.plugins() if r.source.startswith("file"))
    assert "reserved" in record.status
    assert host.attacks.resolve("apgd").obj.__module__ == "robustkit.attacks.apgd"


def test_same_plugin_name_twice(host: Host, register_plugin: Callable[..., PluginRecord]) -> None:
    register_plugin(object(), "twin")
    record = register_plugin(object(), "twin")
    assert record.status.startswith("failed: a plugin named 'twin' is already loaded")
    assert [r.status for r in host.plugins() if r.name == "twin"] == ["ok", record.status]


def test_disable_plugins_env(monkeypatch: pytest.MonkeyPatch, host: Host, tmp_path: Path) -> None:
    folder = write_plugins(tmp_path / "p", good=GOOD_PLUGIN, other=GOOD_PLUGIN)
    monkeypatch.setenv("ROBUSTKIT_DISABLE_PLUGINS", "good, unrelated")
    fresh = Host(entry_points=False, plugins_dirs=[folder])
    status = statuses(fresh)
    assert status["good"] == "disabled"
    assert status["other"] == "ok"
    assert [e.qualified_name for e in fresh.attacks.list("*shove")] == ["other:shove"]


def test_strict_plugins_env_reraises(
    monkeypatch: pytest.MonkeyPatch, host: Host, tmp_path: Path
) -> None:
    folder = write_plugins(tmp_path / "p", broken="raise ImportError('no backend here')\n")
    monkeypatch.setenv("ROBUSTKIT_STRICT_PLUGINS", "1")
    with pytest.raises(ImportError, match="no backend here"):
        Host(entry_points=False, plugins_dirs=[folder])
    monkeypatch.setenv("ROBUSTKIT_STRICT_PLUGINS", "0")
    assert statuses(Host(entry_points=False, plugins_dirs=[folder]))["broken"].startswith(
        "failed: ImportError"
    )


def test_plugins_dir_must_exist(host: Host, tmp_path: Path) -> None:
    with pytest.raises(RobustkitError, match="not a directory"):
        host.load_plugins_dir(tmp_path / "missing")


def test_plugins_dir_through_the_cli(host: Host, tmp_path: Path) -> None:
    folder = write_plugins(tmp_path / "p", mine=GOOD_PLUGIN, broken="1/0\n")
    runner = CliRunner()
    result = runner.invoke(cli, ["--plugins-dir", str(folder), "attacks", "list", "--json"])
    assert result.exit_code == 0, result.output
    names = [row["name"] for row in json.loads(result.stdout)]
    assert "mine:shove" in names and "robustkit:pgd" in names
    result = runner.invoke(cli, ["--plugins-dir", str(folder), "plugins", "--json"])
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["mine"]["status"] == "ok" and rows["mine"]["source"].startswith("file ")
    assert rows["broken"]["status"] == "failed: ZeroDivisionError: division by zero"
    plain = runner.invoke(cli, ["--plugins-dir", str(folder), "attacks", "list"])
    assert plain.exit_code == 0 and "mine:shove" in plain.stdout


def _fake_entry_points(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **modules: str) -> None:
    """Installed-plugin stand-ins: one module per entry point, found through sys.path."""
    folder = write_plugins(tmp_path / "site", **modules)
    monkeypatch.syspath_prepend(str(folder))
    points = [
        importlib.metadata.EntryPoint(name=stem.removeprefix("rk_"), value=stem, group="robustkit")
        for stem in modules
    ]

    def entry_points(**selection: Any) -> list[importlib.metadata.EntryPoint]:
        return points if selection.get("group") == "robustkit" else []

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


COMMAND_PLUGIN = """
import click
from robustkit import hookimpl

@hookimpl
def robustkit_register_commands(cli):
    @cli.command()
    def hello():
        click.echo("hello from a plugin")
"""


def test_entry_point_plugins_load_each_in_its_own_try(
    monkeypatch: pytest.MonkeyPatch, host: Host, tmp_path: Path
) -> None:
    _fake_entry_points(
        monkeypatch,
        tmp_path,
        rk_good=GOOD_PLUGIN,
        rk_cmd=COMMAND_PLUGIN,
        rk_broken="raise RuntimeError('torch too old for this plugin')\n",
        rk_badsig="from robustkit import hookimpl\n@hookimpl\ndef robustkit_load_model(ref, options, extra):\n"
        "    return None\n",
    )
    installed = Host()
    status = statuses(installed)
    assert status["good"] == "ok" and status["cmd"] == "ok"
    assert status["broken"] == "failed: RuntimeError: torch too old for this plugin"
    assert status["badsig"].startswith("failed: PluginValidationError")
    assert installed.attacks.resolve("shove").qualified_name == "good:shove"
    builtins_still_work(installed)

    monkeypatch.setattr("robustkit.plugin.host._host", None)  # the CLI builds its host from entry points
    runner = CliRunner()
    result = runner.invoke(cli, ["hello"])
    assert result.exit_code == 0 and result.stdout == "hello from a plugin\n"
    result = runner.invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0
    rows = {row["name"]: row["status"] for row in json.loads(result.stdout)}
    assert rows["broken"].startswith("failed:") and rows["good"] == "ok"


def test_failing_command_hook_keeps_other_commands(
    host: Host, register_plugin: Callable[..., PluginRecord]
) -> None:
    class BadCommands:
        @hookimpl
        def robustkit_register_commands(self, cli: click.Group) -> None:
            raise RuntimeError("cannot build my command")

    register_plugin(BadCommands(), "badcmd")
    result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row["status"] for row in json.loads(result.stdout)}
    assert rows["badcmd"] == "failed: RuntimeError: cannot build my command"


def test_crashing_loader_is_charged_to_its_plugin_and_the_next_loader_answers(
    host: Host, register_plugin: Callable[..., PluginRecord], caplog: pytest.LogCaptureFixture
) -> None:
    from robustkit.models.loading import load_model

    class CrashingLoader:
        @hookimpl
        def robustkit_load_model(self, ref: str, options: Any) -> Any:
            raise OSError("disk on fire\nsecond line")

    class RefusingLoader:
        @hookimpl
        def robustkit_load_model(self, ref: str, options: Any) -> Any:
            raise RobustkitError(f"refusing {ref}: not my format")

    register_plugin(CrashingLoader(), "crashy")
    register_plugin(RefusingLoader(), "refuser")
    # every model still loads: the built-in loader answers after the two plugins declined
    assert load_model("builtin:digits-cnn").format == "builtin"
    assert "plugin 'crashy' failed in robustkit_load_model: OSError: disk on fire; second line" in caplog.text
    # when nobody answers, the first refusal or failure is the one-line error
    with pytest.raises(RobustkitError) as info:
        host.first_result("robustkit_load_model", ref="x.bin", options=None)
    assert str(info.value) == "refusing x.bin: not my format"


def test_wrapper_hooks_work_through_pluggy_dispatch(host: Host, register_plugin: Callable[..., PluginRecord]) -> None:
    """Hooks are called by pluggy itself, so a ``wrapper=True`` implementation wraps the call
    (a host calling each function by hand would hand back its generator instead)."""
    from robustkit.models.base import LoadOptions
    from robustkit.models.loading import load_model

    seen: list[str] = []

    class Wrapping:
        @hookimpl(wrapper=True)
        def robustkit_load_model(self, ref: str, options: Any) -> Any:
            loaded = yield
            loaded.notes.append(f"seen by the wrapper: {ref}")
            return loaded

        @hookimpl(wrapper=True)
        def robustkit_register_attacks(self, registry: Any) -> Any:
            seen.append(registry.kind)
            return (yield)

    record = register_plugin(Wrapping(), "wrapping")
    assert record.ok, record.status
    loaded = load_model("builtin:digits-cnn", LoadOptions())
    assert loaded.notes[-1] == "seen by the wrapper: builtin:digits-cnn"
    assert host.attacks.resolve("pgd").qualified_name == "robustkit:pgd"  # built-ins registered inside
    assert seen == ["attack"]
    assert {r.name: r.status for r in host.plugins()}["wrapping"] == "ok"


def test_tryfirst_loader_is_asked_before_the_built_in(host: Host, register_plugin: Callable[..., PluginRecord]) -> None:
    calls: list[str] = []

    class Early:
        @hookimpl(tryfirst=True)
        def robustkit_load_model(self, ref: str, options: Any) -> Any:
            calls.append(ref)

    class Late:
        @hookimpl(trylast=True)
        def robustkit_load_model(self, ref: str, options: Any) -> Any:
            raise AssertionError("firstresult: the built-in answered, nobody after it is asked")

    register_plugin(Late(), "late")
    register_plugin(Early(), "early")
    from robustkit.models.loading import load_model

    assert load_model("builtin:digits-cnn").format == "builtin"
    assert calls == ["builtin:digits-cnn"]
