"""Embedding-space adversarial training, as steps of robustkit's shared training loop.

Each defence perturbs the word-embedding output (``model.perturbed``: before position
embeddings and LayerNorm, where HotFlip's substitutions act) at real tokens, within a
per-sample Frobenius ball of radius ``--eps`` in units of the batch's mean word-embedding norm
(``robustkit_text.embedding.token_norm``), and writes only its step: the loop gives the
checkpoints, ``--resume``, bf16/fp16, the early stopping and the canary, which for text is
HotFlip with one edit (``TextDefence.canary``). Every pass runs in train mode (dropout on), as
in the reference implementations; the optimizer steps once per batch, on the gradient clipped
to norm 1 (``max_grad_norm``, as BERT fine-tuning does). Cost per batch, in forward-backward
passes: plain 1, FGM 2, PGD-K K+1, FreeLB-K K.

- ``pgd`` (Madry et al. on embeddings): K normalised ascent steps of 2.5 eps / K from zero,
  projected; the update is on the clean plus the adversarial loss, as FGM's, and the clean pass
  also gives the first ascent direction.
- ``fgm`` (Miyato et al., 2017): PGD with K = 1, i.e. the clean loss plus the loss at
  ``eps * g / ||g||_F``.
- ``freelb`` (Zhu et al., 2020): a uniform random start scaled by ``init_mag`` / sqrt(tokens x
  dim), K ascent steps of ``adv_lr * g / ||g||_F`` (both in token norms) projected into eps; the
  parameter gradients of the K passes (each loss divided by K, no clean loss) are accumulated
  and applied in one update, so the adversary costs no extra passes ("free"). As in the
  authors' code (``dp_masks``), the K passes of a batch share one set of dropout masks, so the
  ascent climbs one loss surface rather than K differently thinned networks.

The default ``--eps`` 1 is the reference FGM radius (1.0 on BERT-base, whose tokens have norm
~1.4) in these units, of the order of what one substitution moves a token by (~sqrt(2) token norms).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkit import distributed
from robustkit.data import Dataset
from robustkit.distributed import DistContext
from robustkit.errors import RobustkitError
from robustkit.harden.base import DefenceResult, LoopSupport
from robustkit.harden.config import RunConfig, TrainingParams
from robustkit.harden.defences import TrainingDefence
from robustkit.harden.step import Step, StepContext, adversarial_step
from robustkit.modules import eval_mode, predict_logits
from robustkit.params import param
from robustkit.precision import Precision
from robustkit.threat import Norm, ThreatModel
from robustkit_text.attacks import HotFlip
from robustkit_text.embedding import normalised, pgd, project, token_norm, zeros
from robustkit_text.model import TextClassifier, perturbed

#: The embedding radius when ``--eps`` is not given, in units of the mean token norm.
DEFAULT_EPS = 1.0


@dataclass(frozen=True)
class TextTrainingParams(TrainingParams):
    # Clipping at 1, as BERT fine-tuning does (Hugging Face's run_glue, FreeLB's code), and 10 epochs,
    # for every text defence alike (issue 18; the benchmark's setting on held-out seeds 10-14): FreeLB-3
    # stuck on a one-word shortcut (clean < 95%) on 2 of 5 seeds with 6 epochs, with clipping alone and
    # with 10 epochs alone; with both on none of seeds 10-19, HotFlip accuracy k=1 85% / k=2 52% against
    # plain's 73% / 31% (mean of 10 seeds).
    epochs: int = param(10, "passes over the training split")
    max_grad_norm: float = param(1.0, "clip the global l2 norm of the parameters' gradient to this before each "
                                      "update (0: off); as in BERT fine-tuning, it keeps a fresh tiny BERT, "
                                      "FreeLB's above all, from settling on a one-word shortcut")
    lr: float = param(2e-3, "peak learning rate of the schedule; about 2e-5 for a pretrained BERT")
    augment: str = param("none", "text is not augmented (keep none)")
    stop_on_overfit: bool = param(False, "stop when the canary's robust accuracy falls while clean holds; off for "
                                         "text: HotFlip is not the training attack, and a model that still predicts "
                                         "one class scores robust = clean, so the epoch that starts learning 'falls'")


def _classifier(module: nn.Module) -> TextClassifier:
    inner = getattr(module, "_orig_mod", module)  # torch.compile's wrapper
    if not isinstance(inner, TextClassifier):
        raise RobustkitError("text defences train text classifiers: give a Hugging Face folder (or weights with "
                             "--arch and their tokenizer beside them) and text data (CSV or JSONL)")
    return inner


class TextDefence(TrainingDefence):
    """A training defence for text classifiers; its threat is an l2 (Frobenius) embedding ball."""

    Params: ClassVar[type] = TextTrainingParams
    norms: ClassVar[frozenset[Norm]] = frozenset({Norm.L2})
    loop: ClassVar[LoopSupport] = LoopSupport(channels_last=False, compile=False, awp=False)
    #: The best epoch is the most accurate one (robust accuracy breaks ties): a classifier that
    #: still predicts one class has nothing HotFlip can flip, so robust accuracy alone would
    #: prefer it to every model that has learned something.
    monitor: ClassVar[str] = "val_clean"
    overfit_advice: ClassVar[str] = ("HotFlip is not the training attack, and a model leaving a one-word shortcut "
                                     "can fall on it; audit the kept and the final weights with robustkit audit")

    def apply(self, model: nn.Module, data: Dataset | None, *, threat: ThreatModel,
              run: RunConfig | None = None) -> DefenceResult:
        _classifier(model)
        if data is not None and data.x_train is not None and data.x_train.is_floating_point():
            raise RobustkitError(f"defence {self.name!r} trains on token ids; give text data (CSV or JSONL)")
        return super().apply(model, data, threat=threat, run=run)

    @staticmethod
    def canary(craft: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, params: TrainingParams,
               precision: Precision, world: DistContext, device: torch.device) -> tuple[float, float]:
        """(clean, robust) validation accuracy, robust against HotFlip with one token edit."""
        model = _classifier(craft)
        mine = torch.arange(world.rank, len(x), world.world_size)
        xb, yb = x[mine].to(device), y[mine].to(device)
        with eval_mode(model):
            right = (predict_logits(model, xb).argmax(1) == yb).cpu()
            budgets = right.long()  # only what stands clean is attacked
            broken = HotFlip(beam=1).run(model, xb, yb, budgets).broken_at <= 1
        clean, robust = distributed.sum_over_ranks([int(right.sum()), int((right & ~broken).sum())], world)
        return clean / len(x), robust / len(x)


class Plain(TextDefence):
    """Plain fine-tuning: the baseline, through the same loop, data path and canary."""

    name = "plain"
    summary = "plain fine-tuning of a text classifier (the baseline)"

    def make_step(self, ctx: StepContext) -> Step:
        return adversarial_step(ctx, lambda x, y: x)


def _cross_entropy(ctx: StepContext, x: Tensor, y: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    with ctx.autocast(), perturbed(_classifier(ctx.craft).embedding, delta):
        logits = ctx.model(x).float()
    return F.cross_entropy(logits, y), logits


def _pgd_step(ctx: StepContext, steps: int) -> Step:
    """Clean plus adversarial loss, the adversary K steps of PGD (FGM: K = 1) started from the
    clean pass's embedding gradient, so that pass serves both: K + 1 passes in all."""
    model = _classifier(ctx.craft)

    def step(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        zero = zeros(model, x).requires_grad_(True)
        clean, _ = _cross_entropy(ctx, x, y, zero)
        scale = ctx.optimization.backward(clean)  # the parameters' and the embedding's gradients
        delta = pgd(model, x, y, ctx.threat.eps * token_norm(model, x, ctx.world), steps, grad=zero.grad)
        adversarial, logits = _cross_entropy(ctx, x, y, delta)
        (adversarial * scale).backward()  # accumulated onto the clean loss's gradients
        ctx.optimization.step()
        return (clean + adversarial).detach(), logits.detach()

    return step


class FGM(TextDefence):
    name = "fgm"
    summary = "fast gradient method on the embeddings (Miyato et al., 2017)"

    def make_step(self, ctx: StepContext) -> Step:
        return _pgd_step(ctx, 1)


@dataclass(frozen=True)
class PGDParams(TextTrainingParams):
    steps: int = param(3, "ascent steps K")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 1:
            raise ValueError("steps must be >= 1")


class EmbeddingPGD(TextDefence):
    name = "pgd"
    summary = "PGD-K adversarial training on the embeddings (Madry et al.)"
    Params = PGDParams

    def make_step(self, ctx: StepContext) -> Step:
        return _pgd_step(ctx, self.params.steps)


def _rewinder(device: torch.device) -> Callable[[], None]:
    """Snapshot torch's global generators that dropout on ``device`` draws from (the host's, and
    the GPU's on CUDA); the returned function rewinds them to it, so the next forward pass draws
    the masks the first pass after the snapshot drew, in any unmodified model. Each pass draws
    as much as the first, so the generators end where one pass leaves them: the run's random
    stream after the batch (and so a resumed run's) does not depend on K."""
    host = torch.get_rng_state()
    gpu = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def rewind() -> None:
        torch.set_rng_state(host)
        if gpu is not None:
            torch.cuda.set_rng_state(gpu, device)

    return rewind


@dataclass(frozen=True)
class FreeLBParams(TextTrainingParams):
    # The FreeLB authors' QQP setting (adv-lr 0.2, adv-init-mag 0.32, K = 3; launch/run_glue.sh), read in
    # token norms: the perturbation grows from ~0.17 to ~0.57 over the K passes, inside eps 1. Steps that
    # reach eps 1 by the last pass (0.3, 0.5) left FreeLB, which has no clean loss, stuck at 89% clean
    # validation accuracy on the synthetic reviews (a fresh tiny BERT that follows the first sentiment
    # word; issue 18); at these steps it still stuck there on about half the seeds until the text
    # defaults clipped the gradient and trained 10 epochs (TextTrainingParams).
    steps: int = param(3, "ascent steps K (each also accumulates the parameters' gradient)")
    adv_lr: float = param(0.2, "ascent step on the embeddings (FreeLB's adv-lr), in units of the mean token norm "
                               "like --eps")
    init_mag: float = param(0.3, "scale of the random start (FreeLB's adv-init-mag), in units of the mean token norm")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 1 or self.adv_lr <= 0 or self.init_mag < 0:
            raise ValueError("steps must be >= 1, adv_lr > 0 and init_mag >= 0")


class FreeLB(TextDefence):
    name = "freelb"
    summary = "FreeLB: K ascent steps, parameter gradients accumulated over them (Zhu et al., 2020)"
    Params = FreeLBParams

    def make_step(self, ctx: StepContext) -> Step:
        model, p = _classifier(ctx.craft), self.params

        def step(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            mask = model.editable(x).float()
            unit, dim = token_norm(model, x, ctx.world), model.embedding.embedding_dim
            radius = ctx.threat.eps * unit
            start = torch.rand(*x.shape, dim, device=x.device, generator=ctx.generator) * 2 - 1
            tokens = mask.sum(1).clamp_min(1).view(-1, 1, 1)
            delta = project(start * mask.unsqueeze(-1) * p.init_mag * unit / torch.sqrt(tokens * dim), radius)
            total, scale = torch.zeros((), device=x.device), 1.0
            rewind = _rewinder(ctx.device)
            for t in range(p.steps):
                if t:
                    rewind()  # the dropout masks of the first pass (the reference's dp_masks)
                delta.requires_grad_(True)
                loss, logits = _cross_entropy(ctx, x, y, delta)
                loss = loss / p.steps
                if t == 0:
                    scale = ctx.optimization.backward(loss)
                else:
                    (loss * scale).backward()
                total = total + loss.detach()
                if t < p.steps - 1:
                    assert delta.grad is not None
                    delta = project(delta.detach() + p.adv_lr * unit * normalised(delta.grad, mask), radius)
            ctx.optimization.step()
            return total, logits.detach()

        return step


DEFENCES: tuple[type[TextDefence], ...] = (Plain, FGM, EmbeddingPGD, FreeLB)


def default_threat(eps: float | None) -> ThreatModel:
    """The embedding ball a text defence trains in (bounds do not apply to embeddings)."""
    return ThreatModel(Norm.L2, DEFAULT_EPS if eps is None else eps)


def describe_threat(threat: ThreatModel) -> dict[str, Any]:
    return {"space": "word-embedding output", "norm": "Frobenius (l2 over the sequence), per sample",
            "eps": threat.eps, "unit": "mean word-embedding norm of the batch's real tokens"}
