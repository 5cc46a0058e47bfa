"""Data sets: the bundled digits, ``.npz`` files and image folders, all validated.

Every data set reaches attacks as float tensors N x C x H x W in the bounds with integer
labels, and every way that convention can be broken gets a one-line error saying what is
wrong, where, and how to fix it. One exception saves memory where data is largest: a
training split stored as uint8 (an ``.npz`` ``x_train`` of uint8, a ``train/`` image folder)
stays uint8 in memory, a quarter of float32, and ``float_inputs`` turns each batch into
floats in [0, 1] where it is used (on the training device), with the very numbers a float
loader would have produced. ``load_dataset(..., stored=True)`` keeps the evaluation split so
too, for harden: its validation data and the image folder it splits into training and
evaluation.

Data files are untrusted input: ``.npz`` archives are read member by member with
:mod:`zipfile` (never unpickled), every array's declared shape and dtype are checked against
the member's real size and against :func:`max_array_bytes` before any data is read, and images
are opened only in the formats their suffixes name, under the same memory cap
(docs/security.md).

Labels are integer class indices of any integer dtype; their values are checked in that dtype
before the cast to int64. Float labels are refused, even whole numbers (``y.astype(np.int64)``
says what you mean).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from robustkit.errors import DataError, RobustkitError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
#: The decoders Pillow may use for those suffixes; no other (EPS would run Ghostscript).
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")

#: Default cap, in bytes, on one array as loaded (a data array, an image folder's images in
#: all, an ONNX tensor); ``ROBUSTKIT_MAX_ARRAY_BYTES`` overrides it (docs/security.md).
MAX_ARRAY_BYTES = 4 * 1024**3
MAX_ARRAY_BYTES_ENV = "ROBUSTKIT_MAX_ARRAY_BYTES"
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def max_array_bytes() -> int:
    """The cap on one array's size in memory: ``ROBUSTKIT_MAX_ARRAY_BYTES`` or 4 GiB.

    The variable takes bytes, or a number with a binary unit: ``8G``, ``512M``, ``1.5T``.
    """
    text = os.environ.get(MAX_ARRAY_BYTES_ENV, "").strip()
    if not text:
        return MAX_ARRAY_BYTES
    match = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([kmgt]?)(?:i?b)?", text.lower())
    if not match or float(match[1]) * _UNITS[match[2]] < 1:
        raise RobustkitError(
            f"{MAX_ARRAY_BYTES_ENV}={text!r} is not a size; give bytes or a number with a unit, e.g. 8G or 512M"
        )
    return int(float(match[1]) * _UNITS[match[2]])


def format_bytes(count: int | float) -> str:
    """``4 GiB``, ``3.64 TiB``: a byte count for messages."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def over_limit(what: str, size: int) -> str | None:
    """A message for ``what`` needing ``size`` bytes, or None when it is within the cap."""
    cap = max_array_bytes()
    if size <= cap:
        return None
    enough = f"{-(-size // 1024**3)}G" if size >= 1024**3 else f"{-(-size // 1024**2)}M"
    return (f"{what} needs {format_bytes(size)}, over robustkit's limit of {format_bytes(cap)} per array "
            f"(set {MAX_ARRAY_BYTES_ENV}={enough} or more if you trust the file and have the memory)")


#: uint8 value k as float32 k / 255, computed as the loaders always did (numpy float32 division):
#: a lookup, so every device gives the same numbers (a GPU divides by a scalar as a multiplication).
_UINT8_TO_FLOAT = torch.from_numpy(np.arange(256, dtype=np.uint8).astype(np.float32) / 255.0)


def float_inputs(x: Tensor) -> Tensor:
    """``x`` as float inputs: uint8 images (k standing for k/255) as float32 in [0, 1], on
    ``x``'s device; floats unchanged."""
    if x.dtype != torch.uint8:
        return x
    return _UINT8_TO_FLOAT.to(x.device)[x.long()]


@dataclass
class Dataset:
    """Evaluation split (``x``, ``y``) and an optional training split. ``x_train`` may be uint8
    (images as stored, k standing for k/255; ``float_inputs`` converts a batch)."""

    name: str
    x: Tensor
    y: Tensor
    num_classes: int
    x_train: Tensor | None = None
    y_train: Tensor | None = None
    bounds: tuple[float, float] = (0.0, 1.0)
    class_names: list[str] = field(default_factory=list)
    source: str = ""
    #: A separate validation set (``--val-data``) for harden's canary; None: a split of the training data.
    x_val: Tensor | None = None
    y_val: Tensor | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def describe(self) -> dict[str, Any]:
        """The ``data`` block of a report."""
        return {
            "name": self.name,
            "source": self.source or self.name,
            "n_eval": len(self.x),
            "n_train": 0 if self.x_train is None else len(self.x_train),
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "bounds": list(self.bounds),
            "sha256": tensors_sha256(self.x, self.y),
        }

    def validate(self, num_classes: int | None = None, *, stored: bool = False) -> Dataset:
        """Check both splits against the convention; ``num_classes`` is the model's. ``stored``:
        the evaluation split may be uint8 too (``load_dataset``)."""
        classes = num_classes or self.num_classes
        validate_split(self.x, self.y, bounds=self.bounds, num_classes=classes, where=f"{self.name} (eval split)",
                       uint8_ok=stored)
        self.y = self.y.long()  # checked above: any integer dtype whose values are class indices
        if self.x_train is not None and self.y_train is not None:
            validate_split(self.x_train, self.y_train, bounds=self.bounds, num_classes=classes,
                           where=f"{self.name} (train split)", uint8_ok=True)
            self.y_train = self.y_train.long()
            if self.x_train.shape[1:] != self.x.shape[1:]:
                raise DataError(
                    f"{self.name}: train inputs have shape {tuple(self.x_train.shape[1:])} but eval inputs "
                    f"{tuple(self.x.shape[1:])}; both splits need the same C x H x W"
                )
        return self

    def split(self, fraction: float = 0.2, seed: int = 0) -> Dataset:
        """This evaluation-only data set as a seeded training split and a held-out ``fraction``
        for evaluation (the same for a given seed, class proportions left to chance)."""
        order = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(seed))
        held = max(1, round(fraction * len(order)))
        if held >= len(order):
            raise DataError(f"data {self.name!r}: {len(order)} samples are too few to split for training")
        evaluation, train = order[:held], order[held:]
        return dataclasses.replace(self, x=self.x[evaluation], y=self.y[evaluation], x_train=self.x[train],
                                   y_train=self.y[train])

    def with_validation(self, other: Dataset, where: str) -> Dataset:
        """This data set with ``other``'s evaluation split as its validation set, checked against
        the training split (input shape, classes)."""
        x_train, _ = self.training_split()
        if other.input_shape != tuple(x_train.shape[1:]):
            raise DataError(f"--val-data {where}: inputs of shape {other.input_shape}, but the training data's are "
                            f"{tuple(x_train.shape[1:])}; give validation data of the same C x H x W")
        if other.class_names and self.class_names and other.class_names != self.class_names:
            raise DataError(f"--val-data {where}: classes {other.class_names}, but the training data's are "
                            f"{self.class_names}; give the same class folders")
        if other.num_classes > self.num_classes:
            raise DataError(f"--val-data {where}: labels up to {other.num_classes - 1}, but the training data has "
                            f"{self.num_classes} classes 0..{self.num_classes - 1}; keep to those classes")
        return dataclasses.replace(self, x_val=other.x, y_val=other.y)

    def training_split(self) -> tuple[Tensor, Tensor]:
        """``(x_train, y_train)``, or a ``DataError`` naming the fix when there is none."""
        if self.x_train is None or self.y_train is None:
            raise DataError(
                f"data {self.name!r} has no training split; give an .npz with x_train and y_train "
                "(and x, y for the evaluation)"
            )
        return self.x_train, self.y_train


def tensors_sha256(*tensors: Tensor) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def validate_split(
    x: Tensor, y: Tensor, *, bounds: tuple[float, float], num_classes: int, where: str, uint8_ok: bool = False
) -> None:
    """Raise ``DataError`` naming the first problem found and the fix. ``uint8_ok``: uint8
    images (standing for [0, 1]) are accepted, as a training split may keep them."""
    stored = uint8_ok and x.dtype == torch.uint8
    if stored and tuple(bounds) != (0.0, 1.0):
        raise DataError(f"{where}: uint8 inputs stand for [0, 1], not the bounds {bounds}; give floats in the bounds")
    if not torch.is_floating_point(x) and not stored:
        raise DataError(f"{where}: inputs have dtype {x.dtype}; give floats scaled into the bounds {bounds}")
    if x.dim() != 4:
        raise DataError(
            f"{where}: inputs have shape {tuple(x.shape)}; expected N x C x H x W "
            "(add a channel axis for grey images, move channels first for HWC arrays)"
        )
    if len(x) == 0:
        raise DataError(f"{where}: no samples")
    if not stored:  # uint8 images are finite and in [0, 1] by construction
        _check_values(x, bounds, where)
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise DataError(f"{where}: labels have dtype {y.dtype}; give integer class indices")
    if y.dim() != 1 or len(y) != len(x):
        raise DataError(f"{where}: labels have shape {tuple(y.shape)}; expected ({len(x)},), one per input")
    # compared in numpy, in the labels' own dtype: no cast can wrap a uint64 or overflow num_classes
    labels = y.detach().cpu().numpy()
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes) | (labels > np.iinfo(np.int64).max))
    if len(bad):
        index = int(bad[0])
        classes = (f"{num_classes} classes 0..{num_classes - 1}" if num_classes > 1
                   else "1 class 0" if num_classes == 1 else "classes (there are none)")
        raise DataError(f"{where}: label {labels[index].item()} at index {index} is outside the {classes}")


def _check_values(x: Tensor, bounds: tuple[float, float], where: str) -> None:
    finite = torch.isfinite(x).flatten(1).all(dim=1)
    if not bool(finite.all()):
        index = int((~finite).nonzero()[0])
        raise DataError(f"{where}: input {index} contains NaN or infinite values; clean or drop it")
    low, high = bounds
    outside = ((x < low) | (x > high)).flatten(1).any(dim=1)
    if bool(outside.any()):
        index = int(outside.nonzero()[0])
        raise DataError(
            f"{where}: values span [{float(x.min()):.4g}, {float(x.max()):.4g}], outside the bounds "
            f"[{low:g}, {high:g}] (first at input {index}); scale inputs into the bounds and put any "
            "normalisation inside the model with --mean/--std"
        )


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's bundled 1,797 real 8x8 digits, scaled to [0, 1], split with a fixed seed."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=bunch.target
    )
    train_t, test_t = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return Dataset(
        name="digits",
        x=images[test_t],
        y=labels[test_t],
        x_train=images[train_t],
        y_train=labels[train_t],
        num_classes=10,
        class_names=[str(i) for i in range(10)],
        source="builtin:digits (scikit-learn load_digits, seed 0, 20% test)",
    )


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


@dataclass(frozen=True)
class _NpyMember:
    """One array of an ``.npz``, as its ``.npy`` header declares it (no data read yet)."""

    key: str
    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    fortran_order: bool
    data_offset: int

    def rows(self, limit: int | None) -> tuple[int, ...]:
        """The shape read for ``limit`` leading rows (C order only; Fortran arrays are read whole)."""
        if limit is None or not self.shape or self.fortran_order or limit >= self.shape[0]:
            return self.shape
        return (limit, *self.shape[1:])


def _open_npz(path: Path) -> zipfile.ZipFile:
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
    except OSError as err:
        raise DataError(f"{path}: cannot read the file ({err.strerror or err})") from None
    if not head:
        raise DataError(f"{path}: the file is empty; save arrays with np.savez(path, x=x, y=y)")
    if head.startswith(b"\x93NUMPY"):
        raise DataError(f"{path}: holds a single .npy array, not an .npz archive; save with np.savez(path, x=x, y=y)")
    if head[:1] == b"\x80":
        raise DataError(f"{path}: holds pickled objects, not an .npz archive (robustkit never unpickles data); "
                        "save plain arrays with np.savez")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise DataError(f"{path}: not a readable .npz archive ({_one_line(err)}); it is truncated, corrupt, or not "
                        "written by np.savez") from None


_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError, RuntimeError)


def _npy_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo, key: str, path: Path) -> _NpyMember:
    """The declared shape and dtype of one member, read without decompressing its data."""
    from numpy.lib import format as npy

    try:
        with archive.open(info) as stream:
            version = npy.read_magic(stream)
            if version == (1, 0):
                shape, fortran_order, dtype = npy.read_array_header_1_0(stream)
            elif version in ((2, 0), (3, 0)):  # 3.0 only allows utf-8 field names, which we refuse anyway
                shape, fortran_order, dtype = npy.read_array_header_2_0(stream)
            else:
                raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
            offset = stream.tell()
    except (ValueError, SyntaxError, TypeError) as err:
        raise DataError(f"{path}: array {key!r} is not a readable .npy array ({_one_line(err)}); "
                        "save plain arrays with np.savez") from None
    except _ZIP_ERRORS as err:
        raise DataError(f"{path}: cannot read array {key!r} from the archive ({_one_line(err)}); "
                        "the file is corrupt") from None
    member = _NpyMember(key, info, tuple(int(n) for n in shape), np.dtype(dtype), bool(fortran_order), offset)
    if member.dtype.hasobject:
        raise DataError(f"{path}: array {key!r} holds pickled objects (dtype {member.dtype}); robustkit never "
                        "unpickles data: save plain arrays with np.savez")
    declared = math.prod(member.shape) * member.dtype.itemsize
    available = max(info.file_size - offset, 0)
    if declared > available:
        raise DataError(
            f"{path}: array {key!r} is truncated: its header declares shape {member.shape} {member.dtype} "
            f"({format_bytes(declared)}) but the archive holds {format_bytes(available)} of it; save it again"
        )
    return member


def _check_dtype(member: _NpyMember, where: str) -> None:
    kind = member.dtype.kind
    if member.key.startswith("x"):
        if member.dtype != np.uint8 and kind != "f":
            raise DataError(f"{where}: {member.key} has dtype {member.dtype}; give floats in [0, 1] or uint8 images")
    elif kind not in "iu":
        hint = " (y.astype(np.int64) if they are whole numbers)" if kind == "f" else ""
        raise DataError(f"{where}: {member.key} has dtype {member.dtype}; give integer class indices{hint}")


def _loaded_bytes(member: _NpyMember, limit: int | None, stored: bool) -> int:
    """What the array costs in memory as read and as converted (float32 inputs, int64 labels;
    uint8 inputs of the training split, or of both with ``stored``, stay as they are)."""
    kept = (member.key == "x_train" or stored) and member.dtype == np.uint8
    converted = 8 if member.key.startswith("y") else 1 if kept else 4
    return math.prod(member.rows(limit)) * max(member.dtype.itemsize, converted)


_CHUNK = 16 << 20


def _read_npy(archive: zipfile.ZipFile, member: _NpyMember, path: Path, limit: int | None) -> np.ndarray:
    """The member's data (its first ``limit`` rows where it is C-ordered), decompressed in chunks."""
    shape = member.rows(limit)
    array = np.empty(math.prod(shape), dtype=member.dtype)
    buffer = array.view(np.uint8).reshape(-1)
    filled = 0
    try:
        with archive.open(member.info) as stream:
            stream.seek(member.data_offset)
            while filled < len(buffer):
                chunk = stream.read(min(_CHUNK, len(buffer) - filled))
                if not chunk:
                    break
                buffer[filled:filled + len(chunk)] = np.frombuffer(chunk, np.uint8)
                filled += len(chunk)
    except _ZIP_ERRORS as err:
        raise DataError(f"{path}: array {member.key!r} is corrupt ({_one_line(err)}); save it again") from None
    if filled < len(buffer):
        raise DataError(f"{path}: array {member.key!r} is truncated: {format_bytes(filled)} of the "
                        f"{format_bytes(len(buffer))} its header declares; save it again")
    if member.fortran_order:
        array = array.reshape(shape[::-1]).transpose()
        return array[:limit] if limit is not None and array.ndim else array
    return array.reshape(shape)


def _as_float_inputs(array: np.ndarray, where: str) -> Tensor:
    if array.dtype == np.uint8:
        return torch.from_numpy(array.astype(np.float32) / 255.0)
    if not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"{where}: x has dtype {array.dtype}; give floats in [0, 1] or uint8 images")
    return torch.from_numpy(np.asarray(array, dtype=np.float32, order="C"))


def _as_stored(array: np.ndarray, where: str) -> Tensor:
    """uint8 images as they are (``float_inputs`` converts them where they are used), else floats."""
    return torch.from_numpy(array) if array.dtype == np.uint8 else _as_float_inputs(array, where)


def _as_labels(array: np.ndarray, where: str, key: str = "y") -> Tensor:
    """int64 labels, checked in their own dtype first: uint64 values past int64 would wrap."""
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{where}: {key} has dtype {array.dtype}; give integer class indices")
    if array.size and array.dtype.kind == "u" and array.dtype.itemsize >= 8:
        too_large = np.flatnonzero(array > np.iinfo(np.int64).max)
        if len(too_large):
            index = int(too_large[0])
            raise DataError(f"{where}: label {array.flat[index].item()} at index {index} of {key!r} is too large "
                            "for a class index; give class indices 0..K-1 for K classes")
    return torch.from_numpy(np.asarray(array, dtype=np.int64, order="C"))


def load_npz(path: Path, limit: int | None = None, stored: bool = False) -> Dataset:
    """``x``/``y`` (evaluation) and optionally ``x_train``/``y_train``; never unpickles.

    Every array's ``.npy`` header is read first (shape, dtype) and checked against the data the
    archive holds and against :func:`max_array_bytes`, so a truncated array or a small file
    that inflates to gigabytes is refused before its data is read. With ``limit`` only the
    first ``limit`` evaluation samples are read and the training split is left out (for
    audits); the class count still comes from all labels of both splits. ``stored``: a uint8
    ``x`` stays uint8 as well (``load_dataset``).
    """
    where = str(path)
    with _open_npz(path) as archive:
        infos: dict[str, zipfile.ZipInfo] = {}
        for info in archive.infolist():
            if not info.is_dir():
                infos.setdefault(info.filename[:-4] if info.filename.endswith(".npy") else info.filename, info)
        if not {"x", "y"} <= infos.keys():
            raise DataError(f"{path}: needs arrays 'x' and 'y' (has: {', '.join(sorted(infos)) or 'none'})")
        train = {"x_train", "y_train"} <= infos.keys()
        keys = ["x", "y", *(["x_train", "y_train"] if train else [])]
        members = {key: _npy_header(archive, infos[key], key, path) for key in keys}
        wanted = {"x": limit, "y": None, "x_train": None, "y_train": None}  # all labels: they give the class count
        if limit is not None:
            wanted.pop("x_train")
        for key, rows in wanted.items():
            if key in members:
                _check_dtype(members[key], where)
                message = over_limit(f"{path}: array {key!r} of shape {members[key].rows(rows)} "
                                     f"{members[key].dtype}", _loaded_bytes(members[key], rows, stored))
                if message:
                    raise DataError(message)
        arrays = {key: _read_npy(archive, members[key], path, rows) for key, rows in wanted.items() if key in members}
    x = _as_stored(arrays["x"], where) if stored else _as_float_inputs(arrays["x"], where)
    y = _as_labels(arrays["y"], where, "y")
    y_train = _as_labels(arrays["y_train"], where, "y_train") if train else None
    labels = torch.cat([y.flatten()] + ([y_train.flatten()] if y_train is not None else []))
    num_classes = max(int(labels.max()), 0) + 1 if len(labels) else 0
    if limit is not None:
        inputs = members["x"].shape[:1]  # validate() sees the first rows only: x and y must match in full
        if y.dim() == 1 and inputs and len(y) != inputs[0]:
            raise DataError(f"{where}: labels have shape {tuple(y.shape)}; expected ({inputs[0]},), one per input")
        return Dataset(path.stem, x, y[:limit] if y.dim() else y, num_classes, source=where)
    x_train = None
    if train:  # uint8 images stay uint8 (float_inputs converts each batch)
        x_train = _as_stored(arrays["x_train"], where)
    return Dataset(path.stem, x, y, num_classes, x_train, y_train, source=where)


def _pixel_limit() -> int:
    """Most pixels in one image: the array cap over 12 bytes (three float32 channels)."""
    return max(1, max_array_bytes() // 12)


@contextmanager
def _image_limits() -> Iterator[int]:
    """Pillow's decompression-bomb limit set to robustkit's, its warning turned into an error."""
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit = _pixel_limit()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield limit
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _read_image(file: Path, max_pixels: int) -> np.ndarray:
    """One image as H x W x C uint8, or a one-line ``DataError`` naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        if file.stat().st_size == 0:
            raise DataError(f"{file}: the image file is empty (0 bytes); remove it or save it again")
        with Image.open(file, formats=IMAGE_FORMATS) as image:
            mode = "L" if image.mode in ("L", "1", "I", "I;16") else "RGB"
            array = np.asarray(image.convert(mode), dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        size = re.search(r"\((\d+) pixels\)", str(err))
        pixels = f"{int(size[1]):,} pixels" if size else "more pixels than allowed"
        raise DataError(
            f"{file}: refusing an image of {pixels}, over robustkit's limit of {max_pixels:,} pixels (a decompression "
            f"bomb?); set {MAX_ARRAY_BYTES_ENV} to raise it if you trust the image"
        ) from None
    except UnidentifiedImageError:
        raise DataError(f"{file}: not a readable image (no {'/'.join(IMAGE_FORMATS)} decoder recognises it); "
                        "remove it or convert it") from None
    except OSError as err:
        if err.filename is not None:  # opening it failed (permissions, ...), not decoding it
            raise DataError(f"{file}: cannot read the file ({err.strerror or _one_line(err)})") from None
        raise DataError(f"{file}: cannot decode the image ({_one_line(err)}); it is truncated or corrupt") from None
    except DataError:
        raise
    except Exception as err:  # Pillow's decoders raise SyntaxError, ValueError, struct.error, ...
        raise DataError(f"{file}: cannot decode the image ({type(err).__name__}: {_one_line(err)}); "
                        "it is truncated or corrupt") from None
    return array if array.ndim == 3 else array[..., None]


#: Seed of the images an audit with --limit draws from an image folder.
LIMIT_SEED = 0
#: Sub-folders that make an image folder a split data set: training images, then evaluation.
TRAIN_FOLDER = "train"
EVAL_FOLDERS = ("val", "test")


def load_image_folder(path: Path, limit: int | None = None, stored: bool = False) -> Dataset:
    """An image data set: ``train/`` and ``val/`` (or ``test/``) sub-folders, each with one
    sub-folder per class, or one sub-folder per class (evaluation only; ``Dataset.split``
    makes a seeded training split of it). Images must share one size. The training images
    stay uint8, the evaluation images too with ``stored`` (``load_dataset``)."""
    train = path / TRAIN_FOLDER
    evaluation = next((path / name for name in EVAL_FOLDERS if (path / name).is_dir()), None)
    if not train.is_dir() or evaluation is None:
        return _as_evaluation(_load_class_folders(path, limit), stored)
    data = _as_evaluation(_load_class_folders(evaluation, limit), stored)
    data.name = path.name
    if limit is None:
        data.source = str(path)
    if limit is not None:  # an audit with --limit reads only the evaluation images it needs
        return data
    trained = _load_class_folders(train, None)
    if trained.class_names != data.class_names:
        raise DataError(f"{path}: {train.name}/ has the classes {trained.class_names} but {evaluation.name}/ has "
                        f"{data.class_names}; both need the same class folders")
    data.x_train, data.y_train = trained.x, trained.y  # uint8, as stored
    return data


def _as_evaluation(data: Dataset, stored: bool) -> Dataset:
    """Evaluation images as floats (what attacks take), or as stored (uint8) with ``stored``."""
    if not stored:
        data.x = float_inputs(data.x)
    return data


def _load_class_folders(path: Path, limit: int | None = None) -> Dataset:
    """One sub-folder per class (sorted names are the classes), as uint8; images must share one size.

    Only regular files with an image suffix are read, each only by the decoder of an image
    format (never a plug-in that runs a program, such as EPS through Ghostscript), under
    :func:`max_array_bytes` for every image and for all of them together. With ``limit``
    only ``limit`` images are decoded, drawn at random (seed ``LIMIT_SEED``) from all classes:
    the first files in class order would leave the last classes out.
    """
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{path}: an image folder needs one sub-folder per class")
    if len(classes) == 1:  # its images would all get label 0, whatever class the model calls them
        raise DataError(f"{path}: one class folder ({classes[0]}/); an image folder needs a sub-folder for every "
                        "class, as the labels are the folders' sorted positions")
    files = [(file, index) for index, name in enumerate(classes) for file in sorted((path / name).iterdir())
             # notes, sub-folders, and pipes or devices that would block or never end are skipped
             if file.suffix.lower() in IMAGE_SUFFIXES and file.is_file()]
    if limit is not None and limit < len(files):
        chosen = torch.randperm(len(files), generator=torch.Generator().manual_seed(LIMIT_SEED))[:limit]
        files = [files[i] for i in sorted(chosen.tolist())]
    images: list[np.ndarray] = []
    labels: list[int] = []
    size = None
    total = 0
    with _image_limits() as max_pixels:
        for file, index in files:
            array = _read_image(file, max_pixels)
            if size is None:
                size = array.shape[:2]
            if array.shape[:2] != size:
                raise DataError(f"{file}: size {array.shape[:2]} differs from {size}; resize all images to one size")
            total += array.nbytes * 4  # what they take as float32, the form evaluation images take
            message = over_limit(f"{path}: the images up to {file.name}", total)
            if message:
                raise DataError(message)
            images.append(array)
            labels.append(index)
    if not images:
        raise DataError(f"{path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the class folders")
    if len({image.shape[2] for image in images}) > 1:  # grey among colour images: grey as RGB, as torchvision does
        images = [np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image for image in images]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor(labels, dtype=torch.int64)
    if limit is not None:
        source = f"{path} (a random {len(images)} of its images, seed {LIMIT_SEED}, from every class)"
        return Dataset(path.name, x, y, len(classes), class_names=classes, source=source)
    return Dataset(path.name, x, y, len(classes), class_names=classes, source=str(path))


def load_dataset(ref: str, limit: int | None = None, *, stored: bool = False) -> Dataset:
    """A data set from a path (``.npz``, image folder) or a registered name (``builtin:digits``).

    ``builtin:NAME`` and a bare ``NAME`` resolve in the data-set registry (built-in first);
    ``provider:NAME`` is exact. The result is validated before it is returned.

    ``limit`` keeps the first ``limit`` evaluation samples and no training split (what an
    audit with ``--limit`` needs); files are then read only as far as those samples.

    ``stored``: uint8 images (an image folder, a uint8 ``x`` in an ``.npz``) stay uint8 in the
    evaluation split as well, a quarter of float32's memory, for a caller that converts them
    with ``float_inputs`` where it uses them (harden); attacks take the default, floats.
    """
    from robustkit.plugin.host import get_host

    if limit is not None and limit < 1:
        raise RobustkitError(f"--limit must be >= 1, got {limit}")
    path = Path(ref).expanduser()
    if path.exists():
        if path.is_dir():
            dataset = load_image_folder(path, limit, stored)
        elif path.suffix == ".npz":
            if not path.is_file():
                raise RobustkitError(f"{ref}: not a regular file; give a .npz with x and y, or an image folder")
            dataset = load_npz(path, limit, stored)
        else:
            raise RobustkitError(f"{ref}: unsupported data file; give a .npz with x and y, or an image folder")
    else:
        name = ref[len("builtin:"):] if ref.startswith("builtin:") else ref
        if "/" in name or name.endswith(".npz"):
            raise RobustkitError(f"data {ref!r} does not exist")
        entry = get_host().datasets.resolve(name)
        dataset = entry.obj()
    if limit is not None:  # 0-d arrays stay as they are, for validate() to name
        dataset.x = dataset.x[:limit] if dataset.x.dim() else dataset.x
        dataset.y = dataset.y[:limit] if dataset.y.dim() else dataset.y
        dataset.x_train = dataset.y_train = None
    return dataset.validate(stored=stored)
