"""Published training recipes: each resolves to its paper's settings, trains for an epoch, is
recorded in config.json, and yields to flags."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from robustkit.cli import cli
from robustkit.harden.loop import lr_factor
from robustkit.harden.recipes import RECIPES


def harden(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["harden", "builtin:digits-cnn", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_each_recipe_trains_an_epoch_with_its_papers_settings(name: str, tmp_path: Path) -> None:
    recipe = RECIPES[name]
    code, out, err = harden("--recipe", name, "-o", "epochs", "1", "--out", tmp_path, "--json")
    assert code == 0, err
    summary = json.loads(out)
    config = json.loads((tmp_path / "config.json").read_text())
    assert summary["recipe"] == config["recipe"] == name
    assert config["defence"] == f"robustkit:{recipe.defence}"
    assert config["eps"] == pytest.approx(recipe.eps)  # the digits lie in [0, 1], as the recipes assume
    for key, value in recipe.params.items():
        expected = 1 if key == "epochs" else value
        assert config["params"][key] == (pytest.approx(expected) if isinstance(value, float) else expected), key
    assert config["params"]["optimizer"] == "sgd" and config["params"]["nesterov"] is False
    assert summary["epochs_run"] == 1


def test_flags_override_the_recipe_and_conflicts_are_one_line(tmp_path: Path) -> None:
    code, _, err = harden("--recipe", "fast-at", "--eps", "0.1", "-o", "lr", "0.05", "-o", "epochs", "1",
                          "--out", tmp_path / "a", "--json")
    assert code == 0, err
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["eps"] == 0.1 and config["params"]["lr"] == 0.05 and config["params"]["step_factor"] == 1.25
    code, _, err = harden("--recipe", "pgd-at", "--defence", "trades", "--out", tmp_path / "b")
    assert code == 1 and "drop --defence trades" in err and err.count("\n") == 1
    code, _, err = harden("--recipe", "no-such", "--out", tmp_path / "c")
    assert code == 1 and "fast-at" in err


def test_recipes_list_and_show() -> None:
    listed = json.loads(CliRunner().invoke(cli, ["recipes", "list", "--json"]).stdout)
    assert {r["name"] for r in listed} == set(RECIPES) and all(r["source"] for r in listed)
    shown = CliRunner().invoke(cli, ["recipes", "show", "pgd-at"])
    assert shown.exit_code == 0 and "Rice" in shown.stdout and "piecewise" in shown.stdout


def test_piecewise_schedule_divides_by_ten_at_each_milestone() -> None:
    factor = lr_factor("piecewise", 100, (0.5, 0.75))
    assert [factor(t) for t in (0, 49, 50, 74, 75, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
