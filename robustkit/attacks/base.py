"""The attack interface.

An ``Attack`` holds settings only (a frozen ``Params`` dataclass) and receives the model at
call time, as in foolbox 3. Plugins write ``run``; the final ``__call__`` does the work every
attack needs and no plugin should be trusted to repeat: checks the norm, puts the model in
eval mode (restoring each submodule's mode afterwards), runs a CPU conv net in channels-last
(``fast_layout``), projects the result into the eps-ball and the bounds, judges success
in fp32, and refuses a result a plugin's attack obtained by changing the model's weights
(``ModelTampered``).
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, final

import torch
from torch import Tensor, nn

from robustkit.errors import DataError, RobustkitError
from robustkit.modules import Model, eval_mode, fast_layout, predict_logits
from robustkit.params import Configurable
from robustkit.threat import Norm, ThreatModel


@dataclass
class AttackResult:
    x_adv: Tensor  #: adversarial examples, projected into the ball and the bounds
    success: Tensor  #: bool (N,): misclassified (untargeted) or classified as the target
    logits: Tensor  #: fp32 logits of ``x_adv``
    seconds: float

    @property
    def robust_accuracy(self) -> float:
        """Share of samples the attack did not fool (clean mistakes count as fooled)."""
        return float((~self.success).float().mean()) if len(self.success) else float("nan")


def is_success(logits: Tensor, labels: Tensor, targeted: bool) -> Tensor:
    """Untargeted: predicted class differs from the label; targeted: equals the target."""
    predicted = logits.argmax(dim=1)
    return predicted == labels if targeted else predicted != labels


def default_targets(logits: Tensor, y: Tensor) -> Tensor:
    """The most likely wrong class at the clean input: the usual target when none is given."""
    masked = logits.detach().float().clone()
    masked.scatter_(1, y.view(-1, 1), float("-inf"))
    return masked.argmax(dim=1)


#: Attacks defined in this package are robustkit's own, held to the contract by its tests.
_CORE_PACKAGE = "robustkit."


class ModelTampered(RobustkitError):
    """An attack changed the model's parameters or buffers: its result does not count, and the
    caller restores the weights it saved (the audit engine does, then goes on without it)."""


def weights_fingerprint(model: Model) -> Tensor | None:
    """Where each parameter and buffer lives and the float64 sum of its values: any in-place
    change (zeroing, scaling, a loaded state) shows, at the cost of one pass over the weights.
    None for a predict function without weights."""
    if not isinstance(model, nn.Module):
        return None
    tensors = [*model.parameters(), *model.buffers()]
    if not tensors:
        return None
    with torch.no_grad():
        sums = torch.stack([t.detach().double().sum() for t in tensors]).cpu()
    places = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.float64)
    return torch.cat([places, sums])


class Attack(Configurable, ABC):
    """Base class of every attack, native or wrapped."""

    norms: ClassVar[frozenset[Norm]]
    supports_targeted: ClassVar[bool] = True
    needs_gradients: ClassVar[bool] = True
    #: ``run`` takes ``radii``: one call attacks each sample in a ball of its own radius, so the
    #: engine can attack every eps of an audit in one run. That pays for a score-based attack,
    #: whose per-query overhead a small batch at each eps would pay once per eps.
    per_sample_eps: ClassVar[bool] = False
    #: ``run`` searches for each sample's smallest adversarial perturbation (and takes
    #: ``radii``): the norm of what it finds settles the sample at every eps at once, so the
    #: engine runs it once per sample, in the ball of the largest eps where the sample stands.
    minimum_norm: ClassVar[bool] = False
    #: The loss its gradient steps follow when the attack fixes it ("dlr", "margin", "ce"); None:
    #: its ``loss`` parameter says, else cross-entropy is assumed (``follows_cross_entropy``).
    fixed_loss: ClassVar[str | None] = None

    def follows_cross_entropy(self) -> bool:
        """Whether its gradient steps follow cross-entropy, whose gradient vanishes when the softmax
        saturates (huge logits); DLR and margin losses keep one at any scale of the logits. An
        attack that names no loss counts as cross-entropy, so a check relying on this errs toward
        failing."""
        return (self.fixed_loss or getattr(self.params, "loss", "ce")) not in ("dlr", "margin")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"

    @abstractmethod
    def run(self, model: Model, x: Tensor, labels: Tensor, threat: ThreatModel) -> Tensor:
        """Return adversarial examples for ``x``.

        ``labels`` are the true classes, or the target classes when ``threat.targeted``.
        The model is already in eval mode. The result need not be projected: ``__call__``
        projects it into the ball and bounds, so an attack cannot cheat by leaving them.
        An attack with ``per_sample_eps`` or ``minimum_norm`` also takes ``radii``, a float64 tensor (N,) of each
        sample's radius, none above ``threat.eps``, and must then use it instead of ``threat.eps``.
        """

    @final
    def __call__(
        self, model: Model, x: Tensor, y: Tensor, *, threat: ThreatModel, targets: Tensor | None = None,
        radii: Tensor | None = None,
    ) -> AttackResult:
        """Attack ``x`` within ``threat``; with ``radii`` (N,), each sample within its own radius
        (at most ``threat.eps``; only for attacks with ``per_sample_eps``)."""
        if threat.norm not in self.norms:
            supported = ", ".join(sorted(n.value for n in self.norms))
            raise RobustkitError(
                f"attack {self.name!r} does not support the {threat.norm.value} norm; it supports: {supported}"
            )
        if threat.targeted and not self.supports_targeted:
            raise RobustkitError(f"attack {self.name!r} has no targeted mode; drop --targeted")
        _check_batch(x, y, threat)
        if radii is not None:
            radii = self._check_radii(radii, len(x), threat)
        y = y.long()  # int32 labels are accepted; losses and scatter need int64 indices
        if not len(x):  # nothing to attack (a filtered batch came out empty): the model is not asked
            return AttackResult(x.clone(), torch.zeros(0, dtype=torch.bool, device=x.device),
                                torch.empty(0, 0, device=x.device), 0.0)
        start = time.perf_counter()
        with eval_mode(model), fast_layout(model, x) as x_run:
            if threat.targeted and targets is None:
                targets = default_targets(predict_logits(model, x_run), y)
            labels = targets.long() if threat.targeted and targets is not None else y
            # robustkit's own attacks are not fingerprinted: the check costs two passes over the
            # weights per call, on the hot path of training's inner attack; guests are checked
            guest = not type(self).__module__.startswith(_CORE_PACKAGE)
            before = weights_fingerprint(model) if guest else None
            raw = self.run(model, x_run, labels, threat) if radii is None else self.run(  # type: ignore[call-arg]
                model, x_run, labels, threat, radii=radii.to(x.device))
            after = weights_fingerprint(model) if guest else None
            if before is not None and (after is None or not torch.equal(before.nan_to_num(), after.nan_to_num())):
                raise ModelTampered(
                    f"attack {self.name!r} changed the model's weights while attacking; its result is not counted"
                )
            if raw.shape != x.shape:
                raise RobustkitError(
                    f"attack {self.name!r} returned shape {tuple(raw.shape)} for inputs of shape {tuple(x.shape)}"
                )
            x_adv = threat.project(x_run, raw.detach().to(device=x.device, dtype=x.dtype), radii=radii)
            logits = predict_logits(model, x_adv).to(x.device)
        if x.is_contiguous():
            x_adv = x_adv.contiguous()  # hand back the caller's layout
        success = is_success(logits, labels, threat.targeted)
        return AttackResult(x_adv, success, logits, time.perf_counter() - start)

    def _check_radii(self, radii: Tensor, n: int, threat: ThreatModel) -> Tensor:
        if not (self.per_sample_eps or self.minimum_norm):
            raise RobustkitError(f"attack {self.name!r} takes one eps per call, not one per sample")
        radii = radii.detach().cpu().double()
        if radii.shape != (n,) or not bool(((radii >= 0) & (radii <= threat.eps)).all()):
            raise DataError(f"radii must have shape ({n},) and lie in [0, {threat.eps:g}] (the threat's eps)")
        return radii


def _check_batch(x: Tensor, y: Tensor, threat: ThreatModel) -> None:
    if not torch.is_floating_point(x):
        raise DataError(f"inputs must be floating point in the bounds {threat.bounds}, got {x.dtype}")
    if y.dim() != 1 or len(y) != len(x):
        raise DataError(f"labels must have shape ({len(x)},), got {tuple(y.shape)}")
    if y.dtype not in (torch.int64, torch.int32):
        raise DataError(f"labels must be integer class indices, got {y.dtype}")
    if len(x):
        low, high = threat.bounds
        x_min, x_max = float(x.min()), float(x.max())
        if x_min < low - 1e-6 or x_max > high + 1e-6:
            raise DataError(
                f"inputs span [{x_min:.3g}, {x_max:.3g}], outside the bounds {threat.bounds}; "
                "scale them into the bounds and put normalisation inside the model (--mean/--std)"
            )
