"""Data sets: the bundled digits, ``.npz`` files and image folders, all validated.

Every data set reaches attacks as float tensors N x C x H x W in the bounds with integer
labels, and every way that convention can be broken gets a one-line error saying what is
wrong, where, and how to fix it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from robustkit.errors import DataError, RobustkitError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class Dataset:
    """Evaluation split (``x``, ``y``) and an optional training split."""

    name: str
    x: Tensor
    y: Tensor
    num_classes: int
    x_train: Tensor | None = None
    y_train: Tensor | None = None
    bounds: tuple[float, float] = (0.0, 1.0)
    class_names: list[str] = field(default_factory=list)
    source: str = ""

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

    def validate(self, num_classes: int | None = None) -> Dataset:
        """Check both splits against the convention; ``num_classes`` is the model's."""
        classes = num_classes or self.num_classes
        validate_split(self.x, self.y, bounds=self.bounds, num_classes=classes, where=f"{self.name} (eval split)")
        if self.x_train is not None and self.y_train is not None:
            validate_split(self.x_train, self.y_train, bounds=self.bounds, num_classes=classes,
                           where=f"{self.name} (train split)")
            if self.x_train.shape[1:] != self.x.shape[1:]:
                raise DataError(
                    f"{self.name}: train inputs have shape {tuple(self.x_train.shape[1:])} but eval inputs "
                    f"{tuple(self.x.shape[1:])}; both splits need the same C x H x W"
                )
        return self

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


def validate_split(x: Tensor, y: Tensor, *, bounds: tuple[float, float], num_classes: int, where: str) -> None:
    """Raise ``DataError`` naming the first problem found and the fix."""
    if not torch.is_floating_point(x):
        raise DataError(f"{where}: inputs have dtype {x.dtype}; give floats scaled into the bounds {bounds}")
    if x.dim() != 4:
        raise DataError(
            f"{where}: inputs have shape {tuple(x.shape)}; expected N x C x H x W "
            "(add a channel axis for grey images, move channels first for HWC arrays)"
        )
    if len(x) == 0:
        raise DataError(f"{where}: no samples")
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
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise DataError(f"{where}: labels have dtype {y.dtype}; give integer class indices")
    if y.dim() != 1 or len(y) != len(x):
        raise DataError(f"{where}: labels have shape {tuple(y.shape)}; expected ({len(x)},), one per input")
    bad = (y < 0) | (y >= num_classes)
    if bool(bad.any()):
        index = int(bad.nonzero()[0])
        raise DataError(
            f"{where}: label {int(y[index])} at index {index} is outside the {num_classes} classes 0..{num_classes - 1}"
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


def _as_float_inputs(array: np.ndarray, where: str) -> Tensor:
    if array.dtype == np.uint8:
        return torch.from_numpy(array.astype(np.float32) / 255.0)
    if not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"{where}: x has dtype {array.dtype}; give floats in [0, 1] or uint8 images")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _as_labels(array: np.ndarray, where: str) -> Tensor:
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{where}: y has dtype {array.dtype}; give integer class indices")
    return torch.from_numpy(array.astype(np.int64))


def _read(archive: Any, key: str, path: Path) -> np.ndarray:
    """One array of an open ``.npz``; numpy reads arrays lazily, so object arrays fail here."""
    try:
        return archive[key]
    except ValueError as err:
        raise DataError(
            f"{path}: array {key!r} holds pickled objects ({err}); save plain arrays with np.savez"
        ) from None


def load_npz(path: Path) -> Dataset:
    """``x``/``y`` (evaluation) and optionally ``x_train``/``y_train``; never unpickles."""
    try:
        archive = np.load(path, allow_pickle=False)
    except ValueError as err:
        raise DataError(f"{path}: holds pickled objects ({err}); save plain arrays with np.savez") from None
    except Exception as err:
        raise DataError(f"{path}: not a readable .npz file ({err})") from None
    with archive:
        keys = set(archive.files)
        if not {"x", "y"} <= keys:
            raise DataError(f"{path}: needs arrays 'x' and 'y' (has: {', '.join(sorted(keys)) or 'none'})")
        x = _as_float_inputs(_read(archive, "x", path), str(path))
        y = _as_labels(_read(archive, "y", path), str(path))
        x_train = y_train = None
        if "x_train" in keys and "y_train" in keys:
            x_train = _as_float_inputs(_read(archive, "x_train", path), str(path))
            y_train = _as_labels(_read(archive, "y_train", path), str(path))
    labels = torch.cat([y] + ([y_train] if y_train is not None else []))
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    return Dataset(path.stem, x, y, num_classes, x_train, y_train, source=str(path))


def load_image_folder(path: Path) -> Dataset:
    """One sub-folder per class (sorted names are the classes); images must share one size."""
    from PIL import Image

    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{path}: an image folder needs one sub-folder per class")
    images, labels = [], []
    size = None
    for index, name in enumerate(classes):
        for file in sorted((path / name).iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            with Image.open(file) as image:
                mode = "L" if image.mode in ("L", "1", "I", "I;16") else "RGB"
                array = np.asarray(image.convert(mode), dtype=np.float32) / 255.0
            if size is None:
                size = array.shape
            if array.shape != size:
                raise DataError(f"{file}: size {array.shape} differs from {size}; resize all images to one size")
            images.append(array if array.ndim == 3 else array[..., None])
            labels.append(index)
    if not images:
        raise DataError(f"{path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the class folders")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor(labels, dtype=torch.int64)
    return Dataset(path.name, x, y, len(classes), class_names=classes, source=str(path))


def load_dataset(ref: str) -> Dataset:
    """A data set from a path (``.npz``, image folder) or a registered name (``builtin:digits``).

    ``builtin:NAME`` and a bare ``NAME`` resolve in the data-set registry (built-in first);
    ``provider:NAME`` is exact. The result is validated before it is returned.
    """
    from robustkit.plugin.host import get_host

    path = Path(ref).expanduser()
    if path.exists():
        if path.is_dir():
            dataset = load_image_folder(path)
        elif path.suffix == ".npz":
            dataset = load_npz(path)
        else:
            raise RobustkitError(f"{ref}: unsupported data file; give a .npz with x and y, or an image folder")
    else:
        name = ref[len("builtin:"):] if ref.startswith("builtin:") else ref
        if "/" in name or name.endswith(".npz"):
            raise RobustkitError(f"data {ref!r} does not exist")
        entry = get_host().datasets.resolve(name)
        dataset = entry.obj()
    return dataset.validate()
