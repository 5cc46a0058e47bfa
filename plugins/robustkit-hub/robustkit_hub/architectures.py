"""``--arch timm:NAME`` and ``--arch torchvision:NAME`` for a weights file.

robustkit's own readers open the file (safetensors, or a state dict by ``torch.load(
weights_only=True)``; never a pickle without ``--trust-code``) and its strict loader fills the
network; this module only builds the library's architecture, with ``pretrained=False`` /
``weights=None`` (nothing is ever downloaded) and as many classes as the weights' classifier
has, and takes the library's preprocessing as the model's input convention.
"""
from __future__ import annotations

import difflib
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustkit import LoadedModel, LoadOptions, RobustkitError
from robustkit.models.files import load_model_file
from robustkit_hub.preprocessing import Preprocessing

#: A class count no real classifier has: the weight sized by it in a probe is the classifier.
PROBE_CLASSES = 1009


class Library(ABC):
    """One model library: its names, how it builds a network, what its config says of inputs."""

    prefix: str

    @abstractmethod
    def names(self, pattern: str) -> list[str]:
        """The library's classifier names matching a ``*`` wildcard pattern."""

    @abstractmethod
    def exists(self, name: str) -> bool: ...

    @abstractmethod
    def create(self, name: str, num_classes: int) -> nn.Module:
        """The architecture with fresh weights; never downloads."""

    @abstractmethod
    def preprocessing(self, name: str, net: nn.Module) -> Preprocessing: ...

    def check_name(self, name: str) -> None:
        """An unknown name is one line with the closest names (a typo, a missing variant)."""
        if self.exists(name):
            return
        found = re.match(r"[a-z]+", name.lower())
        stem = found[0] if found else ""
        pattern = f"*{stem}*"
        candidates = (stem and self.names(pattern)) or self.names("*")
        close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.0)
        listing = f" (all of them: {self.prefix}.list_models({pattern!r}))" if stem and len(candidates) > 5 else ""
        raise RobustkitError(f"--arch {self.prefix}:{name}: {self.prefix} has no classifier named {name!r}; close "
                             f"names: {', '.join(close)}{listing}")


class Timm(Library):
    prefix = "timm"

    def names(self, pattern: str) -> list[str]:
        import timm

        return list(timm.list_models(pattern))

    def exists(self, name: str) -> bool:
        import timm

        # registered names only: ``hf-hub:`` and ``local-dir:`` names would fetch or read a config
        return bool(timm.is_model(name))

    def create(self, name: str, num_classes: int) -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=num_classes)

    def preprocessing(self, name: str, net: nn.Module) -> Preprocessing:
        cfg: dict[str, Any] = getattr(net, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean"), cfg.get("std")
        return Preprocessing(f"timm's pretrained_cfg of {name}",
                             (tuple(mean), tuple(std)) if mean is not None and std is not None else None,
                             tuple(cfg["input_size"]) if "input_size" in cfg else None,
                             bool(cfg.get("fixed_input_size", False)))


class Torchvision(Library):
    prefix = "torchvision"

    def names(self, pattern: str) -> list[str]:
        import torchvision

        return list(torchvision.models.list_models(module=torchvision.models, include=pattern))

    def exists(self, name: str) -> bool:
        return name in self.names("*")

    def create(self, name: str, num_classes: int) -> nn.Module:
        from torchvision.models import get_model

        return get_model(name, weights=None, num_classes=num_classes)

    def preprocessing(self, name: str, net: nn.Module) -> Preprocessing:
        """The default weights' transforms (an ``ImageClassification``: mean, std, crop), read
        from the enum without fetching the weights."""
        from torchvision.models import get_model_weights

        try:
            weights = get_model_weights(name).DEFAULT
        except (ValueError, AttributeError):  # a classifier without published weights
            return Preprocessing(f"torchvision's {name} (no weights enum)", None)
        transforms = weights.transforms()
        crop = list(transforms.crop_size) * 2
        return Preprocessing(f"torchvision's {type(weights).__name__}.{weights.name} transforms",
                             (tuple(transforms.mean), tuple(transforms.std)), (3, crop[0], crop[-1]))


LIBRARIES: dict[str, type[Library]] = {"timm": Timm, "torchvision": Torchvision}


def classifier_size(library: Library, name: str, state: dict[str, Tensor], source: str) -> tuple[int, str]:
    """``(classes, key)``: the out features of the weights' classifier, found as the weight a
    probe network (built on the meta device, no memory) sizes by ``PROBE_CLASSES``."""
    with torch.device("meta"):
        probe = library.create(name, PROBE_CLASSES)
    key = next((k for k, v in probe.state_dict().items() if v.dim() and v.shape[0] == PROBE_CLASSES), None)
    if key is None:
        raise RobustkitError(f"--arch {library.prefix}:{name}: no layer of it is sized by num_classes, so its "
                             "classifier cannot be fitted to the weights")
    if key not in state:
        raise RobustkitError(f"weights in {source} do not fit --arch {library.prefix}:{name}: they have no {key!r} "
                             f"(its classifier); pass the architecture they were saved from")
    return int(state[key].shape[0]), key


def load_weights(ref: str, prefix: str, name: str, options: LoadOptions) -> LoadedModel:
    """Load the weights file ``ref`` into ``prefix:name`` with robustkit's safe readers and strict loader."""
    library = LIBRARIES[prefix]()
    library.check_name(name)
    built: list[tuple[nn.Module, str]] = []

    def build(arch: str, state: dict[str, Tensor]) -> nn.Module:
        classes, key = classifier_size(library, name, state, Path(ref).name)
        net = library.create(name, classes)
        built.append((net, f"{classes} classes, from the weights' classifier {key!r}"))
        return net

    loaded = load_model_file(ref, options, build=build)
    if loaded is None:
        raise RobustkitError(f"--arch {prefix}:{name} takes a weights file (.safetensors, or a state-dict .pt/.pth); "
                             f"{ref!r} is not one")
    for net, note in built:  # not built: --trust-code opened a whole pickled module, which has its own
        loaded.notes.append(note)
        library.preprocessing(name, net).declare(loaded, options)
    return loaded
