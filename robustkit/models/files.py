"""Built-in model formats: built-in architectures, safetensors, state dicts, ONNX, and the
code-running formats (TorchScript, torch.export) only with ``--trust-code``."""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from robustkit.errors import RobustkitError, UnsafeFileError
from robustkit.models.base import LoadedModel, LoadOptions, file_sha256, state_sha256
from robustkit.models.loading import SAFE_FORMATS, build_architecture, load_state_dict_strict

STATE_DICT_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}


def _refuse(path: Path, what: str) -> UnsafeFileError:
    return UnsafeFileError(
        f"refusing to load {path.name}: {what} can run arbitrary code when loaded; use {SAFE_FORMATS}, "
        "or pass --trust-code if you trust this file and its author"
    )


def _require_arch(path: Path, options: LoadOptions) -> str:
    if not options.arch:
        raise RobustkitError(
            f"{path.name} holds weights only; name the architecture with --arch module:factory or --arch builtin:NAME"
        )
    return options.arch


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives carry Python source under ``<name>/code/``; state dicts do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.endswith("constants.pkl") for name in archive.namelist())


def _from_state_dict(path: Path, state: object, options: LoadOptions, fmt: str) -> LoadedModel:
    if isinstance(state, dict):
        for key in ("state_dict", "model_state_dict", "model"):  # common checkpoint layouts
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RobustkitError(f"{path.name} does not hold a state dict of tensors; save model.state_dict()")
    arch = _require_arch(path, options)
    net = build_architecture(arch)
    load_state_dict_strict(net, state, path.name, arch)
    return LoadedModel(net, str(path), fmt, file_sha256(path), notes=[f"architecture {arch}"])


def _load_builtin(ref: str) -> LoadedModel:
    net = build_architecture(ref)
    return LoadedModel(net, ref, "builtin", state_sha256(net),
                       notes=["built-in architecture with fresh (untrained) weights, seeded by torch's RNG"])


def _load_safetensors(path: Path, options: LoadOptions) -> LoadedModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise RobustkitError(f"{path.name} is not a valid safetensors file ({err})") from None
    return _from_state_dict(path, state, options, "safetensors")


def _load_torch_file(path: Path, options: LoadOptions) -> LoadedModel:
    if _is_torchscript(path):
        if not options.trust_code:
            raise _refuse(path, "a TorchScript file")
        module = torch.jit.load(str(path), map_location="cpu")
        return LoadedModel(module, str(path), "torchscript", file_sha256(path), trusted_code=True)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not options.trust_code:
            reason = str(err).strip().splitlines()[-1] if str(err).strip() else "unsupported objects"
            raise UnsafeFileError(
                f"refusing to unpickle {path.name}: it holds Python objects beyond tensors ({reason[:160]}); "
                f"save model.state_dict() or use {SAFE_FORMATS}, or pass --trust-code if you trust this file"
            ) from None
        state = torch.load(str(path), map_location="cpu", weights_only=False)  # the user vouched for it
        if isinstance(state, nn.Module):
            return LoadedModel(state, str(path), "pickled-module", file_sha256(path), trusted_code=True)
    except (RuntimeError, EOFError, OSError) as err:
        raise RobustkitError(f"{path.name} is not a readable torch file ({str(err).splitlines()[0]})") from None
    return _from_state_dict(path, state, options, "state-dict")


def _load_exported_program(path: Path, options: LoadOptions) -> LoadedModel:
    if not options.trust_code:
        raise _refuse(path, "a torch.export program")
    module = torch.export.load(str(path)).module()
    # The graph's train/eval behaviour was fixed at export; torch makes train()/eval() raise on
    # it, but attacks toggle modes around every call, so give back nn.Module's flag-only ones.
    del module.train, module.eval
    return LoadedModel(module, str(path), "torch.export", file_sha256(path), trusted_code=True,
                       notes=["torch.export graph: its train/eval behaviour is the one it was exported in"])


def load_model_file(ref: str, options: LoadOptions) -> LoadedModel | None:
    """Load ``ref`` if it is a format robustkit knows; None lets other loaders try."""
    if ref.startswith("builtin:"):
        return _load_builtin(ref)
    path = Path(ref).expanduser()
    if not path.exists():
        raise RobustkitError(f"model file {ref!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _load_safetensors(path, options)
    if suffix in STATE_DICT_SUFFIXES:
        return _load_torch_file(path, options)
    if suffix == ".pt2":
        return _load_exported_program(path, options)
    if suffix == ".onnx":
        from robustkit.models.onnx import load_onnx

        return load_onnx(path, options)
    if suffix in (".pkl", ".pickle", ".joblib"):
        raise _refuse(path, "a pickle")
    return None
