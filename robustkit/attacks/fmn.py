"""Fast Minimum-Norm attack (FMN; Pintor et al., NeurIPS 2021), linf and l2, in pure torch.

Why a minimum-norm attack: an audit asks for robust accuracy at several eps. PGD answers one
eps per run; FMN looks for each sample's *smallest* adversarial perturbation, so one run
answers every eps: a sample is broken at eps exactly when its distance is <= eps.
``minimal_perturbations`` is that run (optionally capped at a radius per sample); ``FMN``
wraps it as an ``Attack`` (a ``minimum_norm`` one: what it returns is the smallest example).

One FMN search (Algorithm 1 of the paper) keeps a radius eps_k per sample and alternates:

- an eps step: if the iterate is adversarial, shrink eps_k by a factor 1 - gamma_k (never
  above the best distance found so far); if not, grow it by 1 + gamma_k once an adversarial
  was found, or, before that, set it to the iterate's norm plus a linear estimate of the
  distance to the boundary, ``|loss| / ||grad||_dual`` (dual norm: l1 for linf, l2 for l2);
- a delta step: a gradient step of l2 length alpha_k on the logit difference, then projection
  onto the eps_k-ball and the bounds.

gamma_k and alpha_k are cosine-annealed, so the radius and the step settle at the boundary.
The step is the gradient scaled to unit l2 norm for both norms, as in the paper and in its
reference implementations (adversarial-library, foolbox); a sign step for linf measured no
better here. The norm keeps shrinking while the iterate stays adversarial, so there is no
early stop: every sample correctly classified at the start runs all the steps; the others
are at distance 0 and are not attacked.

Departures from the reference code, each measured on the digits CNN against PGD and
torchattacks' FAB (the figures are in docs/performance.md):

- the l2 projection is the exact projection onto the ball *intersected with* the bounds, not
  a scaling followed by a clip (see ``_project``): with the clip, the search stalls before
  its first adversarial on many samples;
- the untargeted search follows the logit difference to the runner-up class, so it settles on
  that class's boundary even when another class's is closer. ``classes=k`` adds targeted
  searches at the next k-1 likeliest classes (at the clean input) and keeps each sample's
  smallest distance, as FAB-T and APGD-T do (k=1 is the paper's attack);
- an iterate counts as an answer only with a small logit margin (``_MARGIN``), so that the
  example stays adversarial when someone else judges it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from robustkit.attacks.base import Attack, is_success
from robustkit.attacks.native import (
    loss_gradient,
    margin_loss,
    warn_slow_precision,
)
from robustkit.errors import RobustkitError
from robustkit.modules import Model, eval_mode, predict_logits
from robustkit.params import param
from robustkit.precision import Precision
from robustkit.threat import TOLERANCE, Norm, ThreatModel, per_sample_norm

StartingPoints = Literal["none", "noise"]

_NORMS = frozenset({Norm.LINF, Norm.L2})
#: Uniform-noise draws per sample when looking for an adversarial starting point.
_NOISE_TRIES = 10
#: An iterate counts as an answer only if it is misclassified (on target) by this share of its
#: largest logit. FMN ends on the boundary, where a margin of 1e-6 or an exact tie is common,
#: and whoever judges the example again (another batch, channels-last, a GPU's TF32
#: convolutions) computes logits a little differently: on the digits CNN, batch and layout
#: alone move them by 3e-6 at a scale of 9. The margin costs about share * |logit| / ||grad||
#: in distance (2e-4 in linf on the digits), far below any eps worth auditing.
_MARGIN = 1e-3
#: Halvings of the l2 projection's scale: 2^-24 is below fp32's resolution of the scale.
_BISECTION_STEPS = 24


@dataclass(frozen=True)
class FMNParams:
    steps: int = param(100, "steps of each search; all of them run (the norm keeps shrinking)")
    classes: int = param(3, "searches per sample: the paper's untargeted one, then one aimed at each next "
                            "likeliest wrong class; the smallest distance wins (1 = the paper's attack; "
                            "a targeted attack runs one)")
    alpha_init: float = param(1.0, "l2 length of the first gradient step, for a [0, 1] input range")
    alpha_final: float | None = param(None, "l2 length of the last step (cosine-annealed); default alpha_init/100")
    gamma_init: float = param(0.05, "first relative change of the search radius per step")
    gamma_final: float = param(0.001, "last relative change of the search radius (cosine-annealed)")
    starting_points: StartingPoints = param("none", "none: start at the input; noise: at the boundary "
                                                    "towards uniform noise that fools the model (3-7 points "
                                                    "weaker on the digits)")
    binary_search_steps: int = param(10, "steps of the boundary search for noise starting points")
    precision: Precision = param("fp32", "autocast dtype for the gradient; success is judged in fp32")
    seed: int = param(0, "seed of the noise starting points")

    def __post_init__(self) -> None:
        if self.steps < 1 or self.classes < 1 or self.binary_search_steps < 1:
            raise ValueError("steps, classes and binary_search_steps must be >= 1")
        if self.alpha_init <= 0 or (self.alpha_final is not None and self.alpha_final <= 0):
            raise ValueError("alpha_init and alpha_final must be > 0")
        if not (0 < self.gamma_init < 1 and 0 < self.gamma_final < 1):
            raise ValueError("gamma_init and gamma_final must lie in (0, 1)")

    @property
    def alpha_last(self) -> float:
        return self.alpha_final if self.alpha_final is not None else self.alpha_init / 100


@dataclass
class _Search:
    """What the searches leave behind, for ``minimal_perturbations`` and ``FMN.run``."""

    best: Tensor  #: each sample's smallest adversarial example found, ``x`` where none was
    distances: Tensor  #: float64 (N,): norm of ``best - x``; inf where none was found
    last: Tensor  #: the first search's last iterate (inside the cap); ``x`` if not attacked


@dataclass
class _Run:
    """One search's answers on the attacked samples."""

    best: Tensor  #: smallest adversarial iterate found (the input where none)
    norms: Tensor  #: its fp32 norm; inf where none was found
    last: Tensor  #: the last iterate


def _view(values: Tensor, like: Tensor) -> Tensor:
    """(N,) values shaped to broadcast over a batch like ``like``."""
    return values.view(-1, *([1] * (like.dim() - 1)))


def _cosine(start: float, end: float, step: int, steps: int) -> float:
    """Cosine annealing from ``start`` (step 0) towards ``end`` (step ``steps``)."""
    return end + (start - end) * (1 + math.cos(math.pi * step / steps)) / 2


def _clip(delta: Tensor, floor: Tensor, ceiling: Tensor) -> Tensor:
    return torch.minimum(torch.maximum(delta, floor), ceiling)


def _project(x: Tensor, x_adv: Tensor, eps: Tensor, norm: Norm, bounds: tuple[float, float]) -> Tensor:
    """The point of {ball of radius ``eps[i]`` (inf allowed) around ``x[i]``} ∩ bounds closest
    to ``x_adv``.

    linf: clipping to the box and then to the bounds is that point (both are separable). l2:
    scaling into the ball and then clipping, as PGD does, is not: the clip removes the part of
    the step that points out of the bounds (a lot, on images with saturated pixels) and leaves
    the iterate deep inside the ball. FMN grows its radius from the iterate's norm until it
    finds a first adversarial, so that shortfall stalls it. The exact projection is
    ``clamp(s * delta)`` for the largest s in (0, 1] whose norm is at most eps (the KKT
    conditions of the problem); s is found by bisection, keeping the feasible end.
    """
    low, high = bounds
    delta = x_adv - x
    limit = eps.to(x.dtype)
    if norm is Norm.LINF:
        radius = _view(limit, x)
        return (x + _clip(delta, -radius, radius)).clamp(low, high)
    floor, ceiling = low - x, high - x

    def lengths(scale: Tensor) -> Tensor:
        return _clip(_view(scale, x) * delta, floor, ceiling).flatten(1).norm(p=2, dim=1)

    fits = lengths(torch.ones_like(limit)) <= limit
    lower, upper = torch.zeros_like(limit), torch.ones_like(limit)
    for _ in range(_BISECTION_STEPS):
        middle = (lower + upper) / 2
        inside = lengths(middle) <= limit
        lower, upper = torch.where(inside, middle, lower), torch.where(inside, upper, middle)
    scale = torch.where(fits, torch.ones_like(limit), lower)
    return x + _clip(_view(scale, x) * delta, floor, ceiling)


def _path(x: Tensor, end: Tensor, t: Tensor, norm: Norm, span: float) -> Tensor:
    """A point of the path from ``x`` (t = 0) to ``end`` (t = 1) whose norm grows with t:
    the straight segment for l2; for linf, ``end - x`` clipped to ``t * span``."""
    delta = end - x
    if norm is Norm.LINF:
        radius = _view(t * span, x).to(x.dtype)
        return x + _clip(delta, -radius, radius)
    return x + _view(t, x).to(x.dtype) * delta


def _answers(logits: Tensor, labels: Tensor, targeted: bool) -> Tensor:
    """Misclassified (on target when ``targeted``) with a margin that survives re-judging."""
    objective = margin_loss(logits, labels)  # best other - label: > 0 once misclassified
    if targeted:
        objective = -objective
    return objective > _MARGIN * logits.abs().amax(dim=1).clamp_min(1.0)


@torch.no_grad()
def _fp32_logits(model: Model, x: Tensor) -> Tensor:
    with torch.autocast(x.device.type, enabled=False):
        return model(x).float()


def _hits(model: Model, x: Tensor, labels: Tensor, targeted: bool) -> Tensor:
    """Answers among the rows of ``x``, judged in fp32."""
    return _answers(_fp32_logits(model, x), labels, targeted)


def _noise_starts(
    model: Model, x: Tensor, labels: Tensor, norm: Norm, *, targeted: bool, bounds: tuple[float, float],
    search_steps: int, generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """An adversarial starting point near the boundary for each sample that has one, and the
    mask of those samples.

    Uniform noise in the bounds is drawn until it fools the model (a few tries), then a
    binary search along the path from ``x`` to it finds the answer (``_answers``) closest to
    ``x`` on that path: the paper's optional warm start, so the steps go to shrinking the norm
    rather than to finding a first adversarial. On the digits CNN it ends in worse local
    minima than starting at ``x`` (robust accuracy 3-7 points higher at every eps tried).
    """
    low, high = bounds
    end = x.clone()
    found = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for _ in range(_NOISE_TRIES):
        todo = (~found).nonzero().squeeze(1)
        if todo.numel() == 0:
            break
        noise = low + (high - low) * torch.rand(x[todo].shape, generator=generator, device=x.device, dtype=x.dtype)
        hit = _hits(model, noise, labels[todo], targeted)
        end[todo[hit]] = noise[hit]
        found[todo[hit]] = True
    lower = torch.zeros(len(x), dtype=torch.float64, device=x.device)
    upper = torch.ones_like(lower)
    rows = found.nonzero().squeeze(1)
    for _ in range(search_steps if rows.numel() else 0):
        middle = (lower[rows] + upper[rows]) / 2
        hit = _hits(model, _path(x[rows], end[rows], middle, norm, high - low), labels[rows], targeted)
        lower[rows] = torch.where(hit, lower[rows], middle)
        upper[rows] = torch.where(hit, middle, upper[rows])
    return _path(x, end, upper, norm, high - low), found


def _fmn(
    model: Model, x0: Tensor, labels: Tensor, aim: Tensor, norm: Norm, p: FMNParams, *, targeted: bool,
    aim_targeted: bool, limit: Tensor, bounds: tuple[float, float], generator: torch.Generator,
) -> _Run:
    """One FMN search on ``x0``, steered by the logit difference towards ``aim`` (the true
    classes, or target classes when ``aim_targeted``), with each radius at most ``limit``.

    Any iterate that succeeds against ``labels`` (misclassified; on target when ``targeted``),
    by the margin ``_answers`` asks for, is an answer, even one in a class the search was not
    aimed at; the radius follows success against ``aim``, so a targeted search keeps heading
    for its class.
    """
    low, high = bounds
    span = high - low  # alpha is in units of a [0, 1] input range
    dual = 1 if norm is Norm.LINF else 2
    eps = torch.full((len(x0),), math.inf, device=x0.device)
    best_norm = torch.full_like(eps, math.inf)  # over answers
    aim_norm = torch.full_like(eps, math.inf)  # over iterates that reached the aim (the radius' bound)
    best = x0.clone()
    x_adv = x0.clone()
    if p.starting_points == "noise":
        start, has_start = _noise_starts(model, x0, aim, norm, targeted=aim_targeted, bounds=bounds,
                                         search_steps=p.binary_search_steps, generator=generator)
        start_norm = per_sample_norm(start - x0, norm)
        usable = has_start & (start_norm <= limit)  # a start beyond the cap is no answer
        best[usable], best_norm[usable], aim_norm[usable] = start[usable], start_norm[usable], start_norm[usable]
        eps = torch.where(has_start, torch.minimum(start_norm, limit), eps)
        x_adv = torch.where(_view(has_start, x0), _project(x0, start, limit, norm, bounds), x0)

    for step in range(p.steps):
        alpha = _cosine(p.alpha_init, p.alpha_last, step, p.steps) * span
        gamma = _cosine(p.gamma_init, p.gamma_final, step, p.steps)
        # true scale (the boundary estimate divides by the gradient's norm)
        grad, logits = loss_gradient(model, x_adv, aim, targeted=aim_targeted, loss="margin", precision=p.precision)
        objective = margin_loss(logits, aim)  # > 0 once misclassified
        if aim_targeted:
            objective = -objective  # > 0 once on target
        reached = is_success(logits, aim, aim_targeted)
        delta_norm = per_sample_norm(x_adv - x0, norm)
        better = _answers(logits, labels, targeted) & (delta_norm < best_norm)
        if p.precision != "fp32" and better.any():
            # a reduced-precision verdict near the boundary is noise: judge the candidates in fp32
            rows = better.nonzero().squeeze(1)
            better[rows] = _answers(_fp32_logits(model, x_adv[rows]), labels[rows], targeted)
        best_norm = torch.where(better, delta_norm, best_norm)
        best = torch.where(_view(better, x0), x_adv, best)
        aim_norm = torch.where(reached, torch.minimum(aim_norm, delta_norm), aim_norm)

        grad_flat = grad.flatten(1).float()
        to_boundary = objective.abs() / grad_flat.norm(p=dual, dim=1).clamp_min(1e-12)
        eps = torch.where(
            reached,
            torch.minimum(eps * (1 - gamma), aim_norm),
            torch.where(torch.isfinite(aim_norm), eps * (1 + gamma), delta_norm + to_boundary),
        )
        eps = torch.minimum(eps, limit)

        unit = grad / _view(grad_flat.norm(p=2, dim=1).clamp_min(1e-12), grad).to(grad.dtype)
        x_adv = _project(x0, x_adv + alpha * unit, eps, norm, bounds).detach()

    # The last step's iterate has not been judged yet: give it its chance, in fp32.
    final_norm = per_sample_norm(x_adv - x0, norm)
    better = _answers(_fp32_logits(model, x_adv), labels, targeted) & (final_norm < best_norm)
    best_norm = torch.where(better, final_norm, best_norm)
    best = torch.where(_view(better, x0), x_adv, best)
    return _Run(best, best_norm, x_adv)


def _aims(model: Model, x0: Tensor, labels: Tensor, classes: int) -> list[Tensor]:
    """The 2nd, 3rd, ... likeliest wrong classes at the clean input, up to ``classes`` - 1 of
    them (the untargeted search usually ends at the likeliest)."""
    logits = predict_logits(model, x0).to(x0.device)
    ranked = logits.scatter(1, labels.view(-1, 1), float("-inf")).argsort(dim=1, descending=True)
    return [ranked[:, rank] for rank in range(1, min(classes, logits.shape[1] - 1))]


def _search(
    model: Model, x: Tensor, labels: Tensor, norm: Norm, p: FMNParams, *, cap: Tensor,
    bounds: tuple[float, float], targeted: bool,
) -> _Search:
    """FMN on every sample with ``cap`` > 0 (its largest radius; inf for none), then each
    answer confirmed in fp32 and measured in float64 on the example returned."""
    x = x.detach()
    low, high = bounds
    best, last = x.clone(), x.clone()
    distances = torch.full((len(x),), math.inf, dtype=torch.float64, device=x.device)
    if len(x) == 0:
        return _Search(best, distances, last)
    clean_hit = is_success(_fp32_logits(model, x), labels, targeted)
    distances[clean_hit] = 0.0  # already misclassified (or on target): nothing to search for
    active = (~clean_hit & (cap > 0)).nonzero().squeeze(1)
    if active.numel() == 0:
        return _Search(best, distances, last)

    x0, judge = x[active], labels[active]
    worst = per_sample_norm(torch.maximum(x0 - low, high - x0), norm)  # the farthest point in the bounds
    limit = torch.minimum(cap[active].to(device=x.device, dtype=torch.float32), worst)
    generator = torch.Generator(device=x.device).manual_seed(p.seed)
    run = _fmn(model, x0, judge, judge, norm, p, targeted=targeted, aim_targeted=targeted, limit=limit,
               bounds=bounds, generator=generator)
    best_adv, best_norm, last_iterate = run.best, run.norms, run.last
    for aim in [] if targeted else _aims(model, x0, judge, p.classes):
        run = _fmn(model, x0, judge, aim, norm, p, targeted=False, aim_targeted=True, limit=limit,
                   bounds=bounds, generator=generator)
        better = run.norms < best_norm
        best_norm = torch.where(better, run.norms, best_norm)
        best_adv = torch.where(_view(better, x0), run.best, best_adv)

    # Confirm every answer in fp32 on the example returned (a near tie can flip between the
    # batch it was found in and this one), and measure its distance in float64 on it.
    found = torch.isfinite(best_norm)
    rows = found.nonzero().squeeze(1)
    if rows.numel():
        found[rows] = is_success(predict_logits(model, best_adv[rows]).to(x.device), judge[rows], targeted)
    delta = (best_adv.double() - x0.double()).flatten(1)
    measured = delta.abs().amax(dim=1) if norm is Norm.LINF else delta.norm(p=2, dim=1)
    distances[active] = torch.where(found, measured, torch.full_like(measured, math.inf))
    best[active] = torch.where(_view(found, x0), best_adv, x0)
    last[active] = last_iterate
    return _Search(best, distances, last)


def minimal_perturbations(
    model: Model,
    x: Tensor,
    y: Tensor,
    norm: Norm | str,
    *,
    steps: int = 100,
    classes: int = 3,
    alpha_init: float = 1.0,
    alpha_final: float | None = None,
    gamma_init: float = 0.05,
    gamma_final: float = 0.001,
    bounds: tuple[float, float] = (0.0, 1.0),
    max_eps: float | Tensor | None = None,
    targeted: bool = False,
    starting_points: StartingPoints = "none",
    binary_search_steps: int = 10,
    precision: Precision = "fp32",
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Each sample's smallest adversarial example FMN finds, and its distance.

    Returns ``(x_best, distances)``: ``x_best`` has ``x``'s shape and lies in the bounds;
    ``distances`` is float64 (N,), the ``norm`` of ``x_best - x`` measured on the returned
    example, ``inf`` where no adversarial was found (``x_best`` is then ``x``) and 0 for
    samples already misclassified (already on target when ``targeted``, ``y`` then holding
    the targets). Every finite distance is confirmed in fp32: the model misclassifies
    ``x_best`` (classifies it as the target). Robust accuracy at any eps is
    ``(distances > eps).float().mean()``: one run answers every eps.

    ``max_eps`` (a float, or a tensor (N,) of per-sample radii) caps the search radius: the
    steps are spent inside the ball that matters, and no distance above it is returned.
    ``classes`` searches run per sample (untargeted attacks only): the paper's untargeted one,
    then one aimed at each next likeliest wrong class; each costs ``steps`` forward-backward
    passes. ``alpha_init`` is the l2 length of the first step for a [0, 1] input range (scaled
    with the bounds' range); ``alpha_final`` defaults to ``alpha_init / 100``.
    ``starting_points="noise"`` starts each search at the boundary point found by a binary
    search towards uniform noise that fools the model (drawn with ``seed``); ``"none"``
    starts at ``x``, as the paper does by default. ``precision`` sets the autocast dtype of
    the forward-backward passes; success is always judged in fp32. The model is put in eval
    mode while it runs.
    """
    norm = Norm.parse(norm)
    if norm not in _NORMS:
        raise RobustkitError(f"FMN supports the linf and l2 norms, not {norm.value}")
    p = FMNParams(steps=steps, classes=classes, alpha_init=alpha_init, alpha_final=alpha_final,
                  gamma_init=gamma_init, gamma_final=gamma_final, starting_points=starting_points,
                  binary_search_steps=binary_search_steps, precision=precision, seed=seed)
    warn_slow_precision(x.device, precision)
    cap = torch.full((len(x),), math.inf, device=x.device)
    if max_eps is not None:
        cap = torch.as_tensor(max_eps, dtype=torch.float32, device=x.device).expand(len(x)).clone()
        if bool((cap < 0).any()) or bool(cap.isnan().any()):
            raise RobustkitError("max_eps must be >= 0")
    with eval_mode(model):
        search = _search(model, x, y.long(), norm, p, cap=cap, bounds=(float(bounds[0]), float(bounds[1])),
                         targeted=targeted)
    return search.best, search.distances


class FMN(Attack):
    """Fast Minimum-Norm attack (Pintor et al., 2021): the smallest adversarial it can find,
    searched inside the eps-ball, or inside each sample's own radius (``radii``).

    ``minimum_norm``: the norm of what ``run`` returns for a broken sample is its distance, so
    the engine can run it once per sample, in the ball of the largest eps, and settle every
    smaller eps from that norm. ``per_sample_eps`` stays False: the attack contract's
    per-sample check asks that some sample use most of the largest radius, and a minimum-norm
    attack rightly leaves a sample misclassified at the start where it is (15 of the contract
    model's 16 digits) and moves the others no further than the boundary.
    """

    name = "fmn"
    norms = _NORMS
    Params = FMNParams
    fixed_loss = "margin"  # logit differences: its steps keep a gradient at any scale of the logits
    minimum_norm = True
    summary = "minimum-norm search with an adaptive radius, linf and l2 (Pintor et al., 2021)"

    def run(self, model: Model, x: Tensor, labels: Tensor, threat: ThreatModel,
            radii: Tensor | None = None) -> Tensor:
        """Each sample's smallest adversarial found within its radius (``threat.eps``, or
        ``radii[i]``); for the others, the first search's last iterate, which the cap keeps
        inside the ball (a PGD-like point at its edge)."""
        p: FMNParams = self.params
        warn_slow_precision(x.device, p.precision)
        cap = (torch.full((len(x),), threat.eps, dtype=torch.float64) if radii is None else radii.double()).to(x.device)
        search = _search(model, x, labels, threat.norm, p, cap=cap.float(), bounds=threat.bounds,
                         targeted=threat.targeted)
        inside = search.distances <= cap + TOLERANCE * cap.clamp_min(1.0)
        return torch.where(_view(inside, x), search.best, search.last)
