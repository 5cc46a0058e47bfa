"""Perturbations of the word-embedding output, as the papers normalise them.

A perturbation ``delta`` (N x L x d) is added to the word-embedding output (``model.perturbed``:
before the position embeddings and LayerNorm, where HotFlip's substitutions act) at real
tokens only (padding and special tokens are masked). Its size is the per-sample Frobenius norm
over the whole sequence, as in Miyato et al. (2017) and Zhu et al. (FreeLB, 2020): an ascent
step is ``step * g / ||g||_F`` and the projection rescales into the ball.

Radii are given in units of the mean word-embedding norm of the batch's real tokens
(``token_norm``), so one number means the same on any model: BERT-base's tokens have norm
~1.4, so the reference implementations' absolute eps 1.0 is ~0.7 here; the tiny synthetic BERT's
are ~0.2, where an absolute 1.0 would drown the input. A radius of 1 is one average token's
length spread over the sequence; one substitution moves a token by ~sqrt(2) of it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from robustkit.distributed import DistContext, all_reduce_sum_
from robustkit_text.model import TextClassifier, perturbed

_TINY = 1e-12


def frobenius(delta: Tensor) -> Tensor:
    """Per-sample Frobenius norm, shaped (N, 1, 1) to broadcast against ``delta``."""
    return delta.flatten(1).norm(dim=1).clamp_min(_TINY).view(-1, 1, 1)


def normalised(grad: Tensor, mask: Tensor) -> Tensor:
    """``g / ||g||_F`` on the real tokens (``mask``, N x L)."""
    grad = grad * mask.unsqueeze(-1)
    return grad / frobenius(grad)


def project(delta: Tensor, radius: float | Tensor) -> Tensor:
    """Into the Frobenius ball of ``radius`` (a point inside stays)."""
    return delta * (radius / frobenius(delta)).clamp(max=1.0)


def token_norm(model: TextClassifier, ids: Tensor, world: DistContext | None = None) -> Tensor:
    """Mean l2 norm of the word embeddings of the real tokens of ``ids`` (a detached scalar): the
    unit of every embedding radius. Measured per batch, it follows embeddings that grow while a
    fresh model trains (the tiny BERT's go from ~0.16 to ~0.3); under torchrun (``world``) over
    the global batch, every rank's share, so N processes train as one does."""
    with torch.no_grad():
        rows = model.embedding.weight[ids.long()[model.editable(ids)]]
        total = torch.stack([rows.float().norm(dim=-1).sum(), torch.tensor(float(len(rows)), device=rows.device)])
        if world is not None:
            all_reduce_sum_(total, world)
        return total[0] / total[1] if total[1] > 0 else torch.ones((), device=rows.device)


def zeros(model: TextClassifier, ids: Tensor) -> Tensor:
    weight = model.embedding.weight
    return torch.zeros(*ids.shape, weight.shape[1], device=weight.device, dtype=torch.float32)


def pgd(model: TextClassifier, ids: Tensor, y: Tensor, radius: float | Tensor, steps: int,
        grad: Tensor | None = None) -> Tensor:
    """K normalised ascent steps of ``2.5 radius / K`` on the cross-entropy from zero, each
    projected into the ball of ``radius`` (absolute: scale it by ``token_norm``), in whatever
    mode the model is in: the PGD-K and FGM (K = 1) defences and the audit's diagnostic.
    ``grad``: the embedding gradient at zero when the caller has it (training's clean pass)."""
    mask = model.editable(ids).float()
    delta = zeros(model, ids)
    for t in range(steps):
        if t or grad is None:
            delta.requires_grad_(True)
            with perturbed(model.embedding, delta):
                loss = F.cross_entropy(model(ids).float(), y)
            (grad,) = torch.autograd.grad(loss, delta)
        delta = project(delta.detach() + 2.5 * radius / steps * normalised(grad, mask), radius)
    return delta
