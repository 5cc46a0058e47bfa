"""Augmentation on the device (random crop with padding, horizontal flip): each output is a
crop of the padded input, the draws are seeded by where the run is, and a run interrupted
and resumed with augmentation ends exactly where an uninterrupted one does."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkit.data import Dataset, load_digits
from robustkit.errors import OptionError
from robustkit.harden.augment import Augmentation, batch_generator, parse_augmentation
from robustkit.harden.config import RunConfig
from robustkit.harden.defences import FGSMRS
from robustkit.testing import check_resume_is_exact
from robustkit.threat import ThreatModel

THREAT = ThreatModel("linf", 0.1)


def _matches_a_window(out: Tensor, x: Tensor, padding: int, fill: float) -> tuple[bool, bool]:
    """Whether ``out`` is some crop of the padded ``x``, and whether that crop is flipped."""
    padded = F.pad(x, (padding,) * 4, value=fill)
    height, width = x.shape[1:]
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            window = padded[:, dy:dy + height, dx:dx + width]
            if torch.equal(out, window):
                return True, False
            if torch.equal(out, window.flip(2)):
                return True, True
    return False, False


def test_each_augmented_image_is_a_padded_crop_possibly_flipped() -> None:
    x = torch.rand(64, 3, 12, 12)
    augment = Augmentation(crop_padding=3, flip=True)
    out = augment(x, torch.Generator().manual_seed(0), fill=0.0)
    assert out.shape == x.shape and out.dtype == x.dtype
    flips = 0
    for original, augmented in zip(x, out):
        found, flipped = _matches_a_window(augmented, original, 3, 0.0)
        assert found
        flips += flipped
    assert 10 < flips < 54  # about half are flipped
    assert not torch.equal(out, x)
    again = augment(x, torch.Generator().manual_seed(0), fill=0.0)
    assert torch.equal(out, again)  # seeded
    assert not torch.equal(out, augment(x, torch.Generator().manual_seed(1), fill=0.0))
    channels_last = x.contiguous(memory_format=torch.channels_last)
    kept = augment(channels_last, torch.Generator().manual_seed(0), fill=0.0)
    assert kept.is_contiguous(memory_format=torch.channels_last) and torch.equal(kept, out)


def test_generator_is_a_function_of_where_the_run_is() -> None:
    draw = lambda *where: torch.rand(4, generator=batch_generator(torch.device("cpu"), *where))  # noqa: E731
    assert torch.equal(draw(0, 0, 1, 5), draw(0, 0, 1, 5))
    assert not torch.equal(draw(0, 0, 1, 5), draw(0, 0, 1, 6))
    assert not torch.equal(draw(0, 0, 1, 5), draw(0, 1, 1, 5))


@pytest.mark.parametrize(
    ("spec", "shape", "expected"),
    [
        ("auto", (1, 8, 8), Augmentation()),  # the digits: too small to shift, not flip-symmetric
        ("auto", (3, 32, 32), Augmentation(4, True)),
        ("crop", (3, 32, 32), Augmentation(4, False)),
        ("flip, crop", (1, 8, 8), Augmentation(4, True)),
        ("none", (3, 32, 32), Augmentation()),
    ],
)
def test_parse(spec: str, shape: tuple[int, ...], expected: Augmentation) -> None:
    assert parse_augmentation(spec, shape, 4) == expected


@pytest.mark.parametrize("spec", ["rotate", "", "crop,rotate"])
def test_unknown_augmentation_is_a_one_line_error(spec: str) -> None:
    with pytest.raises(OptionError, match="auto, none"):
        parse_augmentation(spec, (3, 32, 32), 4)


def _digits_16() -> Dataset:
    """The digits upsampled to 16x16, large enough for ``auto`` to augment."""
    data = load_digits()
    assert data.x_train is not None
    grow = lambda x: F.interpolate(x, size=(16, 16), mode="nearest")  # noqa: E731
    return dataclasses.replace(data, x=grow(data.x), x_train=grow(data.x_train))


def _net() -> nn.Module:
    torch.manual_seed(0)
    # BatchNorm: its 0-d num_batches_tracked buffer is part of the run's identity on resume
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10))


def test_resume_with_augmentation_is_bit_identical(tmp_path: Path) -> None:
    data = _digits_16()
    settings = {"epochs": 2, "canary_size": 64}

    def train(out: Path, resume: bool) -> dict[str, Tensor]:
        run = RunConfig(out_dir=out, resume=resume, progress=False)
        return FGSMRS(**settings).apply(_net(), data, threat=THREAT, run=run).model.state_dict()

    whole = check_resume_is_exact(train, FGSMRS, 30, tmp_path)  # in epoch 2 (digits: 23 batches an epoch)
    plain = FGSMRS(**settings, augment="none").apply(_net(), data, threat=THREAT, run=RunConfig(progress=False))
    assert any(not torch.equal(a, b) for a, b in zip(whole.values(), plain.model.state_dict().values()))  # augmented
