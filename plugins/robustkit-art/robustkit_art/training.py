"""ART's adversarial trainers as robustkit ``training`` defences.

One adapter, ``ArtTrainer.apply``, trains a copy of the model (the caller's stays as it was)
on ``data.x_train`` with SGD (momentum 0.9) through ART's ``PyTorchClassifier``, under the
same conventions as the attacks: clip values from the threat model, no preprocessing, labels
one-hot, numpy and torch seeded from ``seed``. The subclasses only build ART's trainer.
"""
from __future__ import annotations

import copy
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from robustkit import OWN_LOOP, Dataset, Defence, DefenceResult, Norm, RobustkitError, RunConfig, ThreatModel
from robustkit.data import float_inputs
from robustkit.params import param
from robustkit_art.attacks import (
    ART_NORMS,
    ArtParams,
    batch_size_param,
    cuda_device,
    model_device,
    seed_param,
    seeded,
    white_box_classifier,
)


@dataclass(frozen=True)
class TrainingParams(ArtParams):
    epochs: int = param(10, "passes over the training split")
    learning_rate: float = param(0.05, "SGD learning rate (momentum 0.9)")
    batch_size: int = batch_size_param()
    seed: int = seed_param()


@dataclass(frozen=True)
class PGDTrainingParams(TrainingParams):
    steps: int = param(7, "steps of the inner PGD attack")
    step_size: float | None = param(None, "inner PGD step in input units; default 2.5 * eps / steps")


@dataclass(frozen=True)
class TradesParams(PGDTrainingParams):
    beta: float = param(6.0, "weight of the robustness (KL) term against the clean loss")


@dataclass(frozen=True)
class AWPParams(TradesParams):
    zero_ok: ClassVar[frozenset[str]] = frozenset({"seed", "warmup"})

    gamma: float = param(0.01, "relative size of the adversarial weight perturbation")
    mode: Literal["pgd", "trades"] = param("pgd", "loss the weights are perturbed against")
    warmup: int = param(0, "epochs before the weights are perturbed")


class ArtTrainer(Defence):
    """The one adapter behind every ART adversarial trainer; subclasses build the trainer."""

    kind = "training"
    loop = OWN_LOOP  # ART's trainer.fit runs the epochs: no canary, checkpoints or torchrun
    Params = TrainingParams
    norms: ClassVar[frozenset[Norm]] = frozenset({Norm.LINF})
    art_class: ClassVar[str]  #: class name in ``art.defences.trainer``

    @abstractmethod
    def build(self, classifier: Any, threat: ThreatModel, proxy: Callable[[], Any]) -> Any:
        """ART's trainer for ``classifier``; ``proxy()`` gives a classifier over a copy."""

    def step_size(self, threat: ThreatModel) -> float:
        p = self.params
        return float(p.step_size) if p.step_size is not None else 2.5 * threat.eps / p.steps

    def inner_pgd(self, classifier: Any, threat: ThreatModel) -> Any:
        """The PGD attack that TRADES and AWP train against."""
        from art.attacks.evasion import ProjectedGradientDescent

        p = self.params
        return ProjectedGradientDescent(
            classifier, norm=ART_NORMS[threat.norm], eps=threat.eps,
            eps_step=self.step_size(threat), max_iter=p.steps, num_random_init=1,
            batch_size=p.batch_size, verbose=False,
        )

    def check(self, threat: ThreatModel) -> None:
        if threat.norm not in self.norms:
            supported = ", ".join(sorted(n.value for n in self.norms))
            raise RobustkitError(
                f"art:{self.name} trains against {supported} only, not {threat.norm}; "
                "use art:trades or art:awp for l2"
            )
        if threat.targeted:
            raise RobustkitError(f"art:{self.name} trains against untargeted attacks; drop --targeted")

    def apply(
        self, model: nn.Module, data: Dataset | None, *, threat: ThreatModel, run: RunConfig | None = None
    ) -> DefenceResult:
        """Train a copy on ``data.x_train`` in ART's loop; of ``run`` only the defaults are
        supported (``loop`` says so, and ``robustkit harden`` refuses the rest)."""
        p = self.params
        self.check(threat)
        refused = self.loop.refusals(run or RunConfig(), 1)
        if refused:
            raise RobustkitError(f"art:{self.name} trains in ART's own loop, which cannot honour {', '.join(refused)}")
        if not isinstance(model, nn.Module):
            raise RobustkitError(f"art:{self.name} trains torch models; this one has no weights")
        if data is None or data.x_train is None or data.y_train is None:
            raise RobustkitError(f"art:{self.name} trains on a data set with a training split")
        trained = copy.deepcopy(model)
        device = model_device(trained)
        x = float_inputs(data.x_train.detach().cpu()).to(torch.float32).numpy()  # uint8 storage as [0, 1]
        with torch.no_grad():
            nb_classes = int(trained.eval()(torch.from_numpy(x[:1]).to(device)).shape[1])
        y = np.eye(nb_classes, dtype=np.float32)[data.y_train.cpu().numpy()]

        def make_classifier(net: nn.Module) -> Any:
            optimizer = torch.optim.SGD(net.parameters(), lr=p.learning_rate, momentum=0.9)
            return white_box_classifier(net, tuple(x.shape[1:]), nb_classes, threat, device,
                                        optimizer=optimizer)

        with seeded(p.seed, device), cuda_device(device):
            classifier = make_classifier(trained)
            trainer = self.build(classifier, threat, lambda: make_classifier(copy.deepcopy(trained)))
            trainer.fit(x, y, nb_epochs=p.epochs, batch_size=p.batch_size)
        note = (f"adversarially trained by ART's {self.art_class} for {p.epochs} epochs against "
                f"{threat}; ART keeps no per-epoch history")
        return DefenceResult(trained.eval(), notes=[note])


class MadryPGD(ArtTrainer):
    """PGD adversarial training (Madry et al.): train on PGD examples only."""

    name = "madry-pgd"
    aliases = ("pgd-at",)
    Params = PGDTrainingParams
    art_class = "AdversarialTrainerMadryPGD"
    summary = "ART's AdversarialTrainerMadryPGD: train on linf PGD examples (Madry et al., 2018)"

    def build(self, classifier: Any, threat: ThreatModel, proxy: Callable[[], Any]) -> Any:
        from art.defences.trainer import AdversarialTrainerMadryPGD

        p = self.params
        return AdversarialTrainerMadryPGD(
            classifier, nb_epochs=p.epochs, batch_size=p.batch_size, eps=threat.eps,
            eps_step=self.step_size(threat), max_iter=p.steps, num_random_init=1,
        )


class FastFGSM(ArtTrainer):
    """'Fast is better than free' (Wong et al.): FGSM from a random start, cyclic rate."""

    name = "fbf"
    aliases = ("fast-at",)
    art_class = "AdversarialTrainerFBFPyTorch"
    summary = "ART's AdversarialTrainerFBFPyTorch: FGSM with random starts (Wong et al., 2020)"

    def build(self, classifier: Any, threat: ThreatModel, proxy: Callable[[], Any]) -> Any:
        from art.defences.trainer import AdversarialTrainerFBFPyTorch

        return AdversarialTrainerFBFPyTorch(classifier, eps=threat.eps)


class Trades(ArtTrainer):
    """TRADES (Zhang et al.): clean loss plus beta times the KL to the adversarial output."""

    name = "trades"
    Params = TradesParams
    norms = frozenset({Norm.LINF, Norm.L2})
    art_class = "AdversarialTrainerTRADESPyTorch"
    summary = "ART's AdversarialTrainerTRADESPyTorch (Zhang et al., 2019)"

    def build(self, classifier: Any, threat: ThreatModel, proxy: Callable[[], Any]) -> Any:
        from art.defences.trainer import AdversarialTrainerTRADESPyTorch

        return AdversarialTrainerTRADESPyTorch(
            classifier, self.inner_pgd(classifier, threat), beta=self.params.beta
        )


class AWP(ArtTrainer):
    """Adversarial weight perturbation (Wu et al.) on top of PGD or TRADES training."""

    name = "awp"
    Params = AWPParams
    norms = frozenset({Norm.LINF, Norm.L2})
    art_class = "AdversarialTrainerAWPPyTorch"
    summary = "ART's AdversarialTrainerAWPPyTorch: perturb weights too (Wu et al., 2020)"

    def build(self, classifier: Any, threat: ThreatModel, proxy: Callable[[], Any]) -> Any:
        from art.defences.trainer import AdversarialTrainerAWPPyTorch

        p = self.params
        return AdversarialTrainerAWPPyTorch(
            classifier, proxy(), self.inner_pgd(classifier, threat), mode=p.mode.upper(),
            gamma=p.gamma, beta=p.beta, warmup=p.warmup,
        )


TRAINERS: tuple[type[ArtTrainer], ...] = (MadryPGD, FastFGSM, Trades, AWP)
