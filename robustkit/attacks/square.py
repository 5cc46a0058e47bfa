"""Square attack (Andriushchenko et al., 2020), linf: score-based, no gradients.

It needs only the model's scores, so it attacks models whose gradients are useless or absent
(an ONNX graph under onnxruntime, a quantising input layer). An audit runs it after the
gradient attacks: if it breaks samples they could not, the gradients were masking.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from robustkit.attacks.base import Attack
from robustkit.attacks.native import margin_loss
from robustkit.modules import Model
from robustkit.params import param
from robustkit.threat import Norm, ThreatModel

#: The paper's schedule: the square's share of the image shrinks as queries are spent.
_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64),
             (6000, 128), (8000, 256), (10000, 512))


def square_fraction(p_init: float, query: int, queries: int) -> float:
    """Share of the image the square covers at ``query``, rescaled to a 10,000-query budget."""
    progress = int(query / queries * 10000)
    divisor = 1
    for (threshold, _), (_, next_divisor) in itertools.pairwise(_SCHEDULE):
        if progress > threshold:
            divisor = next_divisor
    return p_init / divisor


#: Queries whose random squares and signs are drawn at once.
_BLOCK = 100


def _signs(generator: torch.Generator, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """Random +1/-1 of ``shape``, in ``like``'s dtype and on its device."""
    return torch.randint(0, 2, shape, generator=generator, device=like.device).to(like.dtype) * 2 - 1


@dataclass(frozen=True)
class SquareParams:
    queries: int = param(1000, "model queries per sample (forward passes)")
    p_init: float = param(0.3, "initial share of the image covered by the square")
    seed: int = param(0, "seed of the random squares")

    def __post_init__(self) -> None:
        if self.queries < 1 or not 0 < self.p_init <= 1:
            raise ValueError("queries must be >= 1 and p_init in (0, 1]")


class Square(Attack):
    """Random search over square-shaped linf perturbations, guided by the margin loss."""

    name = "square"
    norms = frozenset({Norm.LINF})
    Params = SquareParams
    needs_gradients = False
    per_sample_eps = True
    summary = "score-based random search, no gradients (Andriushchenko et al., 2020)"

    def run(self, model: Model, x: Tensor, labels: Tensor, threat: ThreatModel,
            radii: Tensor | None = None) -> Tensor:
        p: SquareParams = self.params
        generator = torch.Generator(device=x.device).manual_seed(p.seed)
        n, channels, height, width = x.shape
        low, high = threat.bounds
        eps = torch.full((n,), threat.eps) if radii is None else radii
        eps = eps.to(device=x.device, dtype=x.dtype).view(n, 1, 1, 1)  # each sample's radius

        def objective(candidate: Tensor, target: Tensor) -> Tensor:
            """Minimised by the search; negative once the attack succeeds."""
            with torch.no_grad():
                margin = margin_loss(model(candidate).float(), target)  # best other - target
            return margin if threat.targeted else -margin

        best = (x + eps * _signs(generator, (n, channels, 1, width), x)).clamp(low, high)  # vertical stripes
        loss = objective(best, labels)
        # Work on the samples still standing only; re-gather them only when some fall.
        active = (loss >= 0).nonzero().squeeze(1)
        x_act, best_act, loss_act, labels_act = x[active], best[active], loss[active], labels[active]
        for query, (u, v), step in self._draws(generator, n, channels, eps, x):
            if active.numel() == 0:
                break
            side = round(math.sqrt(square_fraction(p.p_init, query, p.queries) * height * width))
            side = min(max(side, 1), max(min(height, width) - 1, 1))
            top, left = int(u * (height - side + 1)), int(v * (width - side + 1))
            candidate = best_act.clone()
            candidate[:, :, top : top + side, left : left + side] = (
                x_act[:, :, top : top + side, left : left + side] + step[active]).clamp(low, high)
            new_loss = objective(candidate, labels_act)
            better = new_loss < loss_act
            best_act = torch.where(better.view(-1, 1, 1, 1), candidate, best_act)
            loss_act = torch.where(better, new_loss, loss_act)
            done = loss_act < 0
            if bool(done.any()):
                best[active] = best_act
                keep = ~done
                active, x_act, best_act, loss_act, labels_act = (
                    t[keep] for t in (active, x_act, best_act, loss_act, labels_act))
        best[active] = best_act
        return best

    def _draws(self, generator: torch.Generator, n: int, channels: int, eps: Tensor,
               x: Tensor) -> Iterator[tuple[int, list[float], Tensor]]:
        """Per query: its number, the square's corner as fractions of the free range, and the
        signed step (n, channels, 1, 1) of every sample.

        Drawn in blocks of queries, not one query at a time: a small batch's query costs little
        more than the fixed overhead of its operations, so every operation saved counts.
        """
        queries: int = self.params.queries
        for block in range(1, queries, _BLOCK):
            numbers = range(block, min(block + _BLOCK, queries))
            corners = torch.rand((len(numbers), 2), generator=generator, device=x.device).tolist()
            yield from zip(numbers, corners, eps * _signs(generator, (len(numbers), n, channels, 1, 1), x))
