"""Training data paths: uint8 storage kept as uint8 until the device (a quarter of the memory,
the same numbers), and a separate validation set (--val-data) for the canary."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from robustkit.cli import cli
from robustkit.data import Dataset, float_inputs, load_dataset, load_digits
from robustkit.errors import DataError
from robustkit.harden.config import RunConfig
from robustkit.harden.defences import FGSMRS
from robustkit.threat import ThreatModel

THREAT = ThreatModel("linf", 0.1)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 8 * 8, 10))


def _as_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.numpy() * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def npz_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same 400 training digits as uint8, and as float32 converted the usual way (k / 255)."""
    digits = load_digits()
    assert digits.x_train is not None and digits.y_train is not None
    root = tmp_path_factory.mktemp("npz")
    stored = _as_uint8(digits.x_train[:400])
    arrays = {"x": digits.x[:64].numpy(), "y": digits.y[:64].numpy(), "y_train": digits.y_train[:400].numpy()}
    np.savez(root / "u8.npz", x_train=stored, **arrays)
    np.savez(root / "f32.npz", x_train=stored.astype(np.float32) / 255.0, **arrays)
    return root / "u8.npz", root / "f32.npz"


def test_uint8_data_stays_uint8_and_trains_bit_identically_to_floats(npz_pair: tuple[Path, Path]) -> None:
    stored, floats = (load_dataset(str(path)) for path in npz_pair)
    assert stored.x_train is not None and floats.x_train is not None
    assert stored.x_train.dtype == torch.uint8 and floats.x_train.dtype == torch.float32
    # bytes held by the training inputs: 400 x 1 x 8 x 8 = 25,600 as uint8, 102,400 as float32
    assert stored.x_train.nbytes == 25_600 and floats.x_train.nbytes == 4 * stored.x_train.nbytes
    assert torch.equal(float_inputs(stored.x_train), floats.x_train)  # the same numbers, to the bit

    settings = {"epochs": 1, "canary_size": 32, "canary_steps": 2}
    trained = {
        name: FGSMRS(**settings).apply(_net(), data, threat=THREAT, run=RunConfig(progress=False, **run)).model
        for name, data, run in (
            ("float", floats, {}),
            ("uint8 on the device", stored, {"placement": "device"}),
            ("uint8 through the loader", stored, {"placement": "loader", "workers": 0}),
        )
    }
    reference = trained.pop("float").state_dict()
    for name, model in trained.items():
        for key, value in model.state_dict().items():
            assert torch.equal(value, reference[key]), (name, key)


def _write_folder(folder: Path, x: torch.Tensor, y: torch.Tensor, classes: int = 10) -> None:
    for k in range(classes):
        (folder / f"c{k}").mkdir(parents=True, exist_ok=True)
    for index, (image, label) in enumerate(zip(_as_uint8(x), y.tolist())):
        Image.fromarray(image[0], mode="L").save(folder / f"c{label}" / f"{index}.png")


def test_image_folders_keep_training_images_as_uint8_and_take_a_validation_folder(tmp_path: Path) -> None:
    digits = load_digits()
    assert digits.x_train is not None and digits.y_train is not None
    _write_folder(tmp_path / "data" / "train", digits.x_train[:60], digits.y_train[:60])
    _write_folder(tmp_path / "data" / "val", digits.x[:30], digits.y[:30])
    _write_folder(tmp_path / "holdout", digits.x[30:50], digits.y[30:50])
    data = load_dataset(str(tmp_path / "data"))
    assert data.x_train is not None and data.x_train.dtype == torch.uint8 and data.x.dtype == torch.float32
    validated = data.with_validation(load_dataset(str(tmp_path / "holdout")), "holdout")
    assert validated.x_val is not None and len(validated.x_val) == 20

    _write_folder(tmp_path / "nine", digits.x[:20], digits.y[:20] % 9, classes=9)
    with pytest.raises(DataError, match=r"^--val-data nine: classes \['c0'.*the training data's are"):
        data.with_validation(load_dataset(str(tmp_path / "nine")), "nine")
    wide = dataclasses.replace(digits, x=torch.zeros(4, 1, 8, 9), y=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(DataError, match=r"^--val-data wide: inputs of shape \(1, 8, 9\), but the training data's are "
                                        r"\(1, 8, 8\); give validation data of the same C x H x W$"):
        data.with_validation(wide, "wide")
    many = Dataset("many", digits.x[:4], torch.tensor([0, 1, 2, 11]), 12)
    with pytest.raises(DataError, match="labels up to 11, but the training data has 10 classes"):
        digits.with_validation(many, "many")


def test_a_split_folder_and_validation_folder_stay_uint8_until_the_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder of class folders (harden splits it) and a --val-data folder: the training and the
    validation images reach the loop as uint8, with the numbers a float load gives; only the
    evaluation split the audits attack is float."""
    digits = load_digits()
    _write_folder(tmp_path / "data", digits.x[:100], digits.y[:100])
    _write_folder(tmp_path / "val", digits.x[100:130], digits.y[100:130])
    seen: list[Dataset] = []
    apply = FGSMRS.apply

    def spy(self: FGSMRS, model: nn.Module, data: Dataset, **kwargs: Any) -> Any:
        seen.append(data)
        return apply(self, model, data, **kwargs)

    monkeypatch.setattr(FGSMRS, "apply", spy)
    result = CliRunner().invoke(cli, ["harden", "builtin:digits-cnn", "--data", str(tmp_path / "data"), "--val-data",
                                      str(tmp_path / "val"), "--defence", "fgsm-rs", "-o", "epochs", "1",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    (data,) = seen
    assert data.x_train is not None and data.x_val is not None
    assert data.x_train.dtype == torch.uint8 and data.x_val.dtype == torch.uint8 and data.x.dtype == torch.float32
    assert len(data.x_train) == 80 and len(data.x) == 20  # the seeded 80/20 split
    assert torch.equal(float_inputs(data.x_val), load_dataset(str(tmp_path / "val")).x)
    floats = load_dataset(str(tmp_path / "data")).split(0.2, seed=0)  # the split as a float load makes it
    assert floats.x_train is not None and torch.equal(float_inputs(data.x_train), floats.x_train)
    assert torch.equal(data.x, floats.x)


def test_cli_val_data_drives_the_canary_and_is_recorded(npz_pair: tuple[Path, Path], tmp_path: Path) -> None:
    """End to end: uint8 training data, a separate 7-sample validation set, and --awp."""
    digits = load_digits()
    val = tmp_path / "val.npz"
    np.savez(val, x=digits.x[100:107].numpy(), y=digits.y[100:107].numpy())
    args = ["harden", "builtin:digits-cnn", "--data", str(npz_pair[0]), "--val-data", str(val), "--defence",
            "fgsm-rs", "--awp", "5e-3", "-o", "epochs", "1", "--out", str(tmp_path / "a"), "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["val_data"] == str(val)
    assert config["params"]["awp_gamma"] == 5e-3 and config["params"]["awp_warmup"] == 0
    record = json.loads((tmp_path / "a" / "train_log.jsonl").read_text().splitlines()[0])
    for key in ("val_clean", "val_robust"):  # measured on the 7 samples, not on a split of the training data
        assert record[key] * 7 == pytest.approx(round(record[key] * 7))

    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((3, 1, 8, 9), np.float32), y=np.zeros(3, np.int64))
    bad = CliRunner().invoke(cli, [*args[:5], str(wrong), *args[6:-3], "--out", str(tmp_path / "b")])
    assert bad.exit_code != 0 and "give validation data of the same C x H x W" in bad.output
    assert len([line for line in bad.output.splitlines() if "--val-data" in line]) == 1, bad.output
