"""Shared pieces of the attack benchmarks: one model, one batch, one stopwatch."""
from __future__ import annotations

import time
from collections.abc import Callable

import torch

from robustkit.zoo import cnn4_bn


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def benchmark_setup(batch: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The benchmark CNN (4 conv layers with BatchNorm, eval mode) and a synthetic 3x32x32 batch."""
    torch.manual_seed(0)
    return cnn4_bn().eval(), torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
