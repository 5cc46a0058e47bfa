"""The command line through click's CliRunner: JSON on stdout, one-line errors, exit codes."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from robustkit.cli import cli
from robustkit.errors import RobustkitError
from robustkit.plugin.host import Host, PluginRecord


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def json_of(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # exactly one document: json.loads rejects trailing text


def test_plugins_json(host: Host) -> None:
    (row,) = json_of(invoke("plugins", "--json"))
    assert row["name"] == "robustkit.builtins.plugin"
    assert (row["provider"], row["status"], row["source"]) == ("robustkit", "ok", "built-in")
    assert "robustkit_register_attacks" in row["hooks"]


def test_plugins_table(host: Host) -> None:
    result = invoke("plugins")
    assert result.exit_code == 0, result.output
    # the row's status cell, not any "ok" (the header "hooks" holds one)
    (row,) = [line for line in result.stdout.splitlines() if "robustkit.builtins.plugin" in line]
    cells = [cell.strip() for cell in row.strip("│┃| ").split("│")]
    assert cells[:3] == ["robustkit.builtins.plugin", "robustkit", "ok"], cells


def test_attacks_list_json(host: Host) -> None:
    rows = {row["name"]: row for row in json_of(invoke("attacks", "list", "--json"))}
    assert {"robustkit:fgsm", "robustkit:pgd"} <= set(rows)
    pgd = rows["robustkit:pgd"]
    assert pgd["norms"] == ["l2", "linf"] and pgd["targeted"] is True and pgd["gradients"] is True
    assert pgd["per_sample_eps"] is False and rows["robustkit:square"]["per_sample_eps"] is True
    assert pgd["summary"] and "madry" in pgd["aliases"]
    assert [row["name"] for row in json_of(invoke("attacks", "list", "*:fg*", "--json"))] == ["robustkit:fgsm"]
    assert json_of(invoke("attacks", "list", "nothing-*", "--json")) == []


def test_attacks_list_table_and_pattern(host: Host) -> None:
    result = invoke("attacks", "list", "pg*")
    assert result.exit_code == 0 and "robustkit:pgd" in result.stdout and "robustkit:fgsm" not in result.stdout
    assert "no attacks match 'zzz'" in invoke("attacks", "list", "zzz").stdout


def test_attacks_show_json(host: Host) -> None:
    info = json_of(invoke("attacks", "show", "pgd", "--json"))
    assert info["name"] == "robustkit:pgd"
    params = {p["name"]: p for p in info["params"]}
    assert params["steps"] == {"name": "steps", "type": "int", "default": 10, "help": "gradient steps per restart"}
    assert params["step_size"]["default"] is None and params["step_size"]["type"] == "float?"
    assert params["precision"]["type"] == "fp32|bf16|fp16"
    assert all(p["help"] for p in info["params"])
    assert json_of(invoke("attacks", "show", "robustkit:madry", "--json"))["name"] == "robustkit:pgd"


def test_attacks_show_table(host: Host) -> None:
    result = invoke("attacks", "show", "fgsm")
    assert result.exit_code == 0
    assert "robustkit:fgsm" in result.stdout and "precision" in result.stdout and "fp32" in result.stdout


def test_datasets_defences_exporters_list(host: Host) -> None:
    (digits,) = json_of(invoke("datasets", "list", "--json"))
    assert digits["name"] == "robustkit:digits" and "1,797" in digits["summary"]
    assert "robustkit:digits" in invoke("datasets", "list").stdout
    assert json_of(invoke("datasets", "show", "digits", "--json"))["params"] == []
    for plural in ("defences", "exporters"):
        rows = json_of(invoke(plural, "list", "--json"))
        assert all(row["name"].startswith("robustkit:") and "targeted" not in row for row in rows), rows
        assert invoke(plural, "list").exit_code == 0


def test_unknown_attack_is_one_line_exit_1(host: Host) -> None:
    result = invoke("attacks", "show", "pgdd")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "unknown attack 'pgdd'" in result.stderr and "robustkit attacks list" in result.stderr
    assert "Traceback" not in result.output


def test_usage_errors_exit_2(host: Host) -> None:
    assert invoke("attacks", "show").exit_code == 2
    assert invoke("attacks", "list", "--no-such-flag").exit_code == 2
    result = invoke("no-such-command")
    assert result.exit_code == 2 and "No such command" in result.stderr


def test_bad_plugins_dir_is_usage_error(host: Host, tmp_path: Path) -> None:
    file = tmp_path / "file.py"
    file.write_text("")
    assert invoke("--plugins-dir", str(file), "plugins").exit_code == 2


def test_internal_error_without_and_with_verbose(host: Host,
                                                 register_plugin: Callable[..., PluginRecord]) -> None:
    from robustkit.plugin.hookspecs import hookimpl

    class Exploding:
        @hookimpl
        def robustkit_register_commands(self, cli: Any) -> None:

            @cli.command()
            def explode() -> None:
                raise ZeroDivisionError("deep inside")

            @cli.command()
            def refuse() -> None:
                raise RobustkitError("cannot do that; try --other")

    register_plugin(Exploding(), "exploding")
    result = invoke("explode")
    assert result.exit_code == 1
    assert result.stderr == "Error: internal error: ZeroDivisionError: deep inside (run with -v for the traceback)\n"
    verbose = invoke("-v", "explode")
    assert isinstance(verbose.exception, ZeroDivisionError)  # propagates: the traceback is printed
    assert invoke("refuse").stderr == "Error: cannot do that; try --other\n"
    assert isinstance(invoke("-v", "refuse").exception, RobustkitError)


def test_version_and_help(host: Host) -> None:
    assert invoke("--version").stdout.startswith("robustkit, version ")
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("plugins", "attacks", "defences", "exporters", "datasets", "demo"):
        assert command in result.stdout


@pytest.mark.slow
def test_demo_json(host: Host, tmp_path: Path) -> None:
    result = invoke("demo", "--epochs", "2", "--json", "--out", str(tmp_path / "demo"))
    document = json_of(result)
    assert len(document["train_loss"]) == 2 and document["train_loss"][1] < document["train_loss"][0]
    report = document["audit"]
    assert report["clean_accuracy"] > 0.6  # two epochs of a small CNN
    worst = {row["eps"]: row["robust_accuracy"] for row in report["worst_case"]}
    assert sorted(worst) == [0.05, 0.1, 0.2]
    assert worst[0.05] >= worst[0.1] >= worst[0.2] and worst[0.2] < report["clean_accuracy"]
    assert (tmp_path / "demo" / "audit" / "report.json").is_file()
    assert "Traceback" not in result.output
