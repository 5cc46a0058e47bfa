"""Data sets: the bundled digits, .npz files, image folders, and a one-line error for bad data."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from robustkit.data import Dataset, load_dataset, load_digits
from robustkit.errors import DataError, RobustkitError, UnknownNameError
from robustkit.plugin.host import Host


def test_builtin_digits(host: Host) -> None:
    data = load_dataset("builtin:digits")
    assert data.x.shape == (360, 1, 8, 8) and data.x_train is not None and data.y_train is not None
    assert data.x_train.shape == (1437, 1, 8, 8)
    assert data.x.dtype == torch.float32 and data.y.dtype == torch.int64
    assert float(data.x.min()) == 0.0 and float(data.x.max()) == 1.0
    assert data.num_classes == 10 and sorted(data.y.unique().tolist()) == list(range(10))
    # stratified: every class has 36 evaluation images (+-1)
    assert all(35 <= int((data.y == c).sum()) <= 37 for c in range(10))
    # the split is fixed: same images every time, and train and evaluation do not overlap
    again = load_dataset("digits")
    assert torch.equal(again.x, data.x) and torch.equal(again.y, data.y)
    assert again.describe()["sha256"] == data.describe()["sha256"]
    train_rows = {tuple(row) for row in data.x_train.flatten(1).tolist()}
    overlap = sum(tuple(row) in train_rows for row in data.x.flatten(1).tolist())
    assert overlap < 5  # a few digits are pixel-identical in the source data, no more
    assert not torch.equal(load_digits(seed=1).y, data.y)


def test_describe(host: Host) -> None:
    info = load_dataset("builtin:digits").describe()
    assert {
        k: info[k] for k in ("name", "n_eval", "n_train", "input_shape", "num_classes", "bounds")
    } == {
        "name": "digits",
        "n_eval": 360,
        "n_train": 1437,
        "input_shape": [1, 8, 8],
        "num_classes": 10,
        "bounds": [0.0, 1.0],
    }


def test_unknown_dataset_name(host: Host, tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match=r"did you mean .*digits.*robustkit datasets list"):
        load_dataset("digit")
    with pytest.raises(RobustkitError, match="does not exist"):
        load_dataset(str(tmp_path / "missing.npz"))
    text = tmp_path / "data.csv"
    text.write_text("1,2\n")
    with pytest.raises(RobustkitError, match="unsupported data file"):
        load_dataset(str(text))


def _save(path: Path, **arrays: Any) -> str:
    np.savez(path, **arrays)
    return str(path)


def test_npz_eval_split(host: Host, tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((6, 3, 4, 4)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2])
    data = load_dataset(_save(tmp_path / "small.npz", x=x, y=y))
    assert data.name == "small" and data.num_classes == 3 and data.x_train is None
    assert np.array_equal(data.x.numpy(), x) and data.y.dtype == torch.int64


def test_npz_with_train_split_and_uint8(host: Host, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4, 1, 5, 5), dtype=np.uint8)
    x_train = rng.integers(0, 256, (8, 1, 5, 5), dtype=np.uint8)
    data = load_dataset(
        _save(
            tmp_path / "u8.npz",
            x=x,
            y=np.array([0, 1, 0, 1]),
            x_train=x_train,
            y_train=np.array([0, 1, 2, 3, 0, 1, 2, 3]),
        )
    )
    assert data.num_classes == 4  # counted over both splits
    assert data.x_train is not None and data.x_train.shape == (8, 1, 5, 5)
    assert torch.allclose(data.x, torch.from_numpy(x).float() / 255)
    assert data.x_train.dtype == torch.uint8 and torch.equal(data.x_train, torch.from_numpy(x_train))  # kept as stored


def _png(path: Path, value: int, size: tuple[int, int] = (6, 5), mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour: Any = value if mode == "L" else (value, 0, 255 - value)
    Image.new(mode, size, colour).save(path)


def test_image_folder(host: Host, tmp_path: Path) -> None:
    root = tmp_path / "pets"
    _png(root / "cat" / "a.png", 0)
    _png(root / "cat" / "b.png", 51)
    _png(root / "dog" / "c.png", 255)
    (root / "dog" / "notes.txt").write_text("ignored")
    data = load_dataset(str(root))
    assert data.class_names == ["cat", "dog"] and data.num_classes == 2
    assert data.x.shape == (3, 1, 5, 6)  # N x C x H x W from a 6-wide, 5-high image
    assert data.y.tolist() == [0, 0, 1]
    assert data.x[:, 0, 0, 0].tolist() == pytest.approx([0.0, 0.2, 1.0])


def test_image_folder_rgb(host: Host, tmp_path: Path) -> None:
    root = tmp_path / "rgb"
    _png(root / "a" / "1.png", 255, mode="RGB")
    _png(root / "b" / "2.png", 0, mode="RGB")
    data = load_dataset(str(root))
    assert data.x.shape == (2, 3, 5, 6)
    assert data.x[0, :, 0, 0].tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("no-classes", "needs one sub-folder per class"),
        ("no-images", "no images"),
        ("mixed-sizes", r"size \(5, 7\) differs from \(5, 6\); resize"),
        ("one-class", "one class folder"),
    ],
)
def test_bad_image_folders(host: Host, tmp_path: Path, layout: str, message: str) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    if layout == "no-images":
        for name in ("a", "b"):
            (root / name).mkdir()
            (root / name / "readme.txt").write_text("x")
    elif layout == "mixed-sizes":
        _png(root / "a" / "1.png", 0, size=(6, 5))
        _png(root / "b" / "2.png", 0, size=(7, 5))
    elif layout == "one-class":  # every image would get label 0, whatever the model calls its class
        _png(root / "three" / "1.png", 0)
    with pytest.raises(DataError, match=message):
        load_dataset(str(root))


def test_grey_images_among_colour_ones_read_as_rgb(host: Host, tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    _png(root / "a" / "1.png", 51)  # grey first: the colour image after it must not be refused
    _png(root / "b" / "2.png", 255, mode="RGB")
    data = load_dataset(str(root))
    assert data.x.shape == (2, 3, 5, 6)
    assert data.x[0, :, 0, 0].tolist() == pytest.approx([0.2, 0.2, 0.2])  # the grey value in every channel
    assert data.x[1, :, 0, 0].tolist() == [1.0, 0.0, 0.0]


def test_limit_does_not_hide_a_label_count_mismatch(host: Host, tmp_path: Path) -> None:
    path = _save(tmp_path / "short-y.npz", x=np.full((6, 1, 3, 3), 0.5, dtype=np.float32), y=np.array([0, 1, 0, 1, 0]))
    with pytest.raises(DataError, match=r"labels have shape \(5,\); expected \(6,\)"):
        load_dataset(str(path), limit=3)


GOOD_X = np.full((4, 1, 3, 3), 0.5, dtype=np.float32)
GOOD_Y = np.array([0, 1, 2, 1])


def _nan_x() -> np.ndarray:
    x = GOOD_X.copy()
    x[2, 0, 1, 1] = np.nan
    return x


def _outside_x() -> np.ndarray:
    x = GOOD_X.copy()
    x[3, 0, 0, 0] = 1.5
    return x


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (
            {"x": GOOD_X[:, 0], "y": GOOD_Y},
            r"inputs have shape \(4, 3, 3\); expected N x C x H x W",
        ),
        ({"x": GOOD_X.astype(np.int32), "y": GOOD_Y}, "x has dtype int32; give floats in"),
        ({"x": _nan_x(), "y": GOOD_Y}, "input 2 contains NaN or infinite values"),
        (
            {"x": _outside_x(), "y": GOOD_Y},
            r"values span \[0.5, 1.5\], outside the bounds \[0, 1\] "
            r"\(first at input 3\)",
        ),
        (
            {"x": GOOD_X, "y": GOOD_Y.astype(np.float32)},
            "y has dtype float32; give integer class indices",
        ),
        ({"x": GOOD_X, "y": GOOD_Y[:3]}, r"labels have shape \(3,\); expected \(4,\)"),
        (
            {"x": GOOD_X, "y": np.array([0, 1, -1, 1])},
            "label -1 at index 2 is outside the 2 classes",
        ),
        ({"x": GOOD_X}, "needs arrays 'x' and 'y' \\(has: x\\)"),
        (
            {"x": GOOD_X, "y": GOOD_Y, "x_train": GOOD_X[:, :, :2], "y_train": GOOD_Y},
            r"train inputs have shape \(1, 2, 3\) but eval inputs \(1, 3, 3\)",
        ),
        (
            {"x": GOOD_X, "y": GOOD_Y, "x_train": _nan_x(), "y_train": GOOD_Y},
            r"bad \(train split\): input 2",
        ),
    ],
    ids=[
        "shape",
        "int-dtype",
        "nan",
        "outside-bounds",
        "float-labels",
        "label-count",
        "negative-label",
        "missing-y",
        "split-shapes",
        "train-nan",
    ],
)
def test_bad_npz_is_one_line_naming_problem_and_place(
    host: Host, tmp_path: Path, arrays: dict[str, Any], message: str
) -> None:
    path = _save(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message) as info:
        load_dataset(path)
    assert "bad" in str(info.value) and "\n" not in str(info.value)


def test_labels_beyond_the_models_classes() -> None:
    data = Dataset("tiny", torch.full((2, 1, 2, 2), 0.5), torch.tensor([0, 5]), num_classes=6)
    data.validate()
    with pytest.raises(DataError, match=r"label 5 at index 1 is outside the 4 classes 0\.\.3"):
        data.validate(num_classes=4)


def test_pickled_npz_is_refused_without_unpickling(host: Host, tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (print, ("pickle ran",))

    path = tmp_path / "pickled.npz"
    np.savez(path, x=GOOD_X, y=np.array([Payload()] * 4, dtype=object))
    with pytest.raises(DataError, match="array 'y' holds pickled objects") as info:
        load_dataset(str(path))
    assert "pickled.npz" in str(info.value)
    not_npz = tmp_path / "fake.npz"
    not_npz.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(DataError, match=r"fake\.npz"):
        load_dataset(str(not_npz))
