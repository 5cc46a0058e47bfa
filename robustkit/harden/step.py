"""What a training defence writes: its *step*, given a ``StepContext``.

A defence says how one batch is perturbed and what loss is minimised; the loop
(``robustkit.harden.loop``) owns everything else. Examples are crafted through the *unwrapped*
module (``ctx.craft``, never the DDP wrapper, whose forward would prepare a gradient
all-reduce that crafting never runs) and, unless a defence documents otherwise, with every
submodule in eval mode, so BatchNorm neither normalises a batch by the statistics of its own
perturbation nor records them.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkit.distributed import DistContext
from robustkit.errors import RobustkitError
from robustkit.harden.awp import WeightPerturbation
from robustkit.precision import Precision, autocast, input_gradient
from robustkit.threat import ThreatModel

#: A training step: (x, y) -> (loss, logits of the inputs it trained on), both detached.
Step = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
#: A training loss: (model, x, x_adv, y) -> (loss, logits of x_adv), run under autocast.
TrainLoss = Callable[[nn.Module, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass
class Optimization:
    """The optimizer, its learning-rate schedule, under fp16 the gradient scaler, and the
    gradient clipping (``max_grad_norm``) that every defence's update goes through."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None = None
    max_grad_norm: float = 0.0  #: clip the gradients' global l2 norm to this before a step; 0: off

    def backward(self, loss: Tensor) -> float:
        """Gradients of ``loss`` in ``.grad`` (fresh); returns the factor by which they are
        scaled (the GradScaler's scale under fp16, else 1), so a step that also reads input
        gradients from this backward pass (free training) can unscale them."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            return 1.0
        scale = self.scaler.get_scale()
        self.scaler.scale(loss).backward()
        return scale

    def step(self) -> None:
        """One optimizer and schedule step on the gradients in ``.grad``, clipped first if
        ``max_grad_norm`` is set (under fp16 on the unscaled gradients, which the scaler then
        does not unscale again; a step whose gradients overflowed is still skipped). Under DDP
        the gradients were all-reduced at backward, so every process clips the same ones."""
        if self.max_grad_norm:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()

    def update(self, loss: Tensor) -> float:
        """``backward`` then ``step``; returns the gradients' scale."""
        scale = self.backward(loss)
        self.step()
        return scale


@dataclass
class StepContext:
    """What a defence's step may use; built by the loop for one run."""

    model: nn.Module  #: the forward pass that trains (DDP-wrapped and/or compiled)
    craft: nn.Module  #: the unwrapped module (compiled if asked): craft examples through this
    threat: ThreatModel
    device: torch.device
    precision: Precision
    generator: torch.Generator  #: random starts (on ``device``); checkpointed with the run
    optimization: Optimization
    seed: int
    world: DistContext
    train_size: int  #: samples in the training split: per-sample state is indexed by position in it
    carry: dict[str, Tensor] = field(default_factory=dict)  #: state kept across batches (checkpointed)
    #: Positions in the training split of the batch being stepped on, on the device that holds
    #: the training data (the training device when it fits there, else the host): per-sample
    #: state belongs there too. Set by the loop before each step.
    batch_index: Tensor | None = None
    #: Adversarial weight perturbation (``--awp``), applied by ``train``; None without it.
    awp: WeightPerturbation | None = None

    def autocast(self) -> AbstractContextManager[Any]:
        return autocast(self.device.type, self.precision)

    def train(self, loss: TrainLoss, x: Tensor, x_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor, float]:
        """One optimizer step on ``loss(model, x, x_adv, y)``, under ``--awp`` with the gradient
        taken at adversarially perturbed weights (``robustkit.harden.awp``). Returns the loss,
        the logits and the gradients' scale (see ``Optimization.backward``)."""
        opt = self.optimization
        perturbed: AbstractContextManager[Any] = nullcontext()
        if self.awp is not None:
            loss_scale = opt.scaler.get_scale() if opt.scaler is not None else 1.0
            perturbed = self.awp.applied(loss, x, x_adv, y, self.autocast(), loss_scale)
        with perturbed:
            with self.autocast():
                value, logits = loss(self.model, x, x_adv, y)
            scale = opt.backward(value)
        opt.step()
        return value, logits, scale

    def update(self, loss: Tensor) -> float:
        """One optimizer and schedule step on a loss the step computed itself (see
        ``Optimization.update``). AWP must perturb the weights before that loss's forward pass,
        so under ``--awp`` a step has to use ``train`` (or ``adversarial_step``) instead."""
        if self.awp is not None:
            raise RobustkitError(
                "this defence's step computes its loss itself (ctx.update), so --awp cannot perturb the "
                "weights before it; drop --awp, or write the step with ctx.train or adversarial_step"
            )
        return self.optimization.update(loss)

    def input_gradient(self, x: Tensor, objective: Callable[[Tensor], Tensor]) -> Tensor:
        """Gradient of ``objective(fp32 logits of craft(x))`` with respect to ``x``, in fp32.

        Only the input gradient is computed (parameter ``.grad`` is untouched).
        """
        grad, _, _ = input_gradient(self.craft, x, objective, self.precision)
        return grad

    def step_seed(self) -> int:
        """A seed unique to this run, rank and optimizer step, restored exactly on resume."""
        return hash((self.seed, self.world.rank, self.optimization.scheduler.last_epoch)) & 0x7FFF_FFFF


def cross_entropy_loss(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Madry's outer objective: cross-entropy at the adversarial examples only."""
    logits = model(x_adv).float()
    return F.cross_entropy(logits, y), logits


def adversarial_step(
    ctx: StepContext,
    perturb: Callable[[Tensor, Tensor], Tensor],
    loss: TrainLoss = cross_entropy_loss,
) -> Step:
    """The usual step: craft ``x_adv = perturb(x, y)``, then one update on ``loss`` (``ctx.train``)."""

    def step(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        value, logits, _ = ctx.train(loss, x, perturb(x, y), y)
        return value.detach(), logits.detach()

    return step


class LoopDefence(Protocol):
    """What the loop needs of a training defence (``robustkit.harden.defences.StepDefence``
    is the base class that provides it): a name and params for the recipe, the validation
    metric that picks the best epoch, replays per batch, the step, and the per-epoch canary."""

    name: ClassVar[str]
    monitor: ClassVar[str]
    overfit_advice: ClassVar[str]
    params: Any

    @property
    def replays(self) -> int: ...

    def make_step(self, ctx: StepContext) -> Step: ...

    def canary(self, craft: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, params: Any,
               precision: Precision, world: DistContext, device: torch.device) -> tuple[float, float]: ...
