"""torchattacks through robustkit agrees with robustkit's own attacks and with torchattacks
called directly, on CNNs trained on the real digits (360 test images), linf eps 0.05 and 0.1.

Every adversarial example is checked against the threat model here, and robust accuracy is
recomputed from the model's own predictions, not taken from either library.
"""
from __future__ import annotations

from functools import cache

import pytest
import torch
import torchattacks
from robustkit_torchattacks.attacks import FGSM, PGD
from torch import Tensor, nn

from robustkit import Attack, ThreatModel
from robustkit.data import load_digits
from robustkit.host import Host
from robustkit.modules import fast_layout
from robustkit.testing import trained_digits_model

pytestmark = pytest.mark.slow
CASES = [(kind, eps) for kind in ("cnn", "normalized-bn") for eps in (0.05, 0.1)]
STEPS = 10


def builtin_attack(name: str, **params: object) -> Attack:
    """robustkit's own attack, by the name a user types (``robustkit:pgd``)."""
    attack_cls = Host(entry_points=False).attacks.resolve(f"robustkit:{name}").obj
    return attack_cls(**params)


def _digits() -> tuple[Tensor, Tensor]:
    data = load_digits()
    return data.x, data.y


def robust_accuracy(
    model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor, threat: ThreatModel
) -> float:
    """Percentage of samples classified correctly; refuses any example off the threat model."""
    bad = threat.violations(x, x_adv)
    assert not bad.any(), f"{int(bad.sum())} adversarial examples leave the eps-ball or the bounds"
    with torch.no_grad():
        return 100 * float((model(x_adv).argmax(1) == y).float().mean())


def _through_robustkit(attack: Attack, kind: str, eps: float) -> tuple[float, Tensor]:
    model = trained_digits_model(kind)
    x, y = _digits()
    threat = ThreatModel.parse(f"linf:{eps}")
    torch.manual_seed(0)
    x_adv = attack(model, x, y, threat=threat).x_adv
    return robust_accuracy(model, x, y, x_adv, threat), x_adv


@cache
def _wrapped_pgd(kind: str, eps: float) -> tuple[float, Tensor]:
    """torchattacks:pgd with the shared settings, run once per case for both PGD tests."""
    return _through_robustkit(PGD(steps=STEPS, step_size=2.5 * eps / STEPS), kind, eps)


@pytest.mark.parametrize(("kind", "eps"), CASES)
def test_fgsm_agrees_with_robustkit_fgsm(kind: str, eps: float) -> None:
    wrapped, _ = _through_robustkit(FGSM(), kind, eps)
    native, _ = _through_robustkit(builtin_attack("fgsm"), kind, eps)
    assert abs(wrapped - native) <= 1.0, (wrapped, native)


@pytest.mark.parametrize(("kind", "eps"), CASES)
def test_pgd_agrees_with_robustkit_pgd(kind: str, eps: float) -> None:
    """Same steps, step size and random start. The native PGD keeps any iterate that fooled
    the model, torchattacks only the last one, so the native number may be slightly lower."""
    wrapped, _ = _wrapped_pgd(kind, eps)
    native, _ = _through_robustkit(
        builtin_attack("pgd", steps=STEPS, step_size=2.5 * eps / STEPS), kind, eps
    )
    assert abs(wrapped - native) <= 3.0, (wrapped, native)


@pytest.mark.parametrize(("kind", "eps"), CASES)
def test_pgd_agrees_with_torchattacks_called_directly(kind: str, eps: float) -> None:
    step_size = 2.5 * eps / STEPS
    wrapped, wrapped_adv = _wrapped_pgd(kind, eps)
    model = trained_digits_model(kind)
    x, y = _digits()
    torch.manual_seed(0)
    direct = torchattacks.PGD(model, eps=eps, alpha=step_size, steps=STEPS, random_start=True)
    with fast_layout(model, x) as x_run:  # the memory layout robustkit runs the model in
        direct_adv = direct(x_run, y)
    direct_accuracy = robust_accuracy(model, x, y, direct_adv, ThreatModel.parse(f"linf:{eps}"))
    assert abs(wrapped - direct_accuracy) <= 3.0, (wrapped, direct_accuracy)
    # Same library, seed and layout: the wrapper must not change what torchattacks computes.
    assert torch.allclose(wrapped_adv, direct_adv, atol=1e-6)
