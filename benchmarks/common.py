"""Shared pieces of the attack benchmarks: one model, one batch, one threat, the libraries'
PGD called directly, and one way to time runs."""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from robustkit.models.zoo import cnn4_bn

#: PGD-10 at linf 8/255 with native PGD's default step (2.5 * eps / steps = 2/255), given to
#: every implementation.
EPS, STEPS = 8 / 255, 10
STEP = 2.5 * EPS / STEPS


def arguments(description: str, repeats: int) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    return parser.parse_args()


def benchmark_setup(batch: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The benchmark CNN (4 conv layers with BatchNorm, eval mode) and a synthetic 3x32x32 batch."""
    torch.manual_seed(0)
    return cnn4_bn().eval(), torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))


def torchattacks_pgd(model: torch.nn.Module) -> Any:
    """torchattacks.PGD with the shared settings, as a user builds it."""
    import torchattacks

    return torchattacks.PGD(model, eps=EPS, alpha=STEP, steps=STEPS, random_start=True)


def art_pgd(model: torch.nn.Module, batch: int) -> Any:
    """ART's ProjectedGradientDescentPyTorch with the shared settings, as a user builds it."""
    from art.attacks.evasion import ProjectedGradientDescentPyTorch
    from art.estimators.classification import PyTorchClassifier

    classifier = PyTorchClassifier(model, loss=torch.nn.CrossEntropyLoss(), input_shape=(3, 32, 32), nb_classes=10,
                                   clip_values=(0.0, 1.0))
    return ProjectedGradientDescentPyTorch(classifier, norm=np.inf, eps=EPS, eps_step=STEP, max_iter=STEPS,
                                           num_random_init=1, batch_size=batch, verbose=False)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_seconds(runs: dict[str, Callable[[], object]], repeats: dict[str, int]) -> dict[str, float]:
    """Median wall time of each run after one warm-up call (kernel selection, allocator, lazy
    imports). Repeats are interleaved, so that a change of load hits every run alike."""
    for fn in runs.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(max(repeats.values())):
        for name, fn in runs.items():
            if repeat < repeats[name]:
                samples[name].append(timed(fn))
    return {name: statistics.median(values) for name, values in samples.items()}
