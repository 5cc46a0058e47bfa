"""Hugging Face image classifiers saved as a folder (``save_pretrained``: ``config.json`` and
``model.safetensors``, with ``preprocessor_config.json`` beside them when saved).

The folder is read as data: safetensors only (a ``pytorch_model.bin`` is a pickle), no custom
model code (``auto_map``), and the image processor's JSON is read rather than instantiated;
``--trust-code`` lifts the first two. Folders of other tasks (text, audio) are left to other
loaders. transformers is imported only once the folder is known to be an image classifier.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustkit import LoadedModel, LoadOptions, RobustkitError
from robustkit.errors import UnsafeFileError
from robustkit.models.base import state_sha256, verbose
from robustkit_hub.preprocessing import Preprocessing

AUTO_CLASS = "AutoModelForImageClassification"
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
PROCESSOR = "preprocessor_config.json"


class Logits(nn.Module):
    """A transformers classifier with robustkit's interface: images in, the logits tensor out
    (not the library's output object), so attacks take gradients of it as of any network."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.model(pixel_values=x).logits
        return logits


def _json(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise RobustkitError(f"{path.parent.name}/{path.name} is not readable JSON ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}); save the model again") from None
    if not isinstance(document, dict):
        raise RobustkitError(f"{path.parent.name}/{path.name} is not a JSON object; save the model again")
    return document


def is_image_classifier(config: dict[str, Any]) -> bool:
    """What ``save_pretrained`` records of an image classifier: its class (``architectures``),
    or custom code registered for the image-classification auto class."""
    architectures = config.get("architectures") or []
    return AUTO_CLASS in (config.get("auto_map") or {}) or any(
        str(a).endswith("ForImageClassification") for a in architectures)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' load report and progress bars stay off the terminal unless ``-v``; our
    own checks below say what matters in one line. Its settings are restored afterwards."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    if not verbose():
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _processor(folder: Path, config: dict[str, Any]) -> Preprocessing:
    """The image processor's mean/std and size, as they apply to robustkit's [0, 1] inputs.

    The processor rescales 0-255 pixels by ``rescale_factor`` (1/255: robustkit's inputs) and
    then normalises; another factor, or none, is folded into the mean/std, so that the network
    sees what the processor would have given it.
    """
    path = folder / PROCESSOR
    if not path.is_file():
        return Preprocessing(f"{folder.name} (no {PROCESSOR})", None)
    processor = _json(path)
    channels = int(config.get("num_channels", 3))
    scale = 255 * float(processor.get("rescale_factor", 1 / 255)) if processor.get("do_rescale", True) else 255.0

    def per_channel(key: str, default: float) -> tuple[float, ...]:
        value = processor.get(key, default) if processor.get("do_normalize", True) else default
        values = value if isinstance(value, list) else [value] * channels
        return tuple(float(v) for v in values)

    mean, std = per_channel("image_mean", 0.0), per_channel("image_std", 1.0)
    mean, std = tuple(m / scale for m in mean), tuple(s / scale for s in std)
    plain = all(m == 0 for m in mean) and all(abs(s - 1) < 1e-9 for s in std)
    size = processor.get("crop_size") if processor.get("do_center_crop") else processor.get("size")
    shape = (channels, int(size["height"]), int(size["width"])) if isinstance(size, dict) and {
        "height", "width"} <= size.keys() else None
    rescale = "" if abs(scale - 1) < 1e-9 else f" (0-255 pixels times {scale / 255:g}, folded into mean/std)"
    return Preprocessing(f"{folder.name}/{PROCESSOR}{rescale}", None if plain else (mean, std), shape)


def _weights(folder: Path, options: LoadOptions) -> bool:
    """Whether the weights are safetensors; pickled weights only with --trust-code."""
    if any((folder / name).is_file() for name in SAFE_WEIGHTS):
        return True
    pickled = next((name for name in PICKLED_WEIGHTS if (folder / name).is_file()), None)
    if pickled is None:
        raise RobustkitError(f"{folder.name} has a config.json but no model.safetensors; save the model with "
                             "model.save_pretrained(folder)")
    if not options.trust_code:
        raise UnsafeFileError(f"refusing to unpickle {folder.name}/{pickled}: a pickle can run arbitrary code when "
                              "loaded; re-save it with model.save_pretrained(folder, safe_serialization=True) "
                              "(writes model.safetensors), or pass --trust-code if you trust this folder")
    return False


def load_folder(folder: Path, options: LoadOptions) -> LoadedModel | None:
    """The folder's image classifier returning logits, with its processor's preprocessing;
    None when the folder holds another kind of model."""
    config = _json(folder / "config.json")
    if not is_image_classifier(config):
        return None
    if options.arch:
        raise RobustkitError(f"{folder.name} is a transformers folder whose config.json names the architecture; "
                             f"drop --arch {options.arch}")
    custom = AUTO_CLASS in (config.get("auto_map") or {})
    if custom and not options.trust_code:
        raise UnsafeFileError(f"refusing {folder.name}: its config.json asks for custom model code "
                              f"({config['auto_map'][AUTO_CLASS]}), which runs when loaded; pass --trust-code if "
                              "you trust this folder and its author")
    safe = _weights(folder, options)
    from transformers import AutoModelForImageClassification

    try:
        with _quiet_transformers():
            model, info = AutoModelForImageClassification.from_pretrained(
                str(folder), local_files_only=True, use_safetensors=safe, trust_remote_code=options.trust_code,
                dtype=torch.float32, ignore_mismatched_sizes=True, output_loading_info=True)
    except Exception as err:  # unknown model_type, damaged safetensors, custom code that fails, ...
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise RobustkitError(f"transformers cannot load {folder.name} ({type(err).__name__}: {reason})") from None
    _check_loading(folder, info)
    net = Logits(model)
    loaded = LoadedModel(net, str(folder), "transformers", state_sha256(net), trusted_code=custom or not safe,
                         notes=[f"transformers {type(model).__name__} ({model.config.num_labels} classes)"])
    _processor(folder, config).declare(loaded, options)
    return loaded


def _check_loading(folder: Path, info: dict[str, Any]) -> None:
    """Every weight of the network from the file, shapes as the config says: transformers
    would otherwise initialise what is missing or mis-sized at random and go on."""
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        first = mismatched[0]  # transformers 5: (key, file shape, config shape); 4.x: the key alone
        example = (f"{first[0]}: file {tuple(first[1])} vs config {tuple(first[2])}" if isinstance(first, tuple)
                   else str(first))
        raise RobustkitError(f"{folder.name}: its weights do not fit its config.json: {len(mismatched)} shape "
                             f"mismatch(es), e.g. {example} (num_labels in config.json must be the classifier's "
                             "size); save config and weights together")
    for kind in ("missing", "unexpected"):
        keys = sorted(info.get(f"{kind}_keys") or [])
        if keys:
            raise RobustkitError(f"{folder.name}: {len(keys)} {kind} weight(s) in its weights, e.g. {keys[0]}; "
                                 "save config and weights together with model.save_pretrained(folder)")
