"""Reduced-precision arithmetic, one definition for attacks and training alike.

``Precision`` names the autocast dtype of a forward-backward pass; fp32 logits are what every
verdict (fooled or not, accuracy) is judged by, whatever the precision of the pass.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Literal

import torch
from torch import Tensor

Precision = Literal["fp32", "bf16", "fp16"]

AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: fp16 input gradients of a summed loss can underflow: the objective is multiplied by this
#: power of two before the backward pass and the gradient divided by it after, which is exact.
FP16_LOSS_SCALE = 1024.0


def autocast(device_type: str, precision: Precision) -> AbstractContextManager[Any]:
    """Autocast to ``precision``'s dtype on ``device_type``; a no-op for fp32."""
    dtype = AUTOCAST_DTYPES.get(precision)
    return torch.autocast(device_type, dtype=dtype, enabled=dtype is not None)


def input_gradient(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    objective: Callable[[Tensor], Tensor],
    precision: Precision,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(gradient, values, logits)``: the fp32 logits of ``model(x)`` (forward under autocast),
    ``values = objective(logits)`` (per sample or a scalar, always in fp32) and the gradient of
    their sum with respect to ``x`` alone (parameter ``.grad`` is untouched), in true scale."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        with autocast(x.device.type, precision):
            logits = model(x)
        logits32 = logits.float()
        values = objective(logits32)
        total = values.sum()
        scaled = precision == "fp16"
        (grad,) = torch.autograd.grad(total * FP16_LOSS_SCALE if scaled else total, x)
    return (grad / FP16_LOSS_SCALE if scaled else grad), values.detach(), logits32.detach()
