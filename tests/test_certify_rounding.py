"""Certificates hold for the model as it runs, in fp32, not only in exact arithmetic.

The old rule (bounds in fp32, certified when the margin bound exceeds a fixed 1e-4) proved
samples whose exact margin is positive while the fp32 forward pass misclassifies a point of the
ball: the model's own rounding is about ``2^-24`` of the sizes it adds up, whatever the margin.
Near-tie models show it here, against an exhaustive search of the ball's fp32 points and PGD;
the certifier, which bounds the fp32 rounding (``robustkit.audit.certify``'s docstring), proves
none of them, and its bounds sit below every fp32 margin that is computed.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from robustkit.attacks.native import PGD
from robustkit.audit import certify
from robustkit.audit.certify import Certifier
from robustkit.threat import Norm, ThreatModel

CPU = torch.device("cpu")
#: The fixed tolerance the old rule needed above zero.
OLD_TOLERANCE = 1e-4


def _fp32_margins(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``logit[y] - logit[j]`` as the model computes them (fp32), in fp64 (exact differences of fp32 values)."""
    with torch.no_grad():
        logits = model(x).double()
    return logits.gather(1, y.view(-1, 1)) - logits


def _exact_bounds(certifier: Certifier, x: Tensor, y: Tensor, threat: ThreatModel,
                  monkeypatch: pytest.MonkeyPatch) -> Tensor:
    """The certifier's bounds in exact arithmetic: its fp32 rounding allowance set to zero."""
    with monkeypatch.context() as patch:
        patch.setitem(certify._UNIT_ROUNDOFF, torch.float32, 0.0)
        return certifier.margin_bounds(x, y, threat)


def _near_tie(w2: float, x0: float, eps: float, margin: float) -> nn.Sequential:
    """A model on one input whose exact margin is ``margin`` or more over ``[x0 - eps, x0 + eps]``,
    but whose fp32 margin is negative at some points of it.

    Hidden: ``h1 = w1 x``, ``h2 = w2 x`` (``w1`` the float after ``w2``) and ``h3 = k``; logits:
    ``h1 - h2`` and ``h3``. Every step but the two products is exact in fp32 (the subtraction by
    Sterbenz's lemma, the other terms are 0 or k alone), so any BLAS computes the margin
    ``fl(w1 x) - fl(w2 x) - k``, while the exact one is ``(w1 - w2) x - k``. With x just under
    1/2, ``(w1 - w2) x`` is just under an ulp of ``w x`` (2^-10 for w = 3e4, 2^-6 for 3e5), so
    the two products round to the same float for some x: the fp32 margin is then ``-k``.
    """
    w1 = float(torch.nextafter(torch.tensor(w2), torch.tensor(torch.inf)))
    k = float(torch.tensor((w1 - w2) * (x0 - eps) - margin))  # fp32, so the exact margin is from this k
    net = nn.Sequential(nn.Linear(1, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[w1], [w2], [0.0]]))
        net[0].bias.copy_(torch.tensor([0.0, 0.0, k]))
        net[2].weight.copy_(torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 1.0]]))
        net[2].bias.zero_()
    return net.eval()


def _every_fp32_point(x0: float, eps: float) -> Tensor:
    """Every fp32 number in ``[x0 - eps, x0 + eps]`` (within [0, 1]), as (M, 1): the whole ball."""
    ends = torch.tensor([max(x0 - eps, 0.0), min(x0 + eps, 1.0)], dtype=torch.float32)
    low, high = (int(v) for v in ends.view(torch.int32))  # positive floats order as their bits
    points = torch.arange(low - 1, high + 2, dtype=torch.int32).view(torch.float32)
    points = points[(points.double() - x0).abs() <= eps]  # the ends were rounded: keep the ball only
    return points.view(-1, 1)


def _old_rule(model: nn.Sequential, x: Tensor, eps: float) -> Tensor:
    """The old certifier's margin bound for ``_near_tie``, in fp32: there CROWN is the exact linear
    bound (every ReLU is on over the ball), ``c . x - |c| eps + d`` with ``c``, ``d`` from the weights."""
    first, last = model[0], model[2]
    row = last.weight[0] - last.weight[1]
    coefficient, constant = row @ first.weight, row @ first.bias + last.bias[0] - last.bias[1]
    return (x @ coefficient - coefficient.abs().sum() * eps + constant).detach()


@pytest.mark.parametrize(("w2", "margin"), [(30000.0, 4e-4), (300000.0, 1e-2)],
                         ids=["margin-4x-tolerance", "margin-100x-tolerance"])
def test_fixed_tolerance_proves_a_near_tie_that_fp32_breaks(w2, margin, monkeypatch):
    x0, eps = float(torch.tensor(0.49)), 1e-3
    model = _near_tie(w2, x0, eps, margin)
    x, y = torch.tensor([[x0]]), torch.tensor([0])
    threat = ThreatModel(Norm.LINF, eps)
    points = _every_fp32_point(x0, eps)
    assert len(points) > 60000
    with torch.no_grad():
        hidden = model[0](points)
    assert bool((hidden > 0).all())  # every ReLU on over the ball: the bounds below are exact
    # exact arithmetic: the model is right everywhere in the ball, by more than the old tolerance
    weight, bias = model[0].weight.detach().double(), model[0].bias.detach().double()
    exact = (weight[0, 0] - weight[1, 0]) * points.double().squeeze(1) - bias[2]
    assert float(exact.min()) >= margin * 0.99 > OLD_TOLERANCE
    # (a) the old rule proves the sample: fp32 bounds, and the certifier's own bounds in exact
    # arithmetic, both clear the fixed tolerance
    assert float(_old_rule(model, x, eps)) > OLD_TOLERANCE
    certifier = Certifier(model, (1,), CPU)
    exact_bound = _exact_bounds(certifier, x, y, threat, monkeypatch)[0, 1]
    assert float(exact_bound) == pytest.approx(float(exact.min()), rel=1e-6)
    # ... yet the fp32 model, searched exhaustively over the ball, is wrong at some points
    fp32 = _fp32_margins(model, points, y.expand(len(points)))[:, 1]
    assert bool((fp32 < 0).any()), "no fp32 point of the ball is misclassified: the construction failed"
    # (b) the certifier proves nothing, and its bound is below every fp32 margin of the ball
    assert not bool(certifier.certify(x, y, threat).any())
    bound = certifier.margin_bounds(x, y, threat)[0, 1]
    assert float(bound) <= float(fp32.min())


def _large_net(seed: int) -> nn.Sequential:
    """A random ReLU net with weights 64 times the usual: logits about 1e4, fp32 errors about 1e-3."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    with torch.no_grad():
        for layer in net:
            if isinstance(layer, nn.Linear):
                layer.weight.mul_(64)
                layer.bias.mul_(64)
    return net.eval()


def _with_margin(model: nn.Sequential, x: Tensor, y: Tensor, threat: ThreatModel, target: Callable[[float], float],
                 monkeypatch: pytest.MonkeyPatch) -> nn.Sequential:
    """A copy of ``model`` whose class-y bias is moved so that the exact bound of the sample's
    smallest margin is just above ``target(allowance)`` (by at most an ulp of that bias), the
    allowance being what the certifier subtracts for rounding."""
    model = copy.deepcopy(model)
    bias = model[-1].bias
    for step in range(100):
        certifier = Certifier(model, tuple(x.shape[1:]), CPU)
        exact = _exact_bounds(certifier, x, y, threat, monkeypatch)[0]
        allowance = exact - certifier.margin_bounds(x, y, threat)[0]
        closest = int(exact.argmin())
        goal = target(float(allowance[closest]))
        if step >= 2 and float(exact[closest]) > goal:
            return model
        with torch.no_grad():  # two moves to the goal (the allowance depends a little on the bias), then ulps up
            bias[y] = bias[y] + goal - float(exact[closest]) if step < 2 else torch.nextafter(bias[y], bias[y] + 1)
    raise AssertionError("the margin did not settle")


def _corners(x: Tensor, eps: float, count: int, generator: torch.Generator) -> Tensor:
    """Random corners of the linf ball, nudged inside where fp32 rounding put them out."""
    points = x + eps * (torch.randint(0, 2, (count, x.shape[1]), generator=generator) * 2 - 1)
    outside = (points.double() - x.double()).abs() > eps
    return torch.where(outside, torch.nextafter(points, x.expand_as(points)), points)


@pytest.mark.slow
def test_proofs_at_the_edge_hold_in_fp32_on_random_models(monkeypatch):
    """On random large-weight nets, half the samples get an exact margin just above the old
    tolerance (a near tie, which the old rule proves), half one just above the certifier's
    rounding allowance (which it just proves). PGD breaks some of the ties in fp32 and none of
    the proofs; the bounds are below every fp32 margin computed (at PGD's points and corners)."""
    threat = ThreatModel(Norm.LINF, 1e-4)  # small: every ReLU stable, so the bounds are tight
    attack = PGD(steps=50, restarts=2, loss="margin")
    old_proven, new_proven, broken = [], [], []
    for seed in range(3):
        base = _large_net(seed)
        generator = torch.Generator().manual_seed(seed)
        x = torch.rand(8, 16, generator=generator) * 0.8 + 0.1
        with torch.no_grad():
            y = base(x).argmax(1)
        for i in range(len(x)):
            xi, yi = x[i:i + 1], y[i:i + 1]
            tie = i % 2 == 0
            target: Callable[[float], float] = (lambda a: OLD_TOLERANCE) if tie else (lambda a: 1.05 * a)
            model = _with_margin(base, xi, yi, threat, target, monkeypatch)
            certifier = Certifier(model, (16,), CPU)
            bounds = certifier.margin_bounds(xi, yi, threat)
            old_proven.append(bool(_exact_bounds(certifier, xi, yi, threat, monkeypatch).min() > OLD_TOLERANCE))
            new_proven.append(bool(certifier.certify(xi, yi, threat)))
            result = attack(model, xi, yi, threat=threat)
            assert not bool(threat.violations(xi, result.x_adv).any())
            broken.append(bool(result.success))
            points = torch.cat([xi, result.x_adv, _corners(xi, threat.eps, 256, generator)])
            gap = _fp32_margins(model, points, yi.expand(len(points))) - bounds
            gap = gap[:, torch.arange(3) != yi]
            assert float(gap.min()) >= 0, f"seed {seed}, sample {i}: an fp32 margin {-float(gap.min())} below the bound"
    old, new, hit = torch.tensor(old_proven), torch.tensor(new_proven), torch.tensor(broken)
    assert bool(old.all())  # every margin is above the old tolerance in exact arithmetic
    assert not bool((new & hit).any()), "a proven sample was broken"
    assert bool(new[1::2].all()) and not bool(new[::2].any())  # proofs just above the allowance only
    assert int(hit[::2].sum()) >= 2, "PGD broke too few near ties in fp32: the old rule's flaw is not exercised"


@pytest.mark.parametrize(("precision", "operand"), [("high", 2.0**-11), ("medium", 2.0**-8)])
def test_fast_fp32_matmul_settings_widen_the_allowance(precision, operand, monkeypatch):
    """Under TF32 or bf16 matmuls the operands are rounded to 10 or 7 bits: the allowance grows
    by about that unit roundoff over fp32's (2^-24), and stays sound (here: read the setting)."""
    model = _large_net(0)
    x = torch.rand(4, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)
    threat = ThreatModel(Norm.LINF, 1e-4)
    certifier = Certifier(model, (16,), CPU)
    exact = _exact_bounds(certifier, x, y, threat, monkeypatch)
    plain = exact - certifier.margin_bounds(x, y, threat)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: precision)
    fast = exact - certifier.margin_bounds(x, y, threat)
    finite = exact.isfinite()
    ratio = fast[finite] / plain[finite]
    # each layer's relative bound goes from gamma(n + 1), at most gamma(65) here, to about 2 v more
    assert bool((ratio > operand / (65 * 2.0**-24)).all()), ratio


def test_parametrized_weights_are_bounded_as_computed():
    """A weight-normed layer is bounded with the weight the model computes from its parameters."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))
    normed = copy.deepcopy(plain)
    nn.utils.parametrizations.weight_norm(normed[0])
    with torch.no_grad():
        plain[0].weight.copy_(normed[0].weight)
    x = torch.rand(8, 16, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(8, dtype=torch.long)
    threat = ThreatModel(Norm.LINF, 0.01)
    bounds = Certifier(normed, (16,), CPU).margin_bounds(x, y, threat)
    torch.testing.assert_close(bounds, Certifier(plain, (16,), CPU).margin_bounds(x, y, threat), rtol=0, atol=0)
    assert nn.utils.parametrize.is_parametrized(normed[0])  # the model itself is left as it was
