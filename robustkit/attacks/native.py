"""robustkit's own gradient attacks in pure torch: FGSM and PGD (linf, l2).

Written for speed on any device: gradients are taken with respect to the input only (no
parameter gradients are computed), the loss is summed so each sample's gradient does not
shrink with the batch size, optional bf16/fp16 autocast covers the forward-backward pass, and
samples stop being attacked as soon as an iterate fools the model (that iterate is kept:
a sample counts as broken if any iterate broke it, not only the last one).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from robustkit.attacks.base import Attack, is_success
from robustkit.modules import Model
from robustkit.params import param
from robustkit.precision import Precision, input_gradient
from robustkit.threat import Norm, ThreatModel

LossName = Literal["ce", "margin"]


def margin_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-sample ``max_{j != y} z_j - z_y`` (the C&W margin): positive once misclassified."""
    true = logits.gather(1, labels.view(-1, 1)).squeeze(1)
    others = logits.scatter(1, labels.view(-1, 1), float("-inf")).amax(dim=1)
    return others - true


def warn_slow_precision(device: torch.device, precision: Precision) -> None:
    """bf16 on a CPU without bf16 instructions runs reference kernels, far slower than fp32
    (docs/performance.md)."""
    if precision == "bf16" and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        # warnings.warn shows this once per call site, not once per batch.
        warnings.warn("precision bf16 on a CPU without bf16 instructions is slower than fp32; use fp32 here",
                      RuntimeWarning, stacklevel=3)


def loss_gradient(
    model: Model, x: Tensor, labels: Tensor, *, targeted: bool, loss: LossName, precision: Precision
) -> tuple[Tensor, Tensor]:
    """Gradient of the attack objective with respect to ``x`` and the fp32 logits at ``x``.

    The objective increases as the attack makes progress: the summed loss for untargeted
    attacks (summed, so a sample's gradient does not shrink with the batch), minus the loss
    towards the target for targeted ones.
    """
    sign = -1.0 if targeted else 1.0

    def objective(logits: Tensor) -> Tensor:
        if loss == "ce":
            return sign * F.cross_entropy(logits, labels, reduction="sum")
        return sign * margin_loss(logits, labels).sum()

    grad, _, logits = input_gradient(model, x, objective, precision)
    return grad, logits


def ascent_step(grad: Tensor, norm: Norm, size: float) -> Tensor:
    """The steepest-ascent step of length ``size`` for the norm: sign for linf, unit l2 else."""
    if norm is Norm.LINF:
        return size * grad.sign()
    norms = grad.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
    return size * grad / norms.view(-1, *([1] * (grad.dim() - 1)))


def random_start(x: Tensor, threat: ThreatModel, generator: torch.Generator) -> Tensor:
    """A uniform point of the linf, l2 or l1 ball around ``x``, projected into the bounds.

    A uniform point of an lp ball is a direction ``g / ||g||_p`` with ``g`` drawn from the
    generalised normal density ``exp(-|t|^p)`` (Gaussian for l2, Laplace for l1) times a
    radius ``eps * u^(1/d)``.
    """
    if threat.norm is Norm.LINF:
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        delta = (2 * noise - 1) * threat.eps
    else:
        p = 2 if threat.norm is Norm.L2 else 1
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if p == 1:  # a Laplace draw: a Gaussian's sign times an exponential's size
            uniform = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            direction = direction.sign() * -torch.log1p(-uniform)
        direction = direction / direction.flatten(1).norm(p=p, dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        dims = x[0].numel()
        radius = torch.rand(len(x), generator=generator, device=x.device, dtype=x.dtype) ** (1.0 / dims)
        delta = direction * (threat.eps * radius).view(-1, *([1] * (x.dim() - 1)))
    return threat.project(x, x + delta)


def _generator(x: Tensor, seed: int) -> torch.Generator:
    return torch.Generator(device=x.device).manual_seed(seed)


@dataclass(frozen=True)
class FGSMParams:
    loss: LossName = param("ce", "objective: cross-entropy or the C&W margin")
    precision: Precision = param("fp32", "autocast dtype for the gradient; success is judged in fp32")


class FGSM(Attack):
    """Fast gradient sign method (linf) / fast gradient method (l2): one step of size eps."""

    name = "fgsm"
    aliases = ("fgm",)
    norms = frozenset({Norm.LINF, Norm.L2})
    Params = FGSMParams
    summary = "one gradient step of size eps (Goodfellow et al., 2015)"

    def run(self, model: Model, x: Tensor, labels: Tensor, threat: ThreatModel) -> Tensor:
        p: FGSMParams = self.params
        warn_slow_precision(x.device, p.precision)
        grad, _ = loss_gradient(model, x, labels, targeted=threat.targeted, loss=p.loss, precision=p.precision)
        return x + ascent_step(grad, threat.norm, threat.eps)


@dataclass(frozen=True)
class PGDParams:
    steps: int = param(10, "gradient steps per restart")
    step_size: float | None = param(None, "step length in input units; default 2.5 * eps / steps")
    random_start: bool = param(True, "start from a uniform point of the eps-ball")
    restarts: int = param(1, "independent runs; later ones attack only the samples still standing")
    loss: LossName = param("ce", "objective: cross-entropy or the C&W margin")
    precision: Precision = param("fp32", "autocast dtype for the gradient; success is judged in fp32")
    early_stop: bool = param(True, "stop attacking a sample once an iterate fools the model")
    last_iterate: bool = param(False, "return every sample's last iterate (the inner maximiser of "
                                      "adversarial training) instead of the first that fooled; no early stop")
    seed: int = param(0, "seed of the random starts")

    def __post_init__(self) -> None:
        if self.steps < 1 or self.restarts < 1:
            raise ValueError("steps and restarts must be >= 1")
        if self.last_iterate and self.restarts > 1:
            raise ValueError("last_iterate needs restarts=1")
        if self.step_size is not None and self.step_size <= 0:
            raise ValueError("step_size must be > 0")


def _confirmed_in_fp32(model: Model, x_adv: Tensor, target: Tensor, hit: Tensor, targeted: bool) -> Tensor:
    """``hit`` narrowed to the samples whose iterate also fools the model in fp32.

    A reduced-precision forward pass can flip a near tie: a sample "fooled" only in bf16 must
    not be stopped on (with early stop it would never be attacked again), because
    ``Attack.__call__`` judges the result in fp32. The extra pass runs on the hits alone.
    """
    index = hit.nonzero().squeeze(1)
    with torch.no_grad(), torch.autocast(x_adv.device.type, enabled=False):
        logits = model(x_adv[index]).float()
    confirmed = hit.clone()
    confirmed[index] = is_success(logits, target[index], targeted)
    return confirmed


class PGD(Attack):
    """Projected gradient descent (Madry et al., 2018) with random starts and restarts."""

    name = "pgd"
    aliases = ("bim-rs", "madry")
    norms = frozenset({Norm.LINF, Norm.L2})
    Params = PGDParams
    summary = "iterated gradient steps projected into the eps-ball (Madry et al., 2018)"

    def run(self, model: Model, x: Tensor, labels: Tensor, threat: ThreatModel) -> Tensor:
        p: PGDParams = self.params
        warn_slow_precision(x.device, p.precision)
        step_size = p.step_size if p.step_size is not None else 2.5 * threat.eps / p.steps
        generator = _generator(x, p.seed)
        if p.last_iterate:  # Madry's maximiser: no success bookkeeping, no host syncs
            x_adv = random_start(x, threat, generator) if p.random_start else x.clone()
            for _ in range(p.steps):
                grad, _ = loss_gradient(model, x_adv, labels, targeted=threat.targeted, loss=p.loss,
                                         precision=p.precision)
                x_adv = threat.project(x, x_adv + ascent_step(grad, threat.norm, step_size))
            return x_adv
        result = x.detach().clone()
        fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for restart in range(p.restarts):
            active = (~fooled).nonzero().squeeze(1)
            if active.numel() == 0:
                break
            x0, target = x[active], labels[active]
            x_adv = random_start(x0, threat, generator) if p.random_start else x0.clone()
            for _ in range(p.steps):
                grad, logits = loss_gradient(
                    model, x_adv, target, targeted=threat.targeted, loss=p.loss, precision=p.precision
                )
                hit = is_success(logits, target, threat.targeted) & ~fooled[active]
                if p.precision != "fp32" and hit.any():
                    hit = _confirmed_in_fp32(model, x_adv, target, hit, threat.targeted)
                if hit.any():
                    result[active[hit]] = x_adv[hit]
                    fooled[active[hit]] = True
                    if p.early_stop:
                        keep = ~hit
                        active, x0, target, x_adv, grad = (t[keep] for t in (active, x0, target, x_adv, grad))
                        if active.numel() == 0:
                            break
                x_adv = threat.project(x0, x_adv + ascent_step(grad, threat.norm, step_size))
            standing = ~fooled[active]
            result[active[standing]] = x_adv[standing]
            if restart < p.restarts - 1 and active.numel():
                # Only a further restart needs to know whether the last iterate fooled the
                # model; after the last restart, Attack.__call__ judges it in fp32 anyway.
                with torch.no_grad():
                    final_hit = is_success(model(x_adv).float(), target, threat.targeted) & standing
                fooled[active[final_hit]] = True
        return result
