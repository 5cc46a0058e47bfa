"""Training on image folders: train/ and val/ sub-folders, or one folder of class folders that
harden splits (seeded, and said)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from robustkit.cli import cli
from robustkit.data import load_dataset, load_digits
from robustkit.errors import DataError


def _write_digits(folder: Path, x: np.ndarray, y: np.ndarray) -> None:
    for index, (image, label) in enumerate(zip(x, y)):
        (folder / f"class{label}").mkdir(parents=True, exist_ok=True)
        pixels = (image[0] * 255).round().astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"class{label}" / f"{index}.png")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits as PNG files: root/train/classK/*.png and root/val/classK/*.png."""
    digits = load_digits()
    assert digits.x_train is not None and digits.y_train is not None
    root = tmp_path_factory.mktemp("images")
    _write_digits(root / "train", digits.x_train.numpy(), digits.y_train.numpy())
    _write_digits(root / "val", digits.x.numpy(), digits.y.numpy())
    return root


def test_train_and_val_folders_load_as_both_splits(folders: Path) -> None:
    data = load_dataset(str(folders))
    digits = load_digits()
    assert data.x_train is not None and data.num_classes == 10
    assert len(data.y) == len(digits.y) and len(data.y_train) == len(digits.y_train)  # type: ignore[arg-type]
    assert data.class_names == [f"class{k}" for k in range(10)]
    limited = load_dataset(str(folders), limit=16)
    assert len(limited.y) == 16 and limited.x_train is None
    assert len(set(limited.y.tolist())) >= 6 and "random 16" in limited.source  # drawn from every class, said


def test_harden_trains_on_an_image_folder(folders: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["harden", "builtin:digits-cnn", "--data", str(folders), "--defence", "fgsm-rs",
                                      "-o", "epochs", "4", "--eps", "0.1", "--out", str(tmp_path / "a"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["after"]["clean_accuracy"] > 0.8 and summary["after"]["robust_accuracy"] > summary["before"][
        "robust_accuracy"]
    assert not any("seeded split" in note for note in summary["notes"])


def test_a_folder_of_class_folders_is_split_and_says_so(
    folders: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    result = CliRunner().invoke(cli, ["harden", "builtin:digits-cnn", "--data", str(folders / "train"),
                                      "--defence", "fgsm-rs", "-o", "epochs", "1", "--out", str(tmp_path / "b"),
                                      "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert any("seeded split" in note for note in summary["notes"])
    assert any("seeded split" in r.message and r.levelname == "WARNING" for r in caplog.records)  # the terminal


def test_train_and_val_must_have_the_same_classes(folders: Path, tmp_path: Path) -> None:
    root = tmp_path / "mismatch"
    digits = load_digits()
    _write_digits(root / "train", digits.x[:20].numpy(), digits.y[:20].numpy())
    _write_digits(root / "val", digits.x[:20].numpy(), (digits.y[:20].numpy() + 1) % 12)
    with pytest.raises(DataError, match="same class folders"):
        load_dataset(str(root))
