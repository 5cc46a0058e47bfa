"""A training defence in one plugin file: MART (Wang et al., ICLR 2020) on robustkit's engine.

    robustkit --plugins-dir examples/plugins_dir harden builtin:digits-cnn --data builtin:digits \\
        --defence mart --eps 0.2 --out hardened/

A training defence writes only its *step*: how a batch is perturbed and what loss is
minimised. ``robustkit harden`` does everything else for it, as for the built-in defences:
data placement, precision, the learning-rate schedule, the per-epoch robust canary, atomic
checkpoints, ``--resume``, Ctrl-C and torchrun.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import robustkit
from robustkit.params import param


@dataclass(frozen=True)
class MARTParams(robustkit.TrainingParams):  # epochs, lr, batch size, canary, ... come with it
    beta: float = param(6.0, "weight of the KL term, which counts most on samples the model gets wrong")
    steps: int = param(5, "PGD steps that craft the training examples")


class MART(robustkit.TrainingDefence):
    """Misclassification-aware adversarial training: a boosted cross-entropy at the adversarial
    example plus a clean-to-adversarial KL term weighted by how unsure the model is of the
    true class at the clean input."""

    name = "mart"
    norms = frozenset({robustkit.Norm.LINF})
    Params = MARTParams
    summary = "misclassification-aware adversarial training (Wang et al., 2020)"

    def make_step(self, ctx: robustkit.StepContext) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
        p: MARTParams = self.params
        threat = ctx.threat
        step_size = 2.5 * threat.eps / p.steps

        def perturb(x: Tensor, y: Tensor) -> Tensor:
            # ctx.generator is checkpointed with the run, so a resumed run draws the same starts
            noise = torch.rand(x.shape, generator=ctx.generator, device=x.device, dtype=x.dtype)
            x_adv = threat.project(x, x + (2 * noise - 1) * threat.eps)
            with robustkit.eval_mode(ctx.craft):  # craft through the unwrapped model, BatchNorm frozen
                for _ in range(p.steps):
                    grad = ctx.input_gradient(x_adv, lambda logits: F.cross_entropy(logits, y, reduction="sum"))
                    x_adv = threat.project(x, x_adv + step_size * grad.sign())
            return x_adv

        def loss(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            adversarial, clean = model(x_adv).float(), model(x).float()
            p_adv, p_clean = adversarial.softmax(1), clean.softmax(1)
            most_likely_wrong = p_adv.scatter(1, y[:, None], 0.0).amax(1)
            boosted = F.cross_entropy(adversarial, y) - torch.log1p(-most_likely_wrong.clamp(max=1 - 1e-6)).mean()
            kl = F.kl_div(p_adv.clamp_min(1e-12).log(), p_clean, reduction="none").sum(1)
            unsure = 1 - p_clean.gather(1, y[:, None]).squeeze(1)
            return boosted + p.beta * (kl * unsure).mean(), adversarial

        return robustkit.adversarial_step(ctx, perturb, loss)


@robustkit.hookimpl
def robustkit_register_defences(registry: robustkit.ProviderRegistry[Any]) -> None:
    registry.add(MART)
