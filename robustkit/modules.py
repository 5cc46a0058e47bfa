"""Small torch helpers shared by loaders, attacks and engines."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

#: Anything that maps a batch of inputs in the bounds to (N, C) scores: an ``nn.Module`` for
#: white-box attacks, or a plain predict function (an ONNX session) for black-box ones.
Model = Callable[[Tensor], Tensor]


class Normalized(nn.Module):
    """``net((x - mean) / std)``: keeps the normalisation inside the model.

    This is the one input convention of robustkit: every attack and backend sees inputs in the
    bounds, epsilons are in input units, and an exported graph takes the same inputs.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError("mean and std need the same length and a positive std")
        self.net = net
        self.mean: Tensor
        self.std: Tensor
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.mean) / self.std)


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Put every submodule in eval mode and restore each one's own mode afterwards.

    Saving per-submodule flags (not only ``model.training``) keeps mixed modes intact, e.g. a
    frozen BatchNorm inside a model that is otherwise training.
    """
    if not isinstance(model, nn.Module):
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def model_device(model: Any) -> torch.device:
    """Device of a module's first parameter or buffer (CPU for parameter-free callables)."""
    if isinstance(model, nn.Module):
        for parameter in model.parameters():
            return parameter.device
        for buffer in model.buffers():
            return buffer.device
    return torch.device("cpu")


@torch.no_grad()
def predict_logits(model: Model, x: Tensor, batch_size: int = 512) -> Tensor:
    """fp32 logits in batches, without autocast: the reference every success is judged by."""
    device = model_device(model)
    outputs = []
    with torch.autocast(device.type, enabled=False):
        for start in range(0, len(x), batch_size):
            batch = x[start : start + batch_size].to(device, torch.float32)
            outputs.append(model(batch).float())
    if not outputs:
        return torch.empty(0, 0)
    return torch.cat(outputs)
