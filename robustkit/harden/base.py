"""The defence interface: something that makes a model harder to attack.

Two kinds exist. A *training* defence (adversarial training) returns new weights; a
*transform* defence wraps the model with an input transformation (squeezing, JPEG, ...).
Transforms are often not differentiable, so they may only mask gradients: they declare
``masks_gradients`` so that audits and exports can say so instead of staying silent.

Every defence is called the same way, ``apply(model, data, threat=..., run=...)``. A training
defence built on robustkit's loop (``robustkit.harden.defences.TrainingDefence``) gets the
canary, early stopping, checkpoints, ``--resume``, torchrun and reduced precision from it; one
that runs a loop of its own (ART's trainers) declares in ``loop`` what it lacks, and
``robustkit harden`` refuses the settings it cannot honour and says what is missing before
any work starts.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from torch import nn

from robustkit.data import Dataset
from robustkit.harden.config import RunConfig
from robustkit.params import Configurable
from robustkit.precision import Precision
from robustkit.threat import ThreatModel


@dataclass
class DefenceResult:
    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)  #: one record per epoch
    notes: list[str] = field(default_factory=list)
    survives_export: bool = True  #: False for transformations outside the graph or randomness


@dataclass(frozen=True)
class LoopSupport:
    """What a training defence's loop provides; robustkit's own loop provides all of it."""

    canary: bool = True  #: per-epoch robust validation, best weights, early stopping, overfitting alarm
    checkpoints: bool = True  #: a checkpoint every epoch, ``--resume``, Ctrl-C that saves
    distributed: bool = True  #: DDP under torchrun
    precisions: frozenset[Precision] = frozenset({"fp32", "bf16", "fp16"})
    channels_last: bool = True
    compile: bool = True
    awp: bool = True  #: adversarial weight perturbation (``--awp``)

    def missing(self) -> list[str]:
        """What a run of this loop goes without, in words (empty for robustkit's loop)."""
        gaps = {
            "canary": "no per-epoch robust validation, best-epoch weights or early stopping",
            "checkpoints": "no checkpoints or --resume",
            "distributed": "no torchrun",
        }
        return [text for name, text in gaps.items() if not getattr(self, name)]

    def refusals(self, run: RunConfig, world_size: int) -> list[str]:
        """The settings of ``run`` this loop cannot honour, each with its fix."""
        wanted = {
            "--resume": run.resume and not self.checkpoints,
            "torchrun (several processes)": world_size > 1 and not self.distributed,
            f"--precision {run.precision}": run.precision not in self.precisions,
            "--channels-last": run.channels_last and not self.channels_last,
            "--compile": run.compile and not self.compile,
        }
        return [setting for setting, refused in wanted.items() if refused]


#: The loop of a defence that trains in a library's own loop: plain fp32, one process, no more.
OWN_LOOP = LoopSupport(
    canary=False, checkpoints=False, distributed=False, precisions=frozenset({"fp32"}),
    channels_last=False, compile=False, awp=False,
)


class Defence(Configurable, ABC):
    kind: ClassVar[Literal["training", "transform"]]
    masks_gradients: ClassVar[bool] = False
    #: What the training loop gives (training defences; robustkit's loop gives everything).
    loop: ClassVar[LoopSupport] = LoopSupport()

    def check(self, threat: ThreatModel) -> None:
        """Refuse a threat model this defence cannot handle, before any work is done."""

    @abstractmethod
    def apply(
        self, model: nn.Module, data: Dataset | None, *, threat: ThreatModel, run: RunConfig | None = None
    ) -> DefenceResult:
        """Return the defended model; training defences train on ``data.x_train`` as ``run``
        says (device, precision, output folder; None: in memory, with the defaults)."""
