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
from torch import Tensor

from robustkit import ThreatModel
from robustkit.data import load_digits
from robustkit.modules import fast_layout
from robustkit.testing import (
    assert_close_to_builtin,
    attack_digits,
    checked_robust_accuracy,
    trained_digits_model,
)

pytestmark = pytest.mark.slow
CASES = [(kind, eps) for kind in ("cnn", "normalized-bn") for eps in (0.05, 0.1)]
STEPS = 10


@cache
def _wrapped_pgd(kind: str, eps: float) -> tuple[float, Tensor]:
    """torchattacks:pgd with the shared settings, run once per case for both PGD tests."""
    return attack_digits(PGD(steps=STEPS, step_size=2.5 * eps / STEPS), kind, eps)


@pytest.mark.parametrize(("kind", "eps"), CASES)
def test_fgsm_agrees_with_robustkit_fgsm(kind: str, eps: float) -> None:
    assert_close_to_builtin(attack_digits(FGSM(), kind, eps)[0], "fgsm", kind, eps, points=1.0)


@pytest.mark.parametrize(("kind", "eps"), CASES)
def test_pgd_agrees_with_robustkit_pgd(kind: str, eps: float) -> None:
    """Same steps, step size and random start. The native PGD keeps any iterate that fooled
    the model, torchattacks only the last one, so the native number may be slightly lower."""
    wrapped, _ = _wrapped_pgd(kind, eps)
    assert_close_to_builtin(wrapped, "pgd", kind, eps, points=3.0, steps=STEPS, step_size=2.5 * eps / STEPS)


@pytest.mark.parametrize(("kind", "eps"), CASES)
def test_pgd_agrees_with_torchattacks_called_directly(kind: str, eps: float) -> None:
    step_size = 2.5 * eps / STEPS
    wrapped, wrapped_adv = _wrapped_pgd(kind, eps)
    model = trained_digits_model(kind)
    data = load_digits()
    x, y = data.x, data.y
    torch.manual_seed(0)
    direct = torchattacks.PGD(model, eps=eps, alpha=step_size, steps=STEPS, random_start=True)
    with fast_layout(model, x) as x_run:  # the memory layout robustkit runs the model in
        direct_adv = direct(x_run, y)
    direct_accuracy = checked_robust_accuracy(model, x, y, direct_adv, ThreatModel.parse(f"linf:{eps}"))
    assert abs(wrapped - direct_accuracy) <= 3.0, (wrapped, direct_accuracy)
    # Same library, seed and layout: the wrapper must not change what torchattacks computes.
    assert torch.allclose(wrapped_adv, direct_adv, atol=1e-6)
