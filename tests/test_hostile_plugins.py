"""Plugins are guests (issue 15): an attack that edits the model's weights or raises is named,
left out of the figures, and the audit goes on with the weights restored and the other
attacks; a training defence's inner attack that edits the weights stops training with a
one-line error naming it."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import Tensor

from robustkit.attacks.native import PGD
from robustkit.cli import cli
from robustkit.modules import Model
from robustkit.plugin.host import PluginRecord
from robustkit.testing import trained_digits_model
from robustkit.threat import ThreatModel


class Vandal(PGD):
    """Zeroes the model's weights, then attacks the wreck: robust accuracy would collapse."""

    name = "vandal"
    aliases = ()

    def run(self, model: Model, x: Tensor, labels: Tensor, threat: ThreatModel) -> Tensor:
        with torch.no_grad():
            for parameter in model.parameters():  # type: ignore[union-attr]
                parameter.zero_()
        return super().run(model, x, labels, threat)


class Exploding(PGD):
    name = "exploding"
    aliases = ()

    def run(self, model: Model, x: Tensor, labels: Tensor, threat: ThreatModel) -> Tensor:
        raise RuntimeError("attack exploded")


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "cnn.safetensors"
    save_file(trained_digits_model("cnn").state_dict(), str(path))
    return path


def audit(weights: Path, out: Path, *attacks: str) -> Any:
    args = ["audit", str(weights), "--arch", "builtin:digits-cnn", "--eps", "0.1", "--limit", "100",
            "--mode", "per-attack", "--no-certify", "--check-samples", "16", "--out", str(out), "--json"]
    for attack in attacks:
        args += ["--attack", attack]
    return CliRunner().invoke(cli, args)


@pytest.mark.parametrize(
    ("bad", "error"), [("vandal", "changed the model's weights"), ("exploding", "attack exploded")]
)
def test_a_failing_attack_is_named_left_out_and_the_audit_goes_on(
    bad: str, error: str, weights: Path, tmp_path: Path, register_attacks: Callable[..., PluginRecord]
) -> None:
    register_attacks("guest", Vandal, Exploding)
    honest = audit(weights, tmp_path / "honest", "pgd", "fgsm")
    assert honest.exit_code in (0, 3), honest.output
    result = audit(weights, tmp_path / "guest", "pgd", f"guest:{bad}", "fgsm")
    assert result.exit_code == 3, result.output  # a failed check: the audit is not the one asked for
    report = json.loads((tmp_path / "guest" / "report.json").read_text())
    expected = json.loads((tmp_path / "honest" / "report.json").read_text())
    failed = [c for c in report["checks"] if c["name"] == "attacks completed"]
    assert failed and failed[0]["status"] == "fail" and f"guest:{bad}" in failed[0]["detail"]
    assert error in failed[0]["detail"]
    # the attacks after it ran on the restored weights: the same figures as without the guest
    rows = {(r["attack"], r["eps"]): r["robust_accuracy"] for r in report["results"]}
    for row in expected["results"]:
        assert rows[(row["attack"], row["eps"])] == row["robust_accuracy"], row
    assert report["worst_case"][0]["robust_accuracy"] == expected["worst_case"][0]["robust_accuracy"]
    assert "attacks completed" in (tmp_path / "guest" / "report.md").read_text()


def test_an_inner_attack_that_edits_the_weights_stops_training(
    tmp_path: Path, register_attacks: Callable[..., PluginRecord]
) -> None:
    register_attacks("guest", Vandal)
    result = CliRunner().invoke(cli, ["harden", "builtin:digits-cnn", "--defence", "pgd-at", "--attack",
                                      "guest:vandal", "-o", "epochs", "1", "--out", str(tmp_path / "h")])
    assert result.exit_code == 1, result.output
    assert "'vandal' changed the model's weights" in result.stderr and result.stderr.count("\n") == 1
