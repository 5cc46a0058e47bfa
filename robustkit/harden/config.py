"""What a hardening run is made of: the training recipe (a defence's ``Params``) and the run
settings (device, precision, output folder) that change how fast it goes but not what it learns.

The split matters for ``--resume``: a checkpoint may be continued on another device or with
more workers, but not with another recipe, because the result would no longer be the run that
was started.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from robustkit.params import param
from robustkit.precision import Precision

Placement = Literal["auto", "device", "loader"]


@dataclass(frozen=True)
class TrainingParams:
    """Settings every training defence shares; each defence adds its own below these."""

    epochs: int = param(15, "passes over the training split")
    batch_size: int = param(64, "samples per optimizer step, summed over processes under torchrun")
    lr: float = param(
        6e-3,
        "peak learning rate of the schedule (the cycle averages half its peak, so this is twice "
        "a usual constant rate); lower it, or use sgd, to fine-tune a large pretrained model",
    )
    optimizer: Literal["adam", "sgd"] = param("adam", "adam, or sgd with momentum 0.9")
    nesterov: bool = param(True, "Nesterov momentum for sgd (the papers' recipes use plain momentum)")
    weight_decay: float = param(0.0, "L2 penalty of the optimizer")
    max_grad_norm: float = param(
        0.0,
        "clip the global l2 norm of the parameters' gradient to this before each update (0: off); "
        "BERT fine-tuning clips at 1 (Hugging Face's and FreeLB's code), so one steep batch cannot "
        "throw a transformer's weights far",
    )
    # One cycle for every defence, as fast adversarial training (Wong et al., 2020) uses it: it
    # beat a constant rate for pgd-at, trades and free on builtin:digits (docs/performance.md).
    schedule: Literal["constant", "cyclic", "cosine", "piecewise"] = param(
        "cyclic",
        "learning rate over the run: cyclic (0 -> lr at 2/5 of the run -> 0), cosine decay, "
        "piecewise (divided by 10 at each milestone) or constant",
    )
    milestones: str = param("0.5,0.75", "piecewise schedule: shares of the run after which the lr is divided by 10")
    val_fraction: float = param(0.1, "share of the training split held out for the per-epoch canary")
    canary_steps: int = param(5, "PGD steps of the per-epoch robust-accuracy canary")
    canary_size: int = param(512, "validation samples the canary attacks, at most")
    patience: int = param(
        5,
        "stop after this many epochs without a better robust validation accuracy (0: never stop early)",
    )
    overfit_drop: float = param(
        0.2,
        "a fall of robust validation accuracy this large below the best, "
        "with clean accuracy holding, is catastrophic overfitting",
    )
    stop_on_overfit: bool = param(True, "stop at catastrophic overfitting (the best weights are kept)")
    seed: int = param(0, "seed of the validation split, shuffling, random starts and fresh weights")
    augment: str = param(
        "auto",
        "augmentation on the device, before the attack: crop, flip, crop,flip, none, or auto "
        "(crop and flip for images of 16x16 pixels or more, none below)",
    )
    crop_padding: int = param(4, "padding of the random crop, in pixels")
    awp_gamma: float = param(
        0.0,
        "adversarial weight perturbation (--awp; Wu et al., 2020): before each update every weight layer moves "
        "by this share of its norm against the training loss; 0: off (the authors' code: 1e-2 pgd-at, 5e-3 trades)",
    )
    awp_warmup: int = param(0, "epochs before AWP starts (Wu et al.'s PGD-AT code: 0)")

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("lr must be > 0 and weight_decay >= 0")
        if self.max_grad_norm < 0:
            raise ValueError("max_grad_norm must be >= 0 (0: no clipping)")
        if not 0 < self.val_fraction < 1:
            raise ValueError("val_fraction must lie strictly between 0 and 1")
        if self.canary_steps < 1 or self.canary_size < 1 or self.patience < 0:
            raise ValueError("canary_steps and canary_size must be >= 1, patience >= 0")
        if not 0 < self.overfit_drop <= 1:
            raise ValueError("overfit_drop must lie in (0, 1]")
        if self.crop_padding < 0:
            raise ValueError("crop_padding must be >= 0")
        if self.awp_gamma < 0 or self.awp_warmup < 0:
            raise ValueError("awp_gamma and awp_warmup must be >= 0")
        if self.awp_gamma and self.awp_warmup >= self.epochs:
            raise ValueError(f"awp_warmup {self.awp_warmup} leaves none of the {self.epochs} epochs to AWP; "
                             "lower it (-o awp_warmup N) or raise epochs")
        self.milestone_shares()

    def milestone_shares(self) -> tuple[float, ...]:
        """``milestones`` as numbers in (0, 1), ascending."""
        try:
            shares = tuple(float(part) for part in self.milestones.split(",") if part.strip())
        except ValueError:
            raise ValueError(f"milestones {self.milestones!r}: give shares of the run such as 0.5,0.75") from None
        if not all(0 < share < 1 for share in shares) or list(shares) != sorted(shares):
            raise ValueError(f"milestones {self.milestones!r}: ascending shares of the run in (0, 1)")
        return shares


@dataclass(frozen=True)
class RunConfig:
    """How a run executes; none of it changes what the model learns (up to float rounding)."""

    device: str = "cpu"
    precision: Precision = "fp32"
    channels_last: bool = False
    compile: bool = False  #: ``torch.compile`` the model (first epoch pays the compilation)
    placement: Placement = "auto"  #: data on the device when it fits, else a pinned DataLoader
    workers: int = 2  #: DataLoader worker processes when the data stays on the host
    out_dir: Path | None = None  #: checkpoint and log folder; None keeps everything in memory
    resume: bool = False
    progress: bool = True
