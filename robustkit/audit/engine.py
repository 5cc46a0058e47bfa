"""The evaluation engine: robust accuracy for attacks x epsilons, attacking only what can
still change the answer.

- samples misclassified clean are never attacked;
- a sample broken at a smaller eps counts as broken at every larger one (the balls are
  nested), so each larger eps attacks only the survivors;
- in ``cascade`` mode (the worst case, as AutoAttack computes it) each further attack runs
  only on the samples that survived every earlier one, so put cheap attacks first;
- every adversarial example is checked in fp32 (in the ball, in the bounds, finite) before it
  counts, whatever the attack claims;
- with ``certify``, samples proven robust by bound propagation (``robustkit.audit.certify``) are not
  attacked at that eps: no attack can break them. Certificates are computed after the first
  (cheapest) attack: a certificate costs a few forward passes' worth, more than FGSM but less
  than an iterative attack's hundreds of steps or a score-based attack's queries, so it is
  spent on the samples the cheap attack could not break and spares them every later attack;
- a gradient-free attack that takes per-sample radii (``Attack.per_sample_eps``, as Square
  does) runs last, once for every eps: one batch holds the survivors of each eps, each in its
  own ball. Each query has a fixed overhead (about 1 ms for a small CNN on 2 CPU cores,
  whether it carries 6 samples or 300), so runs eps by eps would pay it once per eps;
- with ``gradient_free_shortcut``, a gradient-free attack (not minimum-norm) searches nested
  balls from the outside in instead: each sample is attacked first at the largest eps where it
  stands, and at the smaller eps only if the attack broke it there (``_nested_search``). A
  sample it cannot break then costs one budget of queries, not one per eps. Random search can
  miss in a large ball a break it would find in a smaller one, so this may change the answer:
  every skip is counted (``AttackOutcome.skipped``) and said (``AttackOutcome.notes``). An
  attack that takes per-sample radii runs in two batches: the largest eps, then every smaller
  eps of the samples broken there;
- in those stages an example found in a larger ball that also lies in a smaller audited one
  breaks the sample there too, which is sound: the smallest such eps is credited (as for the
  minimum-norm attack) and the eps in between are not attacked;
- with ``examples`` (an ``ExampleKeeper``), the few adversarial examples a report pictures are
  kept as the batches pass; every other example is dropped with its batch.
Per-sample results are kept, so robust accuracy is the mean over samples of the minimum over
attacks, and the worst case can never be above any single attack.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from robustkit.attacks.base import Attack
from robustkit.audit.certify import Certifier, Unsupported, check_norm
from robustkit.console import progress
from robustkit.distributed import DistContext, all_reduce_max_, all_reduce_min_, all_reduce_sum
from robustkit.errors import RobustkitError, one_line
from robustkit.modules import Model, fast_layout, predict_logits
from robustkit.threat import TOLERANCE, ThreatModel, eps_text, per_sample_norm

log = logging.getLogger(__name__)

NEVER = math.inf
#: A gradient-free attack keeps no activations for a backward pass, so it takes batches this
#: many times larger: fewer, fuller forward passes for its many queries, within the memory a
#: gradient attack's batch needs.
GRADIENT_FREE_BATCH_FACTOR = 4
#: Samples certified first at each eps; if none is proven, certification stops there.
CERTIFY_PILOT = 32


@dataclass(frozen=True)
class NamedAttack:
    name: str  #: qualified name, e.g. robustkit:pgd
    attack: Attack


@dataclass
class AttackOutcome:
    """Per-sample results of one attack over the eps list."""

    name: str
    params: dict[str, Any]
    broken_at: Tensor  #: (N,) smallest eps that broke each sample; 0 for clean mistakes; inf never
    seconds: dict[float, float] = field(default_factory=dict)
    attacked: dict[float, int] = field(default_factory=dict)  #: samples attacked at each eps
    rejected: int = 0  #: examples the fp32 check threw out (outside the ball or bounds, not finite)
    #: samples standing at an eps but not attacked there by the nested-search shortcut (the attack
    #: could not break them in a larger ball); only eps where some were, absent when none
    skipped: dict[float, int] = field(default_factory=dict)
    #: what ran where it differs from the full evaluation, in words, for the report
    notes: list[str] = field(default_factory=list)
    #: why the attack stopped (it raised, or changed the model's weights); None when it ran through
    failed: str | None = None


@dataclass(frozen=True)
class KeptExample:
    """An adversarial example kept for the report's pictures (``robustkit.audit.pictures``)."""

    index: int  #: the sample's position in the evaluated data
    eps: float  #: broken: the eps credited for the break; survived: the radius it was attacked at
    attack: str
    x_adv: Tensor  #: the example as the fp32 check accepted it, on the CPU
    broken: bool


class ExampleKeeper:
    """Keeps the adversarial examples a report pictures, as the attacks find them, so that no
    other example outlives its batch (a data set's worth of examples would not fit in memory).

    ``broken``: up to that many samples broken at the smallest eps (ties: lowest index), each with
    the example of its smallest break. ``survived``: up to that many samples not broken (so far),
    attacked at the largest eps (ties: lowest index), each with the last attempt there. Both
    keys only improve as offers come, so what is kept at the end is the best of every offer.
    Under torchrun each rank sees its own batches only: ``chosen`` drops what the merged
    results contradict.
    """

    def __init__(self, broken: int, survived: int) -> None:
        self.capacity = {True: broken, False: survived}
        self.kept: dict[bool, dict[int, KeptExample]] = {True: {}, False: {}}

    @staticmethod
    def _rank(example: KeptExample) -> tuple[float, int]:
        """Lower is kept first: broken at a smaller eps; survived at a larger one; then the index."""
        return (example.eps if example.broken else -example.eps, example.index)

    def offer(self, attack: str, index: Tensor, radii: Tensor, credited: Tensor, x_adv: Tensor, broken: Tensor,
              valid: Tensor) -> None:
        """One batch's results: samples ``index`` attacked at ``radii``, examples ``x_adv``;
        ``broken`` ones credited at ``credited``; only ``valid`` ones (the fp32 check) count."""
        for row in valid.nonzero().squeeze(1).tolist():
            hit, sample = bool(broken[row]), int(index[row])
            if hit:
                self.kept[False].pop(sample, None)
            elif sample in self.kept[True]:
                continue
            # the tensor is copied only once the example is kept
            candidate = KeptExample(sample, float(credited[row] if hit else radii[row]), attack, x_adv[row], hit)
            kept, rank = self.kept[hit], self._rank(candidate)
            old = kept.get(sample)
            if old is not None and self._rank(old) < rank:
                continue
            if old is None and len(kept) >= self.capacity[hit]:
                worst = max(kept.values(), key=self._rank, default=None)
                if worst is None or self._rank(worst) <= rank:
                    continue
                del kept[worst.index]
            kept[sample] = dataclasses.replace(candidate, x_adv=x_adv[row].detach().float().cpu().clone())

    def chosen(self, broken_at: Tensor) -> list[KeptExample]:
        """The kept examples that agree with the final per-sample results ``broken_at`` (the
        worst case over attacks): broken ones first, smallest eps first, then survivors."""
        broken = [e for e in self.kept[True].values()
                  if bool(broken_at[e.index] == torch.tensor(e.eps, dtype=broken_at.dtype))]
        survived = [e for e in self.kept[False].values() if float(broken_at[e.index]) == NEVER]
        return sorted(broken, key=self._rank) + sorted(survived, key=self._rank)


@dataclass
class Evaluation:
    threats: list[ThreatModel]
    clean_correct: Tensor
    outcomes: list[AttackOutcome]
    cascade: bool
    interrupted: bool = False
    #: (N,) smallest eps at which proving a sample failed (0 for clean mistakes, inf if never);
    #: no proof is tried at that eps or above. None when certification is off.
    uncertified_at: Tensor | None = None
    proven: Tensor | None = None  #: (N,) largest eps at which a sample was proven robust (0 if none)
    certified_eps: list[float] = field(default_factory=list)  #: eps whose certification step ran
    certify_seconds: dict[float, float] = field(default_factory=dict)
    certification: str = "off"  #: how certificates were made, or why not
    #: gradient-free attacks (if any) ran as a nested search; what each skipped: its skipped, notes
    gradient_free_shortcut: bool = False

    @property
    def eps(self) -> list[float]:
        return [t.eps for t in self.threats]

    @property
    def n(self) -> int:
        return len(self.clean_correct)

    @property
    def clean_accuracy(self) -> float:
        return float(self.clean_correct.float().mean())

    def robust_accuracy(self, outcome: AttackOutcome, eps: float) -> float:
        return float((outcome.broken_at > eps).float().mean())

    def worst_broken_at(self) -> Tensor:
        if not self.outcomes:  # no attack ran (e.g. skipped): only clean mistakes are broken
            return torch.where(self.clean_correct, torch.tensor(NEVER), torch.tensor(0.0))
        stacked = torch.stack([o.broken_at for o in self.outcomes])
        return stacked.min(dim=0).values

    def worst_case(self, eps: float) -> float:
        return float((self.worst_broken_at() > eps).float().mean())

    def certified_accuracy(self, eps: float) -> float | None:
        """Share of samples proven robust at ``eps``: a lower bound on robust accuracy.

        At eps 0 every correctly classified sample is proven (its ball is itself), and no clean
        mistake ever is.
        """
        if self.proven is None or eps not in self.certified_eps:
            return None
        return float(((self.proven >= eps) & self.clean_correct).float().mean())

    def proven_to(self) -> Tensor:
        """Per sample, the largest eps at which it was proven robust (0 if none)."""
        return self.proven.double() if self.proven is not None else torch.zeros(self.n, dtype=torch.float64)

    def breaking_attack(self) -> list[str | None]:
        """Per sample, the first attack (in order) that broke it at the smallest eps."""
        if not self.outcomes:
            return [None] * self.n
        stacked = torch.stack([o.broken_at for o in self.outcomes])
        best = stacked.min(dim=0)
        names: list[str | None] = []
        for i, value in enumerate(best.values.tolist()):
            if value == NEVER or value == 0:
                names.append(None)
            else:
                names.append(self.outcomes[int(best.indices[i])].name)
        return names


def _params_dict(params: Any) -> dict[str, Any]:
    return dataclasses.asdict(params)


def evaluate(
    model: Model,
    x: Tensor,
    y: Tensor,
    attacks: Sequence[NamedAttack],
    threats: Sequence[ThreatModel],
    *,
    batch_size: int = 256,
    cascade: bool = False,
    device: str | torch.device = "cpu",
    on_result: Callable[[Evaluation], None] | None = None,
    dist_ctx: DistContext | None = None,
    certify: bool = False,
    gradient_free_shortcut: bool = False,
    clean_logits: Tensor | None = None,
    examples: ExampleKeeper | None = None,
) -> Evaluation:
    """Run every attack at every eps (ascending, each once) on ``x``; see the module docstring.

    ``on_result`` is called after each (attack, eps), or after an attack's one run over every
    eps, so callers can save partial results; a ``KeyboardInterrupt`` stops the run and
    returns what was computed, marked interrupted.
    Under ``torchrun`` (``dist_ctx``), every rank holds all samples and the batches of each
    stage are dealt out round-robin, then merged; the batches are the ones a single process
    would form, so the result equals a single-process run.
    ``gradient_free_shortcut``: run gradient-free attacks as a nested search, largest eps first
    (module docstring); what it skipped is in each outcome's ``skipped`` and ``notes``.
    ``clean_logits``: the model's fp32 logits on ``x``, when the caller has them already
    (``predict_logits``), so they are not computed twice.
    ``examples``: offered every batch's checked examples, to keep the few a report pictures.
    """
    dist_ctx = dist_ctx or DistContext()
    if not attacks:
        raise RobustkitError("no attacks to run; name one with --attack (see `robustkit attacks list`)")
    norms = {t.norm for t in threats}
    if len(norms) != 1:
        raise RobustkitError("evaluate one norm at a time")
    threats = sorted(set(threats), key=lambda t: t.eps)
    device = torch.device(device)
    if clean_logits is not None and (clean_logits.dim() != 2 or len(clean_logits) != len(x)):
        raise RobustkitError(f"clean_logits must have shape ({len(x)}, classes), got {tuple(clean_logits.shape)}")
    with fast_layout(model, x[:batch_size].to(device)):  # one weight swap for the run, not one per call
        if clean_logits is None:
            clean_logits = predict_logits(model, x)
        clean_correct = (clean_logits.argmax(1) == y.to(clean_logits.device)).cpu()
        initial = torch.where(clean_correct, torch.tensor(NEVER), torch.tensor(0.0))
        outcomes = [
            AttackOutcome(a.name, _params_dict(a.attack.params) if dataclasses.is_dataclass(a.attack.params)
                          else {}, initial.clone()) for a in attacks
        ]
        evaluation = Evaluation(list(threats), clean_correct, outcomes, cascade,
                                gradient_free_shortcut=gradient_free_shortcut)
        certifier = _certifier(model, x, max(threats, key=lambda t: t.eps), device, evaluation) if certify else None
        total = len(threats) * len(attacks)
        try:
            with progress() as bar:
                task = bar.add_task("attacking", total=total)

                def run(named: NamedAttack, outcome: AttackOutcome, at: Sequence[ThreatModel]) -> None:
                    """Run one attack at the eps of ``at``, on the samples still standing at each."""
                    bar.update(task, description=f"{named.name} {at[0].norm}:{','.join(eps_text(t.eps) for t in at)}")
                    standing = evaluation.worst_broken_at() if cascade else outcome.broken_at
                    todo = [((standing > t.eps) & _not_proven(evaluation, t.eps)).nonzero().squeeze(1) for t in at]
                    done = sum(len(o.seconds) for o in outcomes)  # (attack, eps) steps finished

                    def batch_done(share: float) -> None:  # a long run moves the bar batch by batch
                        bar.advance(task, len(at) * share)

                    seconds, rejected = _attack_subset(named.attack, model, x, y, todo, at, outcome.broken_at,
                                                       batch_size, device, dist_ctx, batch_done,
                                                       keep=_keep(examples, named))
                    for threat, samples in zip(at, todo):
                        outcome.seconds[threat.eps] = seconds[threat.eps]
                        outcome.attacked[threat.eps] = int(samples.numel())
                    outcome.rejected += rejected
                    bar.update(task, completed=done + len(at))  # exact, whatever share this rank's batches had
                    if on_result is not None:
                        on_result(evaluation)

                def run_nested(named: NamedAttack, outcome: AttackOutcome) -> None:
                    """Run a gradient-free attack as a nested search over every eps (largest first)."""
                    bar.update(task, description=f"{named.name} {threats[0].norm}:"
                                                 f"{','.join(eps_text(t.eps) for t in reversed(threats))} (nested)")
                    standing = evaluation.worst_broken_at() if cascade else outcome.broken_at
                    eligible = torch.stack([(standing > t.eps) & _not_proven(evaluation, t.eps) for t in threats])
                    done = sum(len(o.seconds) for o in outcomes)
                    _nested_search(named, outcome, model, x, y, eligible, threats, batch_size, device, dist_ctx,
                                   lambda share: bar.advance(task, share), keep=_keep(examples, named))
                    bar.update(task, completed=done + len(threats))
                    if on_result is not None:
                        on_result(evaluation)

                def certify_step(step: int) -> None:
                    assert certifier is not None
                    bar.update(task, description=f"certifying {threats[step]}")
                    _certify(certifier, x, y, threats[step : step + 2], evaluation, batch_size, device, dist_ctx)
                    if on_result is not None:
                        on_result(evaluation)

                snapshot = _weights(model)

                def guarded(named: NamedAttack, outcome: AttackOutcome, call: Callable[[], None]) -> None:
                    """Run an attack; one that raises (or edits the weights) is charged to itself,
                    the weights are restored, and the evaluation goes on without it."""
                    if outcome.failed is not None:
                        return
                    try:
                        call()
                    except Exception as err:
                        if dist_ctx.enabled:  # ranks must stay in step: the run ends (torchrun stops the rest)
                            raise
                        if snapshot is not None and isinstance(model, nn.Module):
                            model.load_state_dict(snapshot)
                        outcome.failed = one_line(err)
                        log.error("attack %s failed (%s); the audit goes on without it", named.name, outcome.failed)
                        for t in threats:
                            outcome.seconds.setdefault(t.eps, 0.0)
                            outcome.attacked.setdefault(t.eps, 0)
                        if on_result is not None:
                            on_result(evaluation)

                for step, threat in enumerate(threats):
                    certified = certifier is None
                    for position, (named, outcome) in enumerate(zip(attacks, outcomes)):
                        if _batches_eps(named.attack) or _nested(named.attack, gradient_free_shortcut):
                            continue
                        if not certified and position > 0:
                            certify_step(step)
                            certified = True
                        guarded(named, outcome, functools.partial(run, named, outcome, [threat]))
                    if not certified:  # for the report's lower bound
                        certify_step(step)
                for named, outcome in zip(attacks, outcomes):
                    if _nested(named.attack, gradient_free_shortcut):
                        guarded(named, outcome, functools.partial(run_nested, named, outcome))
                    elif _batches_eps(named.attack):
                        guarded(named, outcome, functools.partial(run, named, outcome, threats))
        except KeyboardInterrupt:
            evaluation.interrupted = True
    return evaluation


#: What ``_attack_subset`` offers each batch to: ``ExampleKeeper.offer`` without the attack's name.
Keep = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor], None]


def _keep(examples: ExampleKeeper | None, named: NamedAttack) -> Keep | None:
    return None if examples is None else functools.partial(examples.offer, named.name)


def _weights(model: Model) -> dict[str, Tensor] | None:
    """A copy of the model's parameters and buffers, to restore after an attack that edits them."""
    if not isinstance(model, nn.Module):
        return None
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _batches_eps(attack: Attack) -> bool:
    """Whether the engine runs ``attack`` once for all eps, after every other attack.

    Minimum-norm attacks, whose one run per sample answers every eps; and gradient-free
    attacks that take per-sample radii: their many queries each pay a fixed overhead, which one
    run over the survivors of every eps pays once (docs/performance.md). Other gradient attacks
    stay eps by eps, where the nesting of the balls saves more: a sample broken at one eps is
    not attacked at the next.
    """
    return attack.minimum_norm or (attack.per_sample_eps and not attack.needs_gradients)


def _nested(attack: Attack, shortcut: bool) -> bool:
    """Whether the engine runs ``attack`` as a nested search, largest eps first, after every
    other attack: with the shortcut, for gradient-free attacks other than minimum-norm ones
    (which answer every eps in one run anyway)."""
    return shortcut and not attack.needs_gradients and not attack.minimum_norm


def _nested_search(
    named: NamedAttack, outcome: AttackOutcome, model: Model, x: Tensor, y: Tensor, eligible: Tensor,
    threats: Sequence[ThreatModel], batch_size: int, device: torch.device, dist_ctx: DistContext,
    stage_done: Callable[[float], None], merge_inner: bool | None = None, keep: Keep | None = None,
) -> None:
    """Attack each sample first at the largest eps where it is ``eligible`` (K eps x N samples:
    standing, not proven), and at the smaller eligible eps only if the attack broke it there.

    The first stage attacks every sample at its largest eligible eps. A sample the attack broke
    is credited the smallest audited eps whose ball holds its example; one it could not break is
    not attacked at any smaller eps, and is counted there in ``outcome.skipped``, with a note (the
    attack might have broken it in a smaller ball: random search is not monotone in eps). Later
    stages attack the samples broken so far below their credited eps: with ``merge_inner`` (the
    default for attacks that take per-sample radii), at every smaller eligible eps at once, in
    one batch, so the second stage is the last and each query's overhead is paid twice in all,
    not once per eps; without, eps by eps as long as the attack keeps breaking them (one call per
    eps anyway, so nesting further only saves). Every rank forms the same stages from the merged
    results, so a run under torchrun equals a single-process run. ``stage_done`` gets each
    batch's share of its stage (a stage counts 1).
    """
    attack = named.attack
    merge_inner = attack.per_sample_eps if merge_inner is None else merge_inner
    count, n = eligible.shape
    eps = torch.tensor([t.eps for t in threats], dtype=outcome.broken_at.dtype).view(-1, 1)  # as broken_at stores
    rank = torch.arange(1, count + 1).view(-1, 1)

    def top(mask: Tensor) -> Tensor:  # per sample, the index of the largest eps in mask; -1 if none
        return (mask.long() * rank).max(0).values - 1

    def only_top(mask: Tensor) -> Tensor:
        return mask & (rank - 1 == top(mask).view(1, -1))

    tried = torch.zeros_like(eligible)  # (eps, sample) rows attacked
    searching = eligible.any(0)
    refined = torch.zeros(n, dtype=torch.bool)  # broken at a larger eps by this attack
    attacked, again = [0] * count, [0] * count  # per eps: samples attacked, of which broken at a larger eps
    failed_at = [[0] * count for _ in range(count)]  # [k][j]: skipped at eps k, not broken at eps j
    seconds, rejected, first = [0.0] * count, 0, True
    while True:
        rows = eligible & ~tried & (eps < outcome.broken_at.view(1, -1)) & searching.view(1, -1)
        if first or not merge_inner:
            rows = only_top(rows)
        if not bool(rows.any()):
            break
        todo = [rows[k].nonzero().squeeze(1) for k in range(count)]
        live = [k for k in range(count) if len(todo[k])]
        for k in live:
            attacked[k] += len(todo[k])
            again[k] += int(refined[todo[k]].sum())
        total = int(rows.sum())
        for group in [live] if attack.per_sample_eps else [[k] for k in live]:
            share = sum(len(todo[k]) for k in group) / total
            spent, thrown = _attack_subset(
                attack, model, x, y, [todo[k] for k in group], [threats[k] for k in group], outcome.broken_at,
                batch_size, device, dist_ctx, functools.partial(_scaled, stage_done, share), settle=threats,
                keep=keep)
            for k in group:
                seconds[k] += spent[threats[k].eps]
            rejected += thrown
        tried |= rows
        highest = top(rows)  # each searched sample's largest eps in this stage
        searched = highest >= 0
        broken = searched & (outcome.broken_at <= eps.view(-1)[highest.clamp_min(0)])
        missed = searched & ~broken  # not broken at its largest eps this stage: searched no further
        left = eligible & ~tried & missed.view(1, -1)
        for j in set(highest[missed].tolist()):
            for k in range(j):
                failed_at[k][j] += int((left[k] & (highest == j)).sum())
        refined |= broken
        searching &= broken
        first = False
    outcome.rejected += rejected
    for k, threat in enumerate(threats):
        outcome.seconds[threat.eps] = seconds[k]
        outcome.attacked[threat.eps] = attacked[k]
        skipped = sum(failed_at[k])
        if skipped:
            outcome.skipped[threat.eps] = skipped
            outcome.notes.append(_shortcut_note(named.name, threats, k, attacked[k], again[k], failed_at[k]))


def _scaled(done: Callable[[float], None], share: float, part: float) -> None:
    done(part * share)


def _shortcut_note(name: str, threats: Sequence[ThreatModel], k: int, attacked: int, again: int,
                   failed_at: list[int]) -> str:
    """What the nested-search shortcut ran and skipped at ``threats[k]``, exactly."""
    values = [t.eps for t in threats]
    short = len({f"{e:.3g}" for e in values}) == len(values)

    def show(e: float) -> str:
        return f"{e:.3g}" if short else f"{e:.6g}"

    here, skipped = show(values[k]), sum(failed_at)
    sources = [(values[j], c) for j, c in enumerate(failed_at) if c]
    if attacked == 0:
        ran = "did not run"
    elif attacked == again:
        ran = f"ran on the {attacked} standing samples it broke at a larger eps"
    else:
        ran = (f"ran on {attacked} standing samples ({again} it broke at a larger eps, "
               f"{attacked - again} not attacked at a larger eps)")
    where = show(sources[0][0]) if len(sources) == 1 else (
        "a larger eps (" + ", ".join(f"{c} at {show(e)}" for e, c in reversed(sources)) + ")")
    return (f"{name} at {here} {ran}; {skipped} standing samples it could not break at {where} were not attacked "
            f"at {here} (nested-search shortcut; --suite autoattack never uses it)")


def _rows(attack: Attack, todo: Sequence[Tensor], threats: Sequence[ThreatModel]) -> tuple[Tensor, Tensor]:
    """The samples to attack and the radius of each: one row per (sample, eps) to attack; for a
    minimum-norm attack, one row per sample, at the largest eps where it still stands."""
    samples = torch.cat(list(todo))
    eps = torch.cat([torch.full((len(t),), threat.eps, dtype=torch.float64) for t, threat in zip(todo, threats)])
    if not attack.minimum_norm or not len(samples):
        return samples, eps
    largest = torch.full((int(samples.max()) + 1,), -1.0, dtype=torch.float64)
    largest.scatter_reduce_(0, samples, eps, reduce="amax")
    unique = (largest >= 0).nonzero().squeeze(1)
    return unique, largest[unique]


def _settled_at(found: Tensor, radii: Tensor, threats: Sequence[ThreatModel]) -> Tensor:
    """For a minimum-norm attack's examples at distance ``found``: the smallest audited eps that
    holds each (the balls are nested, so it breaks the sample there and at every larger eps);
    ``radii`` (the ball it was attacked in) where none is smaller."""
    eps = torch.tensor(sorted(t.eps for t in threats), dtype=torch.float64)
    slack = TOLERANCE * max(1.0, float(eps.max()))
    index = torch.searchsorted(eps, found.double() - slack).clamp_max(len(eps) - 1)
    return torch.minimum(eps[index], radii)


def _attack_subset(
    attack: Attack, model: Model, x: Tensor, y: Tensor, todo: Sequence[Tensor], threats: Sequence[ThreatModel],
    broken_at: Tensor, batch_size: int, device: torch.device, dist_ctx: DistContext,
    batch_done: Callable[[float], None], settle: Sequence[ThreatModel] | None = None, keep: Keep | None = None,
) -> tuple[dict[float, float], int]:
    """Attack ``x[todo[k]]`` at ``threats[k]`` for every k, in batches that may mix eps; record
    each newly broken sample at the smallest eps that broke it: with ``settle`` (a minimum-norm
    attack's ``threats``), the smallest of those eps whose ball holds the example found.
    ``batch_done`` gets each batch's share of the samples; ``keep`` each batch's checked examples.

    Returns the seconds spent at each eps (a batch's time is shared out by its samples at each
    eps, as each costs the attack the same budget) and the number of examples rejected.
    """
    samples, eps = _rows(attack, todo, threats)
    settle = threats if attack.minimum_norm else settle
    largest, single = max(threats, key=lambda t: t.eps), len(threats) == 1
    seconds, rejected = dict.fromkeys((t.eps for t in threats), 0.0), 0
    size = batch_size if attack.needs_gradients else batch_size * GRADIENT_FREE_BATCH_FACTOR
    for rows in _dealt(torch.arange(len(samples)), size, dist_ctx):
        index, radii = samples[rows], eps[rows]
        xb, yb = x[index].to(device), y[index].to(device)
        result = attack(model, xb, yb, threat=largest, radii=None if single else radii)
        invalid = largest.violations(xb, result.x_adv, radii=radii).cpu()
        rejected += int(invalid.sum())
        # Broken means misclassified (for targeted attacks too: missing the target while still
        # changing the answer breaks the sample as much as hitting it).
        broken = (result.logits.argmax(1) != yb).cpu() & ~invalid
        credited = _settled_at(per_sample_norm(result.x_adv - xb, largest.norm).cpu(), radii, settle) \
            if settle else radii
        broken_at.scatter_reduce_(0, index[broken], credited[broken].to(broken_at.dtype), reduce="amin")
        if keep is not None:
            keep(index, radii, credited, result.x_adv, broken, ~invalid)
        for radius in radii.unique().tolist():
            seconds[radius] += result.seconds * float((radii == radius).double().mean())
        batch_done(len(rows) / len(samples))
    all_reduce_min_(broken_at, dist_ctx)
    return {e: all_reduce_sum(s, dist_ctx) for e, s in seconds.items()}, int(all_reduce_sum(rejected, dist_ctx))


def _certifier(model: Model, x: Tensor, largest: ThreatModel, device: torch.device,
               evaluation: Evaluation) -> Certifier | None:
    """A certifier for the model, or None with the reason recorded (nothing is skipped then)."""
    try:
        check_norm(largest.norm)
        certifier = Certifier(model, tuple(x.shape[1:]), device)
        certifier.check_reproduces(x[:CERTIFY_PILOT].to(device), largest)
    except Unsupported as reason:
        evaluation.certification = f"unsupported: {reason}"
        return None
    evaluation.certification = "linear bound propagation (CROWN)"
    evaluation.uncertified_at = torch.where(evaluation.clean_correct, torch.tensor(NEVER), torch.tensor(0.0))
    evaluation.proven = torch.zeros(evaluation.n)
    return certifier


def _not_proven(evaluation: Evaluation, eps: float) -> Tensor:
    if evaluation.proven is None:
        return torch.ones(evaluation.n, dtype=torch.bool)
    return evaluation.proven < eps


def _certify(
    certifier: Certifier, x: Tensor, y: Tensor, threats: Sequence[ThreatModel], evaluation: Evaluation,
    batch_size: int, device: torch.device, dist_ctx: DistContext,
) -> None:
    """Settle, at ``threats[0]``'s eps, which standing samples are proven robust, looking one eps ahead.

    A proof at the next eps (``threats[1]``) covers this one too, as the balls are nested. So the
    samples are tried there first, and only those that fail are tried again here; that proves
    most of a robust model's samples once for two eps. A sample is never tried at or above an
    eps where it failed, since bounds only loosen as the ball grows.
    """
    uncertified_at, proven = evaluation.uncertified_at, evaluation.proven
    assert uncertified_at is not None and proven is not None
    start_time = time.perf_counter()
    for threat in reversed(threats):
        wanted = (uncertified_at > threat.eps) & (proven < threat.eps) & (evaluation.worst_broken_at() == NEVER)
        _prove(certifier, x, y, wanted.nonzero().squeeze(1), threat, evaluation, batch_size, device, dist_ctx)
    evaluation.certify_seconds[threats[0].eps] = all_reduce_sum(time.perf_counter() - start_time, dist_ctx)
    evaluation.certified_eps.append(threats[0].eps)


def _prove(
    certifier: Certifier, x: Tensor, y: Tensor, candidates: Tensor, threat: ThreatModel, evaluation: Evaluation,
    batch_size: int, device: torch.device, dist_ctx: DistContext,
) -> None:
    """Try to prove ``candidates`` robust at ``threat.eps``; record proofs and failures.

    The first ``CERTIFY_PILOT`` go first: when none of them is proven, the rest are marked failed
    untried, as a certificate would cost more than it saves.
    """
    uncertified_at, proven = evaluation.uncertified_at, evaluation.proven
    assert uncertified_at is not None and proven is not None
    pilot, rest = candidates[:CERTIFY_PILOT], candidates[CERTIFY_PILOT:]
    # the ball an example is accepted in (violations() allows TOLERANCE for rounding): a proof
    # covers all of it, so no accepted example can break a proven sample
    accepted = dataclasses.replace(threat, eps=threat.eps + TOLERANCE * max(1.0, threat.eps))
    for part in (pilot, rest):
        for index in _dealt(part, batch_size, dist_ctx):
            ok = certifier.certify(x[index].to(device), y[index].to(device), accepted).cpu()
            uncertified_at[index[~ok]] = threat.eps
            proven[index[ok]] = threat.eps
        all_reduce_min_(uncertified_at, dist_ctx)
        all_reduce_max_(proven, dist_ctx)
        if part is pilot and not bool((proven[pilot] >= threat.eps).any()):
            uncertified_at[rest] = threat.eps
            return


def _dealt(samples: Tensor, size: int, dist_ctx: DistContext) -> Iterator[Tensor]:
    """This rank's batches of ``samples``: batches of ``size``, dealt out round-robin over ranks."""
    for number, start in enumerate(range(0, samples.numel(), size)):
        if number % dist_ctx.world_size == dist_ctx.rank:
            yield samples[start : start + size]
