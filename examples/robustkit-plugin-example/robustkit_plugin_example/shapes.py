"""``example:shapes``: 8x8 grey images of six shapes, drawn procedurally from a seed.

A data-set plugin registers a factory that returns a ``robustkit.Dataset``: float inputs
N x C x H x W in the bounds, integer labels, and optionally a training split (which
``robustkit harden`` trains on). The shapes are drawn with a random centre, size, stroke and
brightness on a 4x finer grid and averaged down (anti-aliasing), plus a little pixel noise;
the same seed gives the same tensors on every machine, so nothing is downloaded or cached.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from robustkit import Dataset

CLASSES = ("ring", "disc", "square", "block", "plus", "cross")
SIZE = 8  #: image side in pixels (the size of builtin:digits, so builtin:digits-cnn fits)
_FINE = 4  #: supersampling factor


def draw(labels: Tensor, generator: torch.Generator) -> Tensor:
    """Images (N x 1 x SIZE x SIZE in [0, 1]) of the shapes that ``labels`` name."""
    n = len(labels)

    def uniform(low: float, high: float) -> Tensor:
        return (low + (high - low) * torch.rand(n, generator=generator)).view(n, 1, 1)

    centre_x, centre_y = uniform(3.0, 5.0), uniform(3.0, 5.0)
    radius, half_stroke, brightness = uniform(2.2, 3.3), uniform(0.45, 0.7), uniform(0.6, 1.0)
    coords = (torch.arange(SIZE * _FINE, dtype=torch.float32) + 0.5) / _FINE
    dx = coords.view(1, 1, -1) - centre_x
    dy = coords.view(1, -1, 1) - centre_y
    distance = torch.sqrt(dx**2 + dy**2)
    box = torch.maximum(dx.abs(), dy.abs())
    u, v = (dx + dy) / math.sqrt(2), (dx - dy) / math.sqrt(2)
    side = 0.8 * radius  # a square of the same area impression as the disc
    masks = torch.stack([
        (distance - radius).abs() < half_stroke,
        distance < radius,
        (box - side).abs() < half_stroke,
        box < side,
        ((dx.abs() < half_stroke) & (dy.abs() < radius)) | ((dy.abs() < half_stroke) & (dx.abs() < radius)),
        ((u.abs() < half_stroke) & (v.abs() < radius)) | ((v.abs() < half_stroke) & (u.abs() < radius)),
    ], dim=1)  # N x classes x fine x fine
    fine = masks[torch.arange(n), labels].float() * brightness
    images = torch.nn.functional.avg_pool2d(fine.unsqueeze(1), _FINE)
    noise = 0.05 * torch.randn(images.shape, generator=generator)
    return (images + noise).clamp(0.0, 1.0)


def load_shapes(n_train: int = 1800, n_eval: int = 360, seed: int = 0) -> Dataset:
    """Each split holds the classes in equal shares (up to rounding), shuffled by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.cat([(torch.arange(n) % len(CLASSES))[torch.randperm(n, generator=generator)]
                        for n in (n_train, n_eval)])
    images = draw(labels, generator)
    return Dataset(
        name="shapes",
        x=images[n_train:], y=labels[n_train:],
        x_train=images[:n_train], y_train=labels[:n_train],
        num_classes=len(CLASSES),
        class_names=list(CLASSES),
        source=f"example:shapes (procedural, seed {seed}, {n_train} train / {n_eval} eval)",
    )
