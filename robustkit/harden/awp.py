"""Adversarial weight perturbation (AWP; Wu, Xia & Wang, "Adversarial Weight Perturbation Helps
Robust Generalization", NeurIPS 2020): each update uses the gradient taken at weights moved, layer
by layer, in the direction that most increases the defence's own training loss, which flattens
the robust loss landscape and narrows the robust generalisation gap.

Per batch, once the adversarial examples are crafted:

1. the gradient g_l of the defence's loss at (x, x_adv, y) (cross-entropy at x_adv for pgd-at,
   the TRADES loss for trades, ...) with respect to every weight matrix or kernel w_l is taken
   on a *proxy*: a copy of the network loaded with its weights and buffers, in train mode, so
   BatchNorm normalises by the batch's statistics as the training pass will, while only the
   proxy's running statistics see this extra pass (the paper's code does the same). As in that
   code, only parameters named ``*weight*`` with more than one dimension move: biases and
   BatchNorm's affine parameters stay;
2. each w_l moves by ``gamma * ||w_l|| / ||g_l|| * g_l`` (one ascent step relative to the
   layer's norm);
3. the training pass takes its gradient at the perturbed weights;
4. the weights are restored exactly (copied back, not subtracted) and the optimizer steps.
   The paper's code steps first and subtracts the perturbation after: the same update up to
   float rounding, except that weight decay here acts on the unperturbed weights.

It costs one more forward-backward pass of the loss per batch. Under torchrun the ranks sum
their g (one all-reduce), so each perturbs as one process on the global batch would. Nothing
carries from one batch to the next (the proxy is reloaded every batch, its only randomness is
dropout's, from torch's checkpointed generator, and whether AWP is on is a function of the
epoch), so a checkpoint needs no AWP state and a resumed run repeats the original exactly.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from robustkit import distributed
from robustkit.distributed import DistContext

#: The defence's training loss, (model, x, x_adv, y) -> (loss, logits) (``step.TrainLoss``).
Loss = Callable[[nn.Module, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
#: Keeps a zero gradient from dividing by zero (the paper's code uses the same).
_EPS = 1e-20


def perturbed_weights(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters AWP moves: weight matrices and kernels, as the paper's code chooses them."""
    return [(name, p) for name, p in module.named_parameters() if p.dim() > 1 and "weight" in name]


class WeightPerturbation:
    """AWP for one run: ``applied(...)`` perturbs ``module``'s weights for the training pass
    inside it and restores them bit for bit on leaving. ``active`` is set by the loop each
    epoch (off during the warm-up)."""

    def __init__(self, module: nn.Module, gamma: float, world: DistContext, compile: bool = False) -> None:
        self.module, self.gamma, self.world = module, gamma, world
        self.proxy = copy.deepcopy(module)
        self.forward: nn.Module = torch.compile(self.proxy) if compile else self.proxy  # type: ignore[assignment]
        names = dict(perturbed_weights(module))
        proxy_params = dict(self.proxy.named_parameters())
        self.weights = list(names.values())
        self.proxy_weights = [proxy_params[name] for name in names]
        self.active = False

    def gradients(self, loss: Loss, x: Tensor, x_adv: Tensor, y: Tensor,
                  autocast: AbstractContextManager[Any], scale: float) -> list[Tensor]:
        """g_l: the loss's gradient with respect to each perturbed weight, at the current weights
        (taken on the proxy; summed over ranks under torchrun). ``scale`` multiplies the loss
        (the fp16 GradScaler's factor keeps small gradients from flushing to zero)."""
        self.proxy.load_state_dict(self.module.state_dict())
        self.proxy.train()
        with autocast:
            value, _ = loss(self.forward, x.detach(), x_adv.detach(), y)
        grads = torch.autograd.grad(value * scale, self.proxy_weights, allow_unused=True)
        flat = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, self.proxy_weights)]
        if self.world.enabled:
            joined = distributed.all_reduce_sum_(torch.cat([g.flatten() for g in flat]), self.world)
            flat = [part.view_as(g) for part, g in zip(joined.split([g.numel() for g in flat]), flat)]
        return flat

    @contextmanager
    def applied(self, loss: Loss, x: Tensor, x_adv: Tensor, y: Tensor,
                autocast: AbstractContextManager[Any], scale: float = 1.0) -> Iterator[None]:
        """Inside: the weights perturbed against ``loss`` (when ``active``); after: the originals."""
        if not self.active:
            yield
            return
        grads = self.gradients(loss, x, x_adv, y, autocast, scale)
        saved = [w.detach().clone() for w in self.weights]
        with torch.no_grad():
            for w, g in zip(self.weights, grads):
                g_norm = g.float().norm()
                step = g * (self.gamma * w.float().norm() / (g_norm + _EPS))
                w.add_(torch.where(torch.isfinite(g_norm), step, 0.0))  # fp16 overflow: this step unperturbed
        try:
            yield
        finally:
            with torch.no_grad():
                for w, original in zip(self.weights, saved):
                    w.copy_(original)
