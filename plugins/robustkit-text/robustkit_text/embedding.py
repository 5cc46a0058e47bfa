"""Perturbations of the embedding output, as the papers normalise them.

A perturbation ``delta`` (N x L x d) is added to the word-embedding output (``model.perturbed``)
at real tokens only (padding and special tokens are masked). Its size is the per-sample
Frobenius norm over the whole sequence, as in Miyato et al. (2017) and Zhu et al. (FreeLB,
2020): an ascent step is ``step * g / ||g||_F`` and the projection rescales into the ball of
radius eps. The embedding-space PGD here serves the PGD-K defence and the audit's diagnostic,
which is reported apart from the threat model: no text realises an arbitrary embedding point.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from robustkit_text.model import TextClassifier, perturbed

_TINY = 1e-12


def frobenius(delta: Tensor) -> Tensor:
    """Per-sample Frobenius norm, shaped (N, 1, 1) to broadcast against ``delta``."""
    return delta.flatten(1).norm(dim=1).clamp_min(_TINY).view(-1, 1, 1)


def normalised(grad: Tensor, mask: Tensor) -> Tensor:
    """``g / ||g||_F`` on the real tokens (``mask``, N x L)."""
    grad = grad * mask.unsqueeze(-1)
    return grad / frobenius(grad)


def project(delta: Tensor, eps: float) -> Tensor:
    """Into the Frobenius ball of radius ``eps`` (a point inside stays)."""
    return delta * (eps / frobenius(delta)).clamp(max=1.0)


def zeros(model: TextClassifier, ids: Tensor) -> Tensor:
    weight = model.embedding.weight
    return torch.zeros(*ids.shape, weight.shape[1], device=weight.device, dtype=torch.float32)


def pgd(model: TextClassifier, ids: Tensor, y: Tensor, eps: float, steps: int,
        forward: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """K normalised ascent steps of ``2.5 eps / K`` on the cross-entropy from zero, projected
    after each: the embedding perturbation of PGD-K (Madry et al. on embeddings)."""
    forward = forward or model
    mask = model.editable(ids).float()
    delta = zeros(model, ids)
    step = 2.5 * eps / steps
    for _ in range(steps):
        delta.requires_grad_(True)
        with perturbed(model.embedding, delta * mask.unsqueeze(-1)):
            loss = F.cross_entropy(forward(ids).float(), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = project(delta.detach() + step * normalised(grad, mask), eps)
    return (delta * mask.unsqueeze(-1)).detach()
