"""Built-in architectures, named ``builtin:NAME`` on the command line.

They are small on purpose: everything in robustkit must run, train and be tested on a 2-core
CPU with the bundled 8x8 digits. Factories take keyword arguments with working defaults so
that ``--arch robustkit.models.zoo:digits_cnn`` works as well as ``--arch builtin:digits-cnn``.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn


def digits_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """Two conv layers and two linear ones for 8x8 digits (about 71k parameters, 0.4 MFLOP)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 128), nn.ReLU(),
        nn.Linear(128, num_classes),
    )


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return (x + self.body(x)).relu()


def digits_resnet(num_classes: int = 10, in_channels: int = 1, width: int = 32) -> nn.Module:
    """A small residual network with BatchNorm, for what BatchNorm and skips change."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        _ResidualBlock(width),
        nn.MaxPool2d(2),
        _ResidualBlock(width),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(width, num_classes),
    )


def cnn4_bn(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Four conv layers with BatchNorm for 32x32 inputs: the benchmark network."""
    layers: list[nn.Module] = []
    channels = in_channels
    for width, pool in ((32, False), (64, True), (128, True), (128, True)):
        layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        if pool:
            layers.append(nn.MaxPool2d(2))
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "digits-cnn": digits_cnn,
    "digits-resnet": digits_resnet,
    "cnn4-bn": cnn4_bn,
}
