"""What a model loader is given and returns (the ``robustkit_load_model`` hook's types), and
the hashes that identify a model in a report."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustkit.modules import Model


@dataclass(frozen=True)
class LoadOptions:
    arch: str | None = None  #: "module:factory", "path/file.py:factory" or "builtin:NAME"
    trust_code: bool = False  #: allow formats that run code when loaded
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    device: str = "cpu"


#: safetensors metadata key of the input convention robustkit writes beside hardened or exported
#: weights: mean/std (the normalisation outside the saved network), bounds, input shape, classes
INPUT_METADATA_KEY = "robustkit.input"
#: (mean, std) per channel
Normalisation = tuple[tuple[float, ...], tuple[float, ...]]


def input_metadata(normalisation: Normalisation | None, bounds: tuple[float, float],
                   input_shape: tuple[int, ...], num_classes: int | None) -> str:
    """The ``INPUT_METADATA_KEY`` document (JSON) for weights saved without their normalisation."""
    mean, std = normalisation if normalisation is not None else (None, None)
    return json.dumps({"mean": list(mean) if mean else None, "std": list(std) if std else None,
                       "bounds": list(bounds), "input_shape": list(input_shape), "num_classes": num_classes})


@dataclass
class LoadedModel:
    """A loaded model and where it came from (the ``model`` block of a report)."""

    model: Model  #: an ``nn.Module`` when gradients are available, else a predict function
    source: str
    format: str
    sha256: str
    trusted_code: bool = False  #: True when a file that can run code was opened
    notes: list[str] = field(default_factory=list)
    #: the mean/std the network expects, as its file declares (robustkit's safetensors metadata)
    #: or its library's config (a plugin's loader); wrapped by ``load_model``
    declared_normalisation: Normalisation | None = None
    #: where ``declared_normalisation`` comes from, named in the notes and in a conflict's error
    declared_by: str = "the file's metadata"
    #: the mean/std ``load_model`` wrapped around the network (from --mean/--std or the file)
    normalisation: Normalisation | None = None

    @property
    def white_box(self) -> bool:
        return isinstance(self.model, nn.Module)

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "format": self.format,
            "sha256": self.sha256,
            "white_box": self.white_box,
            "trusted_code": self.trusted_code,
            "notes": list(self.notes),
        }


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def state_sha256(module: nn.Module) -> str:
    """Hash of a module's weights: identifies models that have no file (built-ins)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        # reshape(-1): a 0-d tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def verbose() -> bool:
    """Whether the user asked for ``-v``: the CLI then sets the root logger to DEBUG. Loaders let
    third-party libraries (onnxruntime's own log) speak only then."""
    return logging.getLogger("robustkit").isEnabledFor(logging.DEBUG)
