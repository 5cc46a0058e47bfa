"""The example plugin distribution, registered through the entry-point group as an install
would register it, and the one-file ``--plugins-dir`` example.

Installing the example into a fresh environment for every run is slow, so the entry point is
simulated: ``importlib.metadata.entry_points`` returns an ``EntryPoint`` naming the example's
plugin module, with the example's folder on ``sys.path``. Everything after that (loading,
``robustkit plugins``, resolving ``example:momentum``, an audit) is the real code path.
"""
from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import save_file

from robustkit.cli import cli
from robustkit.plugin import host as host_module
from robustkit.testing import check_attack_contract

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXAMPLE = EXAMPLES / "robustkit-plugin-example"
PLUGINS_DIR = EXAMPLES / "plugins_dir"


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def fake_entry_points(monkeypatch: pytest.MonkeyPatch, *fakes: importlib.metadata.EntryPoint) -> None:
    """Make ``entry_points(group="robustkit")`` return ``fakes`` and nothing that is installed."""
    original = importlib.metadata.entry_points

    def entry_points(**params: Any) -> Any:
        if params.get("group") == host_module.ENTRY_POINT_GROUP:
            return importlib.metadata.EntryPoints(fakes)
        return original(**params)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    for name in ("ROBUSTKIT_DISABLE_PLUGINS", "ROBUSTKIT_STRICT_PLUGINS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(host_module, "_host", None)  # the CLI builds a fresh host with entry points
    monkeypatch.setattr(host_module, "_plugins_dirs", ())


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example distribution as ``pip install examples/robustkit-plugin-example`` leaves it."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    fake_entry_points(monkeypatch, importlib.metadata.EntryPoint(
        name="example", value="robustkit_plugin_example.plugin", group=host_module.ENTRY_POINT_GROUP))


def test_pyproject_declares_the_entry_point_the_test_simulates() -> None:
    text = (EXAMPLE / "pyproject.toml").read_text()
    assert '[project.entry-points.robustkit]\nexample = "robustkit_plugin_example.plugin"\n' in text
    assert 'dependencies = ["robustkit"]' in text


def test_listed_by_plugins_and_attacks_list(installed: None) -> None:
    result = invoke("plugins", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert {name for name, row in rows.items() if row["source"].startswith("entry point")} == {"example"}
    assert rows["example"]["status"] == "ok"
    assert rows["example"]["source"] == "entry point robustkit_plugin_example.plugin"
    assert rows["example"]["hooks"] == [
        "robustkit_register_attacks", "robustkit_register_datasets", "robustkit_report_sections"]
    attacks = {a["name"]: a for a in json.loads(invoke("attacks", "list", "--json").stdout)}
    assert attacks["example:momentum"]["norms"] == ["l2", "linf"]
    assert attacks["example:momentum"]["aliases"] == ["mi-fgsm"]
    assert "example:momentum" in invoke("attacks", "list", "example:*").stdout  # the table too
    assert "decay" in invoke("attacks", "show", "mi-fgsm").stdout
    datasets = {d["name"]: d for d in json.loads(invoke("datasets", "list", "--json").stdout)}
    assert datasets["example:shapes"]["summary"].startswith("procedural 8x8 shapes (ring, disc")


def test_disabled_by_environment(installed: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROBUSTKIT_DISABLE_PLUGINS", "example")
    rows = {row["name"]: row for row in json.loads(invoke("plugins", "--json").stdout)}
    assert rows["example"]["status"] == "disabled"
    result = invoke("attacks", "show", "example:momentum")
    assert result.exit_code == 1 and "unknown attack 'example:momentum'" in result.stderr


@pytest.fixture(scope="module")
def shapes_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """builtin:digits-cnn trained briefly on example:shapes (the shapes are 8x8 like digits)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(EXAMPLE))
        from robustkit_plugin_example.shapes import load_shapes
    from robustkit.models.zoo import digits_cnn
    from robustkit.train import FitConfig, fit

    data = load_shapes(n_train=600, n_eval=60)
    assert data.x_train is not None and data.y_train is not None
    torch.manual_seed(0)
    model = digits_cnn()
    fit(model, data.x_train, data.y_train, FitConfig(epochs=8, batch_size=32, lr=3e-3))
    path = tmp_path_factory.mktemp("shapes") / "shapes-cnn.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def test_audit_with_the_plugins_attack_data_set_and_report_sections(installed: None, shapes_weights: Path,
                                                                    tmp_path: Path) -> None:
    result = invoke("audit", str(shapes_weights), "--arch", "builtin:digits-cnn", "--data", "example:shapes",
                    "--attack", "fgsm", "--attack", "example:momentum", "-o", "example:momentum.steps", "5",
                    "--eps", "0.02,0.05", "--mode", "per-attack", "--limit", "40", "--no-checks", "--json",
                    "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["data"]["source"].startswith("example:shapes") and report["n"] == 40
    assert report["clean_accuracy"] > 0.8  # trained: the audit measures something
    rows = {(r["attack"], r["eps"]): r for r in report["results"]}
    assert rows[("example:momentum", 0.02)]["params"]["steps"] == 5
    for eps in (0.02, 0.05):  # per-attack: each attack's own accuracy
        assert rows[("example:momentum", eps)]["robust_accuracy"] <= rows[("robustkit:fgsm", eps)]["robust_accuracy"]
    assert rows[("example:momentum", 0.05)]["robust_accuracy"] < report["clean_accuracy"]
    assert [(s["plugin"], s["title"]) for s in report["sections"]] == [
        ("example", "About example:shapes"), ("example", "About example:momentum")]
    assert "About example:momentum" in (tmp_path / "report.md").read_text()


def test_plugins_dir_example(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_entry_points(monkeypatch)
    result = invoke("--plugins-dir", str(PLUGINS_DIR), "attacks", "list", "--json")
    assert result.exit_code == 0, result.output
    noise = {a["name"]: a for a in json.loads(result.stdout)}["noise:noise"]
    assert noise["gradients"] is False and noise["norms"] == ["linf"]
    records = {r.name: r for r in host_module.get_host().plugins()}
    assert records["noise"].source == f"file {PLUGINS_DIR / 'noise.py'}"
    check_attack_contract(host_module.get_host().attacks.resolve("noise:noise").obj())


def test_plugins_dir_training_defence_runs_on_the_engine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """examples/plugins_dir/mart.py: a third-party training defence written against the public
    API only, trained by ``robustkit harden`` like a built-in one."""
    fake_entry_points(monkeypatch)
    result = invoke("--plugins-dir", str(PLUGINS_DIR), "harden", "builtin:digits-cnn", "--data", "builtin:digits",
                    "--defence", "mart", "--eps", "0.2", "--epochs", "4", "-o", "canary_size", "128",
                    "--json", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["defence"] == "mart:mart" and summary["params"]["beta"] == 6.0
    # plain training leaves about 2% at this eps (benchmarks/training_cost.py)
    assert summary["after"]["robust_accuracy"] >= 0.3, summary["after"]
    assert (tmp_path / "model.safetensors").is_file()
