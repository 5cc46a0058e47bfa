"""``example:momentum``: the momentum iterative attack (MI-FGSM, Dong et al., 2018).

Each step adds the l1-normalised input gradient to a running momentum and moves along the
momentum (its sign for linf, its direction for l2), then projects into the eps-ball. Momentum
keeps the direction stable across steps, which is why MI-FGSM was proposed for transfer
attacks; white-box it is about as strong as PGD of the same step count, and with no random
start it is deterministic, so it cannot stand in for PGD with restarts.

What a plugin attack writes is ``run``: robustkit's ``Attack.__call__`` has already checked
the norm, put the model in eval mode and turned targets into ``labels``, and afterwards it
projects the result into the ball and the bounds and judges success in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from robustkit import Attack, Model, Norm, ThreatModel, param

Loss = Literal["ce", "margin"]


@dataclass(frozen=True)
class MomentumParams:
    steps: int = param(10, "gradient steps")
    step_size: float | None = param(None, "step length in input units; default 2.5 * eps / steps")
    decay: float = param(1.0, "momentum decay factor mu (0 gives the basic iterative method)")
    loss: Loss = param("ce", "objective: cross-entropy or the C&W margin")

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError("steps must be >= 1")
        if self.step_size is not None and self.step_size <= 0:
            raise ValueError("step_size must be > 0")
        if self.decay < 0:
            raise ValueError("decay must be >= 0")


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    return values.view(-1, *([1] * (like.dim() - 1)))


def objective_gradient(model: Model, x: Tensor, labels: Tensor, *, targeted: bool, loss: Loss) -> tuple[Tensor, Tensor]:
    """Gradient of the attack objective (rising as the attack progresses) and the logits at ``x``."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x).float()
        if loss == "ce":
            value = F.cross_entropy(logits, labels, reduction="sum")  # summed: no 1/N shrinkage
        else:
            true = logits.gather(1, labels.view(-1, 1)).squeeze(1)
            others = logits.scatter(1, labels.view(-1, 1), float("-inf")).amax(dim=1)
            value = (others - true).sum()
        (grad,) = torch.autograd.grad(-value if targeted else value, x)
    return grad, logits.detach()


class Momentum(Attack):
    """Momentum iterative gradient attack (MI-FGSM, Dong et al., 2018), linf and l2."""

    name = "momentum"
    aliases = ("mi-fgsm",)
    norms = frozenset({Norm.LINF, Norm.L2})
    Params = MomentumParams
    summary = "momentum iterative gradient attack (MI-FGSM, Dong et al., 2018); no random start"

    def run(self, model: Model, x: Tensor, labels: Tensor, threat: ThreatModel) -> Tensor:
        p: MomentumParams = self.params
        step_size = p.step_size if p.step_size is not None else 2.5 * threat.eps / p.steps
        x_adv, best = x.clone(), x.clone()
        fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        momentum = torch.zeros_like(x)
        for _ in range(p.steps):
            grad, logits = objective_gradient(model, x_adv, labels, targeted=threat.targeted, loss=p.loss)
            # Keep the first iterate that fooled the model (torch.where: no host sync per step).
            predicted = logits.argmax(dim=1)
            hit = (predicted == labels) if threat.targeted else (predicted != labels)
            best = torch.where(_per_sample(hit & ~fooled, x), x_adv, best)
            fooled |= hit
            momentum = p.decay * momentum + grad / _per_sample(grad.flatten(1).abs().sum(1).clamp_min(1e-12), x)
            if threat.norm is Norm.LINF:
                direction = momentum.sign()
            else:
                direction = momentum / _per_sample(momentum.flatten(1).norm(dim=1).clamp_min(1e-12), x)
            x_adv = threat.project(x, x_adv + step_size * direction)
        return torch.where(_per_sample(fooled, x), best, x_adv)
