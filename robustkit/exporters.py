"""The exporter interface: write a model for deployment and prove the copy is the same model."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn

from robustkit.attacks.base import NoParams
from robustkit.params import coerce


@dataclass
class ExportResult:
    path: Path
    format: str
    verified: bool = False
    checks: dict[str, Any] = field(default_factory=dict)  #: e.g. max abs difference, argmax agreement
    warnings: list[str] = field(default_factory=list)


class Exporter(ABC):
    name: ClassVar[str]
    suffix: ClassVar[str]
    Params: ClassVar[type] = NoParams
    aliases: ClassVar[tuple[str, ...]] = ()
    summary: ClassVar[str] = ""

    def __init__(self, params: Any = None, /, **overrides: Any) -> None:
        self.params = params if params is not None else coerce(self.Params, overrides, owner=self.name)

    @abstractmethod
    def export(self, model: nn.Module, example: Tensor, path: Path, *, metadata: dict[str, Any]) -> ExportResult:
        """Write ``model`` to ``path`` (atomically) with ``metadata`` embedded."""

    @abstractmethod
    def verify(self, result: ExportResult, model: nn.Module, x: Tensor, y: Tensor) -> ExportResult:
        """Check the written file against ``model`` on real data; raise on a mismatch."""
