"""Safe model loading through the ``robustkit_load_model`` hook.

Safe by default: a pickle is never unpickled and no file that can run code on load
(TorchScript, torch.export) is opened unless the user passes ``--trust-code``. Weights come
from safetensors or ``torch.load(weights_only=True)`` into an architecture the user names.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustkit.errors import RobustkitError
from robustkit.models.base import LoadedModel, LoadOptions, Normalisation
from robustkit.modules import Model, Normalized, model_device, predict_logits

log = logging.getLogger(__name__)

SAFE_FORMATS = "safetensors or a state-dict .pt/.pth with --arch, ONNX, or builtin:NAME"


def build_architecture(spec: str) -> nn.Module:
    """Instantiate ``builtin:NAME``, ``package.module:factory`` or ``file.py:factory``."""
    from robustkit.models.zoo import ARCHITECTURES

    if spec.startswith("builtin:"):
        name = spec[len("builtin:"):]
        if name not in ARCHITECTURES:
            raise RobustkitError(f"unknown built-in architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}")
        return ARCHITECTURES[name]()
    module_name, sep, factory_name = spec.rpartition(":")
    if not sep or not module_name or not factory_name:
        raise RobustkitError(f"--arch {spec!r} needs the form module:factory (e.g. mypkg.nets:resnet18)")
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            if not file.is_file():
                raise RobustkitError(f"--arch file {module_name!r} does not exist")
            module_spec = importlib.util.spec_from_file_location(f"robustkit_arch_{file.stem}", file)
            assert module_spec is not None and module_spec.loader is not None
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module
            module_spec.loader.exec_module(module)
        else:
            module = _import_user_module(module_name)
    except ImportError as err:
        raise RobustkitError(f"--arch {spec!r}: cannot import {module_name!r} ({err})") from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise RobustkitError(f"--arch {spec!r}: {module_name} has no callable {factory_name!r}")
    net = factory()
    if not isinstance(net, nn.Module):
        raise RobustkitError(f"--arch {spec!r} returned {type(net).__name__}, not a torch.nn.Module")
    return net


def _import_user_module(module_name: str) -> Any:
    """``import module_name``, also from the current folder (as ``python -m`` would): ``--arch
    mynets:net`` names the user's own code, which the ``robustkit`` launcher does not put on
    the path."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        top = module_name.split(".")[0]
        here = Path.cwd()
        if err.name != top or not ((here / f"{top}.py").is_file() or (here / top / "__init__.py").is_file()):
            raise
    sys.path.insert(0, str(here))
    try:
        return importlib.import_module(module_name)
    finally:
        sys.path.remove(str(here))


def load_state_dict_strict(net: nn.Module, state: dict[str, Tensor], source: str, arch: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line explanation of any mismatch: keys and
    shapes first, then dtypes that cannot hold the values (``check_state_dtypes``)."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            k = mismatched[0]
            parts.append(f"{len(mismatched)} shape mismatch(es), e.g. {k}: file {tuple(state[k].shape)} "
                         f"vs architecture {tuple(own[k].shape)}")
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise RobustkitError(
            f"weights in {source} do not fit --arch {arch}: {'; '.join(parts)}; "
            "pass the architecture they were saved from"
        )
    check_state_dtypes(own, state, source, arch)
    net.load_state_dict(state, strict=True)


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "integer"


def check_state_dtypes(own: dict[str, torch.Tensor], state: dict[str, Any], source: str, arch: str) -> None:
    """Refuse a tensor whose dtype cannot hold the values of the parameter or buffer it fills.

    Precision may differ (float16, bfloat16 or float64 weights into float32 parameters); the
    kind may not: integer or bool tensors in float parameters, floats in integer buffers such
    as BatchNorm's ``num_batches_tracked``, would be cast silently into other numbers.
    """
    for key, target in own.items():
        given = state.get(key)
        if isinstance(given, torch.Tensor) and _dtype_kind(given.dtype) != _dtype_kind(target.dtype):
            raise RobustkitError(
                f"weights in {source} do not fit --arch {arch}: tensor {key!r} is {given.dtype} but the architecture "
                f"holds {target.dtype} there, and {_dtype_kind(given.dtype)} values are not "
                f"{_dtype_kind(target.dtype)} weights; save the model's own state_dict() without casting it"
            )


def _parse_floats(values: Sequence[float] | None) -> tuple[float, ...] | None:
    return tuple(float(v) for v in values) if values else None


def load_model(ref: str, options: LoadOptions | None = None) -> LoadedModel:
    """Load ``ref`` with the first plugin loader that recognises it, then apply ``--mean/--std``."""
    from robustkit.plugin.host import get_host

    options = options or LoadOptions()
    if (options.mean is None) != (options.std is None):
        raise RobustkitError("--mean and --std go together: give both or neither")
    loaded: LoadedModel | None = get_host().first_result("robustkit_load_model", ref=ref, options=options)
    if loaded is None:
        raise RobustkitError(f"no loader recognises {ref!r}; use {SAFE_FORMATS}")
    normalisation = _normalisation(ref, options, loaded)
    if normalisation is not None:
        if not isinstance(loaded.model, nn.Module):
            raise RobustkitError("--mean/--std need a torch model; put the normalisation inside the ONNX graph")
        mean, std = normalisation
        loaded.model = Normalized(loaded.model, mean, std)
        loaded.normalisation = normalisation
        origin = "--mean/--std" if options.mean is not None else loaded.declared_by
        loaded.notes.append(f"inputs normalised inside the model ({origin}): mean={list(mean)}, std={list(std)}")
    if isinstance(loaded.model, nn.Module):
        loaded.model = loaded.model.to(options.device).eval()
    return loaded


def _normalisation(ref: str, options: LoadOptions, loaded: LoadedModel) -> Normalisation | None:
    """--mean/--std, else what the file declares; a flag that contradicts the file is an error
    (weights hardened on normalised inputs audited with other statistics give wrong numbers)."""
    given = (tuple(options.mean), tuple(options.std)) if options.mean is not None and options.std is not None else None
    declared = loaded.declared_normalisation
    if given is not None and declared is not None and not all(
        len(a) == len(b) and all(abs(u - v) <= 1e-6 * max(1.0, abs(v)) for u, v in zip(a, b))
        for a, b in zip(given, declared)
    ):
        raise RobustkitError(
            f"--mean/--std {list(given[0])}/{list(given[1])} contradict {ref}'s own normalisation "
            f"{list(declared[0])}/{list(declared[1])} ({loaded.declared_by}); drop --mean/--std"
        )
    return given or declared


@dataclass(frozen=True)
class OutputCheck:
    num_classes: int
    warnings: tuple[str, ...]


def check_model_output(model: Model, x: Tensor, num_classes: int | None = None) -> OutputCheck:
    """Run the model on a few inputs: (N, C) finite logits, C matching the data's classes.

    Probabilities (rows in [0, 1] summing to 1) are accepted with a warning: the softmax
    flattens gradients, so gradient attacks on them underestimate the attacker.
    """
    probe = x[: min(len(x), 16)].to(model_device(model))
    if isinstance(model, Normalized) and x.dim() >= 2 and model.mean.numel() not in (x.shape[1],):
        channels = x.shape[1]
        raise RobustkitError(  # the values come from --mean/--std, the file's metadata or a library's config
            f"the normalisation (mean/std) has {model.mean.numel()} value(s) but the data has {channels} channel(s): "
            f"give data with the model's channels, or one --mean/--std value per channel, e.g. "
            f"--mean {','.join(['0.5'] * channels)} --std {','.join(['0.25'] * channels)}"
        )
    try:
        out = predict_logits(model, probe)
    except RobustkitError:
        raise  # already one line naming the file
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        shape = tuple(probe.shape[1:])
        hint = ""
        if len(shape) == 3 and shape[-1] in (1, 3, 4) and shape[0] not in (1, 3, 4):
            hint = (f"; the data looks channels-last (H x W x C = {shape}): store it as N x C x H x W "
                    "(x.transpose(0, 3, 1, 2))")
        raise RobustkitError(f"the model fails on inputs of shape {shape} (the data's): {reason}{hint}") from None
    if out.dim() != 2 or out.shape[0] != len(probe):
        raise RobustkitError(
            f"the model returns shape {tuple(out.shape)} for {len(probe)} inputs; expected (N, C) logits"
        )
    if not bool(torch.isfinite(out).all()):
        raise RobustkitError("the model returns non-finite outputs (NaN or inf) on clean inputs")
    if num_classes is not None and out.shape[1] < num_classes:
        raise RobustkitError(f"the model has {out.shape[1]} outputs but the data has {num_classes} classes")
    warnings = []
    if bool(((out >= 0) & (out <= 1)).all()) and torch.allclose(out.sum(1), torch.ones(len(out)), atol=1e-3):
        warnings.append("the model outputs look like probabilities, not logits: gradient attacks may underestimate "
                        "the attacker; return the logits (drop the final softmax)")
    return OutputCheck(out.shape[1], tuple(warnings))
