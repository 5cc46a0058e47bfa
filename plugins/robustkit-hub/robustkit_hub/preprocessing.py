"""What a library's config says a network expects, handed to robustkit's own mechanisms.

The mean/std become the loader's ``declared_normalisation``: ``robustkit.load_model`` wraps
them around the network exactly as ``--mean/--std`` would, and refuses flags that contradict
them. The input size is said, not enforced: robustkit runs the model on a few of the data's
inputs before any attack (``check_model_output``), so a network that takes only its own size
is refused there with the data's shape and the network's reason, and one that takes other
sizes (most CNNs) is audited on the data as it is, which the note says.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from robustkit import LoadedModel, LoadOptions
from robustkit.models.base import Normalisation

log = logging.getLogger("robustkit.hub")


@dataclass(frozen=True)
class Preprocessing:
    """A config's view of robustkit's inputs (in [0, 1]): normalisation and input size."""

    source: str  #: where it comes from, e.g. "timm's pretrained_cfg of resnet18"
    normalisation: Normalisation | None
    input_size: tuple[int, ...] | None = None  #: C x H x W
    fixed_size: bool | None = None  #: True: that size only; False: others too; None: not known

    def declare(self, loaded: LoadedModel, options: LoadOptions) -> None:
        """Give robustkit the normalisation, and say on the terminal and in the report what was
        taken from the config rather than chosen by the user."""
        if self.normalisation is None:
            note = (f"{self.source} names no mean/std: the network gets robustkit's [0, 1] inputs unnormalised; "
                    "pass --mean/--std if it was trained on normalised inputs")
            loaded.notes.append(note)
            if options.mean is None:
                log.warning("%s", note)
        elif loaded.declared_normalisation is None:
            loaded.declared_normalisation, loaded.declared_by = self.normalisation, self.source
            mean, std = self.normalisation
            if options.mean is None:  # the user did not choose these: say so where they look
                log.warning("inputs normalised with %s: mean=%s, std=%s (weights trained with other statistics "
                            "need theirs in the file's robustkit.input metadata)", self.source, list(mean), list(std))
        elif loaded.declared_normalisation != self.normalisation:
            loaded.notes.append(f"{self.source}'s mean/std {[list(v) for v in self.normalisation]} not used: the "
                                "file's metadata records those of these weights")
        if self.input_size is not None:
            size = "x".join(str(v) for v in self.input_size)
            loaded.notes.append(f"{self.source}: input size {size}; " + {
                True: "the network takes that size only (data of another size is refused before the audit)",
                False: "the network also runs on other sizes, so data of another size is audited as it is, "
                       "not resized",
                None: "data of another size is audited as it is if the network runs on it, else refused "
                      "before the audit"}[self.fixed_size])
