"""The built-in training defences. Each is a ``Params`` dataclass and a *step*; the shared
loop (``robustkit.harden.loop``) does everything else.

Cost per batch, in forward-backward passes: plain training 1; ``fgsm-rs`` and ``atta`` 2;
``free`` 1 per replay (so the same as plain training per pass over the data); ``pgd-at`` K+1
(plus one forward to check the attack's examples); ``trades`` K+2.
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkit import distributed
from robustkit.attacks.base import Attack
from robustkit.attacks.native import ascent_step, random_start
from robustkit.data import Dataset
from robustkit.distributed import DistContext
from robustkit.errors import RobustkitError
from robustkit.harden.base import Defence, DefenceResult
from robustkit.harden.canary import canary as ball_canary
from robustkit.harden.config import RunConfig, TrainingParams
from robustkit.harden.loop import train
from robustkit.harden.step import Step, StepContext, adversarial_step, cross_entropy_loss
from robustkit.modules import eval_mode
from robustkit.params import coerce, param
from robustkit.precision import Precision
from robustkit.threat import Norm, ThreatModel


class TrainingDefence(Defence):
    """A defence that trains: ``make_step`` says how one batch is used, the loop does the rest."""

    kind = "training"
    Params: ClassVar[type] = TrainingParams
    norms: ClassVar[frozenset[Norm]] = frozenset({Norm.LINF, Norm.L2})
    #: The validation accuracy that picks the best epoch (and drives early stopping).
    monitor: ClassVar[str] = "val_robust"
    #: What to do about catastrophic overfitting, said in the canary's note.
    overfit_advice: ClassVar[str] = "lower the step size or lr, use a random start, or use pgd-at"

    @property
    def replays(self) -> int:
        """Optimizer steps taken per batch; the loop runs ceil(epochs / replays) rounds."""
        return 1

    def check(self, threat: ThreatModel) -> None:
        """Refuse a threat model this defence cannot train against, before any work is done."""
        if threat.norm not in self.norms:
            supported = ", ".join(sorted(n.value for n in self.norms))
            raise RobustkitError(f"defence {self.name!r} trains against {supported}; not {threat.norm.value}")
        if threat.targeted:
            raise RobustkitError(f"defence {self.name!r} trains against untargeted attacks; drop --targeted")

    @abstractmethod
    def make_step(self, ctx: StepContext) -> Step:
        """The training step for one run (it may keep state across batches in ``ctx.carry``)."""

    def canary(self, craft: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, params: TrainingParams,
               precision: Precision, world: DistContext, device: torch.device) -> tuple[float, float]:
        """(clean, robust) validation accuracy after each epoch: a few-step PGD in the threat's
        ball (``harden.canary``). A defence whose threat is not a ball (text edits) overrides it."""
        return ball_canary(craft, x, y, threat, params, precision, world, device)

    def apply(
        self,
        model: nn.Module,
        data: Dataset | None,
        *,
        threat: ThreatModel,
        run: RunConfig | None = None,
    ) -> DefenceResult:
        if data is None:
            raise RobustkitError(f"defence {self.name!r} trains the model: it needs a data set with a training split")
        self.check(threat)
        return train(self, model, data, threat, run)


class Standard(TrainingDefence):
    """Plain training on clean inputs: the baseline the defences are measured against.

    Not registered (it is no defence); benchmarks and tests use it so that the baseline runs
    through the same loop, with the same data path, canary and overheads.
    """

    name = "standard"
    summary = "plain (non-adversarial) training"
    monitor = "val_clean"

    def make_step(self, ctx: StepContext) -> Step:
        return adversarial_step(ctx, lambda x, y: x)


@dataclass(frozen=True)
class PGDATParams(TrainingParams):
    attack: str = param("robustkit:pgd", "inner maximiser: any registered attack (--attack)")
    steps: int = param(7, "attack steps (passed to attacks that have a 'steps' setting)")
    step_size: float | None = param(
        None, "attack step in input units (for attacks that have one); default 2.5 * eps / steps"
    )


class PGDAT(TrainingDefence):
    """Madry et al. (2018): train on the examples of a multi-step attack, by default PGD.

    The inner maximiser is resolved in the attack registry, so any registered attack works
    (``--attack torchattacks:pgd``). It is called through ``Attack.__call__``, which crafts with
    the model in eval mode and projects into the eps-ball, whoever wrote the attack. Settings
    the attack has are set for training: ``steps``, ``step_size``, a random start, the last
    (highest-loss) iterate rather than the first that fooled, the run's precision, and a fresh
    seed per step.
    """

    name = "pgd-at"
    aliases = ("madry",)
    Params = PGDATParams
    summary = "Madry PGD adversarial training; any registered attack as the inner maximiser"

    def _attack_class(self) -> type[Attack]:
        from robustkit.plugin.host import get_host

        cls: type[Attack] = get_host().attacks.resolve(self.params.attack).obj
        return cls

    def check(self, threat: ThreatModel) -> None:
        super().check(threat)
        cls = self._attack_class()
        if threat.norm not in cls.norms:
            supported = ", ".join(sorted(n.value for n in cls.norms))
            raise RobustkitError(
                f"attack {self.params.attack!r} supports {supported}, not {threat.norm.value}; "
                "pick another --attack or --threat"
            )

    def inner_attack(self, precision: Precision) -> Attack:
        cls = self._attack_class()
        p: PGDATParams = self.params
        wanted: dict[str, Any] = {
            "steps": p.steps,
            "step_size": p.step_size,
            "random_start": True,
            "early_stop": False,
            "last_iterate": True,
            "precision": precision,
        }
        fields = {f.name for f in dataclasses.fields(cls.Params)}
        chosen = {k: v for k, v in wanted.items() if k in fields and v is not None}  # None: the attack's default
        return cls(coerce(cls.Params, chosen, owner=p.attack))

    def make_step(self, ctx: StepContext) -> Step:
        attack = self.inner_attack(ctx.precision)
        cls, settings = type(attack), attack.params
        seeded = "seed" in {f.name for f in dataclasses.fields(settings)}

        def perturb(x: Tensor, y: Tensor) -> Tensor:
            current = cls(dataclasses.replace(settings, seed=ctx.step_seed())) if seeded else attack
            return current(ctx.craft, x, y, threat=ctx.threat).x_adv

        return adversarial_step(ctx, perturb)


@dataclass(frozen=True)
class FGSMRSParams(TrainingParams):
    step_factor: float = param(1.25, "FGSM step as a multiple of eps (Wong et al. use 1.25)")
    random_start: bool = param(
        True,
        "start from a uniform point of the eps-ball; without it FGSM training is prone to catastrophic overfitting",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.step_factor <= 0:
            raise ValueError("step_factor must be > 0")


def _cross_entropy_sum(y: Tensor) -> Any:
    return lambda logits: F.cross_entropy(logits, y, reduction="sum")


class FGSMRS(TrainingDefence):
    """Fast adversarial training (Wong et al., 2020): one FGSM step of 1.25 eps from a random
    point of the ball, with a cyclic learning rate. Crafted in eval mode, like PGD-AT.

    It costs two forward-backward passes per batch; its known failure, catastrophic
    overfitting, is what the loop's canary watches for.
    """

    name = "fgsm-rs"
    aliases = ("fast-at",)
    Params = FGSMRSParams
    summary = "fast adversarial training: FGSM from a random start, cyclic lr (Wong et al., 2020)"

    def make_step(self, ctx: StepContext) -> Step:
        p: FGSMRSParams = self.params
        threat = ctx.threat

        def perturb(x: Tensor, y: Tensor) -> Tensor:
            start = random_start(x, threat, ctx.generator) if p.random_start else x
            with eval_mode(ctx.craft):
                grad = ctx.input_gradient(start, _cross_entropy_sum(y))
            return threat.project(x, start + ascent_step(grad, threat.norm, p.step_factor * threat.eps))

        return adversarial_step(ctx, perturb)


@dataclass(frozen=True)
class ATTAParams(TrainingParams):
    steps: int = param(1, "attack steps per batch (ATTA-K); each continues where the last epoch left off")
    step_factor: float = param(1.0, "attack step as a multiple of eps")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 1 or self.step_factor <= 0:
            raise ValueError("steps must be >= 1 and step_factor > 0")


class ATTA(TrainingDefence):
    """Adversarial training with transferable adversarial examples (Zheng et al., 2020).

    Each sample's perturbation is kept from one epoch to the next and advanced by one FGSM
    step per visit, starting from a random point of the ball on the first. The model changes
    little between epochs, so the examples keep their strength and the attack accumulates:
    after k epochs a sample has had k steps, as from a k-step PGD, at the cost of fgsm-rs
    (two forward-backward passes per batch). The perturbations (one per training sample, the
    size of the training split) live with the training data, on the device when it fits there
    and on the host otherwise, and go into every checkpoint, so a resumed run continues them.
    Under torchrun the processes exchange their batches' perturbations after each step (an
    all-gather the size of a batch), so each holds them all and a sample keeps its attack when
    the sampler deals it to another process.
    """

    name = "atta"
    aliases = ("atta-k",)
    Params = ATTAParams
    summary = "FGSM steps that carry each sample's perturbation across epochs (Zheng et al., 2020)"

    def make_step(self, ctx: StepContext) -> Step:
        p: ATTAParams = self.params
        threat = ctx.threat

        def perturb(x: Tensor, y: Tensor) -> Tensor:
            assert ctx.batch_index is not None, "the loop sets batch_index before each step"
            home = ctx.batch_index.device  # where the training data lives
            store = ctx.carry.get("perturbation")
            if store is None or store.shape[1:] != x.shape[1:]:
                # NaN marks a sample not perturbed yet
                store = torch.full((ctx.train_size, *x.shape[1:]), float("nan"), device=home, dtype=x.dtype)
                ctx.carry["perturbation"] = store
            elif store.device != home:  # a resumed run restores carried state on the training device
                store = ctx.carry["perturbation"] = store.to(home)
            carried = store[ctx.batch_index].to(x.device, non_blocking=True)
            fresh = random_start(x, threat, ctx.generator)
            x_adv = torch.where(torch.isnan(carried), fresh, threat.project(x, x + carried.nan_to_num()))
            with eval_mode(ctx.craft):
                for _ in range(p.steps):
                    grad = ctx.input_gradient(x_adv, _cross_entropy_sum(y))
                    x_adv = threat.project(x, x_adv + ascent_step(grad, threat.norm, p.step_factor * threat.eps))
            index, delta = ctx.batch_index, x_adv - x
            if ctx.world.enabled:  # every process keeps every sample's perturbation
                index = distributed.gather_tensors(index, ctx.world)
                delta = distributed.gather_tensors(delta, ctx.world)
            store[index] = delta.to(home)
            return x_adv

        return adversarial_step(ctx, perturb)


@dataclass(frozen=True)
class FreeParams(TrainingParams):
    replays: int = param(
        4,
        "times each minibatch is replayed (m); 'epochs' counts passes, so the run "
        "makes ceil(epochs / m) rounds over the data",
    )
    step_size: float | None = param(None, "perturbation step per replay, in input units; default eps")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.replays < 1:
            raise ValueError("replays must be >= 1")


class Free(TrainingDefence):
    """Free adversarial training (Shafahi et al., 2019): each minibatch is replayed m times and
    one backward pass gives both the weight gradient and the input gradient that moves the
    perturbation, which carries over to the next minibatch.

    Crafting happens in *train* mode, deliberately: the example of replay i+1 comes from the
    same forward-backward pass that trains on replay i, so an eval-mode pass would be a second
    pass and forfeit the method's point (the cost of plain training). Under DDP that pass runs
    through the wrapper, since it is the training pass.
    """

    name = "free"
    aliases = ("free-at",)
    Params = FreeParams
    summary = "free adversarial training with minibatch replays (Shafahi et al., 2019)"

    @property
    def replays(self) -> int:
        return int(self.params.replays)

    def make_step(self, ctx: StepContext) -> Step:
        p: FreeParams = self.params
        threat = ctx.threat
        size = p.step_size if p.step_size is not None else threat.eps

        def step(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            delta = ctx.carry.get("delta")
            if delta is None or delta.shape[1:] != x.shape[1:] or len(delta) < len(x):
                delta = torch.zeros_like(x)
            delta = delta[: len(x)]
            for _ in range(p.replays):
                x_adv = threat.project(x, x + delta).requires_grad_(True)
                loss, logits, scale = ctx.train(cross_entropy_loss, x, x_adv, y)
                assert x_adv.grad is not None
                grad = x_adv.grad.float() / scale
                moved = threat.project(x, x_adv.detach() + ascent_step(grad, threat.norm, size)) - x
                # fp16: a step whose gradients overflowed is skipped by the scaler; skip it here too
                delta = torch.where(torch.isfinite(grad), moved, delta)
            ctx.carry["delta"] = delta
            return loss.detach(), logits.detach()

        return step


@dataclass(frozen=True)
class TRADESParams(TrainingParams):
    beta: float = param(6.0, "weight of the robustness (KL) term against the clean cross-entropy")
    steps: int = param(10, "steps of the inner KL maximisation")
    step_size: float | None = param(None, "inner step in input units; default 2.5 * eps / steps")
    awp_warmup: int = param(10, "epochs before AWP starts (Wu et al.'s TRADES-AWP code: 10 of 200)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 1 or self.beta < 0:
            raise ValueError("steps must be >= 1 and beta >= 0")


class TRADES(TrainingDefence):
    """TRADES (Zhang et al., 2019): clean cross-entropy plus beta times the KL divergence between
    the predictions at the clean input and at the point of the ball that maximises it.

    The inner maximisation starts 0.001-Gaussian close to the input, as in the paper, and runs
    in eval mode (the paper's code does the same).
    """

    name = "trades"
    Params = TRADESParams
    summary = "TRADES: clean CE + beta * KL(clean || adversarial) (Zhang et al., 2019)"

    def make_step(self, ctx: StepContext) -> Step:
        p: TRADESParams = self.params
        threat = ctx.threat
        size = p.step_size if p.step_size is not None else 2.5 * threat.eps / p.steps

        def perturb(x: Tensor, y: Tensor) -> Tensor:
            noise = torch.randn(x.shape, generator=ctx.generator, device=x.device, dtype=x.dtype)
            x_adv = threat.project(x, x + 0.001 * noise)
            with eval_mode(ctx.craft):
                with torch.no_grad(), ctx.autocast():
                    clean = F.softmax(ctx.craft(x).float(), dim=1)

                def divergence(logits: Tensor) -> Tensor:
                    return F.kl_div(F.log_softmax(logits, dim=1), clean, reduction="sum")

                for _ in range(p.steps):
                    grad = ctx.input_gradient(x_adv, divergence)
                    x_adv = threat.project(x, x_adv + ascent_step(grad, threat.norm, size))
            return x_adv

        def loss(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            clean, adversarial = model(x).float(), model(x_adv).float()
            robust = F.kl_div(F.log_softmax(adversarial, dim=1), F.softmax(clean, dim=1), reduction="batchmean")
            return F.cross_entropy(clean, y) + p.beta * robust, adversarial

        return adversarial_step(ctx, perturb, loss)


#: The registered training defences (``robustkit defences list``).
DEFENCES: tuple[type[TrainingDefence], ...] = (PGDAT, FGSMRS, ATTA, Free, TRADES)
