"""A user's own model, first time right (issue 17): --arch from the current folder, one
--mean/--std value per channel."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.torch import save_file

from robustkit.cli import cli

NET = """from torch import nn

def net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
"""


@pytest.fixture
def user_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with mynets.py, its weights and 3x8x8 data, as the current folder."""
    (tmp_path / "mynets.py").write_text(NET)
    monkeypatch.syspath_prepend(str(tmp_path))  # only to build the weights here
    from mynets import net  # type: ignore[import-not-found]

    save_file(net().state_dict(), str(tmp_path / "mine.safetensors"))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.random((32, 3, 8, 8), dtype=np.float32), y=rng.integers(0, 10, 32))
    monkeypatch.undo()  # off sys.path again: the CLI must find mynets.py by itself
    monkeypatch.chdir(tmp_path)
    return tmp_path


def audit(*extra: str) -> Any:
    return CliRunner().invoke(cli, ["audit", "mine.safetensors", "--arch", "mynets:net", "--data", "data.npz",
                                    "--attack", "fgsm", "--no-checks", "--no-certify", "--json", *extra])


def test_arch_module_is_imported_from_the_current_folder(user_folder: Path) -> None:
    result = audit()
    assert "No module named" not in result.output
    assert result.exit_code in (0, 3), result.output  # a random net is at chance


def test_one_mean_for_three_channels_is_refused(user_folder: Path) -> None:
    result = audit("--mean", "0.5", "--std", "0.25")
    assert result.exit_code == 1
    assert "1 value(s) but the data has 3 channel(s)" in result.stderr
    assert result.stderr.count("\n") == 1
    result = audit("--mean", "0.5,0.5,0.5,0.5", "--std", "0.25,0.25,0.25,0.25")
    assert result.exit_code == 1 and "4 value(s)" in result.stderr


def test_channels_last_data_is_named_with_the_fix(user_folder: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(user_folder / "nhwc.npz", x=rng.random((32, 8, 8, 3), dtype=np.float32), y=rng.integers(0, 10, 32))
    result = CliRunner().invoke(cli, ["audit", "mine.safetensors", "--arch", "mynets:net", "--data", "nhwc.npz",
                                      "--attack", "fgsm"])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
    assert "(8, 8, 3)" in result.stderr and "channels-last" in result.stderr and "transpose" in result.stderr
