"""APGD and APGD-T (Croce & Hein, 2020): PGD that sets its own step size, linf, l2 and l1.

PGD's result hangs on a hand-picked step size: too large and it oscillates, too small and it
stalls within the budget, and either way the model looks more robust than it is. APGD starts
each sample at a step of 2 * eps and, at checkpoints where that sample's objective stopped
rising, halves its step and restarts it from its best point; steps in between carry momentum.
Nothing is left to tune, so the robust accuracy reflects the model, not the setting. The DLR
loss (difference of logits ratio) is unchanged when the logits are shifted or rescaled, so it
also breaks models whose cross-entropy saturates (huge logits give it zero gradients), and
APGD-T aims the targeted DLR at each of the likeliest wrong classes in turn: together they are
AutoAttack's white-box half.

As in ``native``: input gradients only, optional bf16/fp16 autocast with every hit confirmed
in fp32, a sample stops being attacked at its first fooling iterate (kept, and the batch
compacted, so broken samples cost nothing more), and random starts come from a seeded
generator, never the global RNG.

Where the reference code (AutoAttack, torchattacks) departs from the paper, this follows the
paper: condition 1 counts the steps whose objective rose over the previous iterate (the first
step is compared with the random start), condition 2 applies from the first checkpoint on, and
a restart from the best point drops the momentum (a step that led elsewhere is no direction
to keep).
Samples misclassified at the clean input (at the target, for a targeted threat) are returned
unchanged rather than moved to a random start that might classify them correctly.

l1 follows l1-APGD (Croce & Hein, 2021, "Mind the box"): an l1 step along the gradient's
single largest coordinate is the steepest one, but it stalls on the box's faces, and a dense
step wastes the budget. Each step moves the share of coordinates with the largest gradients
(20% at first), each by ``eta / count`` in its gradient's sign, then projects onto the l1
ball and the box together (``ThreatModel.project``). Every 4% of the steps the share follows
the sparsity of the best point so far (a third fewer coordinates than it has); where that
sparsity fell by over 5% the step size goes back to eps and the sample to its best point,
otherwise the step shrinks by 1.5, never below eps / 10. As in the authors' code, the l1
steps carry no momentum.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from robustkit.attacks.base import Attack, is_success
from robustkit.attacks.native import (
    _confirmed_in_fp32,
    _generator,
    ascent_step,
    margin_loss,
    random_start,
    warn_slow_precision,
)
from robustkit.errors import RobustkitError
from robustkit.modules import Model
from robustkit.params import param
from robustkit.precision import Precision, autocast, input_gradient
from robustkit.threat import Norm, ThreatModel

APGDLoss = Literal["ce", "dlr"]
#: (fp32 logits, goal, label) -> per-sample objective to maximise. ``goal`` is the class the
#: loss is about (true class, or target); ``label`` the class success is judged against.
Objective = Callable[[Tensor, Tensor, Tensor], Tensor]

#: Weight of the new gradient step against the previous step (the paper's momentum alpha).
_ALPHA = 0.75
#: Guards the DLR denominators against ties among the top logits, as in the paper.
_DLR_EPS = 1e-12
#: l1-APGD (module docstring): first share of coordinates a step moves, the share of the steps
#: between reviews, how a review shrinks the step and its floor (a fraction of eps), how much
#: sparser the best point must have become to reset the step, and the share's ratio to it.
_L1_FIRST_SHARE = 0.2
_L1_REVIEW_SHARE = 0.04
_L1_STEP_SHRINK = 1.5
_L1_STEP_FLOOR = 0.1
_L1_SPARSER = 0.95
_L1_SHARE_OF_SPARSITY = 1 / 1.5


def dlr_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-sample ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)``, pi sorting the logits down.

    Positive once misclassified. Dividing the margin by a spread of the top logits makes it
    invariant to shifting and positively rescaling the logits, so a model cannot hide behind
    a saturated softmax.
    """
    top = logits.topk(3, dim=1).values
    return margin_loss(logits, labels) / (top[:, 0] - top[:, 2] + _DLR_EPS)


def targeted_dlr_loss(logits: Tensor, targets: Tensor, labels: Tensor | None = None) -> Tensor:
    """Per-sample ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``, the paper's targeted DLR.

    Without the true ``labels`` (a targeted threat hands the attack only the targets), the
    strongest rival ``max_{i != t} z_i`` stands in for ``z_y``: it is ``z_y`` at a correctly
    classified input, and it is the logit the target must still overtake once it is not.
    """
    top = logits.topk(4, dim=1).values
    scale = top[:, 0] - (top[:, 2] + top[:, 3]) / 2 + _DLR_EPS
    if labels is None:
        return -margin_loss(logits, targets) / scale
    target = logits.gather(1, targets.view(-1, 1)).squeeze(1)
    true = logits.gather(1, labels.view(-1, 1)).squeeze(1)
    return (target - true) / scale


def checkpoints(steps: int) -> dict[int, int]:
    """Iterations at which each sample's step size is reviewed, each with the length of the
    stretch it closes: ``w_j = ceil(p_j * steps)`` with ``p_0 = 0``, ``p_1 = 0.22`` and
    ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``.

    The ``p_j`` are kept in hundredths, as integers, so float rounding cannot move a
    checkpoint; a checkpoint at or after the last step would change nothing and is dropped.
    """
    marks = [0, 22]
    while (following := marks[-1] + max(marks[-1] - marks[-2] - 3, 6)) <= 100:
        marks.append(following)
    stretches: dict[int, int] = {}
    previous = 0
    for mark in marks[1:]:
        iteration = -(-mark * steps // 100)
        if previous < iteration < steps:
            stretches[iteration] = iteration - previous
            previous = iteration
    return stretches


def l1_reviews(steps: int) -> dict[int, int]:
    """l1-APGD's review iterations (every 4% of ``steps``, rounded down, at least every step),
    each with the length of the stretch it closes, as ``checkpoints`` gives them."""
    every = max(int(_L1_REVIEW_SHARE * steps), 1)
    return {k: every for k in range(every, steps, every)}


def _check_budget(steps: int, restarts: int, rho: float) -> None:
    if steps < 1 or restarts < 1:
        raise ValueError("steps and restarts must be >= 1")
    if not 0 < rho <= 1:
        raise ValueError("rho must lie in (0, 1]")


@dataclass(frozen=True)
class APGDParams:
    steps: int = param(100, "iterations per run (the paper uses 100)")
    restarts: int = param(1, "runs from fresh random starts; later ones attack only the samples still standing")
    loss: APGDLoss = param("ce", "cross-entropy, or the difference of logits ratio (immune to logit scaling)")
    rho: float = param(0.75, "share of rising steps below which a checkpoint halves the step size")
    precision: Precision = param("fp32", "autocast dtype for the gradient; success is judged in fp32")
    seed: int = param(0, "seed of the random starts")

    def __post_init__(self) -> None:
        _check_budget(self.steps, self.restarts, self.rho)


@dataclass(frozen=True)
class APGDTParams:
    steps: int = param(100, "iterations per run (the paper uses 100)")
    n_target_classes: int = param(9, "likeliest wrong classes attacked in turn (capped at classes - 1)")
    restarts: int = param(1, "runs per target class; later ones attack only the samples still standing")
    rho: float = param(0.75, "share of rising steps below which a checkpoint halves the step size")
    precision: Precision = param("fp32", "autocast dtype for the gradient; success is judged in fp32")
    seed: int = param(0, "seed of the random starts")

    def __post_init__(self) -> None:
        _check_budget(self.steps, self.restarts, self.rho)
        if self.n_target_classes < 1:
            raise ValueError("n_target_classes must be >= 1")


class APGD(Attack):
    """Auto-PGD with the cross-entropy or DLR loss, untargeted or targeted."""

    name = "apgd"
    aliases = ("auto-pgd",)
    norms = frozenset({Norm.LINF, Norm.L2, Norm.L1})
    Params = APGDParams
    summary = "PGD with momentum that halves its own step size, ce or dlr loss (Croce & Hein, 2020)"

    def run(self, model: Model, x: Tensor, labels: Tensor, threat: ThreatModel) -> Tensor:
        p: APGDParams = self.params
        warn_slow_precision(x.device, p.precision)
        clean = _clean_logits(model, x)
        if p.loss == "dlr":
            _require_classes(clean, 4 if threat.targeted else 3,
                             "the targeted dlr loss" if threat.targeted else "the dlr loss", "use loss=ce")
        objective = _objective(p.loss, threat.targeted)
        return _attack(model, x, labels, [labels] * p.restarts, clean, threat, objective,
                       targeted=threat.targeted, steps=p.steps, rho=p.rho, precision=p.precision, seed=p.seed)


class APGDT(Attack):
    """APGD-T: targeted-DLR APGD against each of the likeliest wrong classes in turn.

    Untargeted overall: a sample counts as broken once any iterate is misclassified, whatever
    the class. Each target's runs attack only the samples the earlier ones left standing.
    """

    fixed_loss = "dlr"

    name = "apgd-t"
    aliases = ("apgdt",)
    norms = frozenset({Norm.LINF, Norm.L2, Norm.L1})
    Params = APGDTParams
    supports_targeted = False
    summary = "targeted-dlr APGD against each of the top wrong classes in turn (Croce & Hein, 2020)"

    def run(self, model: Model, x: Tensor, labels: Tensor, threat: ThreatModel) -> Tensor:
        p: APGDTParams = self.params
        warn_slow_precision(x.device, p.precision)
        clean = _clean_logits(model, x)
        _require_classes(clean, 4, "apgd-t (its targeted dlr loss)", "use apgd with loss=ce")
        wrong = clean.scatter(1, labels.view(-1, 1), float("-inf"))
        targets = wrong.topk(min(p.n_target_classes, clean.shape[1] - 1), dim=1).indices
        goals = (targets[:, j] for j in range(targets.shape[1]) for _ in range(p.restarts))

        def objective(logits: Tensor, goal: Tensor, label: Tensor) -> Tensor:
            return targeted_dlr_loss(logits, goal, label)

        return _attack(model, x, labels, goals, clean, threat, objective,
                       targeted=False, steps=p.steps, rho=p.rho, precision=p.precision, seed=p.seed)


def _clean_logits(model: Model, x: Tensor) -> Tensor:
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        return model(x).float()


def _require_classes(logits: Tensor, needed: int, what: str, instead: str) -> None:
    """The DLR denominators read the 3rd (targeted: 4th) largest logit."""
    if logits.dim() != 2 or logits.shape[1] < needed:
        raise RobustkitError(
            f"{what} needs at least {needed} classes; the model gives scores of shape "
            f"{tuple(logits.shape[1:])}: {instead}"
        )


def _objective(loss: APGDLoss, targeted: bool) -> Objective:
    if loss == "ce":
        sign = -1.0 if targeted else 1.0

        def cross_entropy(logits: Tensor, goal: Tensor, label: Tensor) -> Tensor:
            return sign * F.cross_entropy(logits, goal, reduction="none")

        return cross_entropy
    if targeted:
        def targeted_dlr(logits: Tensor, goal: Tensor, label: Tensor) -> Tensor:
            return targeted_dlr_loss(logits, goal)

        return targeted_dlr

    def dlr(logits: Tensor, goal: Tensor, label: Tensor) -> Tensor:
        return dlr_loss(logits, goal)

    return dlr


def _attack(
    model: Model, x: Tensor, labels: Tensor, goals: Iterable[Tensor], clean: Tensor, threat: ThreatModel,
    objective: Objective, *, targeted: bool, steps: int, rho: float, precision: Precision, seed: int,
) -> Tensor:
    """One APGD run per entry of ``goals`` (N,), each on the samples still standing.

    Returns the first fooling iterate of each broken sample, and for the others the point of
    highest objective over all runs.
    """
    fooled = is_success(clean, labels, targeted)
    result = x.detach().clone()
    if threat.eps == 0:
        return result
    best = torch.full((len(x),), float("-inf"), device=x.device)
    generator = _generator(x, seed)
    for goal in goals:
        index = (~fooled).nonzero().squeeze(1)
        if index.numel() == 0:
            break
        adv, hit, loss = _run_once(model, x[index], goal[index], labels[index], threat, objective, targeted=targeted,
                                   steps=steps, rho=rho, precision=precision, generator=generator)
        fooled[index[hit]] = True
        better = ~hit & (loss > best[index])
        keep = hit | better
        result[index[keep]] = adv[keep]
        best[index[better]] = loss[better]
    return result


@dataclass
class _Batch:
    """The samples one run still attacks; every field is indexed by sample."""

    index: Tensor  #: position in the run's input
    x0: Tensor  #: clean inputs, centres of the balls
    goal: Tensor
    label: Tensor
    x: Tensor  #: current iterate x^(k)
    x_prev: Tensor  #: x^(k-1), for the momentum
    grad: Tensor  #: gradient of the objective at x
    loss: Tensor  #: objective at x
    loss_prev: Tensor  #: objective at x_prev (at the best point after a restart)
    x_best: Tensor
    grad_best: Tensor
    loss_best: Tensor
    loss_checked: Tensor  #: loss_best at the last checkpoint
    rises: Tensor  #: steps since the last checkpoint whose objective rose
    eta: Tensor  #: step size
    halved: Tensor  #: the last checkpoint halved eta
    share: Tensor  #: l1: share of the coordinates a step moves
    sparsity: Tensor  #: l1: nonzero coordinates of the best perturbation at the last review

    def keep(self, mask: Tensor) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name)[mask])


def _run_once(
    model: Model, x0: Tensor, goal: Tensor, label: Tensor, threat: ThreatModel, objective: Objective, *,
    targeted: bool, steps: int, rho: float, precision: Precision, generator: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor]:
    """One APGD run from a random start (``steps`` + 1 forward passes, ``steps`` backward ones).

    Returns per sample: the example (its first fooling iterate, else its highest-objective
    point), whether it fooled the model, and its highest objective (-inf once fooled).
    """
    n = len(x0)
    out = x0.detach().clone()
    fooled = torch.zeros(n, dtype=torch.bool, device=x0.device)
    best = torch.full((n,), float("-inf"), device=x0.device)
    shape = (-1, *([1] * (x0.dim() - 1)))

    l1 = threat.norm is Norm.L1
    dims = x0[0].numel()
    x = random_start(x0, threat, generator)
    loss, logits, grad = _evaluate(model, x, goal, label, objective, precision, need_grad=True)
    assert grad is not None
    batch = _Batch(
        index=torch.arange(n, device=x0.device), x0=x0, goal=goal, label=label, x=x, x_prev=x, grad=grad,
        loss=loss, loss_prev=loss, x_best=x, grad_best=grad, loss_best=loss, loss_checked=loss,
        rises=torch.zeros(n, device=x0.device),
        eta=torch.full((n,), (1 if l1 else 2) * threat.eps, device=x0.device, dtype=x0.dtype),
        halved=torch.zeros(n, dtype=torch.bool, device=x0.device),
        share=torch.full((n,), _L1_FIRST_SHARE, device=x0.device),
        sparsity=torch.full((n,), float(dims), device=x0.device),
    )

    def settle(logits: Tensor) -> None:
        """Record and drop the samples whose current iterate fools the model."""
        hit = is_success(logits, batch.label, targeted)
        if precision != "fp32" and hit.any():
            hit = _confirmed_in_fp32(model, batch.x, batch.label, hit, targeted)
        if hit.any():
            out[batch.index[hit]] = batch.x[hit]
            fooled[batch.index[hit]] = True
            batch.keep(~hit)

    settle(logits)
    stretches = l1_reviews(steps) if l1 else checkpoints(steps)
    for k in range(1, steps + 1):
        if len(batch.index) == 0:
            break
        with torch.no_grad():
            eta = batch.eta.view(shape)
            if l1:
                z = threat.project(batch.x0, batch.x + eta * _sparse_direction(batch.grad, batch.share))
            else:
                z = threat.project(batch.x0, batch.x + eta * ascent_step(batch.grad, threat.norm, 1.0))
                if k > 1:
                    z = threat.project(batch.x0,
                                       batch.x + _ALPHA * (z - batch.x) + (1 - _ALPHA) * (batch.x - batch.x_prev))
        batch.x_prev, batch.x = batch.x, z
        last = k == steps  # the final iterate needs its objective, not its gradient
        batch.loss, logits, grad = _evaluate(model, batch.x, batch.goal, batch.label, objective, precision,
                                             need_grad=not last)
        if grad is not None:
            batch.grad = grad
        settle(logits)
        if last or len(batch.index) == 0:
            break
        with torch.no_grad():
            batch.rises += batch.loss > batch.loss_prev
            batch.loss_prev = batch.loss
            better = batch.loss > batch.loss_best
            batch.loss_best = torch.where(better, batch.loss, batch.loss_best)
            batch.x_best = torch.where(better.view(shape), batch.x, batch.x_best)
            batch.grad_best = torch.where(better.view(shape), batch.grad, batch.grad_best)
            if k in stretches:
                if l1:
                    _review_l1(batch, threat.eps, dims)
                else:
                    _review(batch, rho, stretches[k])
    if len(batch.index):
        better = batch.loss > batch.loss_best  # the last iterate was not compared yet
        out[batch.index] = torch.where(better.view(shape), batch.x, batch.x_best)
        best[batch.index] = torch.maximum(batch.loss, batch.loss_best)
    return out, fooled, best


def _review(batch: _Batch, rho: float, stretch: int) -> None:
    """A checkpoint (linf, l2): halve the step of the samples whose objective rose in fewer than
    ``rho`` of the stretch's steps, or whose best did not improve since an unhalved checkpoint,
    and send them back to their best point."""
    shape = (-1, *([1] * (batch.x.dim() - 1)))
    stalled = ~batch.halved & (batch.loss_best <= batch.loss_checked)
    halve = (batch.rises < rho * stretch) | stalled
    batch.eta = torch.where(halve, batch.eta / 2, batch.eta)
    back = halve.view(shape)
    batch.x = torch.where(back, batch.x_best, batch.x)
    batch.x_prev = torch.where(back, batch.x_best, batch.x_prev)
    batch.grad = torch.where(back, batch.grad_best, batch.grad)
    batch.loss_prev = torch.where(halve, batch.loss_best, batch.loss_prev)
    batch.halved, batch.loss_checked = halve, batch.loss_best
    batch.rises = torch.zeros_like(batch.rises)


def _review_l1(batch: _Batch, eps: float, dims: int) -> None:
    """A review (l1, module docstring): the step's share follows the best point's sparsity; a
    sample whose best point became sparser restarts there at the full step, the others' step
    shrinks."""
    shape = (-1, *([1] * (batch.x.dim() - 1)))
    sparsity = (batch.x_best != batch.x0).flatten(1).sum(dim=1).to(batch.sparsity.dtype)
    sparser = sparsity < _L1_SPARSER * batch.sparsity
    batch.share = sparsity / dims * _L1_SHARE_OF_SPARSITY
    batch.eta = torch.where(sparser, torch.full_like(batch.eta, eps), batch.eta / _L1_STEP_SHRINK)
    batch.eta = batch.eta.clamp(_L1_STEP_FLOOR * eps, eps)
    batch.sparsity = sparsity
    back = sparser.view(shape)
    batch.x = torch.where(back, batch.x_best, batch.x)
    batch.grad = torch.where(back, batch.grad_best, batch.grad)


def _sparse_direction(grad: Tensor, share: Tensor) -> Tensor:
    """The sign of the gradient on each sample's ``share`` of coordinates with the largest
    gradient, scaled to l1 length 1 (l1-APGD's step direction)."""
    size = grad.flatten(1).abs()
    dims = size.shape[1]
    rank = ((1 - share) * dims).long().clamp(0, dims - 1)  # the threshold's place in ascending order
    threshold = size.sort(dim=1).values.gather(1, rank.unsqueeze(1))
    chosen = (size >= threshold) & (size > 0)
    direction = grad.flatten(1).sign() * chosen
    return (direction / chosen.sum(dim=1, keepdim=True).clamp_min(1)).view_as(grad)


def _evaluate(
    model: Model, x: Tensor, goal: Tensor, label: Tensor, objective: Objective, precision: Precision, *,
    need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-sample objective at ``x``, the fp32 logits, and the gradient of the summed objective
    with respect to ``x`` when ``need_grad`` (summed, so a sample's gradient does not shrink
    with the batch; the loss is always computed in fp32)."""
    if need_grad:
        grad, values, logits = input_gradient(model, x, lambda z: objective(z, goal, label), precision)
        return values, logits, grad
    with torch.no_grad(), autocast(x.device.type, precision):
        logits = model(x)
    logits32 = logits.float()
    return objective(logits32, goal, label), logits32, None
