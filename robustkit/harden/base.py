"""The defence interface: something that makes a model harder to attack.

Two kinds exist. A *training* defence (adversarial training) returns new weights; a
*transform* defence wraps the model with an input transformation (squeezing, JPEG, ...).
Transforms are often not differentiable, so they may only mask gradients: they declare
``masks_gradients`` so that audits and exports can say so instead of staying silent.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from torch import nn

from robustkit.data import Dataset
from robustkit.params import Configurable
from robustkit.threat import ThreatModel


@dataclass
class DefenceResult:
    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)  #: one record per epoch
    notes: list[str] = field(default_factory=list)
    survives_export: bool = True  #: False for transformations outside the graph or randomness


class Defence(Configurable, ABC):
    kind: ClassVar[Literal["training", "transform"]]
    masks_gradients: ClassVar[bool] = False

    @abstractmethod
    def apply(self, model: nn.Module, data: Dataset | None, *, threat: ThreatModel) -> DefenceResult:
        """Return the defended model; training defences train on ``data.x_train``."""
