"""torchattacks' attacks as robustkit attacks: one adapter and a table of declarations.

Each class at the bottom only declares which torchattacks class runs it for each norm, its
parameters in robustkit's vocabulary and what it supports. ``TorchattacksAttack.run`` does the
rest the same way for all of them:

- eps and the norm come from the threat model; parameters are renamed to torchattacks' own
  (``step_size`` -> ``alpha``, ``restarts`` -> ``n_restarts``, ``queries`` -> ``n_queries``);
- the model keeps its normalisation inside, so ``set_normalization_used`` is never called.
  torchattacks clips to [0, 1]; other bounds are mapped affinely onto [0, 1] (a model shim,
  eps and step sizes divided by the range) and the result is mapped back;
- targets arrive as ``labels`` and go to torchattacks' "targeted(label)" mode;
- the number of classes comes from one forward pass of one sample, only for the attacks that
  use it, never from torchattacks' default of 10;
- APGD, FAB, Square and AutoAttack reseed the global RNG themselves; a seeded call runs inside
  ``torch.random.fork_rng`` so the caller's random stream (a training loop's) is untouched.

``Attack.__call__`` has already put the model in eval mode, so torchattacks' own mode handling
sees an eval model and never calls ``train()``; ``__call__`` restores the caller's modes.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from robustkit import Attack, Model, Norm, ThreatModel
from robustkit.params import param

#: robustkit's parameter names -> torchattacks' keyword arguments (others are the same).
_RENAME = {"step_size": "alpha", "restarts": "n_restarts", "queries": "n_queries",
           "rescale_schedule": "resc_schedule"}
_NORM_NAMES = {Norm.LINF: "Linf", Norm.L2: "L2"}
_UNIT = (0.0, 1.0)


# -- parameters ----------------------------------------------------------------------------------
def _library_seed() -> Any:
    return param(0, "seed of the random starts (torchattacks reseeds with it; robustkit then "
                    "restores the caller's RNG)")


def _caller_seed() -> Any:
    return param(None, "seed for this call; none: use the caller's global torch RNG")


def _restarts() -> Any:
    return param(1, "random restarts; later ones attack only the samples still standing")


def _n_target_classes() -> Any:
    return param(9, "most likely wrong classes to target, as in AutoAttack (capped at classes - 1)")


@dataclass(frozen=True)
class _Checked:
    """Rejects counts below 1 and non-positive step sizes, for whichever fields a class has."""

    def __post_init__(self) -> None:
        for name in ("steps", "restarts", "queries", "eot_iter", "n_target_classes"):
            if getattr(self, name, 1) < 1:
                raise ValueError(f"{name} must be >= 1")
        step_size = getattr(self, "step_size", None)
        if step_size is not None and step_size <= 0:
            raise ValueError("step_size must be > 0")


@dataclass(frozen=True)
class StepParams(_Checked):
    steps: int = param(10, "gradient steps")
    step_size: float | None = param(None, "step length in input units (torchattacks: alpha); "
                                          "default 2.5 * eps / steps")


@dataclass(frozen=True)
class MIFGSMParams(StepParams):
    decay: float = param(1.0, "momentum decay factor")


@dataclass(frozen=True)
class PGDParams(StepParams):
    random_start: bool = param(True, "start from a uniform point of the eps-ball")
    seed: int | None = _caller_seed()


@dataclass(frozen=True)
class EOTPGDParams(PGDParams):
    eot_iter: int = param(2, "gradients averaged per step (expectation over transformation)")


@dataclass(frozen=True)
class _APGDBase(_Checked):
    steps: int = param(10, "iterations per restart (AutoAttack's paper uses 100)")
    restarts: int = _restarts()
    eot_iter: int = param(1, "gradients averaged per step (expectation over transformation)")
    rho: float = param(0.75, "share of improving steps below which the step size is halved")
    seed: int = _library_seed()


@dataclass(frozen=True)
class APGDParams(_APGDBase):
    loss: Literal["ce", "dlr"] = param("ce", "cross-entropy or the difference-of-logits ratio")


@dataclass(frozen=True)
class APGDTParams(_APGDBase):
    n_target_classes: int = _n_target_classes()


@dataclass(frozen=True)
class FABParams(_Checked):
    steps: int = param(10, "iterations per restart")
    restarts: int = _restarts()
    alpha_max: float = param(0.1, "largest weight of the extrapolation step")
    eta: float = param(1.05, "overshoot of the projection onto the decision boundary")
    beta: float = param(0.9, "weight of the backward step towards the clean input")
    multi_targeted: bool = param(False, "run FAB-T against each of n_target_classes classes")
    n_target_classes: int = _n_target_classes()
    seed: int = _library_seed()


@dataclass(frozen=True)
class SquareParams(_Checked):
    queries: int = param(5000, "model queries per sample (torchattacks: n_queries)")
    restarts: int = _restarts()
    p_init: float = param(0.8, "initial share of the image covered by the square")
    loss: Literal["margin", "ce"] = param("margin", "objective: logit margin or cross-entropy")
    rescale_schedule: bool = param(True, "scale the square-size schedule to the query budget")
    seed: int = _library_seed()


@dataclass(frozen=True)
class AutoAttackParams(_Checked):
    n_target_classes: int = _n_target_classes()
    seed: int = _library_seed()


@dataclass(frozen=True)
class CWParams(_Checked):
    steps: int = param(50, "Adam steps")
    c: float = param(1.0, "weight of the classification term against the l2 distance")
    kappa: float = param(0.0, "confidence margin required of the adversarial logits")
    lr: float = param(0.01, "Adam learning rate (in tanh space)")


@dataclass(frozen=True)
class DeepFoolParams(_Checked):
    steps: int = param(50, "linearisation steps per sample")
    overshoot: float = param(0.02, "relative overshoot past the linearised boundary")


# -- the adapter ---------------------------------------------------------------------------------
class _UnitInputs(nn.Module):
    """Shows ``model`` to torchattacks as a module that takes inputs in [0, 1].

    Needed when the bounds are not [0, 1] (torchattacks clips to [0, 1]) or when ``model`` is
    not a module with parameters (torchattacks reads the device from the first parameter and
    prints when there is none, and reads ``.training``). Built in eval mode, so torchattacks
    never calls ``train()`` on it.
    """

    def __init__(self, model: Model, low: float, scale: float, device: torch.device) -> None:
        super().__init__()
        self.model = model  # a module becomes a submodule; a plain callable stays an attribute
        self.low, self.scale = low, scale
        if next(self.parameters(), None) is None:
            self.device_probe = nn.Parameter(torch.empty(0, device=device))
        self.eval()

    def forward(self, u: Tensor) -> Tensor:
        return self.model(self.low + self.scale * u)


def _has_parameters(model: Model) -> bool:
    return isinstance(model, nn.Module) and next(model.parameters(), None) is not None


@contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Seed the global RNG for one call and give the caller back its own state afterwards."""
    if seed is None:
        yield
        return
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        torch.manual_seed(seed)
        yield


class TorchattacksAttack(Attack):
    """Runs the torchattacks class that ``library`` names for the threat's norm."""

    library: ClassVar[dict[Norm, str]]  #: norm -> torchattacks class name; defines ``norms``
    norm_kwarg: ClassVar[bool] = False  #: the class takes ``norm="Linf"|"L2"``
    eps_kwarg: ClassVar[bool] = True  #: False for minimal-perturbation attacks (CW, DeepFool)
    seeds_itself: ClassVar[bool] = False  #: the class takes ``seed`` and reseeds the global RNG
    fixed: ClassVar[dict[str, Any]] = {}  #: constant keyword arguments

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.norms = frozenset(cls.library)

    def uses_classes(self) -> bool:
        """Whether the class needs the number of classes (for its targets)."""
        return hasattr(self.params, "n_target_classes")

    def run(self, model: Model, x: Tensor, labels: Tensor, threat: ThreatModel) -> Tensor:
        import torchattacks

        low, high = threat.bounds
        scale = high - low
        net: Model = model
        if threat.bounds != _UNIT or not _has_parameters(model):
            net = _UnitInputs(model, low, scale, x.device)
            x = (x - low) / scale
        values = {f.name: getattr(self.params, f.name) for f in dataclasses.fields(self.params)}
        seed = values["seed"] if self.seeds_itself else values.pop("seed", None)
        if "step_size" in values:
            if values["step_size"] is None:
                values["step_size"] = 2.5 * threat.eps / values["steps"]
            values["step_size"] /= scale
        n_target_classes = values.pop("n_target_classes", None)
        kwargs = {_RENAME.get(key, key): value for key, value in values.items()} | self.fixed
        if self.eps_kwarg:
            kwargs["eps"] = threat.eps / scale
        if self.norm_kwarg:
            kwargs["norm"] = _NORM_NAMES[threat.norm]
        if n_target_classes is not None and self.uses_classes():
            with torch.no_grad():
                classes = int(net(x[:1]).shape[-1])
            kwargs["n_classes"] = min(n_target_classes, classes - 1) + 1
        with _seeded(seed):
            attack = getattr(torchattacks, self.library[threat.norm])(net, **kwargs)
            if threat.targeted:
                attack.set_mode_targeted_by_label(quiet=True)
            x_adv: Tensor = attack(x, labels.long())
        return x_adv if net is model else low + scale * x_adv


# -- the attacks ---------------------------------------------------------------------------------
_LINF = Norm.LINF
_LINF_L2 = (Norm.LINF, Norm.L2)


class FGSM(TorchattacksAttack):
    name = "fgsm"
    library = {_LINF: "FGSM"}
    summary = "torchattacks FGSM: one signed-gradient step of size eps"


class BIM(TorchattacksAttack):
    name = "bim"
    library = {_LINF: "BIM"}
    Params = StepParams
    summary = "torchattacks BIM: iterated FGSM from the clean input, clipped to the ball"


class PGD(TorchattacksAttack):
    name = "pgd"
    library = {Norm.LINF: "PGD", Norm.L2: "PGDL2"}
    Params = PGDParams
    summary = "torchattacks PGD (linf) / PGDL2 (l2) with a random start; returns the last iterate"


class MIFGSM(TorchattacksAttack):
    name = "mifgsm"
    library = {_LINF: "MIFGSM"}
    Params = MIFGSMParams
    summary = "torchattacks MI-FGSM: BIM with momentum on normalised gradients"


class EOTPGD(TorchattacksAttack):
    name = "eotpgd"
    library = {_LINF: "EOTPGD"}
    Params = EOTPGDParams
    summary = "torchattacks EOT-PGD: PGD on gradients averaged over eot_iter passes (random models)"


class APGD(TorchattacksAttack):
    name = "apgd"
    library = dict.fromkeys(_LINF_L2, "APGD")
    Params = APGDParams
    norm_kwarg = seeds_itself = True
    supports_targeted = False
    summary = "torchattacks APGD: step-size-free PGD with momentum, ce or dlr loss"


class APGDT(TorchattacksAttack):
    name = "apgdt"
    fixed_loss = "dlr"
    library = dict.fromkeys(_LINF_L2, "APGDT")
    Params = APGDTParams
    norm_kwarg = seeds_itself = True
    supports_targeted = False  # untargeted in effect: it targets the top wrong classes in turn
    summary = "torchattacks APGD-T: targeted dlr APGD against each top wrong class in turn"


class FAB(TorchattacksAttack):
    name = "fab"
    fixed_loss = "margin"
    library = dict.fromkeys(_LINF_L2, "FAB")  # its L1 branch fails in torchattacks 3.5.1
    Params = FABParams
    norm_kwarg = seeds_itself = True
    # torchattacks' single-target FAB indexes its targets wrongly once clean mistakes are
    # dropped; multi_targeted (FAB-T) is the targeted variant that works.
    supports_targeted = False
    summary = "torchattacks FAB: minimal perturbation by projections onto the linearised boundary"

    def uses_classes(self) -> bool:
        return bool(self.params.multi_targeted)


class Square(TorchattacksAttack):
    name = "square"
    library = dict.fromkeys(_LINF_L2, "Square")
    Params = SquareParams
    norm_kwarg = seeds_itself = True
    needs_gradients = False
    summary = "torchattacks Square: score-based random search, no gradients"


class AutoAttack(TorchattacksAttack):
    name = "autoattack"
    library = dict.fromkeys(_LINF_L2, "AutoAttack")
    Params = AutoAttackParams
    norm_kwarg = seeds_itself = True
    supports_targeted = False
    fixed = {"version": "standard"}
    summary = ("torchattacks AutoAttack, standard version: APGD-CE, APGD-T, FAB-T, Square "
               "(torchattacks runs APGD with 10 steps, not the paper's 100)")


class CW(TorchattacksAttack):
    name = "cw"
    fixed_loss = "margin"
    library = {Norm.L2: "CW"}
    Params = CWParams
    eps_kwarg = False
    summary = ("torchattacks CW-L2: minimises the l2 distance, not bounded by eps; robustkit "
               "projects the result into the eps-ball, which may undo its success")


class DeepFool(TorchattacksAttack):
    name = "deepfool"
    fixed_loss = "margin"
    library = {Norm.L2: "DeepFool"}
    Params = DeepFoolParams
    eps_kwarg = False
    supports_targeted = False
    summary = ("torchattacks DeepFool: minimal l2 steps to the linearised boundary, not bounded "
               "by eps; robustkit projects the result into the eps-ball")


ATTACKS: tuple[type[TorchattacksAttack], ...] = (
    FGSM, BIM, PGD, MIFGSM, EOTPGD, APGD, APGDT, FAB, Square, AutoAttack, CW, DeepFool,
)
