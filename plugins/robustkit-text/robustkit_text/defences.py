"""Embedding-space adversarial training, as steps of robustkit's shared training loop.

Each defence perturbs the word-embedding output (``model.perturbed``) within a per-sample
Frobenius ball whose radius is the run's eps (``--eps``; ``robustkit_text.embedding``), and
writes only its step: the loop gives the checkpoints, ``--resume``, bf16/fp16, the early
stopping and the canary, which for text is HotFlip with one edit (``TextDefence.canary``).
Cost per batch, in forward-backward passes: plain 1, FGM 2, PGD-K K+1, FreeLB-K K.

- ``fgm`` (Miyato et al., 2017): the clean loss's backward also gives the embedding gradient
  g; the step adds the loss at ``eps * g / ||g||_F`` and updates on both.
- ``pgd`` (Madry et al. on embeddings): K normalised ascent steps of 2.5 eps / K, projected,
  crafted in eval mode as robustkit's image defences are; the update is on the adversarial
  loss alone.
- ``freelb`` (Zhu et al., 2020): a random start of norm ``init_mag`` (uniform, scaled by
  1 / sqrt(tokens x dim)), K ascent steps of ``adv_lr * g / ||g||_F`` projected into eps; the
  parameter gradients of the K passes (each loss divided by K) are accumulated and applied in
  one update, so the adversary costs no extra passes ("free").
"""
from __future__ import annotations

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
from robustkit_text.embedding import normalised, pgd, project
from robustkit_text.model import TextClassifier, perturbed

#: The embedding radius when ``--eps`` is not given (Frobenius norm over the sequence).
DEFAULT_EPS = 0.03


@dataclass(frozen=True)
class TextTrainingParams(TrainingParams):
    epochs: int = param(6, "passes over the training split")
    lr: float = param(2e-3, "peak learning rate of the schedule; about 2e-5 for a pretrained BERT")
    augment: str = param("none", "text is not augmented (keep none)")


def _classifier(module: nn.Module) -> TextClassifier:
    inner = getattr(module, "_orig_mod", module)  # torch.compile's wrapper
    if not isinstance(inner, TextClassifier):
        raise RobustkitError("text defences train text classifiers: give a Hugging Face folder and text data "
                             "(CSV or JSONL)")
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


class FGM(TextDefence):
    name = "fgm"
    summary = "fast gradient method on the embeddings (Miyato et al., 2017)"

    def make_step(self, ctx: StepContext) -> Step:
        eps, model = ctx.threat.eps, _classifier(ctx.craft)

        def step(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            mask = model.editable(x).float()
            delta = torch.zeros(*x.shape, model.embedding.embedding_dim, device=x.device, requires_grad=True)
            clean, _ = _cross_entropy(ctx, x, y, delta * mask.unsqueeze(-1))
            scale = ctx.optimization.backward(clean)  # the parameters' and the embedding's gradients
            assert delta.grad is not None
            adversarial, logits = _cross_entropy(ctx, x, y, eps * normalised(delta.grad, mask))
            (adversarial * scale).backward()  # accumulated onto the clean loss's gradients
            ctx.optimization.step()
            return (clean + adversarial).detach(), logits.detach()

        return step


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
        model, p = _classifier(ctx.craft), self.params

        def step(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            with eval_mode(model):
                delta = pgd(model, x, y, ctx.threat.eps, p.steps)
            loss, logits = _cross_entropy(ctx, x, y, delta)
            ctx.update(loss)
            return loss.detach(), logits.detach()

        return step


@dataclass(frozen=True)
class FreeLBParams(TextTrainingParams):
    steps: int = param(3, "ascent steps K (each also accumulates the parameters' gradient)")
    adv_lr: float = param(0.05, "ascent step on the embeddings (FreeLB's adv-lr), in the units of --eps")
    init_mag: float = param(0.05, "norm of the random start (FreeLB's adv-init-mag)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 1 or self.adv_lr <= 0 or self.init_mag < 0:
            raise ValueError("steps must be >= 1, adv_lr > 0 and init_mag >= 0")


class FreeLB(TextDefence):
    name = "freelb"
    summary = "FreeLB: K ascent steps, parameter gradients accumulated over them (Zhu et al., 2020)"
    Params = FreeLBParams

    def make_step(self, ctx: StepContext) -> Step:
        model, p, eps = _classifier(ctx.craft), self.params, ctx.threat.eps

        def step(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            mask = model.editable(x).float()
            dim = model.embedding.embedding_dim
            start = torch.rand(*x.shape, dim, device=x.device, generator=ctx.generator) * 2 - 1
            tokens = mask.sum(1).clamp_min(1).view(-1, 1, 1)
            delta = start * mask.unsqueeze(-1) * p.init_mag / torch.sqrt(tokens * dim)
            total, scale = torch.zeros((), device=x.device), 1.0
            for t in range(p.steps):
                delta.requires_grad_(True)
                loss, logits = _cross_entropy(ctx, x, y, delta)
                loss = loss / p.steps
                if t == 0:
                    scale = ctx.optimization.backward(loss)
                else:
                    (loss * scale).backward()
                assert delta.grad is not None
                delta = project(delta.detach() + p.adv_lr * normalised(delta.grad, mask), eps)
                total = total + loss.detach()
            ctx.optimization.step()
            return total, logits.detach()

        return step


DEFENCES: tuple[type[TextDefence], ...] = (Plain, FGM, EmbeddingPGD, FreeLB)


def default_threat(eps: float | None) -> ThreatModel:
    """The embedding ball a text defence trains in (bounds do not apply to embeddings)."""
    return ThreatModel(Norm.L2, DEFAULT_EPS if eps is None else eps)


def describe_threat(threat: ThreatModel) -> dict[str, Any]:
    return {"space": "word-embedding output", "norm": "Frobenius (l2 over the sequence), per sample",
            "eps": threat.eps}
