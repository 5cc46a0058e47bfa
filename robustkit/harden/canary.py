"""The per-epoch canary: robust validation accuracy under a few-step PGD, which picks the best
epoch, stops a run that no longer improves and catches catastrophic overfitting."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from robustkit import distributed
from robustkit.attacks.native import PGD
from robustkit.data import float_inputs
from robustkit.distributed import DistContext
from robustkit.harden.config import TrainingParams
from robustkit.modules import eval_mode, predict_logits
from robustkit.precision import Precision
from robustkit.threat import ThreatModel

#: Clean validation accuracy may dip this much while robust accuracy collapses and still count
#: as "holding" (catastrophic overfitting, unlike divergence, leaves clean accuracy intact).
CLEAN_SLACK = 0.02


def canary(
    craft: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    params: TrainingParams,
    precision: Precision,
    world: DistContext,
    device: torch.device,
) -> tuple[float, float]:
    """(clean, robust) accuracy on the validation samples under a few-step PGD, over all ranks.

    Same seed every epoch, so epochs are compared on the same random starts.
    """
    attack = PGD(steps=params.canary_steps, precision=precision, seed=params.seed)
    mine = torch.arange(world.rank, len(x), world.world_size)
    clean = robust = 0
    with eval_mode(craft):
        for index in mine.split(512):
            xb, yb = float_inputs(x[index].to(device)), y[index].to(device)
            right = predict_logits(craft, xb).argmax(1) == yb
            result = attack(craft, xb, yb, threat=threat)
            clean += int(right.sum())
            robust += int((right & ~result.success).sum())
    clean_sum, robust_sum = distributed.sum_over_ranks([clean, robust], world)
    return clean_sum / len(x), robust_sum / len(x)


@dataclass
class RunState:
    """Where a run is; all of it goes into the checkpoint."""

    epoch: int = 0  #: epochs completed
    batch: int = 0  #: batches completed inside the current epoch (after an interrupt)
    running: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])  #: loss, correct, n, s
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None  #: epoch, val_robust, val_clean, model (a CPU state dict)
    stale: int = 0  #: epochs since the best one
    stop_reason: str | None = None


def judge_epoch(
    state: RunState,
    record: dict[str, Any],
    params: TrainingParams,
    monitor: str,
    advice: str,
    model_state: Callable[[], dict[str, Tensor]],
) -> list[str]:
    """Update best weights, staleness and the stop reason from one epoch's canary; returns notes.

    The best epoch is the one with the highest ``monitor`` (``val_robust`` for defences; the
    other accuracy breaks ties). Catastrophic overfitting: robust validation accuracy falls at
    least ``overfit_drop`` below the best epoch's while clean accuracy holds (within
    ``CLEAN_SLACK``) - the signature of a model that learned to mask single-step gradients,
    not of divergence, where both fall. ``advice``: the defence's fix, said in the note.
    """
    other = "val_clean" if monitor == "val_robust" else "val_robust"
    best = state.best
    if best is None or (record[monitor], record[other]) > (best[monitor], best[other]):
        state.best = {
            "epoch": record["epoch"],
            "val_robust": record["val_robust"],
            "val_clean": record["val_clean"],
            "model": model_state(),
        }
        state.stale = 0
        record["best"] = True
        return []
    notes = []
    state.stale += 1
    robust, clean = record["val_robust"], record["val_clean"]
    if best["val_robust"] - robust >= params.overfit_drop and clean >= best["val_clean"] - CLEAN_SLACK:
        record["overfit"] = True
        notes.append(
            f"catastrophic overfitting at epoch {record['epoch']}: robust validation accuracy "
            f"fell from {best['val_robust']:.1%} (epoch {best['epoch']}) to {robust:.1%} while "
            f"clean accuracy held at {clean:.1%}; keeping the epoch-{best['epoch']} weights "
            f"({advice})"
        )
        if params.stop_on_overfit:
            state.stop_reason = "catastrophic overfitting"
    if state.stop_reason is None and params.patience and state.stale >= params.patience:
        state.stop_reason = "early stopping"
        notes.append(
            f"early stopping after epoch {record['epoch']}: no better {monitor.replace('_', ' ')} "
            f"accuracy for {state.stale} epochs; keeping the epoch-{best['epoch']} weights"
        )
    return notes
