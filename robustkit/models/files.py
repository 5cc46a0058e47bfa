"""Built-in model formats: built-in architectures, safetensors, state dicts, ONNX, and the
code-running formats (TorchScript, torch.export, pickles) only with ``--trust-code``.

Model files are untrusted input until the user says otherwise: without ``--trust-code`` a
pickle is only ever read by ``torch.load(weights_only=True)`` or scanned by :mod:`pickletools`
(which never imports or calls anything), and every failure is one line naming the file and
the problem (docs/security.md).
"""
from __future__ import annotations

import io
import json
import logging
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from robustkit.errors import RobustkitError, UnsafeFileError
from robustkit.models.base import (
    INPUT_METADATA_KEY,
    LoadedModel,
    LoadOptions,
    Normalisation,
    file_sha256,
    state_sha256,
)
from robustkit.models.loading import SAFE_FORMATS, build_architecture, load_state_dict_strict

log = logging.getLogger(__name__)

STATE_DICT_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}
PICKLE_SUFFIXES = {".pkl", ".pickle", ".joblib"}
KNOWN_SUFFIXES = {".safetensors", ".pt2", ".onnx", *STATE_DICT_SUFFIXES, *PICKLE_SUFFIXES}
#: Largest pickle stream scanned for the globals it imports (the scan only names them).
PICKLE_SCAN_BYTES = 64 << 20
#: Modules whose globals a pickled state dict legitimately imports; a global elsewhere is
#: named first when a pickle is refused, then torch's own choice, then any other torch global.
_TENSOR_MODULES = {"torch", "collections", "_codecs"}
_PLAIN_BUILTINS = {f"{module}.{name}" for module in ("builtins", "__builtin__") for name in (
    "set", "frozenset", "bytearray", "bytes", "slice", "complex", "int", "float", "bool", "str", "list", "tuple",
    "dict", "range")}
_TENSOR_STATE = re.compile(r"collections\.OrderedDict|_codecs\.encode|torch\.(_utils|storage|serialization)\..*"
                           r"|torch\.\w*Storage|torch\.(Size|device|dtype|float\w*|bfloat16|u?int\d*|bool)")

T = TypeVar("T")
#: Builds the network ``--arch`` names for the state dict about to fill it; a plugin's builder
#: may read the state (robustkit-hub sizes timm's classifier from it), the default ignores it.
ArchitectureBuilder = Callable[[str, dict[str, torch.Tensor]], nn.Module]


def _named_architecture(arch: str, state: dict[str, torch.Tensor]) -> nn.Module:
    return build_architecture(arch)


def _one_line(err: BaseException) -> str:
    """``Type: first sentence`` of an error (torch's go on for lines of advice)."""
    text = str(err).strip()
    if not text:
        return type(err).__name__
    first = re.split(r"(?<=\.)\s", text.splitlines()[0], maxsplit=1)[0]
    return f"{type(err).__name__}: {first[:200]}"


@contextmanager
def _quiet() -> Iterator[None]:
    """Third-party warnings while reading a file go to the debug log (shown with -v), not the terminal."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        log.debug("%s: %s", warning.category.__name__, warning.message)


def _refuse(path: Path, what: str, imports: str | None = None) -> UnsafeFileError:
    reason = f" (this one imports {imports})" if imports else ""
    return UnsafeFileError(
        f"refusing to load {path.name}: {what} can run arbitrary code when loaded{reason}; use {SAFE_FORMATS}, "
        "or pass --trust-code if you trust this file and its author"
    )


def _trusted(path: Path, load: Callable[[], T]) -> T:
    """Run a code-running loader the user vouched for; its failures become one line."""
    try:
        with _quiet():
            return load()
    except RobustkitError:
        raise
    except Exception as err:
        raise RobustkitError(
            f"cannot load {path.name} even with --trust-code ({_one_line(err)}); the code it was saved with "
            "must be importable and the file whole"
        ) from None


def _require_arch(path: Path, options: LoadOptions) -> str:
    if not options.arch:
        raise RobustkitError(
            f"{path.name} holds weights only; name the architecture with --arch module:factory or --arch builtin:NAME"
        )
    return options.arch


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives carry Python source under ``<name>/code/``; state dicts do not."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name or name.endswith("constants.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return False  # torch.load reports the damage


# --- naming what a pickle imports, without unpickling it -----------------------------------


def _pickle_bytes(path: Path) -> bytes:
    """The pickle stream of a torch zip archive (``*/data.pkl``) or a raw pickle file (its start)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                info = next((i for i in archive.infolist() if i.filename.endswith("data.pkl")), None)
                if info is None or info.file_size > PICKLE_SCAN_BYTES:
                    return b""
                return archive.read(info)
        with path.open("rb") as handle:
            return handle.read(PICKLE_SCAN_BYTES)
    except Exception:  # a damaged archive: nothing to scan
        return b""


def pickle_globals(data: bytes) -> tuple[bool, list[str]]:
    """``(is_pickle, globals)``: whether ``data`` starts with whole pickle(s), and the
    ``module.name`` globals they import, found by :func:`pickletools.genops` (which parses
    opcodes and never imports or calls anything). Legacy torch files hold several pickles."""
    names: list[str] = []
    complete = False
    stream = io.BytesIO(data)
    if not data.startswith(b"\x80"):  # protocol 2+ (what torch and pickle write) opens with PROTO
        return False, names
    try:
        while stream.tell() < len(data):
            pushed: list[object] = []  # the last values pushed, strings kept for STACK_GLOBAL
            memo: dict[int, object] = {}
            for opcode, arg, _ in pickletools.genops(stream):
                if opcode.name in ("GLOBAL", "INST"):
                    names.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(pushed) >= 2:
                    module, name = pushed[-2], pushed[-1]
                    if isinstance(module, str) and isinstance(name, str):
                        names.append(f"{module}.{name}")
                slot = arg if isinstance(arg, int) else -1
                if opcode.name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif opcode.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[slot] = pushed[-1] if pushed else None
                elif opcode.name in ("GET", "BINGET", "LONG_BINGET"):
                    pushed.append(memo.get(slot))
                elif opcode.stack_after:
                    pushed.append(arg if isinstance(arg, str) else None)
                del pushed[:-2]
            complete = True  # reached STOP
    except Exception:  # the bytes after the last pickle (legacy storages), or damage
        pass
    return complete, names


def _offending_global(path: Path, message: str = "") -> str | None:
    """The first global the file imports that a tensors-only pickle would not, else torch's."""
    _, names = pickle_globals(_pickle_bytes(path))
    for name in names:
        if name.split(".")[0] not in _TENSOR_MODULES and name not in _PLAIN_BUILTINS:
            return name
    found = re.search(r"GLOBAL ([\w.]+?)\.?(?:\s|$)", message)
    if found:
        return found[1]
    return next((n for n in names if not _TENSOR_STATE.fullmatch(n) and n not in _PLAIN_BUILTINS), None)


def _weights_only_detail(message: str) -> str:
    """torch's reason, without its advice and documentation lines."""
    found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", message)
    if found:
        return found[1].strip()[:200]
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Weights only load failed", "Check the documentation",
                                                             "Please file an issue", "(1)", "(2)"))]
    return (useful or lines or ["unsupported objects"])[0][:200]


# --- loaders ---------------------------------------------------------------------------------


def _from_state_dict(path: Path, state: object, options: LoadOptions, fmt: str,
                     build: ArchitectureBuilder) -> LoadedModel:
    if isinstance(state, dict):
        for key in ("state_dict", "model_state_dict", "model"):  # common checkpoint layouts
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RobustkitError(f"{path.name} does not hold a state dict of tensors; save model.state_dict()")
    arch = _require_arch(path, options)
    net = build(arch, state)
    load_state_dict_strict(net, state, path.name, arch)
    return LoadedModel(net, str(path), fmt, file_sha256(path), notes=[f"architecture {arch}"])


def _load_builtin(ref: str) -> LoadedModel:
    net = build_architecture(ref)
    return LoadedModel(net, ref, "builtin", state_sha256(net),
                       notes=["built-in architecture with fresh (untrained) weights, seeded by torch's RNG"])


def _load_safetensors(path: Path, options: LoadOptions, build: ArchitectureBuilder) -> LoadedModel:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with _quiet():
            state = load_file(str(path))
            with safe_open(str(path), "pt") as handle:
                metadata = handle.metadata() or {}
    except Exception as err:  # SafetensorError, OSError, ValueError, unknown dtypes, ...
        raise RobustkitError(f"{path.name} is not a valid safetensors file ({_one_line(err)})") from None
    loaded = _from_state_dict(path, state, options, "safetensors", build)
    loaded.declared_normalisation = _declared_normalisation(path, metadata)
    return loaded


def _declared_normalisation(path: Path, metadata: dict[str, str]) -> Normalisation | None:
    """The mean/std robustkit wrote beside the weights (``INPUT_METADATA_KEY``), if any."""
    text = metadata.get(INPUT_METADATA_KEY)
    if text is None:
        return None
    try:
        document = json.loads(text)
        mean, std = document.get("mean"), document.get("std")
        if mean is None and std is None:
            return None
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    except (ValueError, TypeError, AttributeError):
        raise RobustkitError(f"{path.name}: its {INPUT_METADATA_KEY!r} metadata is not robustkit's "
                             "(mean and std lists); re-save the weights or strip the metadata") from None


def _not_readable(path: Path, err: BaseException) -> RobustkitError:
    return RobustkitError(f"{path.name} is not a readable torch file ({_one_line(err)}); it is truncated, corrupt, "
                          "or not written by torch.save")


def _load_torch_file(path: Path, options: LoadOptions, build: ArchitectureBuilder) -> LoadedModel:
    if _is_torchscript(path):
        if not options.trust_code:
            raise _refuse(path, "a TorchScript file")
        module = _trusted(path, lambda: torch.jit.load(str(path), map_location="cpu"))
        return LoadedModel(module, str(path), "torchscript", file_sha256(path), trusted_code=True)
    try:
        with _quiet():
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        message = str(err)
        is_pickle, _ = pickle_globals(_pickle_bytes(path))
        if not options.trust_code and not is_pickle and "GLOBAL" not in message:  # random or damaged bytes
            raise _not_readable(path, pickle.UnpicklingError(_weights_only_detail(message))) from None
        if not options.trust_code:
            imports = _offending_global(path, message)
            why = (f"it imports {imports}, which a weights-only load does not allow (a pickle runs the code it "
                   "imports)" if imports
                   else f"it holds Python objects beyond tensors ({_weights_only_detail(message)})")
            raise UnsafeFileError(
                f"refusing to unpickle {path.name}: {why}; save model.state_dict() or use {SAFE_FORMATS}, "
                "or pass --trust-code if you trust this file"
            ) from None
        state = _trusted(path, lambda: torch.load(str(path), map_location="cpu", weights_only=False))
        if isinstance(state, nn.Module):
            return LoadedModel(state, str(path), "pickled-module", file_sha256(path), trusted_code=True)
    except Exception as err:  # RuntimeError (zip), EOFError (empty), KeyError, ValueError, OSError, ...
        raise _not_readable(path, err) from None
    return _from_state_dict(path, state, options, "state-dict", build)


def _load_pickle(path: Path, options: LoadOptions, build: ArchitectureBuilder) -> LoadedModel:
    """A raw pickle (or joblib file): refused, naming what it imports, unless the user trusts it."""
    if not options.trust_code:
        raise _refuse(path, "a pickle", _offending_global(path))

    def unpickle() -> object:
        if path.suffix.lower() == ".joblib":
            import joblib  # scikit-learn's dependency; joblib files hold numpy arrays outside the pickle

            return joblib.load(path)
        with path.open("rb") as handle:
            return pickle.load(handle)  # the user passed --trust-code

    obj = _trusted(path, unpickle)
    if isinstance(obj, nn.Module):
        return LoadedModel(obj, str(path), "pickled-module", file_sha256(path), trusted_code=True)
    if isinstance(obj, dict):
        loaded = _from_state_dict(path, obj, options, "pickled-state-dict", build)
        loaded.trusted_code = True
        return loaded
    raise RobustkitError(f"{path.name} holds a {type(obj).__module__}.{type(obj).__qualname__}, not a "
                         "torch.nn.Module or a state dict of tensors")


def _load_exported_program(path: Path, options: LoadOptions) -> LoadedModel:
    if not options.trust_code:
        raise _refuse(path, "a torch.export program")
    module = _trusted(path, lambda: torch.export.load(str(path)).module())
    # The graph's train/eval behaviour was fixed at export; torch makes train()/eval() raise on
    # it, but attacks toggle modes around every call, so give back nn.Module's flag-only ones.
    del module.train, module.eval
    return LoadedModel(module, str(path), "torch.export", file_sha256(path), trusted_code=True,
                       notes=["torch.export graph: its train/eval behaviour is the one it was exported in"])


def load_model_file(ref: str, options: LoadOptions,
                    build: ArchitectureBuilder = _named_architecture) -> LoadedModel | None:
    """Load ``ref`` if it is a format robustkit knows; None lets other loaders try. ``build``
    makes the network for weights-only files (plugins reuse the safe readers with their own)."""
    if ref.startswith("builtin:"):
        return _load_builtin(ref)
    path = Path(ref).expanduser()
    if not path.exists():
        raise RobustkitError(f"model file {ref!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in KNOWN_SUFFIXES:
        return None
    if not path.is_file():
        raise RobustkitError(f"model file {ref!r} is not a regular file")
    if path.stat().st_size == 0:
        raise RobustkitError(f"model file {path.name} is empty (0 bytes); the save or download did not finish")
    if suffix == ".safetensors":
        return _load_safetensors(path, options, build)
    if suffix in STATE_DICT_SUFFIXES:
        return _load_torch_file(path, options, build)
    if suffix == ".pt2":
        return _load_exported_program(path, options)
    if suffix == ".onnx":
        from robustkit.models.onnx import load_onnx

        return load_onnx(path, options)
    return _load_pickle(path, options, build)
