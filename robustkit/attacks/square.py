"""Square attack (Andriushchenko et al., 2020), linf and l2: score-based, no gradients.

It needs only the model's scores, so it attacks models whose gradients are useless or absent
(an ONNX graph under onnxruntime, a quantising input layer). An audit runs it after the
gradient attacks: if it breaks samples they could not, the gradients were masking.

Both norms share the random search: propose a change inside a random square, keep it if the
margin loss falls. They differ in the proposal:
- linf: the square is set to ``x ± eps`` (one sign per channel), a vertex of the box;
- l2: the square gets a peaked pattern (concentric rings, two halves of opposite sign) added
  to its current content, and a second square is emptied to pay for it, so the perturbation
  keeps the norm eps.
"""
from __future__ import annotations

import functools
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
#: Random fractions each query draws: the square's corner (linf); the corners of the square
#: and of the one emptied to pay for it, and whether the pattern is transposed (l2).
_FRACTIONS = {Norm.LINF: 2, Norm.L2: 5}
#: The l2 start tiles the image with a grid of this many squares per side, as the paper does.
_L2_GRID = 5


def _signs(generator: torch.Generator, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """Random +1/-1 of ``shape``, in ``like``'s dtype and on its device."""
    return torch.randint(0, 2, shape, generator=generator, device=like.device).to(like.dtype) * 2 - 1


def _rings(rows: int, cols: int) -> Tensor:
    """A peak of concentric rectangles around the centre, the k-th weighted 1/(k+1)^2, unit norm.

    A cell at Chebyshev distance r from the centre lies in rings r, r+1, ...: its value is the
    sum of their weights. The paper uses it as a cheap pseudo-Gaussian bump.
    """
    if rows == 0:
        return torch.zeros(0, cols)
    centre_row, centre_col = rows // 2, cols // 2
    distance = torch.maximum((torch.arange(rows) - centre_row).abs().view(-1, 1),
                             (torch.arange(cols) - centre_col).abs().view(1, -1))
    weights = 1.0 / torch.arange(1, max(centre_row, centre_col) + 2, dtype=torch.float32) ** 2
    tail = weights.flip(0).cumsum(0).flip(0)  # tail[r] = sum of the weights of rings r, r+1, ...
    bump = tail[distance]
    return bump / bump.norm()


@functools.cache
def _l2_pattern(side: int, transposed: bool, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The l2 proposal's pattern: a positive bump over a negative one, unit norm (cached where
    it is used: a handful of sides recur over thousands of queries; callers never modify it)."""
    pattern = torch.cat([_rings(side // 2, side), -_rings(side - side // 2, side)])
    pattern = pattern / pattern.norm()
    return (pattern.T if transposed else pattern).to(device=device, dtype=dtype).contiguous()


def _norms(t: Tensor, dims: int) -> Tensor:
    """l2 norm over the last ``dims`` dimensions, kept as size-1 dimensions for broadcasting."""
    return t.flatten(-dims).norm(dim=-1).view(*t.shape[:-dims], *[1] * dims)


@dataclass(frozen=True)
class SquareParams:
    queries: int = param(1000, "model queries per sample (forward passes)")
    p_init: float = param(0.3, "initial share of the image covered by the square")
    seed: int = param(0, "seed of the random squares")

    def __post_init__(self) -> None:
        if self.queries < 1 or not 0 < self.p_init <= 1:
            raise ValueError("queries must be >= 1 and p_init in (0, 1]")


class Square(Attack):
    """Random search over square-shaped perturbations (linf or l2), guided by the margin loss."""

    name = "square"
    norms = frozenset({Norm.LINF, Norm.L2})
    Params = SquareParams
    needs_gradients = False
    per_sample_eps = True
    summary = "score-based random search, no gradients, linf and l2 (Andriushchenko et al., 2020)"

    def run(self, model: Model, x: Tensor, labels: Tensor, threat: ThreatModel,
            radii: Tensor | None = None) -> Tensor:
        p: SquareParams = self.params
        generator = torch.Generator(device=x.device).manual_seed(p.seed)
        n, channels, height, width = x.shape
        low, high = threat.bounds
        linf = threat.norm is Norm.LINF
        eps = torch.full((n,), threat.eps) if radii is None else radii
        eps = eps.to(device=x.device, dtype=x.dtype).view(n, 1, 1, 1)  # each sample's radius

        def objective(candidate: Tensor, target: Tensor) -> Tensor:
            """Minimised by the search; negative once the attack succeeds."""
            with torch.no_grad():
                margin = margin_loss(model(candidate).float(), target)  # best other - target
            return margin if threat.targeted else -margin

        # linf: vertical stripes at +-eps; l2: the paper's grid of patterns
        start = eps * _signs(generator, (n, channels, 1, width), x) if linf else self._l2_start(generator, x, eps)
        best = (x + start).clamp(low, high)
        loss = objective(best, labels)
        # Work on the samples still standing only; re-gather them only when some fall.
        active = (loss >= 0).nonzero().squeeze(1)
        x_act, best_act, loss_act, labels_act = x[active], best[active], loss[active], labels[active]
        for query, fractions, signs in self._draws(generator, n, channels, eps if linf else 1.0, x, threat.norm):
            if active.numel() == 0:
                break
            share = square_fraction(p.p_init, query, p.queries)
            if linf:
                side = _side(share, height, width, l2=False)
                window = _window(fractions[0], fractions[1], side, height, width)
                candidate = best_act.clone()
                candidate[window] = (x_act[window] + signs[active]).clamp(low, high)
            else:
                side = _side(share, height, width, l2=True)
                candidate = _l2_candidate(x_act, best_act, eps[active], signs[active], side, fractions,
                                          (low, high))
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

    @staticmethod
    def _l2_start(generator: torch.Generator, x: Tensor, eps: Tensor) -> Tensor:
        """The paper's l2 start: patterns (each transposed or not at random) with random signs
        per channel, tiled from a margin over the image (squares of a fifth of its side),
        scaled to eps."""
        n, channels, height, width = x.shape
        tile = max(min(height, width) // _L2_GRID, 1)
        start = torch.zeros_like(x)
        top0, left0 = max((height - _L2_GRID * tile) // 2, 0), max((width - _L2_GRID * tile) // 2, 0)
        for top in range(top0, height - tile + 1, tile):
            for left in range(left0, width - tile + 1, tile):
                transposed = float(torch.rand((), generator=generator, device=x.device)) > 0.5
                pattern = _l2_pattern(tile, transposed, x.device, x.dtype)
                signs = _signs(generator, (n, channels, 1, 1), x)
                start[:, :, top : top + tile, left : left + tile] += pattern * signs
        return start / _norms(start, 3).clamp_min(1e-12) * eps

    def _draws(self, generator: torch.Generator, n: int, channels: int, scale: Tensor | float, x: Tensor,
               norm: Norm) -> Iterator[tuple[int, list[float], Tensor]]:
        """Per query: its number, its random fractions (``_FRACTIONS``) and ``scale`` times a
        random sign per sample and channel (n, channels, 1, 1).

        Drawn in blocks of queries, not one query at a time: a small batch's query costs little
        more than the fixed overhead of its operations, so every operation saved counts.
        """
        queries: int = self.params.queries
        for block in range(1, queries, _BLOCK):
            numbers = range(block, min(block + _BLOCK, queries))
            fractions = torch.rand((len(numbers), _FRACTIONS[norm]), generator=generator, device=x.device).tolist()
            yield from zip(numbers, fractions, scale * _signs(generator, (len(numbers), n, channels, 1, 1), x))


def _side(share: float, height: int, width: int, l2: bool) -> int:
    """The square's side for a ``share`` of the image, short of the image.

    l2 squares are at least 3 and odd (rounded up, as the paper does), so that the pattern's
    rings have a centre; linf squares at least 1.
    """
    side = max(round(math.sqrt(share * height * width)), 3 if l2 else 1)
    side = min(side, max(min(height, width) - 1, 1))
    if l2 and side % 2 == 0:
        side = side + 1 if side + 1 < min(height, width) else side - 1
    return side


def _window(u: float, v: float, side: int, height: int, width: int) -> tuple[slice, ...]:
    """The square with its corner at fractions ``u``, ``v`` of the free range."""
    top, left = int(u * (height - side + 1)), int(v * (width - side + 1))
    return slice(None), slice(None), slice(top, top + side), slice(left, left + side)


def _l2_candidate(x: Tensor, best: Tensor, eps: Tensor, signs: Tensor, side: int, fractions: list[float],
                  bounds: tuple[float, float]) -> Tensor:
    """The paper's l2 proposal, per channel: the first square keeps the direction of its current
    content plus a signed pattern; the second is emptied; the first takes over both squares'
    energy and whatever the budget eps has left, so the whole perturbation keeps norm eps."""
    height, width = x.shape[-2:]
    first = _window(fractions[0], fractions[1], side, height, width)
    second = _window(fractions[2], fractions[3], side, height, width)
    delta = best - x
    both = torch.zeros_like(delta)
    both[second], both[first] = delta[second], delta[first]
    unused = (eps**2 - _norms(delta, 3) ** 2).clamp_min(0) / x.shape[1]
    budget = (unused + _norms(both, 2) ** 2).sqrt()  # (n, channels, 1, 1)
    pattern = _l2_pattern(side, fractions[4] > 0.5, x.device, x.dtype)
    proposal = pattern * signs + delta[first] / _norms(delta[first], 2).clamp_min(1e-12)
    delta = delta.clone()
    delta[second] = 0
    delta[first] = proposal / _norms(proposal, 2).clamp_min(1e-12) * budget
    delta = delta / _norms(delta, 3).clamp_min(1e-12) * eps
    return (x + delta).clamp(*bounds)
