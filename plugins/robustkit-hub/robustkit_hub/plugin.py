"""Entry point of the ``hub`` provider: ``--arch timm:NAME``, ``--arch torchvision:NAME`` and
Hugging Face model folders, through the ``robustkit_load_model`` hook.

Imports only the standard library and robustkit at module level, so discovering the plugin
(``robustkit --help``) costs neither torch nor the model libraries.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import robustkit

if TYPE_CHECKING:
    from robustkit import LoadedModel, LoadOptions

#: ``--arch`` prefixes this plugin builds: ``timm:resnet18``, ``torchvision:vit_b_16``
LIBRARIES = ("timm", "torchvision")


@robustkit.hookimpl
def robustkit_load_model(ref: str, options: LoadOptions) -> LoadedModel | None:
    library, _, name = (options.arch or "").partition(":")
    if library in LIBRARIES:
        from robustkit_hub.architectures import load_weights

        return load_weights(ref, library, name, options)
    if (Path(ref).expanduser() / "config.json").is_file():
        from robustkit_hub.folders import load_folder

        return load_folder(Path(ref).expanduser(), options)  # None for a folder that is not an image classifier
    return None
