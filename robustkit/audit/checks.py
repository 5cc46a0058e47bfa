"""Sanity checks that tell a trustworthy audit from one fooled by gradient masking.

Each check returns a status (pass, warn, fail) and a one-line detail. They follow the advice
of Carlini et al., "On Evaluating Adversarial Robustness" (2019): iterative attacks must beat
single-step ones, gradient-free attacks must not beat gradient attacks, accuracy must fall
with eps and reach chance at a large eps, and more steps must not change the answer.
Checks that attack run on a small subset of clean-correct samples, independently of the main
run, so they cost a fraction of it.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkit.attacks.base import Attack
from robustkit.attacks.native import margin_loss
from robustkit.audit.engine import Evaluation, NamedAttack
from robustkit.models.loading import OutputCheck
from robustkit.modules import Model, eval_mode, model_device, predict_logits
from robustkit.threat import Norm, ThreatModel, eps_text

#: "untested": the check ran but had nothing to test (e.g. no sample breaks at its eps); it is
#: reported as such, never as a pass.
Status = Literal["pass", "warn", "fail", "untested"]

#: z of the two-sided 95% interval around chance accuracy that counts as "at chance".
CHANCE_Z = 1.959964
#: Accuracy above chance that the large-eps probe still counts as "about chance".
PROBE_MARGIN = 0.05


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "detail": self.detail}


@dataclass(frozen=True)
class CheckInputs:
    """What the attack-based checks need; ``x``/``y`` are a subset of clean-correct samples."""

    model: Model
    x: Tensor
    y: Tensor
    threat: ThreatModel  #: the audit's threat model at its middle eps
    eps: Sequence[float]
    fgsm: NamedAttack | None
    iterative: NamedAttack | None  #: the strongest iterative white-box attack of the suite
    gradient_free: NamedAttack | None
    num_classes: int
    batch_size: int = 256
    #: the attacks the audit ran (``attacks_that_ran``): the large-eps probe tries those whose
    #: loss does not saturate before it fails
    attacks: Sequence[NamedAttack] = ()


def _robust_accuracy(inputs: CheckInputs, attack: Attack, threat: ThreatModel) -> Tensor:
    """Per-sample 'still correct' flags for ``attack`` on the check subset."""
    return _standing(inputs.model, inputs.x, inputs.y, attack, threat, inputs.batch_size)


def _standing(model: Model, x: Tensor, y: Tensor, attack: Attack, threat: ThreatModel, batch_size: int) -> Tensor:
    """Per-sample 'still correct' flags for ``attack`` on ``x``; invalid examples do not count."""
    standing = []
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        result = attack(model, xb, yb, threat=threat)
        valid = ~threat.violations(xb, result.x_adv)
        standing.append(~((result.logits.argmax(1) != yb) & valid))
    return torch.cat(standing)


#: What puts an image classifier at chance, for the failed check's fix.
IMAGE_CHANCE_CAUSES = "--mean/--std, the data's scaling and labels, --data"


def clean_accuracy_vs_chance(clean_correct: Tensor, num_classes: int, causes: str = IMAGE_CHANCE_CAUSES) -> Check:
    """A model at chance on clean data is not seeing its inputs as it was trained to (missing
    --mean/--std, wrong scaling or labels, the wrong data set, an untrained model): attacking it
    measures nothing, and every later check would pass on it. ``causes``: what to check, in the
    fix (a plugin's data has its own)."""
    n = len(clean_correct)
    accuracy, chance = float(clean_correct.float().mean()), 1.0 / num_classes
    half_width = CHANCE_Z * math.sqrt(chance * (1 - chance) / max(n, 1))
    detail = f"clean accuracy {accuracy:.1%} on {n} samples; chance is {chance:.1%} (+-{half_width:.1%})"
    if accuracy <= chance + half_width:
        return Check("clean accuracy above chance", "fail", detail + f": clean accuracy is at chance: check "
                     f"{causes}; the attacks were skipped")
    return Check("clean accuracy above chance", "pass", detail)


def informative_eps(evaluation: Evaluation) -> float | None:
    """The audited eps at which checks that compare attacks can tell them apart: the one where
    the worst case broke closest to half of the clean-correct samples (some broken, some
    standing); None if no sample breaks at any eps."""
    correct = evaluation.clean_correct
    if not evaluation.outcomes or not bool(correct.any()):
        return None
    worst = evaluation.worst_broken_at()[correct]
    shares = {e: float((worst <= e).float().mean()) for e in evaluation.eps}
    broken = {e: share for e, share in shares.items() if share > 0}
    if not broken:
        return None
    return min(broken, key=lambda e: (abs(broken[e] - 0.5), e))


def determinism(model: Model, x: Tensor) -> Check:
    first, second = predict_logits(model, x[:64]), predict_logits(model, x[:64])
    gap = float((first - second).abs().max())
    if gap <= 1e-5:
        return Check("deterministic", "pass", f"repeated forward passes agree (max difference {gap:.1e})")
    return Check("deterministic", "fail", f"repeated forward passes differ by up to {gap:.3g}: a randomised model "
                 "needs attacks with expectation over transformation (EOT); plain attacks overstate robustness")


def stateless(model: Model, fresh: Model | None, x: Tensor, threats: Sequence[ThreatModel], seed: int = 0) -> Check:
    """A copy of the model loaded afresh, asked first, must answer points near the data as the
    audited model does after the whole audit: one that remembers earlier queries (a stateful
    defence, a cache of seen inputs) answers the attacks' queries from its memory of the clean
    data and keeps its figures, which then describe a query history, not the model.
    ``fresh``: None when the model can hold no state (an ONNX graph)."""
    name = "stateless"
    if fresh is None:
        return Check(name, "pass", "an ONNX graph keeps no state between runs")
    if not len(x):
        return Check(name, "untested", "no clean-correct sample to ask")
    sign = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(seed)).to(x) * 2 - 1
    # at every audited eps: a corner of the linf ball, a point on the l2/l1 sphere
    nearby = torch.cat([threat.project(x, x + threat.eps * sign) for threat in threats])
    seen, again = (predict_logits(model, x).float().cpu() for _ in range(2))  # points it has answered before
    if not torch.allclose(seen, again, rtol=1e-5, atol=1e-5 * float(seen.abs().max().clamp_min(1))):
        return Check(name, "untested", "not checked: repeated forward passes differ (see deterministic)")
    first = predict_logits(fresh, nearby).float().cpu()  # the fresh copy's first query
    audited = predict_logits(model, nearby).float().cpu()
    scale = float(audited.abs().max().clamp_min(1))
    differ = int((first.argmax(1) != audited.argmax(1)).sum())
    gap = float((first - audited).abs().max())
    detail = (f"a fresh copy and the audited model, on {len(x)} points at each eps from the data "
              f"({len(nearby)} in all): {differ} decisions differ, logits by up to {gap:.2g}")
    if differ == 0 and gap <= 1e-4 * scale:
        return Check(name, "pass", detail)
    return Check(name, "fail", detail + ": the model answers by what it was asked before (a memory of earlier "
                 "inputs, statistics updated by queries); the figures describe this audit's query order, not the "
                 "model: audit a model that keeps no state")


#: Share of samples whose margin lies within ``FLAT_SPREAD`` of the median margin above which
#: the scores count as flat.
FLAT_SHARE, FLAT_SPREAD = 0.9, 0.01


def scores_vary(model: Model, x: Tensor) -> Check:
    """The margin (top score minus the next) must vary between inputs. Nearly the same margin
    everywhere is a hard decision dressed as scores (``one_hot * c`` plus a small smooth term):
    gradient and score-based attacks then follow the small term, which need not lead to the
    decision boundary, and robust accuracy may be overstated. A warning, not a failure: a model
    trained to one margin (heavy label smoothing) can show it honestly."""
    name = "scores vary"
    if len(x) < 10:
        return Check(name, "untested", f"not checked: {len(x)} clean-correct samples, too few to compare")
    top = predict_logits(model, x).float().topk(2, dim=1).values
    margin = top[:, 0] - top[:, 1]
    median = float(margin.median())
    near = float(((margin - median).abs() <= FLAT_SPREAD * abs(median)).float().mean())
    detail = f"{near:.0%} of {len(x)} samples have a margin within {FLAT_SPREAD:.0%} of the median, {median:.3g}"
    if near < FLAT_SHARE:
        return Check(name, "pass", detail)
    return Check(name, "warn", detail + ": the scores are a hard decision with little else (or a model trained to "
                 "one margin); gradient and score attacks get little signal from them, so robust accuracy may be "
                 "overstated: check with a decision-based attack")


def outputs(output_check: OutputCheck) -> Check:
    if output_check.warnings:
        return Check("logits", "warn", output_check.warnings[0])
    return Check("logits", "pass", f"(N, {output_check.num_classes}) finite outputs that are not probabilities")


def attacks_that_ran(suite: Sequence[NamedAttack], evaluation: Evaluation) -> list[NamedAttack]:
    """The attacks of ``suite`` that did not fail in ``evaluation``: the audit's figures come from
    them alone, so the checks judge and rerun only them (a failed one would raise again)."""
    failed = {o.name for o in evaluation.outcomes if o.failed is not None}
    return [a for a in suite if a.name not in failed]


def _input_gradients(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor] | None:
    """Input gradients of the margin loss (true logit minus the best other: only masking zeroes
    it, whatever the logits' scale) and of cross-entropy (a saturated softmax zeroes it too);
    None when the output has no graph back to the input (argmax, a detached or integer output)."""
    device = model_device(model)
    xg, labels = x.to(device).detach().requires_grad_(True), y.to(device)
    with eval_mode(model), torch.enable_grad():
        logits = model(xg).float()
        if not logits.requires_grad:
            return None
        (margin,) = torch.autograd.grad(margin_loss(logits, labels).sum(), xg, retain_graph=True, allow_unused=True)
        (ce,) = torch.autograd.grad(F.cross_entropy(logits, labels, reduction="sum"), xg, allow_unused=True)
    return None if margin is None or ce is None else (margin, ce)


def _vanished(grad: Tensor) -> Tensor:
    """Per sample: the gradient is zero everywhere or not finite somewhere."""
    flat = grad.flatten(1)
    return ~torch.isfinite(flat).all(1) | (flat.abs().amax(1) == 0)


#: Shares of samples without an input gradient above which the gradients check fails, warns.
GRADIENT_FAIL_SHARE, GRADIENT_WARN_SHARE = 0.10, 0.01


def _share_status(share: float) -> Status:
    return "fail" if share > GRADIENT_FAIL_SHARE else "warn" if share > GRADIENT_WARN_SHARE else "pass"


def _saturated_share(masked: Tensor, ce_grad: Tensor) -> float:
    """Share of samples whose cross-entropy gradient vanished but whose margin gradient did not."""
    return float((_vanished(ce_grad) & ~masked).float().mean())


def softmax_saturates(model: Model, x: Tensor, y: Tensor) -> bool:
    """True when enough samples' cross-entropy gradient vanishes while the margin's does not
    (logits so large that the softmax is one-hot) for the gradients check to call it out: a
    cross-entropy attack then stands still there, and a check that reruns one tests nothing."""
    found = _input_gradients(model, x, y) if isinstance(model, nn.Module) and len(x) else None
    if found is None:
        return False
    return _share_status(_saturated_share(_vanished(found[0]), found[1])) != "pass"


def gradients(model: Model, x: Tensor, y: Tensor, attacks: Sequence[NamedAttack]) -> Check:
    """Share of samples whose input gradient is zero or not finite. A vanishing margin gradient
    is masking; a vanishing cross-entropy gradient alone is a saturated softmax, which overstates
    robustness only if every gradient attack in ``attacks`` (those the audit ran) follows
    cross-entropy: one with a DLR or margin loss breaks such a model."""
    if not isinstance(model, nn.Module):
        return Check("gradients", "warn", "not checked: the model gives no gradients (attacked as a black box)")
    found = _input_gradients(model, x, y)
    if found is None:
        return Check("gradients", "fail", f"the output does not depend differentiably on the input: no gradient at "
                     f"all on {len(x)} samples (argmax, a detached or integer output?); gradient attacks cannot "
                     "run: trust only gradient-free attacks")
    masked = _vanished(found[0])
    masked_share = float(masked.float().mean())
    saturated_share = _saturated_share(masked, found[1])
    ce_share = masked_share + saturated_share
    detail = (f"{masked_share:.1%} of {len(x)} samples have a zero or non-finite input gradient of the margin loss, "
              f"{ce_share:.1%} of cross-entropy")
    if _share_status(masked_share) == "fail":
        return Check("gradients", "fail", detail + ": gradients are masked (quantisation or a non-differentiable "
                     "layer); trust only gradient-free attacks")
    white_box = [a for a in attacks if a.attack.needs_gradients]
    ce_names = ", ".join(a.name for a in white_box if a.attack.follows_cross_entropy())
    margin_names = ", ".join(a.name for a in white_box if not a.attack.follows_cross_entropy())
    if not ce_names or _share_status(saturated_share) == "pass":
        return Check("gradients", _share_status(masked_share), detail)
    if not margin_names:
        return Check("gradients", _share_status(ce_share), detail + f": the softmax saturates; the cross-entropy "
                     f"attacks ({ce_names}) get no gradient there and no gradient attack of the audit has a DLR or "
                     "margin loss, so robust accuracy may be overstated: add robustkit:apgd-t or -o apgd.loss dlr")
    return Check("gradients", "warn", detail + f": the softmax saturates; the cross-entropy attacks ({ce_names}) "
                 f"get no gradient there; {margin_names} (DLR or margin loss) are not affected")


def iterative_vs_fgsm(inputs: CheckInputs) -> Check:
    if inputs.fgsm is None or inputs.iterative is None:
        return Check("iterative >= fgsm", "warn", "not checked: the suite lacks FGSM or an iterative attack")
    fgsm = _robust_accuracy(inputs, inputs.fgsm.attack, inputs.threat)
    iterative = _robust_accuracy(inputs, inputs.iterative.attack, inputs.threat)
    weaker = int((~fgsm & iterative).sum())
    detail = (f"at eps {eps_text(inputs.threat.eps)}, {inputs.iterative.name} left standing {weaker} of "
              f"{len(fgsm)} samples that FGSM broke (FGSM {fgsm.float().mean():.1%}, "
              f"iterative {iterative.float().mean():.1%})")
    if bool(fgsm.all()) and bool(iterative.all()):
        return Check("iterative >= fgsm", "untested",
                     detail + ": neither attack broke a sample here, nothing to compare")
    if weaker == 0:
        return Check("iterative >= fgsm", "pass", detail)
    return Check("iterative >= fgsm", "fail" if weaker > 0.02 * len(fgsm) else "warn",
                 detail + ": the iterative attack is not converging (masked or noisy gradients?)")


def gradient_free_vs_white_box(evaluation: Evaluation, gradient_free: set[str]) -> Check:
    """From the main run: did a gradient-free attack break samples every white-box attack missed?"""
    white = [o.broken_at for o in evaluation.outcomes if o.name not in gradient_free]
    free = [o.broken_at for o in evaluation.outcomes if o.name in gradient_free]
    if not white or not free:
        return Check("gradient-free <= white-box", "warn",
                     "not checked: the suite needs both a gradient-free and a white-box attack")
    white_at = torch.stack(white).min(0).values
    free_at = torch.stack(free).min(0).values
    beaten = int((free_at < white_at).sum())
    attacked = int(evaluation.clean_correct.sum())
    detail = f"gradient-free attacks broke {beaten} of {attacked} samples at a smaller eps than every white-box attack"
    if beaten == 0:
        return Check("gradient-free <= white-box", "pass", detail)
    share = beaten / max(attacked, 1)
    if share <= 0.03:  # a few samples: ordinary attack variance, not masking
        return Check("gradient-free <= white-box", "pass", detail + f" ({share:.1%}, within attack variance)")
    return Check("gradient-free <= white-box", "fail" if share > 0.10 else "warn",
                 detail + ": the white-box attacks are being misled, a sign of gradient masking")


def _strongest(inputs: CheckInputs) -> NamedAttack | None:
    return inputs.iterative or inputs.gradient_free


def monotone_in_eps(inputs: CheckInputs) -> Check:
    """Independent runs (no nesting) at every eps: accuracy must not rise with eps."""
    named = _strongest(inputs)
    if named is None or len(inputs.eps) < 2:
        return Check("monotone in eps", "warn", "not checked: needs an iterative attack and two eps values")
    accs = [float(_robust_accuracy(inputs, named.attack, inputs.threat.with_eps(e)).float().mean())
            for e in inputs.eps]
    rises = [(a, b, e) for a, b, e in zip(accs, accs[1:], inputs.eps[1:]) if b > a + 1.0 / len(inputs.x) + 1e-9]
    listing = ", ".join(f"{eps_text(e)}: {a:.1%}" for e, a in zip(inputs.eps, accs))
    if len(set(accs)) == 1:
        return Check("monotone in eps", "untested", f"{named.name} gives {accs[0]:.1%} at every eps ({listing}): "
                     "a flat curve cannot show a rise")
    if not rises:
        return Check("monotone in eps", "pass", f"{named.name} run independently per eps: {listing}")
    return Check("monotone in eps", "fail", f"{named.name} accuracy rises with eps ({listing}): the attack fails at "
                 "larger eps, a sign of gradient masking or a broken attack")


def large_eps_probe(inputs: CheckInputs) -> Check:
    """At linf eps = half the input range every model should be at about chance. When the
    strongest attack stays above, the audit's gradient attacks whose loss does not saturate
    (DLR, margin) attack what it left: a saturated softmax stops cross-entropy, not them, so
    the probe fails only when none of them reaches chance either."""
    named = _strongest(inputs)
    if named is None:
        return Check("large-eps probe", "warn", "not checked: no iterative or gradient-free attack in the suite")
    low, high = inputs.threat.bounds
    probe = ThreatModel(Norm.LINF, 0.5 * (high - low), inputs.threat.bounds)
    if Norm.LINF not in named.attack.norms:
        return Check("large-eps probe", "warn", f"not checked: {named.name} has no linf mode")
    chance = 1.0 / inputs.num_classes
    others = [a for a in inputs.attacks if a.name != named.name and named.attack.needs_gradients
              and a.attack.needs_gradients and not a.attack.follows_cross_entropy() and Norm.LINF in a.attack.norms]
    standing = _robust_accuracy(inputs, named.attack, probe).cpu()
    accuracy = float(standing.float().mean())
    detail = f"{named.name} at linf {eps_text(probe.eps)} leaves {accuracy:.1%} accuracy"
    for other in others:
        if accuracy <= chance + PROBE_MARGIN:
            break
        index = standing.nonzero().squeeze(1)
        standing[index] = _standing(inputs.model, inputs.x[index], inputs.y[index], other.attack, probe,
                                    inputs.batch_size).cpu()
        accuracy = float(standing.float().mean())
        detail += f", then {other.name} {accuracy:.1%}"
    detail += f" (chance {chance:.1%})"
    if accuracy <= chance + PROBE_MARGIN:
        return Check("large-eps probe", "pass", detail)
    return Check("large-eps probe", "fail" if accuracy > 0.5 else "warn",
                 detail + ": an unbounded attacker should win; gradients are likely masked")


def _stronger_params(params: Any) -> Any | None:
    """Twice the steps and one more restart, for attacks that have those settings."""
    if not dataclasses.is_dataclass(params):
        return None
    names = {f.name for f in dataclasses.fields(params)}
    changes: dict[str, Any] = {}
    for steps_name in ("steps", "max_iter"):
        if steps_name in names:
            changes[steps_name] = 2 * getattr(params, steps_name)
            step_size = getattr(params, "step_size", None)
            if step_size is not None:
                changes["step_size"] = step_size / 2
    for restarts_name in ("restarts", "n_restarts"):
        if restarts_name in names:
            changes[restarts_name] = getattr(params, restarts_name) + 1
    return dataclasses.replace(params, **changes) if changes else None  # type: ignore[type-var]


def convergence(inputs: CheckInputs) -> Check:
    named = inputs.iterative
    if named is None:
        return Check("convergence", "warn", "not checked: no iterative attack in the suite")
    stronger = _stronger_params(named.attack.params)
    if stronger is None:
        return Check("convergence", "warn", f"not checked: {named.name} has no steps/restarts settings")
    base = float(_robust_accuracy(inputs, named.attack, inputs.threat).float().mean())
    strong = float(_robust_accuracy(inputs, type(named.attack)(stronger), inputs.threat).float().mean())
    gap = base - strong
    detail = (f"{named.name} with twice the steps and one more restart: {base:.1%} -> {strong:.1%} "
              f"on {len(inputs.x)} samples at eps {eps_text(inputs.threat.eps)}")
    if base == strong == 1.0:
        return Check("convergence", "untested", detail + ": no sample breaks at this eps, nothing to converge on")
    if gap <= 0.01 + 1e-9:
        return Check("convergence", "pass", detail)
    return Check("convergence", "warn", detail + ": the attack has not converged; raise steps/restarts (-o)")


def confidence(evaluation: Evaluation, worst: list[dict[str, Any]]) -> Check:
    widest = max((r["ci95"][1] - r["ci95"][0] for r in worst), default=0.0)
    detail = f"widest 95% Wilson interval of the worst case: {100 * widest:.1f} points (n = {evaluation.n})"
    too_wide = widest > 0.20
    return Check("confidence", "warn" if too_wide else "pass",
                 detail + (": too few samples for firm numbers; audit more (raise --limit)" if too_wide else ""))


def validity(evaluation: Evaluation) -> Check:
    rejected = {o.name: o.rejected for o in evaluation.outcomes if o.rejected}
    if not rejected:
        return Check("valid examples", "pass",
                     "every adversarial example was in the ball, in the bounds and finite (fp32)")
    listing = ", ".join(f"{k}: {v}" for k, v in rejected.items())
    return Check("valid examples", "warn", f"examples rejected by the fp32 check and not counted ({listing})")


def certificates_hold(model: Model, x: Tensor, y: Tensor, evaluation: Evaluation,
                      attacks: Sequence[NamedAttack | None], samples: int, batch_size: int) -> Check:
    """Attack samples the certifier proved robust, at the largest eps it proved any: none may fall.

    The engine skips proven samples, so a wrong certificate would inflate robust accuracy
    silently; this is the independent test of the proofs the audit relied on. ``attacks``: the
    suite's iterative white-box attack and its gradient-free one, so that a model whose
    gradients mislead does not hide a wrong proof.
    """
    name = "certificates hold"
    if evaluation.certification.startswith("unsupported"):
        return Check(name, "pass", f"no certificates ({evaluation.certification}): every sample was attacked")
    if evaluation.proven is None:
        return Check(name, "pass", "certification off (--no-certify): every sample was attacked")
    proven_to = evaluation.proven_to()
    if not bool((proven_to > 0).any()):
        return Check(name, "pass", "no sample was proven robust at any eps: every sample was attacked")
    attackers = [a for a in attacks if a is not None]
    if not attackers:
        return Check(name, "warn", "not checked: no iterative or gradient-free attack in the suite")
    eps = float(proven_to.max())
    index = (proven_to >= eps).nonzero().squeeze(1)[:samples]
    threat = evaluation.threats[0].with_eps(eps)
    standing = torch.ones(len(index), dtype=torch.bool)
    for named in attackers:
        standing &= _standing(model, x[index], y[index], named.attack, threat, batch_size).cpu()
    broken = int((~standing).sum())
    detail = (f"{' and '.join(a.name for a in attackers)} at eps {eps_text(eps)} broke {broken} of {len(index)} "
              f"samples proven robust ({evaluation.certification})")
    if broken == 0:
        return Check(name, "pass", detail)
    return Check(name, "fail", detail + ": a certificate is wrong for this model; rerun with --no-certify")


def subset_rows(clean_correct: Tensor, size: int, seed: int) -> Tensor:
    """Indices (sorted) of up to ``size`` of the clean-correct samples, chosen with a fixed seed:
    the subset the checks attack."""
    correct = clean_correct.cpu().nonzero().squeeze(1)
    order = torch.randperm(len(correct), generator=torch.Generator().manual_seed(seed))[:size]
    return correct[order].sort().values


def clean_subset(model: Model, x: Tensor, y: Tensor, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Up to ``size`` clean-correct samples, chosen with a fixed seed (``subset_rows``)."""
    index = subset_rows(predict_logits(model, x).argmax(1).cpu() == y.cpu(), size, seed)
    return x[index], y[index]

