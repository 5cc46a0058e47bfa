"""The audit's number must be right: suites, the scale-invariant loss, and no silent wrong result.

Each test reproduces a case where an earlier robustkit printed a too-high robustness figure
with green checks: a model whose softmax saturates, a model fed the wrong input scaling,
checks run at an eps where nothing breaks.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import Tensor, nn

from robustkit.attacks.fmn import FMN
from robustkit.audit.engine import NamedAttack, evaluate
from robustkit.audit.run import AuditConfig, run_audit
from robustkit.audit.suites import SUITES
from robustkit.cli import cli
from robustkit.data import load_digits
from robustkit.models.base import LoadOptions
from robustkit.models.zoo import digits_cnn
from robustkit.testing import trained_digits_model
from robustkit.threat import Norm, ThreatModel, per_sample_norm

pytestmark = pytest.mark.usefixtures("host")

#: The default suite with fewer steps and queries, so that a test costs seconds.
LIGHT = (("apgd.steps", "20"), ("apgd-t.steps", "20"), ("fmn.steps", "40"), ("square.queries", "200"))


class ScaledLogits(nn.Module):
    """Logits times 1000: the softmax saturates and cross-entropy gradients vanish."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return 1000.0 * self.net(x)


def scaled_digits_cnn() -> nn.Module:
    return ScaledLogits(digits_cnn())


def _audit(model: str, arch: str, **kwargs) -> dict:
    config = AuditConfig(model, load=LoadOptions(arch=arch), limit=kwargs.pop("limit", 120),
                         options=kwargs.pop("options", LIGHT), **kwargs)
    return run_audit(config)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "cnn.safetensors"
    save_file(trained_digits_model("cnn").state_dict(), str(path))
    return path


def test_default_suite_breaks_a_model_whose_softmax_saturates(weights, tmp_path):
    """Cross-entropy alone leaves such a model looking robust; the DLR loss of APGD-T does not care
    about the logits' scale, so the default suite finds what it finds on the unscaled model."""
    scaled = tmp_path / "scaled.safetensors"
    save_file({f"net.{k}": v for k, v in trained_digits_model("cnn").state_dict().items()}, str(scaled))
    plain = _audit(str(weights), "builtin:digits-cnn", eps=(0.1,), run_checks=False)
    saturated = _audit(str(scaled), f"{Path(__file__).resolve()}:scaled_digits_cnn", eps=(0.1,), run_checks=False)
    assert saturated["clean_accuracy"] == plain["clean_accuracy"]
    plain_worst = plain["worst_case"][0]["robust_accuracy"]
    saturated_worst = saturated["worst_case"][0]["robust_accuracy"]
    assert saturated_worst <= plain_worst + 0.03, (plain_worst, saturated_worst)
    assert saturated_worst < plain["clean_accuracy"] - 0.2  # broken, not only flagged
    by_attack = {r["attack"]: r["robust_accuracy"] for r in saturated["results"]}
    assert by_attack["robustkit:apgd-t"] < by_attack["robustkit:apgd"] - 0.1  # where the break comes from


def test_a_model_at_chance_is_not_attacked_and_fails_loudly(tmp_path):
    """An untrained model (as a model fed inputs without its --mean/--std is): clean accuracy at
    chance; the attacks would 'measure' 10% robust accuracy with every check green."""
    path = tmp_path / "untrained.safetensors"
    torch.manual_seed(3)
    save_file(digits_cnn().state_dict(), str(path))
    result = CliRunner().invoke(cli, ["audit", str(path), "--arch", "builtin:digits-cnn", "--out", str(tmp_path / "r")])
    assert result.exit_code == 3, result.output
    assert "clean accuracy is at chance" in result.output and "--mean/--std" in result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["results"] == [] and report["worst_case"] == []  # no robustness figure at all
    (check,) = [c for c in report["checks"] if c["name"] == "clean accuracy above chance"]
    assert check["status"] == "fail"
    assert "clean accuracy is at chance" in (tmp_path / "r" / "report.md").read_text()
    assert "clean accuracy is at chance" in (tmp_path / "r" / "report.html").read_text()


def test_checks_that_compare_attacks_run_where_samples_break(weights):
    """At 1e-4 nothing breaks; at 0.1 many do: the comparisons run at 0.1."""
    report = _audit(str(weights), "builtin:digits-cnn", eps=(1e-4, 0.1), check_samples=64)
    status = {c["name"]: (c["status"], c["detail"]) for c in report["checks"]}
    assert status["iterative >= fgsm"][0] == "pass" and "at eps 0.1" in status["iterative >= fgsm"][1]
    assert "at eps 0.1" in status["convergence"][1]


def test_a_check_with_nothing_to_test_says_so(weights):
    report = _audit(str(weights), "builtin:digits-cnn", eps=(1e-4,), check_samples=64)
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert status["iterative >= fgsm"] == "untested"
    assert status["convergence"] == "untested"
    assert report["worst_case"][0]["robust_accuracy"] == report["clean_accuracy"]


def test_suites_are_listed_and_named_in_the_report(weights, tmp_path):
    listed = CliRunner().invoke(cli, ["suites", "list", "--json"])
    assert listed.exit_code == 0
    assert [s["name"] for s in json.loads(listed.output)] == list(SUITES)
    shown = CliRunner().invoke(cli, ["suites", "show", "autoattack"])
    assert "FAB-T" in shown.output and "n_target_classes=9" in shown.output
    result = CliRunner().invoke(cli, ["audit", str(weights), "--arch", "builtin:digits-cnn", "--suite", "quick",
                                      "--eps", "0.1", "--limit", "60", "--out", str(tmp_path / "q")])
    assert result.exit_code == 0, result.output
    assert "not a robustness claim" in result.output
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    assert report["config"]["suite"]["name"] == "quick"
    assert report["config"]["attacks"] == ["robustkit:fgsm", "robustkit:apgd"]
    assert [r["params"]["steps"] for r in report["results"] if r["attack"] == "robustkit:apgd"] == [20]
    assert "not a robustness claim" in (tmp_path / "q" / "report.md").read_text()
    unknown = CliRunner().invoke(cli, ["suites", "show", "strong"])
    assert unknown.exit_code == 1 and "default, autoattack, quick" in unknown.output


def test_default_suite_is_autoattacks_components_natively(weights):
    report = _audit(str(weights), "builtin:digits-cnn", eps=(0.1,), run_checks=False)
    assert report["config"]["suite"]["name"] == "default"
    assert report["config"]["attacks"] == ["robustkit:fgsm", "robustkit:apgd", "robustkit:apgd-t", "robustkit:fmn",
                                           "robustkit:square"]
    losses = {r["attack"]: r["params"].get("loss") for r in report["results"]}
    assert losses["robustkit:apgd"] == "ce"


def test_a_minimum_norm_attack_runs_once_and_settles_every_eps():
    """One FMN run per sample; a sample counts as broken at the smallest audited eps that holds
    the example it found, exactly as the example's norm says."""
    data = load_digits()
    model = trained_digits_model("cnn")
    x, y = data.x[:80], data.y[:80]
    eps = [0.03, 0.06, 0.1, 0.15]
    attack = FMN(steps=40)
    threats = [ThreatModel(Norm.LINF, e) for e in eps]
    evaluation = evaluate(model, x, y, [NamedAttack("robustkit:fmn", attack)], threats)
    (outcome,) = evaluation.outcomes
    # every sample stands at every eps before this only attack: one row each, at the largest eps
    assert [e for e, seconds in outcome.seconds.items() if seconds > 0] == [eps[-1]]
    direct = attack(model, x, y, threat=threats[-1])
    found = per_sample_norm(direct.x_adv - x, Norm.LINF)
    for e in eps:
        expected = float(((~direct.success | (found > e + 1e-5)) & evaluation.clean_correct).float().mean())
        assert abs(evaluation.robust_accuracy(outcome, e) - expected) <= 1 / 80, e
    assert evaluation.robust_accuracy(outcome, eps[0]) > evaluation.robust_accuracy(outcome, eps[-1])
