"""Data augmentation on the device: random crop with padding and horizontal flip, batched.

Every adversarial-training recipe for CIFAR-shaped data crafts its examples on augmented
images (random 4-pixel-padded crops and flips); robust overfitting is worse without them.
Both run as a few tensor operations on the whole batch where the batch already is, so they
cost no host round trip. The randomness of a batch comes from a generator seeded by (run
seed, rank, epoch, batch), so a resumed run draws exactly the augmentations of the original
without checkpointing any state.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from robustkit.errors import OptionError

#: Augmentations that can be named in ``augment`` (comma-separated), besides "auto" and "none".
KINDS = ("crop", "flip")
#: ``auto`` augments inputs at least this large (height and width); smaller images, such as
#: the 8x8 digits, lose too much to a 4-pixel shift, and digits or text are not flip-symmetric.
AUTO_MIN_SIZE = 16
#: Keeps augmentation draws apart from the other seeded streams of a run (an int: the hash of
#: a str changes from one process to the next).
_STREAM = 0xA06


@dataclass(frozen=True)
class Augmentation:
    crop_padding: int = 0  #: pixels of padding before a random crop of the original size (0: none)
    flip: bool = False  #: flip horizontally with probability 1/2

    @property
    def active(self) -> bool:
        return self.crop_padding > 0 or self.flip

    def describe(self) -> str:
        parts = ([f"random crop (padding {self.crop_padding})"] if self.crop_padding else []) + (
            ["horizontal flip"] if self.flip else [])
        return " and ".join(parts) or "none"

    def __call__(self, x: Tensor, generator: torch.Generator, fill: float) -> Tensor:
        """The augmented batch (N, C, H, W), in ``x``'s memory format; padding takes ``fill``."""
        if not self.active:
            return x
        n, _, height, width = x.shape
        out = x
        if self.crop_padding:
            p, channels = self.crop_padding, x.shape[1]
            padded = F.pad(x, (p, p, p, p), value=fill)
            dy = torch.randint(0, 2 * p + 1, (n, 1, 1, 1), generator=generator, device=x.device)
            dx = torch.randint(0, 2 * p + 1, (n, 1, 1, 1), generator=generator, device=x.device)
            rows = dy + torch.arange(height, device=x.device).view(1, 1, height, 1)
            cols = dx + torch.arange(width, device=x.device).view(1, 1, 1, width)
            out = padded.gather(2, rows.expand(n, channels, height, width + 2 * p))
            out = out.gather(3, cols.expand(n, channels, height, width))
        if self.flip:
            flipped = torch.rand(n, generator=generator, device=x.device) < 0.5
            out = torch.where(flipped.view(n, 1, 1, 1), out.flip(3), out)
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def parse_augmentation(spec: str, input_shape: tuple[int, ...], padding: int) -> Augmentation:
    """``auto`` (crop and flip for images of at least ``AUTO_MIN_SIZE`` pixels a side, else none),
    ``none``, or a comma-separated list of ``KINDS``."""
    names = {part.strip() for part in spec.split(",") if part.strip()}
    if names == {"auto"}:
        big = len(input_shape) == 3 and min(input_shape[1:]) >= AUTO_MIN_SIZE
        names = set(KINDS) if big else set()
    elif names == {"none"}:
        names = set()
    unknown = names - set(KINDS)
    if unknown or not spec.strip():
        raise OptionError(f"augment {spec!r}: use auto, none, or a comma-separated list of {', '.join(KINDS)}")
    if names and len(input_shape) != 3:
        raise OptionError(f"augment {spec!r} needs image inputs (C x H x W), not shape {input_shape}")
    return Augmentation(padding if "crop" in names else 0, "flip" in names)


def batch_generator(device: torch.device, seed: int, rank: int, epoch: int, batch: int) -> torch.Generator:
    """The generator of one batch's augmentation: a function of where the run is, so a resumed
    run repeats the original's draws."""
    return torch.Generator(device).manual_seed(hash((seed, rank, epoch, batch, _STREAM)) & 0x7FFF_FFFF)
