"""Threat models: which perturbations an adversary may make.

Epsilons are always in input units: models take inputs in ``bounds`` (default [0, 1]) and do
their own normalisation, so ``linf:8/255`` means the same thing to every backend.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from enum import Enum

import torch
from torch import Tensor

from robustkit.errors import OptionError, RobustkitError

#: Slack allowed when checking that an example lies in the eps-ball, for float rounding.
TOLERANCE = 1e-5


class Norm(str, Enum):
    LINF = "linf"
    L2 = "l2"
    L1 = "l1"

    @classmethod
    def parse(cls, text: str | Norm) -> Norm:
        if isinstance(text, Norm):
            return text
        key = text.strip().lower().replace("_", "")
        aliases = {"inf": "linf", "linfinity": "linf", "l∞": "linf", "2": "l2", "1": "l1"}
        key = aliases.get(key, key)
        try:
            return cls(key)
        except ValueError:
            known = ", ".join(n.value for n in cls)
            raise OptionError(f"unknown norm {text!r}; use one of: {known}") from None

    def __str__(self) -> str:
        return self.value


def parse_number(text: str | float | int) -> float:
    """Parse ``0.03``, ``8/255`` or ``1e-2`` into a float (fractions are how eps is written)."""
    if isinstance(text, (int, float)):
        return float(text)
    match = re.fullmatch(r"\s*([-+0-9.eE]+)\s*(?:/\s*([0-9.eE+]+)\s*)?", text)
    try:
        if match is None:
            raise ValueError
        value = float(match.group(1)) / (float(match.group(2)) if match.group(2) else 1.0)
    except (ValueError, ZeroDivisionError):
        raise OptionError(f"not a number: {text!r} (write e.g. 0.03 or 8/255)") from None
    if not math.isfinite(value):
        raise OptionError(f"not a finite number: {text!r}")
    return value


def eps_text(value: float) -> str:
    """An eps as people write it: ``0.1`` when that is short, else ``8/255`` for a multiple of
    1/255 (pixel levels: 0.0313725 is 8/255), else the number."""
    short = f"{value:.4g}"
    if float(short) == value or abs(float(short) - value) < 1e-12:
        return short
    levels = value * 255
    if value > 0 and abs(levels - round(levels)) < 1e-6 * max(1.0, levels):
        return f"{round(levels)}/255"
    return f"{value:g}"


def per_sample_norm(delta: Tensor, norm: Norm | str) -> Tensor:
    """The norm of each sample's perturbation, shape (N,), computed in fp32."""
    norm = Norm.parse(norm)
    flat = delta.detach().float().flatten(1)
    if norm is Norm.LINF:
        return flat.abs().amax(dim=1)
    return flat.norm(p=2 if norm is Norm.L2 else 1, dim=1)


#: Bisection steps for the l1 projection's threshold: it lies in [0, the largest coordinate], so
#: 40 halvings pin it far below float precision.
_L1_BISECTION_STEPS = 40


def _project_l1_box(x: Tensor, delta: Tensor, eps: float, bounds: tuple[float, float]) -> Tensor:
    """Euclidean projection of each ``x + delta`` onto the l1 ball of radius ``eps`` around ``x``
    intersected with the box ``bounds`` (Croce & Hein, 2021: "Mind the box").

    Projecting onto the ball and then clipping to the box (what the two sets suggest one by
    one) wastes the l1 budget on coordinates the box then cuts, which makes l1 attacks weaker.
    With one multiplier ``lam >= 0`` for the l1 constraint the problem separates: each
    coordinate's size is ``min(max(|delta_i| - lam, 0), room_i)``, ``room_i`` being how far the
    box lets it move in its direction. The l1 norm falls as ``lam`` grows, so ``lam`` is found
    by bisection, and the side kept is the one inside the ball.
    """
    low, high = bounds
    flat, centre = delta.flatten(1), x.flatten(1)
    room = torch.where(flat >= 0, high - centre, centre - low).clamp_min(0)
    size = torch.minimum(flat.abs(), room)
    outside = size.sum(dim=1) > eps
    if outside.any():
        wanted, limit = flat.abs()[outside], room[outside]
        below = torch.zeros(len(wanted), device=flat.device, dtype=flat.dtype)
        above = wanted.amax(dim=1)
        for _ in range(_L1_BISECTION_STEPS):
            middle = (below + above) / 2
            over = torch.minimum((wanted - middle.unsqueeze(1)).clamp_min(0), limit).sum(dim=1) > eps
            below, above = torch.where(over, middle, below), torch.where(over, above, middle)
        size[outside] = torch.minimum((wanted - above.unsqueeze(1)).clamp_min(0), limit)
    return (centre + flat.sign() * size).view_as(x).clamp(low, high)


@dataclass(frozen=True)
class ThreatModel:
    """An lp ball of radius ``eps`` around each input, intersected with the input ``bounds``."""

    norm: Norm
    eps: float
    bounds: tuple[float, float] = (0.0, 1.0)
    targeted: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", Norm.parse(self.norm))
        object.__setattr__(self, "eps", float(self.eps))
        object.__setattr__(self, "bounds", (float(self.bounds[0]), float(self.bounds[1])))
        if not math.isfinite(self.eps) or self.eps < 0:
            raise OptionError(f"eps must be a finite number >= 0, got {self.eps}")
        low, high = self.bounds
        if not low < high:
            raise RobustkitError(f"bounds must satisfy low < high, got {self.bounds}")
        if self.norm is Norm.LINF and self.eps > high - low:
            raise OptionError(
                f"linf eps {self.eps:g} exceeds the input range {high - low:g} of bounds "
                f"{self.bounds}; eps is in input units (e.g. 8/255 for [0, 1] images)"
            )

    @classmethod
    def parse(
        cls, text: str, *, bounds: tuple[float, float] = (0.0, 1.0), targeted: bool = False
    ) -> ThreatModel:
        """Parse ``linf:8/255`` or ``l2:0.5`` (norm, a colon, eps in input units)."""
        norm_text, sep, eps_text = text.partition(":")
        if not sep:
            raise OptionError(f"threat model {text!r} needs the form NORM:EPS, e.g. linf:8/255")
        return cls(Norm.parse(norm_text), parse_number(eps_text), bounds, targeted)

    def with_eps(self, eps: float) -> ThreatModel:
        return replace(self, eps=eps)

    def __str__(self) -> str:
        """``linf:8/255``: eps as people write it (``eps_text``), which ``parse`` reads back."""
        return f"{self.norm.value}:{eps_text(self.eps)}" + (" (targeted)" if self.targeted else "")

    def balls(self, radii: Tensor) -> Iterator[tuple[ThreatModel, Tensor]]:
        """This threat at each distinct radius of ``radii`` (N,), with the mask of its samples.

        Per-sample radii come from an audit's eps list, so there are a handful: one pass per
        radius keeps each projection and check the scalar one.
        """
        for radius in radii.unique().tolist():
            yield self.with_eps(radius), radii == radius

    def project(self, x: Tensor, x_adv: Tensor, *, radii: Tensor | None = None) -> Tensor:
        """Move ``x_adv`` into the eps-ball around ``x`` (of radius ``radii[i]`` for sample i
        when given) and the bounds.

        For linf and l2, clipping to the bounds after the ball never leaves the ball, because
        ``x`` itself is inside the bounds, so each coordinate only moves towards ``x``; for l1
        that order wastes budget, and the projection is onto the intersection itself.
        """
        if radii is not None:
            projected = torch.empty_like(x_adv)
            for threat, rows in self.balls(radii.to(x.device)):
                projected[rows] = threat.project(x[rows], x_adv[rows])
            return projected
        delta = x_adv - x
        if self.norm is Norm.L1:  # the box would cut the l1 budget: one projection onto both
            return _project_l1_box(x, delta, self.eps, self.bounds)
        if self.norm is Norm.LINF:
            delta = delta.clamp(-self.eps, self.eps)
        else:
            norms = delta.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
            factor = (self.eps / norms).clamp(max=1.0)
            delta = delta * factor.view(-1, *([1] * (delta.dim() - 1)))
        return (x + delta).clamp(*self.bounds)

    def violations(self, x: Tensor, x_adv: Tensor, *, radii: Tensor | None = None) -> Tensor:
        """Per-sample mask of examples outside the ball (of radius ``radii[i]`` for sample i when
        given) or the bounds, or not finite (fp32 check)."""
        if radii is not None:
            invalid = torch.zeros(len(x), dtype=torch.bool, device=x.device)
            for threat, rows in self.balls(radii.to(x.device)):
                invalid[rows] = threat.violations(x[rows], x_adv[rows])
            return invalid
        x32, adv32 = x.detach().float(), x_adv.detach().float()
        finite = torch.isfinite(adv32).flatten(1).all(dim=1)
        low, high = self.bounds
        in_bounds = ((adv32 >= low - TOLERANCE) & (adv32 <= high + TOLERANCE)).flatten(1).all(1)
        slack = TOLERANCE * max(1.0, self.eps)
        in_ball = per_sample_norm(adv32 - x32, self.norm) <= self.eps + slack
        return ~(finite & in_bounds & in_ball)


#: The usual radii of each norm for inputs in [0, 1], as fractions of the input range: an
#: audit tries all of them (the 2..16/255 scale for linf) ...
AUDIT_EPS = {Norm.LINF: (2 / 255, 4 / 255, 8 / 255, 16 / 255), Norm.L2: (0.25, 0.5, 1.0, 2.0),
             Norm.L1: (2.0, 4.0, 8.0, 16.0)}
#: ... and training (and an export's robustness summary) uses one.
TRAINING_EPS = {Norm.LINF: 8 / 255, Norm.L2: 0.5}


def default_eps(norm: Norm, bounds: tuple[float, float]) -> tuple[float, ...]:
    """The audit's eps list for ``norm``, scaled to the input range ``bounds``."""
    scale = bounds[1] - bounds[0]
    return tuple(round(e * scale, 6) for e in AUDIT_EPS[norm])
