"""Plain (non-adversarial) training: the baseline the demo trains and hardening improves on."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkit.console import progress
from robustkit.data import float_inputs


@dataclass(frozen=True)
class FitConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0


def fit(model: nn.Module, x: Tensor, y: Tensor, config: FitConfig = FitConfig()) -> list[float]:
    """Train with Adam and cross-entropy; returns the mean loss of each epoch.

    Seeded (shuffling and initial weights come from ``config.seed``) so the demo and tests
    are reproducible.
    """
    generator = torch.Generator().manual_seed(config.seed)
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    losses = []
    model.train()
    with progress() as bar:
        task = bar.add_task("training", total=config.epochs)
        for _ in range(config.epochs):
            order = torch.randperm(len(x), generator=generator).to(device)
            total = 0.0
            for start in range(0, len(x), config.batch_size):
                index = order[start : start + config.batch_size]
                loss = F.cross_entropy(model(float_inputs(x[index])), y[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(index)
            losses.append(total / len(x))
            bar.update(task, advance=1, description=f"training loss {losses[-1]:.3f}")
    model.eval()
    return losses

