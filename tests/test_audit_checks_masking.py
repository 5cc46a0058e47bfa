"""The gradients check and the large-eps probe tell masking from a saturated softmax, and survive
a model with no gradient at all.

A model whose output has no graph (argmax) crashed the audit; a model whose logits are scaled
by 1e4 failed both checks although the default suite's DLR attack breaks it as if unscaled. A
suite of cross-entropy attacks only, or a model that rounds its input, must still fail.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import Tensor, nn

from robustkit.attacks.apgd import APGD, APGDT, APGDParams, APGDTParams
from robustkit.attacks.square import Square, SquareParams
from robustkit.audit import checks
from robustkit.audit.engine import AttackOutcome, Evaluation, NamedAttack
from robustkit.cli import cli
from robustkit.data import load_digits
from robustkit.threat import Norm, ThreatModel

pytestmark = pytest.mark.usefixtures("host")

CE = NamedAttack("robustkit:apgd", APGD(APGDParams(steps=10)))
DLR = NamedAttack("robustkit:apgd-t", APGDT(APGDTParams(steps=10, n_target_classes=3)))
SQUARE = NamedAttack("robustkit:square", Square(SquareParams(queries=100)))
#: the default suite, light: the checks see the same kinds of attacks in seconds
LIGHT = ("-o", "apgd.steps", "10", "-o", "apgd-t.steps", "10", "-o", "fmn.steps", "20", "-o", "square.queries", "100")


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


class Wrap(nn.Module):
    def __init__(self, net: nn.Module | None = None) -> None:
        super().__init__()
        self.net = net if net is not None else mlp()


class OneHot(Wrap):
    """The argmax as a one-hot vector: no graph back to the input."""

    def forward(self, x: Tensor) -> Tensor:
        return F.one_hot(self.net(x).argmax(1), 10).float() * 10


class Detached(Wrap):
    """A graph through the weights only: the input is unused."""

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.detach())


class Scaled(Wrap):
    """Logits times 1e4: the softmax saturates, the margin keeps its gradient."""

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) * 1e4


class Rounded(Wrap):
    """Input rounded to 8 bits: a zero gradient for every loss (masking)."""

    def forward(self, x: Tensor) -> Tensor:
        return self.net(torch.round(x * 255) / 255)


def one_hot_mlp() -> nn.Module:
    return OneHot()


def scaled_mlp() -> nn.Module:
    return Scaled()


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, Tensor, Tensor]:
    """A small MLP trained on the digits (a second), and 48 test digits it classifies right."""
    torch.manual_seed(0)
    data = load_digits()
    assert data.x_train is not None and data.y_train is not None
    net = mlp()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        F.cross_entropy(net(data.x_train), data.y_train).backward()
        optimizer.step()
    net.eval()
    with torch.no_grad():
        correct = net(data.x).argmax(1) == data.y
    return net, data.x[correct][:48], data.y[correct][:48]


@pytest.fixture(scope="module")
def wrapped_weights(trained, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "wrapped.safetensors"
    save_file({f"net.{k}": v for k, v in trained[0].state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("wrapper", [OneHot, Detached])
def test_an_output_without_gradient_fails_the_check_without_raising(trained, wrapper):
    net, x, y = trained
    check = checks.gradients(wrapper(net), x, y, [CE, DLR])
    assert check.status == "fail" and "no gradient at all" in check.detail, check


def test_a_saturated_softmax_fails_only_a_suite_of_cross_entropy_attacks(trained):
    net, x, y = trained
    model = Scaled(net)
    mixed = checks.gradients(model, x, y, [CE, DLR, SQUARE])
    assert mixed.status == "warn", mixed
    assert "(robustkit:apgd)" in mixed.detail
    assert "robustkit:apgd-t (DLR or margin loss) are not affected" in mixed.detail
    for ce_only in ([CE], [CE, SQUARE]):  # a gradient-free attack does not make up for it
        check = checks.gradients(model, x, y, ce_only)
        assert check.status == "fail" and "softmax saturates" in check.detail, check
    assert checks.gradients(model, x, y, [DLR]).status == "pass"  # no attack follows cross-entropy
    assert checks.gradients(net, x, y, [CE]).status == "pass"


def test_masking_fails_whatever_the_attacks(trained):
    net, x, y = trained
    check = checks.gradients(Rounded(net), x, y, [CE, DLR])
    assert check.status == "fail" and "masked" in check.detail, check


def _probe(model: nn.Module, x: Tensor, y: Tensor, attacks: list[NamedAttack]) -> checks.Check:
    inputs = checks.CheckInputs(model, x, y, ThreatModel(Norm.LINF, 0.1), [0.1], None, CE, None, 10, attacks=attacks)
    return checks.large_eps_probe(inputs)


def test_the_large_eps_probe_fails_only_when_no_attack_reaches_chance(trained):
    net, x, y = trained
    assert _probe(Scaled(net), x, y, [CE]).status == "fail"
    rescued = _probe(Scaled(net), x, y, [CE, DLR])
    assert rescued.status == "pass" and "then robustkit:apgd-t" in rescued.detail, rescued
    assert _probe(Rounded(net), x, y, [CE, DLR]).status != "pass"


def test_the_checks_judge_only_the_attacks_that_ran():
    evaluation = Evaluation([], torch.ones(2, dtype=torch.bool), [
        AttackOutcome(CE.name, {}, torch.zeros(2), failed="RuntimeError: no grad"),
        AttackOutcome(DLR.name, {}, torch.zeros(2))], cascade=True)
    assert checks.attacks_that_ran([CE, DLR], evaluation) == [DLR]


def _audit(weights: Path, factory: str, out: Path, *args: str):
    return CliRunner().invoke(cli, ["audit", str(weights), "--arch", f"{Path(__file__).resolve()}:{factory}",
                                    "--data", "builtin:digits", "--limit", "40", "--check-samples", "24",
                                    "--out", str(out), *args])


def test_an_audit_of_a_model_without_gradients_ends_with_its_report(wrapped_weights, tmp_path):
    result = _audit(wrapped_weights, "one_hot_mlp", tmp_path / "r", *LIGHT)
    assert result.exit_code == 3, result.output
    assert "no gradient at all" in result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["complete"] and (tmp_path / "r" / "report.md").exists()
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert status["gradients"] == "fail" and status["attacks completed"] == "fail"


@pytest.mark.parametrize(("args", "code", "gradients", "probe"), [
    (LIGHT, 0, "warn", "pass"),  # APGD-T's DLR loss breaks it
    (("--attack", "apgd", "-o", "steps", "10"), 3, "fail", "fail"),  # cross-entropy alone: overstated
])
def test_a_saturated_softmax_fails_only_an_audit_without_a_margin_loss(wrapped_weights, tmp_path, args, code,
                                                                       gradients, probe):
    result = _audit(wrapped_weights, "scaled_mlp", tmp_path / "r", *args)
    assert result.exit_code == code, result.output
    status = {c["name"]: c["status"] for c in json.loads((tmp_path / "r" / "report.json").read_text())["checks"]}
    assert (status["gradients"], status["large-eps probe"]) == (gradients, probe), status


def test_attacks_say_whether_they_follow_cross_entropy() -> None:
    """What the saturation rule reads: a fixed loss on the class, else the ``loss`` parameter, else
    cross-entropy (a check then errs toward failing)."""
    from robustkit_torchattacks import attacks as ta

    from robustkit.attacks.apgd import APGD, APGDT
    from robustkit.attacks.fmn import FMN
    from robustkit.attacks.native import PGD

    assert not APGDT().follows_cross_entropy() and not FMN().follows_cross_entropy()
    assert APGD().follows_cross_entropy() and not APGD(loss="dlr").follows_cross_entropy()
    assert PGD().follows_cross_entropy() and not PGD(loss="margin").follows_cross_entropy()
    assert not ta.APGDT().follows_cross_entropy() and not ta.CW().follows_cross_entropy()
    assert ta.PGD().follows_cross_entropy()  # names no loss: counted as cross-entropy


def test_on_a_saturated_softmax_the_checks_rerun_the_margin_attack(wrapped_weights, tmp_path):
    """APGD-CE stands still on a saturated softmax: the checks that rerun an iterative attack
    would all say "untested"; they rerun APGD-T (DLR), which the default suite has."""
    result = _audit(wrapped_weights, "scaled_mlp", tmp_path / "r", *LIGHT)
    assert result.exit_code == 0, result.output
    found = {c["name"]: c for c in json.loads((tmp_path / "r" / "report.json").read_text())["checks"]}
    for name in ("iterative >= fgsm", "monotone in eps", "convergence"):
        assert found[name]["status"] == "pass", found[name]
        assert "robustkit:apgd-t" in found[name]["detail"], found[name]


def test_the_checks_rerun_cross_entropy_apgd_where_the_softmax_does_not_saturate(trained):
    from robustkit.audit.run import _checks_iterative

    net, x, y = trained
    assert _checks_iterative([CE, DLR], net, x, y) is CE
    assert _checks_iterative([CE, DLR], Scaled(net), x, y) is DLR
    assert _checks_iterative([CE, SQUARE], Scaled(net), x, y) is CE  # nothing better: the gradients check fails


def test_a_wrong_certificate_is_found_by_the_gradient_free_attack_when_gradients_mislead(trained):
    """Proofs skip samples in every attack: the check that tests them must not rely on gradients
    alone, which a masked model withholds (here: proofs claimed at eps 0.3 for a rounding MLP)."""
    net, x, y = trained
    model = Rounded(net)
    evaluation = Evaluation([ThreatModel(Norm.LINF, 0.3)], torch.ones(len(x), dtype=torch.bool), [], cascade=True,
                            certification="linear bound propagation (CROWN)")
    evaluation.proven = torch.full((len(x),), 0.3)
    gradient_only = checks.certificates_hold(model, x, y, evaluation, (CE, None), 24, 256)
    assert gradient_only.status == "pass", gradient_only  # the masked gradient hides the wrong proofs
    both = checks.certificates_hold(model, x, y, evaluation, (CE, SQUARE), 24, 256)
    assert both.status == "fail" and "robustkit:apgd and robustkit:square" in both.detail, both


class Remembering(Wrap):
    """Answers any input within linf 0.15 of one it has seen as that one (a stateful defence): the
    audit asks the clean data first, so every attack's query gets a clean answer."""

    def __init__(self, net: nn.Module | None = None) -> None:
        super().__init__(net)
        self.memory = torch.empty(0, 64)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.detach().flatten(1)
        anchors = flat.clone()
        if len(self.memory):
            distance, nearest = torch.cdist(flat, self.memory, p=float("inf")).min(1)
            seen = distance <= 0.15
            anchors[seen] = self.memory[nearest[seen]]
            flat = flat[~seen]
        self.memory = torch.cat([self.memory, flat])
        return self.net(anchors.view_as(x) + (x - x.detach()))  # the honest gradient, the remembered answer


def remembering_mlp() -> nn.Module:
    return Remembering()


def test_a_model_that_remembers_its_queries_fails_the_stateless_check(wrapped_weights, tmp_path):
    result = _audit(wrapped_weights, "remembering_mlp", tmp_path / "r", "--suite", "quick", "--eps", "0.05,0.1")
    assert result.exit_code == 3, result.output
    found = {c["name"]: c for c in json.loads((tmp_path / "r" / "report.json").read_text())["checks"]}
    assert found["stateless"]["status"] == "fail", found["stateless"]
    assert found["deterministic"]["status"] == "pass"  # asking the same input twice does not show it


@pytest.mark.parametrize("arch", ["plain_mlp", "builtin:digits-cnn"])
def test_a_stateless_model_passes_the_stateless_check(wrapped_weights, cnn_weights, tmp_path, arch):
    if arch.startswith("builtin:"):
        result = CliRunner().invoke(cli, ["audit", str(cnn_weights), "--arch", arch, "--data", "builtin:digits",
                                          "--limit", "40", "--suite", "quick", "--check-samples", "24",
                                          "--out", str(tmp_path / "r")])
    else:
        result = _audit(wrapped_weights, arch, tmp_path / "r", "--suite", "quick")
    found = {c["name"]: c for c in json.loads((tmp_path / "r" / "report.json").read_text())["checks"]}
    assert found["stateless"]["status"] == "pass", (found["stateless"], result.output)


class Plain(Wrap):
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def plain_mlp() -> nn.Module:
    return Plain()


class Decided(Wrap):
    """A hard decision plus a small smooth term: gradients and scores exist but follow the term."""

    def forward(self, x: Tensor) -> Tensor:
        decision = F.one_hot(self.net(x).argmax(1), 10).float()
        return decision * (10 + 1e-3 * ((x - 0.5) ** 2).flatten(1).sum(1, keepdim=True))


def test_scores_that_are_a_decision_in_disguise_are_called_out(trained):
    net, x, _ = trained
    flat = checks.scores_vary(Decided(net), x)
    assert flat.status == "warn" and "100% of 48 samples" in flat.detail, flat
    honest = checks.scores_vary(net, x)
    assert honest.status == "pass", honest
    assert checks.scores_vary(Scaled(net), x).status == "pass"  # the margin's scale is not its spread
