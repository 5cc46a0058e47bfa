"""A one-off plugin file: ``robustkit --plugins-dir examples/plugins_dir attacks list`` shows ``noise:noise``.

Every ``*.py`` file in a ``--plugins-dir`` folder is loaded as a plugin named after the file,
which is also its provider name. Good for an experiment; package it (see
``examples/robustkit-plugin-example``) once others should install it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import robustkit
from robustkit.params import param


@dataclass(frozen=True)
class NoiseParams:
    seed: int = param(0, "seed of the noise")


class Noise(robustkit.Attack):
    """Uniform noise in the eps-ball (a baseline: any real attack must beat it)."""

    name = "noise"
    norms = frozenset({robustkit.Norm.LINF})
    Params = NoiseParams
    needs_gradients = False

    def run(self, model: robustkit.Model, x: Tensor, labels: Tensor, threat: robustkit.ThreatModel) -> Tensor:
        generator = torch.Generator(device=x.device).manual_seed(self.params.seed)
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x + threat.eps * (2 * noise - 1)  # __call__ projects into the ball and judges success


@robustkit.hookimpl
def robustkit_register_attacks(registry: robustkit.ProviderRegistry[Any]) -> None:
    registry.add(Noise)
