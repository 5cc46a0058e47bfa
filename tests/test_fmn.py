"""robustkit's FMN: the interface contract, answers that check out, and strength against PGD
(robustkit's and torchattacks') and torchattacks' FAB, the other minimum-norm attack at hand
(ART 1.20 has no FMN to compare with).

The digits tests share one FMN run per norm on the first 200 test digits: a minimum-norm run
answers every eps, which is the point of the attack and what the tests check.
"""
from __future__ import annotations

import math
import time
from functools import cache

import pytest
import torch
import torchattacks
from torch import Tensor

from robustkit.attacks.fmn import FMN, FMNParams, minimal_perturbations
from robustkit.attacks.native import PGD
from robustkit.data import load_digits
from robustkit.errors import ParamsError, RobustkitError
from robustkit.testing import check_attack_contract, checked_robust_accuracy, fast_params, trained_digits_model
from robustkit.threat import Norm, ThreatModel, per_sample_norm

N = 200
#: Each norm's eps for the strength test, and three eps one run must answer.
AT_EPS = {Norm.LINF: 0.1, Norm.L2: 1.0}
EPS_SETS = {Norm.LINF: (0.05, 0.1, 0.15), Norm.L2: (0.5, 0.75, 1.0)}
#: FAB settles within 20-30 steps on these digits (30 and 100 steps give the same robust
#: accuracy at every eps above, to 0.5 points); each step costs a backward pass per class.
FAB_STEPS = 30


@cache
def digits() -> tuple[torch.nn.Module, Tensor, Tensor]:
    data = load_digits()
    return trained_digits_model("cnn"), data.x[:N].clone(), data.y[:N].clone()


@cache
def fmn_answers(norm: Norm) -> tuple[Tensor, Tensor, float]:
    """(x_best, distances, seconds) of one FMN run with default settings."""
    model, x, y = digits()
    start = time.perf_counter()
    x_best, distances = minimal_perturbations(model, x, y, norm)
    return x_best, distances, time.perf_counter() - start


@cache
def fab_answers(norm: Norm) -> tuple[Tensor, Tensor]:
    """(examples, distances) of torchattacks' FAB, called directly with the largest eps of the
    set. With one restart FAB's search ignores eps (only random restarts use it); eps only
    filters what it returns, so its answer at any smaller eps is in the same run."""
    model, x, y = digits()
    fab = torchattacks.FAB(model, norm="Linf" if norm is Norm.LINF else "L2", eps=max(EPS_SETS[norm]),
                           steps=FAB_STEPS, n_restarts=1, n_classes=10)
    x_adv = fab(x, y)
    with torch.no_grad():
        fooled = model(x_adv).argmax(1) != y
    distances = per_sample_norm(x_adv - x, norm).double()
    return x_adv, torch.where(fooled, distances, torch.full_like(distances, math.inf))


@cache
def pgd_accuracy(norm: Norm, eps: float) -> float:
    """robustkit's PGD (50 steps) robust accuracy in %, checked on the model's predictions."""
    model, x, y = digits()
    threat = ThreatModel(norm, eps)
    torch.manual_seed(0)
    return checked_robust_accuracy(model, x, y, PGD(steps=50)(model, x, y, threat=threat).x_adv, threat)


def fmn_accuracy(norm: Norm, eps: float) -> float:
    """FMN's robust accuracy at eps in %, from the one run's distances."""
    return 100 * float((fmn_answers(norm)[1] > eps).double().mean())


def fab_accuracy(norm: Norm, eps: float) -> float:
    """FAB's robust accuracy at eps in %: its examples within eps, checked like every attack's."""
    model, x, y = digits()
    x_adv, distances = fab_answers(norm)
    within = torch.where((distances <= eps).view(-1, 1, 1, 1), x_adv, x)
    return checked_robust_accuracy(model, x, y, within, ThreatModel(norm, eps))


def test_contract():
    """Both norms (the contract walks the attack's norms), per-sample radii, an unsupported norm."""
    check_attack_contract(FMN(**fast_params(FMN)))


def test_rejects_bad_settings():
    model, x, y = digits()
    with pytest.raises(RobustkitError, match="linf and l2"):
        minimal_perturbations(model, x[:4], y[:4], "l1", steps=2)
    with pytest.raises(RobustkitError, match="max_eps"):
        minimal_perturbations(model, x[:4], y[:4], "l2", steps=2, max_eps=-1.0)
    for bad in ({"steps": 0}, {"classes": 0}, {"gamma_init": 1.0}, {"alpha_init": 0}):
        with pytest.raises(ParamsError):
            FMN(**bad)
    with pytest.raises(ValueError):
        FMNParams(alpha_final=-1.0)


@pytest.mark.slow
@pytest.mark.parametrize("norm", [Norm.LINF, Norm.L2])
def test_answers_check_out(norm):
    """Every finite distance is the measured norm of the returned example, which the model
    misclassifies in fp32 and which lies in the bounds; the rest are the clean inputs."""
    model, x, y = digits()
    x_best, distances, seconds = fmn_answers(norm)
    print(f"FMN {norm.value} on {N} digits: {seconds:.1f} s")
    assert x_best.shape == x.shape and distances.dtype == torch.float64
    assert float(x_best.min()) >= 0.0 and float(x_best.max()) <= 1.0
    found = torch.isfinite(distances)
    assert int(found.sum()) >= 0.9 * N  # the digits CNN is not robust: nearly all break
    measured = per_sample_norm(x_best.double() - x.double(), norm).double()
    assert torch.allclose(distances[found], measured[found], rtol=0, atol=1e-5)
    with torch.no_grad():
        predicted = model(x_best.float()).argmax(1)
        clean_wrong = model(x).argmax(1) != y
    assert bool((predicted[found] != y[found]).all())
    assert torch.equal(x_best[~found], x[~found])
    assert bool((distances[clean_wrong] == 0).all())
    assert bool((distances[~clean_wrong] > 0).all())


@pytest.mark.slow
@pytest.mark.parametrize("norm", [Norm.LINF, Norm.L2])
def test_as_strong_as_pgd_and_fab(norm):
    """At linf 0.1 / l2 1.0, FMN's robust accuracy (from its distances) is at most PGD's
    (robustkit's and torchattacks', 50 steps) + 3 points and FAB's + 2."""
    model, x, y = digits()
    eps = AT_EPS[norm]
    threat = ThreatModel(norm, eps)
    torch.manual_seed(0)
    alpha = 2.5 * eps / 50
    pgd_cls = torchattacks.PGD if norm is Norm.LINF else torchattacks.PGDL2
    torchattacks_pgd = checked_robust_accuracy(
        model, x, y, pgd_cls(model, eps=eps, alpha=alpha, steps=50, random_start=True)(x, y), threat)
    accuracy = {"fmn": fmn_accuracy(norm, eps), "pgd": pgd_accuracy(norm, eps),
                "torchattacks-pgd": torchattacks_pgd, "fab": fab_accuracy(norm, eps)}
    print(f"{threat}: robust accuracy % {accuracy}")
    assert accuracy["fmn"] <= accuracy["pgd"] + 3, accuracy
    assert accuracy["fmn"] <= accuracy["torchattacks-pgd"] + 3, accuracy
    assert accuracy["fmn"] <= accuracy["fab"] + 2, accuracy


@pytest.mark.slow
@pytest.mark.parametrize("norm", [Norm.LINF, Norm.L2])
def test_one_run_answers_every_eps(norm):
    """The one run's answer at each of three eps is as strong as a PGD run made for that eps
    (at most 3 points above it) and agrees with FAB's (the other minimum-norm attack) within 3
    points. Not two-sided against PGD: FMN beats PGD by up to ~5 points at some of these eps."""
    rows = []
    for eps in EPS_SETS[norm]:
        fmn, pgd, fab = fmn_accuracy(norm, eps), pgd_accuracy(norm, eps), fab_accuracy(norm, eps)
        rows.append((eps, fmn, pgd, fab))
        assert fmn <= pgd + 3, rows
        assert abs(fmn - fab) <= 3, rows
    print(f"{norm.value} (eps, fmn %, pgd %, fab %): {rows}")
    assert rows[0][1] > rows[-1][1]  # the eps span a real range of answers


@pytest.mark.slow
@pytest.mark.parametrize("norm", [Norm.LINF, Norm.L2])
def test_attack_at_eps_matches_the_run(norm):
    """``FMN`` at one eps (its search capped at eps) through ``Attack.__call__`` (channels-last,
    projection, fp32 judgement of its own) breaks what the uncapped run's distances say, within
    2 points (the capped searches take other paths), and only with valid examples."""
    model, x, y = digits()
    eps = AT_EPS[norm]
    threat = ThreatModel(norm, eps)
    result = FMN()(model, x, y, threat=threat)
    attacked = checked_robust_accuracy(model, x, y, result.x_adv, threat)
    from_run = fmn_accuracy(norm, eps)
    print(f"{threat}: FMN attack {attacked:.1f} %, one run's distances {from_run:.1f} %, {result.seconds:.1f} s")
    assert abs(100 * result.robust_accuracy - attacked) < 1e-6
    assert abs(attacked - from_run) <= 2


def test_max_eps_caps_every_answer():
    model, x, y = digits()
    x, y = x[:48], y[:48]
    x_best, distances = minimal_perturbations(model, x, y, "linf", steps=20, classes=1, max_eps=0.05)
    found = torch.isfinite(distances)
    assert bool(found.any()) and float(distances[found].max()) <= 0.05 + 1e-6
    radii = torch.where(torch.arange(48) % 2 == 0, 0.0, 0.5)
    x_best, distances = minimal_perturbations(model, x, y, "l2", steps=20, classes=1, max_eps=radii)
    assert torch.equal(x_best[radii == 0], x[radii == 0])  # a radius of 0 leaves the input alone
    found = torch.isfinite(distances)
    assert bool((distances[found] <= radii.double()[found] + 1e-6).all())


def test_run_with_radii_returns_the_smallest_example_within_each_radius():
    """``FMN.run`` with ``radii`` (as the engine calls a minimum-norm attack): the capped run's
    answer where it is within the radius (so its norm is the distance), an example inside the
    radius everywhere, and radius 0 leaves the input alone."""
    model, x, y = digits()
    x, y = x[:48], y[:48]
    radii = torch.tensor([0.15, 0.08, 0.0], dtype=torch.float64).repeat(16)
    threat = ThreatModel(Norm.LINF, 0.15)
    attack = FMN(steps=20, classes=2)
    assert attack.minimum_norm and not attack.per_sample_eps
    x_adv = attack.run(model, x, y, threat, radii=radii)
    x_best, distances = minimal_perturbations(model, x, y, "linf", steps=20, classes=2, max_eps=radii)
    found = torch.isfinite(distances)
    assert bool(found[radii == 0.15].any()) and bool(found[radii == 0.08].any())
    assert torch.equal(x_adv[found], x_best[found])
    assert not bool(threat.violations(x, x_adv, radii=radii).any())
    assert torch.equal(x_adv[radii == 0], x[radii == 0])


def test_same_seed_same_result():
    """Noise starting points are the one random part: the same seed repeats them exactly."""
    model, x, y = digits()
    x, y = x[:40], y[:40]
    runs = [minimal_perturbations(model, x, y, "l2", steps=15, classes=2, starting_points="noise", seed=seed)
            for seed in (3, 3, 4)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[2][0])  # the seed is used


def test_targeted():
    """Targeted answers land on the target, both from the function and through the attack."""
    model, x, y = digits()
    x, y = x[:48], y[:48]
    targets = (y + 1) % 10
    x_best, distances = minimal_perturbations(model, x, targets, "l2", steps=30, targeted=True)
    found = torch.isfinite(distances)
    with torch.no_grad():
        assert bool((model(x_best[found]).argmax(1) == targets[found]).all())
    assert int(found.sum()) >= 40
    threat = ThreatModel(Norm.L2, 1.5, targeted=True)
    result = FMN(steps=30)(model, x, y, threat=threat, targets=targets)
    assert float(result.success.float().mean()) > 0.6
    assert bool((result.logits.argmax(1)[result.success] == targets[result.success]).all())


def test_steps_scale_with_the_bounds():
    """alpha is in [0, 1]-range units: on inputs mapped to [-1, 1] (and a model that maps them
    back), every distance doubles and the examples stay in the new bounds."""
    model, x, y = digits()
    x, y = x[:32], y[:32]
    _, unit = minimal_perturbations(model, x, y, "l2", steps=20, classes=1)
    wide_best, wide = minimal_perturbations(lambda z: model((z + 1) / 2), 2 * x - 1, y, "l2", steps=20, classes=1,
                                            bounds=(-1.0, 1.0))
    found = torch.isfinite(unit) & (unit > 0)
    assert torch.equal(found, torch.isfinite(wide) & (wide > 0))
    assert torch.allclose(wide[found], 2 * unit[found], rtol=1e-3)
    assert float(wide_best.min()) >= -1.0 and float(wide_best.max()) <= 1.0


def test_reduced_precision_is_confirmed_in_fp32():
    model, x, y = digits()
    x, y = x[:32], y[:32]
    x_best, distances = minimal_perturbations(model, x, y, "linf", steps=15, classes=1, precision="fp16")
    found = torch.isfinite(distances)
    assert int(found.sum()) >= 16
    with torch.no_grad():
        assert bool((model(x_best[found]).argmax(1) != y[found]).all())
