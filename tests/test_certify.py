"""The certifier's proofs hold, are tight where they can be, and the engine uses them safely.

A certificate lets the engine skip a sample, so a wrong one inflates robust accuracy without
any sign: every bound is checked here against points of the ball the model is actually run on
(random points, linf corners, PGD aimed at each wrong class), certified samples are attacked
anyway, and evaluation with certificates is compared against evaluation without.
"""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from robustkit.attacks.base import Attack
from robustkit.attacks.native import FGSM, PGD
from robustkit.attacks.square import Square
from robustkit.audit.certify import MAX_INPUT_SIZE, Certifier, Unsupported
from robustkit.audit.engine import CERTIFY_PILOT, Evaluation, NamedAttack, evaluate
from robustkit.data import load_digits
from robustkit.models.zoo import digits_resnet
from robustkit.modules import Normalized
from robustkit.testing import trained_digits_model
from robustkit.threat import TOLERANCE, Norm, ThreatModel
from robustkit.train import FitConfig, fit

CPU = torch.device("cpu")
#: Random points per sample for the soundness checks (half of them linf corners).
POINTS = 256


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    return trained_digits_model("cnn", epochs=8)


def _trained(net: nn.Module, digits) -> nn.Module:
    """A briefly trained net: realistic margins, and BatchNorm running statistics away from 0 and 1."""
    torch.manual_seed(0)
    fit(net, digits.x_train, digits.y_train, FitConfig(epochs=2, lr=3e-3))
    return net


def _mixed_net() -> nn.Module:
    """Every supported layer type: standardising, BatchNorm 2d and 1d (scales of both signs), both
    poolings, Dropout, a nested Sequential."""
    net = Normalized(nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AvgPool2d(2), nn.Dropout(0.3),
        nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Identity(),
        nn.Linear(32, 10),
    ), mean=[0.3], std=[0.4])
    for layer in net.net:
        if isinstance(layer, nn.BatchNorm2d | nn.BatchNorm1d):
            nn.init.uniform_(layer.weight, -1.5, 1.5)
    return net


BUILT: dict[str, Callable[[], nn.Module]] = {
    "mixed": _mixed_net,
    "mlp": lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                                 nn.Linear(32, 10)),
    # a model may end in a nonlinearity: its margins are still bounded, not taken as affine
    "mlp-relu-out": lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10), nn.ReLU()),
}


@pytest.fixture(scope="module")
def models(cnn, digits) -> dict[str, nn.Module]:
    return {"cnn": cnn, **{name: _trained(build(), digits) for name, build in BUILT.items()}}


def _margins(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``logit[y] - logit[j]`` for every j, in eval mode: of the fp32 logits, subtracted exactly (fp64)."""
    with torch.no_grad():
        logits = model.eval()(x).double()
    return logits.gather(1, y.view(-1, 1)) - logits


def _ball_points(x: Tensor, threat: ThreatModel, count: int, generator: torch.Generator) -> Tensor:
    """``count`` points in each sample's ball and the bounds: ``count`` blocks of N, one point per
    sample each; for linf half the blocks are random corners of the ball, for l2 on its sphere."""
    shape = (count, *x.shape)
    half = count // 2
    if threat.norm is Norm.LINF:
        inside = (2 * torch.rand(shape, generator=generator) - 1) * threat.eps
        corners = (torch.randint(0, 2, shape, generator=generator) * 2 - 1) * threat.eps
        delta = torch.cat([inside[:half], corners[half:]])
    else:
        direction = torch.randn(shape, generator=generator)
        direction = direction / direction.flatten(2).norm(dim=2).view(count, len(x), 1, 1, 1)
        radius = torch.rand((count, len(x), 1, 1, 1), generator=generator) ** (1 / x[0].numel())
        radius[half:] = 1.0
        delta = direction * threat.eps * radius
    points = (x.unsqueeze(0) + delta).clamp(*threat.bounds).flatten(0, 1)
    assert not threat.violations(x.repeat(count, 1, 1, 1), points).any()
    return points


def _targeted_pgd_points(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel) -> tuple[Tensor, Tensor]:
    """PGD aimed at each wrong class of each sample: (points, row of the sample) for 9 * N points."""
    classes = 10
    rows = torch.arange(len(x)).repeat_interleave(classes - 1)
    targets = torch.stack([torch.cat([torch.arange(c), torch.arange(c + 1, classes)]) for c in y.tolist()]).flatten()
    attack = PGD(steps=50, restarts=2, loss="margin")
    targeted = ThreatModel(threat.norm, threat.eps, threat.bounds, targeted=True)
    result = attack(model, x[rows], y[rows], threat=targeted, targets=targets)
    assert not threat.violations(x[rows], result.x_adv).any()
    return result.x_adv, rows


THREATS = [ThreatModel(Norm.LINF, 0.02), ThreatModel(Norm.LINF, 0.05), ThreatModel(Norm.L2, 0.3),
           ThreatModel(Norm.L2, 0.1)]


@pytest.mark.parametrize("threat", THREATS, ids=str)
@pytest.mark.parametrize("name", ["cnn", *BUILT])
def test_margin_bounds_are_below_every_margin_in_the_ball(models, digits, name, threat):
    model = models[name]
    x, y = digits.x[:24], digits.y[:24]
    bounds = Certifier(model, (1, 8, 8), CPU).margin_bounds(x, y, threat)
    assert bounds.shape == (24, 10) and bool(bounds.gather(1, y.view(-1, 1)).isinf().all())
    # no slack: the bounds allow for the model's fp32 rounding (class y: margin 0, bound +inf)
    floor = torch.where(bounds.isinf(), -torch.inf, bounds)
    generator = torch.Generator().manual_seed(0)
    random_points = _ball_points(x, threat, POINTS, generator)
    random_rows = torch.arange(len(x)).repeat(POINTS)
    pgd_points, pgd_rows = _targeted_pgd_points(model, x, y, threat)
    for points, rows in ((x, torch.arange(len(x))), (random_points, random_rows), (pgd_points, pgd_rows)):
        gap = _margins(model, points, y[rows]) - floor[rows]
        assert float(gap.min()) >= 0, f"{name} {threat}: a point in the ball beats the bound by {-float(gap.min())}"


def test_bounds_are_exact_on_a_linear_model(digits):
    torch.manual_seed(0)
    model = Normalized(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), mean=[0.3], std=[0.4])
    x, y = digits.x[:24], digits.y[:24]
    certifier = Certifier(model, (1, 8, 8), CPU)
    weight = model.net[1].weight.double() / 0.4  # d logits / d x
    bias = model.net[1].bias.double() - weight.sum(1) * 0.3
    coefficients = weight[y].unsqueeze(1) - weight.unsqueeze(0)  # (N, classes, 64): w_y - w_j
    constants = bias[y].unsqueeze(1) - bias.unsqueeze(0)
    flat = x.flatten(1).double().unsqueeze(1)
    for eps in (0.02, 0.1, 0.5):
        threat = ThreatModel(Norm.LINF, eps)
        low, high = (flat - eps).clamp(0, 1), (flat + eps).clamp(0, 1)
        corner = torch.where(coefficients > 0, low, high)  # the minimising corner, coordinate-wise
        expected = (coefficients * corner).sum(-1) + constants
        bounds = certifier.margin_bounds(x, y, threat).double()
        finite = bounds.isfinite()
        assert finite.sum() == 24 * 9
        torch.testing.assert_close(bounds[finite], expected[finite], atol=1e-4, rtol=0)
    eps = 0.3  # l2: the ball without the bounds, minimised along -(w_y - w_j)
    expected = (coefficients * flat).sum(-1) + constants - eps * coefficients.norm(dim=-1)
    bounds = certifier.margin_bounds(x, y, ThreatModel(Norm.L2, eps)).double()
    torch.testing.assert_close(bounds[bounds.isfinite()], expected[bounds.isfinite()], atol=1e-4, rtol=0)


def test_certified_samples_survive_strong_attacks(cnn, digits):
    x, y = digits.x[:180], digits.y[:180]
    certifier = Certifier(cnn, (1, 8, 8), CPU)
    attacks = [PGD(steps=50, restarts=3, loss="margin"), PGD(steps=50, restarts=1), Square(queries=300)]
    shares = {}
    for eps in (0.025, 0.05):
        threat = ThreatModel(Norm.LINF, eps)
        proven = certifier.certify(x, y, threat)
        broken = torch.zeros(len(x), dtype=torch.bool)
        for attack in attacks:
            broken |= attack(cnn, x, y, threat=threat).success
        assert not bool((proven & broken).any()), f"eps {eps}: {int((proven & broken).sum())} proven samples broken"
        assert bool(broken.any())  # the attacks have teeth: they break what was not proven
        shares[eps] = float(proven.float().mean())
    assert shares[0.025] > 0.5, shares
    assert shares[0.05] <= shares[0.025], shares


SUITE = [NamedAttack("robustkit:fgsm", FGSM()), NamedAttack("robustkit:pgd", PGD(steps=10)),
         NamedAttack("robustkit:square", Square(queries=200))]
EPS = [0.025, 0.05, 0.1]


@pytest.fixture(scope="module")
def engine_runs(cnn, digits) -> dict[bool, Evaluation]:
    x, y = digits.x[:120], digits.y[:120]
    threats = [ThreatModel(Norm.LINF, eps) for eps in EPS]
    return {certify: evaluate(cnn, x, y, SUITE, threats, cascade=True, certify=certify) for certify in (True, False)}


def test_engine_certified_accuracy_is_a_lower_bound(engine_runs):
    certified, plain = engine_runs[True], engine_runs[False]
    assert certified.certification == "linear bound propagation (CROWN)"
    assert certified.certified_eps == EPS and plain.certification == "off"
    for eps in EPS:
        lower = certified.certified_accuracy(eps)
        assert lower is not None and lower <= certified.worst_case(eps)
        assert plain.certified_accuracy(eps) is None
    assert certified.certified_accuracy(EPS[0]) > 0.5


def test_engine_proven_samples_are_not_attacked_and_not_breakable(engine_runs):
    certified, plain = engine_runs[True], engine_runs[False]
    square_certified, square_plain = certified.outcomes[2].attacked, plain.outcomes[2].attacked
    proven_to = certified.proven_to()
    # certificates come right after the first (cheapest) attack: up to there both runs are the
    # same, and the second attack at the first eps skipped exactly the proven samples
    second_certified, second_plain = certified.outcomes[1].attacked, plain.outcomes[1].attacked
    assert second_certified[EPS[0]] == second_plain[EPS[0]] - int((proven_to >= EPS[0]).sum())
    assert sum(square_certified.values()) < sum(square_plain.values())
    assert bool((proven_to >= EPS[1]).any())
    for eps in EPS:
        proven = proven_to >= eps
        assert float(proven.float().mean()) == certified.certified_accuracy(eps)
        assert not bool((proven & (certified.worst_broken_at() <= eps)).any())
        broken_plain = plain.worst_broken_at() <= eps
        assert not bool((proven & broken_plain).any()), f"eps {eps}: proven samples broken without certificates"


def test_certified_accuracy_at_eps_zero_is_clean_accuracy(cnn, digits):
    x, y = digits.x[:120], digits.y[:120]
    threats = [ThreatModel(Norm.LINF, eps) for eps in (0.0, 0.05)]
    evaluation = evaluate(cnn, x, y, SUITE[:1], threats, certify=True)
    assert evaluation.clean_accuracy < 1  # some clean mistakes, which no proof may count
    assert evaluation.certified_accuracy(0.0) == evaluation.clean_accuracy == evaluation.worst_case(0.0)
    assert evaluation.outcomes[0].attacked[0.0] == 0  # nothing to attack in a ball of radius 0
    certified = evaluation.certified_accuracy(0.05)
    assert certified is not None and 0 < certified <= evaluation.worst_case(0.05)


def test_engine_on_an_unsupported_model_attacks_everything(digits):
    torch.manual_seed(0)
    model = Normalized(digits_resnet(), mean=[0.3], std=[0.4]).eval()  # residual: not a Sequential chain
    x, y = digits.x[:40], digits.y[:40]
    suite = [SUITE[0], NamedAttack("robustkit:square", Square(queries=30))]
    threats = [ThreatModel(Norm.LINF, 0.05), ThreatModel(Norm.LINF, 0.1)]
    runs = {certify: evaluate(model, x, y, suite, threats, certify=certify) for certify in (True, False)}
    certified = runs[True]
    assert certified.certification.startswith("unsupported: _ResidualBlock")
    values = {certified.certified_accuracy(t.eps) for t in threats}
    assert values in ({None}, {0.0}), values
    for outcome, reference in zip(certified.outcomes, runs[False].outcomes):
        assert outcome.attacked == reference.attacked  # nothing skipped
        assert torch.equal(outcome.broken_at, reference.broken_at)
    assert all(0 <= certified.worst_case(t.eps) <= certified.clean_accuracy for t in threats)


class _Unmoved(Attack):
    """An l1 attack that returns its inputs: enough to run the engine under a norm the bounds lack."""

    name = "unmoved"
    norms = frozenset({Norm.L1})

    def run(self, model, x: Tensor, labels: Tensor, threat: ThreatModel) -> Tensor:
        return x


def test_engine_with_an_unsupported_norm_attacks_everything(cnn, digits):
    x, y = digits.x[:40], digits.y[:40]
    evaluation = evaluate(cnn, x, y, [NamedAttack("test:unmoved", _Unmoved())], [ThreatModel(Norm.L1, 2.0)],
                          certify=True)
    assert evaluation.certification == "unsupported: the l1 norm is not supported (linf and l2 only)"
    assert evaluation.outcomes[0].attacked[2.0] == int(evaluation.clean_correct.sum())


def test_engine_stops_certifying_after_a_failed_pilot(cnn, digits, monkeypatch):
    tried: list[tuple[float, int]] = []
    certify = Certifier.certify

    def counting(self: Certifier, x: Tensor, y: Tensor, threat: ThreatModel) -> Tensor:
        tried.append((threat.eps, len(x)))
        return certify(self, x, y, threat)

    monkeypatch.setattr(Certifier, "certify", counting)
    x, y = digits.x[:120], digits.y[:120]
    threats = [ThreatModel(Norm.LINF, eps) for eps in (0.025, 0.3, 0.5)]
    evaluation = evaluate(cnn, x, y, [NamedAttack("robustkit:square", Square(queries=5))], threats, certify=True)
    assert evaluation.uncertified_at is not None
    # proofs cover the ball the engine accepts examples in: eps plus its rounding tolerance
    assert all(any(eps < e <= eps + 2 * TOLERANCE for eps in (0.025, 0.3, 0.5)) for e, _ in tried), tried
    per_eps = {eps: sum(n for e, n in tried if eps < e <= eps + 2 * TOLERANCE) for eps in (0.025, 0.3, 0.5)}
    # at 0.025 every clean-correct sample is tried
    assert per_eps[0.025] == int(evaluation.clean_correct.sum())
    # at 0.3 nothing is provable: the pilot fails, and every other candidate (each sample
    # proven at 0.025) is marked unproven without being tried
    uncertified_at = evaluation.uncertified_at
    assert int((uncertified_at == 0.3).sum()) > CERTIFY_PILOT, "too few candidates at 0.3 to exercise the pilot"
    assert per_eps[0.3] == CERTIFY_PILOT
    assert bool(((uncertified_at == 0) | (uncertified_at == 0.025) | (uncertified_at == 0.3)).all())
    assert per_eps[0.5] == 0  # and nothing is tried at a larger eps
    assert evaluation.certified_accuracy(0.3) == 0.0 and evaluation.certified_eps == [0.025, 0.3, 0.5]


class _Negated(nn.Sequential):
    def forward(self, x: Tensor) -> Tensor:
        return -super().forward(x)


class _Shifted(Normalized):
    def standardize(self, x: Tensor) -> Tensor:
        return super().standardize(x) + 1


def _hooked() -> nn.Module:
    """A hook that negates a layer's output: the model computes something else than its layers."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    net[1].register_forward_hook(lambda module, args, output: -output)
    return net


def _forward_on_the_object() -> nn.Module:
    """A forward set on the object, not the class: a class-level check misses it."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    net.forward = lambda x: torch.zeros(len(x), 10)  # type: ignore[method-assign]
    return net


@pytest.mark.parametrize(("model", "shape", "reason"), [
    (lambda x: x.flatten(1)[:, :10], (1, 8, 8), "not a torch module"),
    (_forward_on_the_object(), (1, 8, 8), "has a forward of its own, set on the object"),
    (nn.Sequential(nn.MaxPool2d(3, stride=1), nn.Flatten(), nn.Linear(36, 10)), (1, 8, 8), "non-overlapping"),
    (nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(256, 10)),
     (1, 8, 8), "padding modes"),
    (nn.Sequential(nn.Flatten(), nn.Linear(3 * 40 * 40, 10)), (3, 40, 40), f"at most {MAX_INPUT_SIZE}"),
    (nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Sigmoid()), (1, 8, 8), "Sigmoid layers are not supported"),
    (nn.Sequential(nn.Conv2d(1, 10, 3), nn.BatchNorm2d(10, track_running_stats=False)), (1, 8, 8),
     "running statistics"),
    (nn.Sequential(nn.Conv2d(1, 10, 8)), (1, 8, 8), "not (N, classes) scores"),
    (_Negated(nn.Flatten(), nn.Linear(64, 10)), (1, 8, 8), "_Negated overrides"),
    (_hooked(), (1, 8, 8), "Linear has forward hooks"),
    (Normalized(digits_resnet(), mean=[0.3], std=[0.4]), (1, 8, 8), "_ResidualBlock layers are not supported"),
    (_Shifted(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), mean=[0.3], std=[0.4]), (1, 8, 8),
     "_Shifted overrides Normalized.standardize"),
    # the rounding allowance is for fp32 (or fp64) evaluation; half precision's would swamp the margins
    (nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).half(), (1, 8, 8), "torch.float16 models are not supported"),
    (nn.Sequential(nn.Flatten(), nn.Linear(64, 32).double(), nn.ReLU(), nn.Linear(32, 10)), (1, 8, 8),
     "mixes dtypes"),
], ids=["function", "object-forward", "overlapping-maxpool", "reflect-padding", "large-input", "sigmoid",
        "batchnorm-no-stats", "not-scores", "overridden-forward", "forward-hook", "residual", "overridden-standardize",
        "half", "mixed-dtypes"])
def test_unsupported_models_are_refused_with_the_reason(model, shape, reason):
    with pytest.raises(Unsupported, match=reason.replace("(", r"\(").replace(")", r"\)")):
        Certifier(model, shape, CPU)


def test_a_model_that_computes_other_than_its_layers_gets_no_certificates(cnn, digits):
    """A global forward hook changes every module's output, unseen by the layer walk: only
    running the layers against the model's own output finds it."""
    threat = ThreatModel(Norm.LINF, 0.1)
    certifier = Certifier(cnn, (1, 8, 8), CPU)
    certifier.check_reproduces(digits.x[:32], threat)  # the honest model: its layers are its output
    handle = nn.modules.module.register_module_forward_hook(
        lambda module, args, output: output.flip(1) if module is cnn else None)
    try:
        with pytest.raises(Unsupported, match="not what its layers compute"):
            certifier.check_reproduces(digits.x[:32], threat)
        evaluation = evaluate(cnn, digits.x[:32], digits.y[:32], [NamedAttack("fgsm", FGSM())], [threat],
                              certify=True)
        assert evaluation.proven is None and "not what its layers compute" in evaluation.certification
    finally:
        handle.remove()


def test_unsupported_norm_and_empty_batches(cnn, digits):
    certifier = Certifier(cnn, (1, 8, 8), CPU)
    with pytest.raises(Unsupported, match="the l1 norm is not supported"):
        certifier.margin_bounds(digits.x[:4], digits.y[:4], ThreatModel(Norm.L1, 1.0))
    empty = certifier.certify(digits.x[:0], digits.y[:0], ThreatModel(Norm.LINF, 0.02))
    assert empty.shape == (0,) and empty.dtype == torch.bool


def test_train_mode_model_gets_eval_bounds_and_keeps_its_modes(models, digits):
    model = models["mixed"]
    x, y = digits.x[:16], digits.y[:16]
    threat = ThreatModel(Norm.LINF, 0.02)
    expected = Certifier(model.eval(), (1, 8, 8), CPU).margin_bounds(x, y, threat)
    model.train()
    frozen = model.net[1].eval()  # a mixed mode: one BatchNorm frozen inside a training model
    modes = {name: m.training for name, m in model.named_modules()}
    statistics = [b.clone() for b in model.buffers()]
    try:
        certifier = Certifier(model, (1, 8, 8), CPU)
        torch.testing.assert_close(certifier.margin_bounds(x, y, threat), expected, rtol=0, atol=1e-6)
        assert bool(certifier.certify(x, y, threat).any())
        assert {name: m.training for name, m in model.named_modules()} == modes
        assert not frozen.training and model.net[4].training
        assert all(torch.equal(a, b) for a, b in zip(statistics, model.buffers()))  # no BatchNorm update
    finally:
        model.eval()
