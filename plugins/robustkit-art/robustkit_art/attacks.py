"""ART's evasion attacks behind robustkit's ``Attack`` interface.

One adapter, ``ArtAttack.run``, does what every ART attack needs: it builds ART's estimator
once per call (``PyTorchClassifier`` for gradient attacks, ``BlackBoxClassifierNeuralNetwork``
over scores for query attacks, so those also run on an ONNX session), converts inputs to
numpy float32 once, passes labels one-hot (targets when the threat model is targeted), seeds
Python's, numpy's and torch's generators from ``seed`` and puts their state back afterwards,
and keeps ART away from the model's parameter gradients. Each attack below
only declares its ART class, norms and ``Params`` in robustkit's vocabulary (``steps``,
``step_size``, ``restarts``...) and how those map onto ART's keywords.

The estimator gets ``clip_values=threat.bounds`` and no preprocessing: models take inputs in
the bounds with normalisation inside (robustkit's one input convention).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor, nn

from robustkit import Attack, Model, Norm, RobustkitError, ThreatModel
from robustkit.params import param

ART_NORMS: Mapping[Norm, float] = {Norm.LINF: np.inf, Norm.L2: 2}
#: Keywords filled from the threat model (or fixed), passed only to ART classes that take them.
_CONTEXT_KEYWORDS = ("eps", "norm", "targeted", "verbose")


def batch_size_param(default: int = 128) -> Any:
    return param(default, "samples per ART batch (speed only)")


def seed_param() -> Any:
    return param(0, "seed of the random draws (same seed, same result)")


def _step_size(default_help: str) -> Any:
    return param(None, f"step length in input units; default {default_help}")


@dataclass(frozen=True)
class ArtParams:
    """Base of the plugin's settings: counts must be positive, step sizes too.

    ART checks its own keywords only when an attack starts; checking here rejects a bad
    ``-o`` value at once, with the parameter's robustkit name.
    """

    zero_ok: ClassVar[frozenset[str]] = frozenset({"seed"})  #: counts that may be 0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int) and not isinstance(value, bool):
                low = 0 if f.name in self.zero_ok else 1
                if value < low:
                    raise ValueError(f"{f.name} must be >= {low}, got {value}")
            if f.name.endswith("step_size") and value is not None and value <= 0:
                raise ValueError(f"{f.name} must be > 0, got {value}")


@functools.cache
def _accepted_keywords(art_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(art_class).parameters)


def model_device(model: Model) -> torch.device:
    if isinstance(model, nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            return tensor.device
    return torch.device("cpu")


def cuda_device(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Make ``device`` current: ART places its tensors on ``cuda:current_device``."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed Python's, numpy's and torch's global generators, restoring their state afterwards.

    ART draws random starts and queries from ``np.random`` (and ``random`` in the l2 square
    attack); restoring the state means running an attack does not change the randomness of
    the caller's own code.
    """
    if seed is None:
        yield
        return
    devices = [device.index or 0] if device.type == "cuda" else []
    states = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=devices):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])


@contextlib.contextmanager
def _model_untouched(model: Model, device: torch.device) -> Iterator[None]:
    """Keep ART away from the caller's parameter gradients and current CUDA device.

    ``PyTorchClassifier.loss_gradient`` calls ``model.zero_grad()`` and ``loss.backward()``:
    that would wipe or pollute gradients a training loop holds. Freezing the parameters
    makes backward compute input gradients only (also faster); both the flags and the
    ``.grad`` tensors are put back.
    """
    cuda = cuda_device(device)
    if not isinstance(model, nn.Module):
        with cuda:
            yield
        return
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    try:
        for p, _, _ in saved:
            p.requires_grad_(False)
        with cuda:
            yield
    finally:
        for p, requires_grad, grad in saved:
            p.requires_grad_(requires_grad)
            p.grad = grad


class _Forward(nn.Module):
    """Hides a model's type from ART, which runs an ``nn.Sequential`` layer by layer (past a
    subclass's own ``forward`` and hooks) and whose FBF trainer then reads the first layer's
    output as the logits. Through this, ART calls ``model(x)`` like every other backend."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def white_box_classifier(model: nn.Module, input_shape: tuple[int, ...], nb_classes: int,
                         threat: ThreatModel, device: torch.device, optimizer: Any = None) -> Any:
    """ART's ``PyTorchClassifier``: clip values from the threat model, no preprocessing."""
    from art.estimators.classification import PyTorchClassifier

    if device.type not in ("cpu", "cuda"):
        raise RobustkitError(
            f"ART runs PyTorch models on CPU or CUDA, not {device.type}; move the model"
        )
    return PyTorchClassifier(
        model=_Forward(model), loss=nn.CrossEntropyLoss(), input_shape=input_shape,
        nb_classes=nb_classes, optimizer=optimizer, clip_values=threat.bounds, preprocessing=None,
        device_type="cpu" if device.type == "cpu" else "gpu",
    )


def _black_box_classifier(model: Model, input_shape: tuple[int, ...], nb_classes: int,
                          threat: ThreatModel, device: torch.device, dtype: torch.dtype,
                          probabilities: bool) -> Any:
    from art.estimators.classification import BlackBoxClassifierNeuralNetwork

    @torch.no_grad()
    def predict(batch: np.ndarray) -> np.ndarray:
        scores = model(torch.from_numpy(batch).to(device, dtype)).float()
        return (scores.softmax(dim=1) if probabilities else scores).cpu().numpy()

    return BlackBoxClassifierNeuralNetwork(
        predict, input_shape, nb_classes, clip_values=threat.bounds, preprocessing=None,
    )


class ArtAttack(Attack):
    """The one adapter behind every ``art:*`` attack; subclasses only declare."""

    art_class: ClassVar[str]  #: class name in ``art.attacks.evasion``
    #: robustkit parameter name -> ART keyword, for parameters passed through as they are
    renames: ClassVar[Mapping[str, str]] = {}
    #: black-box estimator returns softmax probabilities (SimBA refuses logits)
    probabilities: ClassVar[bool] = False
    #: untargeted, ART ignores the labels and moves each input away from the model's own
    #: prediction, which for a misclassified input could lead back to the true class; such
    #: inputs are already adversarial, so they are kept as they are and not sent to ART
    attacks_prediction: ClassVar[bool] = False

    def art_class_name(self, threat: ThreatModel) -> str:
        return self.art_class

    def art_kwargs(self, threat: ThreatModel) -> dict[str, Any]:
        """ART's keywords for this attack: the params renamed; subclasses add computed ones."""
        values = dataclasses.asdict(self.params)
        values.pop("seed", None)
        return {self.renames.get(key, key): value for key, value in values.items()}

    def generate_kwargs(self, estimator: Any, x: np.ndarray, labels: np.ndarray,
                        threat: ThreatModel) -> dict[str, Any]:
        """Extra keywords for ART's ``generate`` (starting points, for decision-based attacks)."""
        return {}

    def run(self, model: Model, x: Tensor, labels: Tensor, threat: ThreatModel) -> Tensor:
        if self.needs_gradients and not isinstance(model, nn.Module):
            raise RobustkitError(
                f"art:{self.name} needs gradients, which this model (a predict function, e.g. "
                "ONNX) does not give; use a black-box attack: art:square, art:hopskipjump, "
                "art:boundary or art:simba"
            )
        from art.attacks import evasion

        device = model_device(model)
        input_shape = tuple(x.shape[1:])
        x_np = x.detach().to("cpu", torch.float32).numpy()
        with torch.no_grad():
            nb_classes = int(model(x[:1].to(device)).shape[1])
        labels_np = labels.cpu().numpy()
        if len(labels_np) and int(labels_np.max()) >= nb_classes:
            top = int(labels_np.max())
            raise RobustkitError(f"label {top} is out of range for a model of {nb_classes} classes")
        y_np = np.eye(nb_classes, dtype=np.float32)[labels_np]

        art_class = getattr(evasion, self.art_class_name(threat))
        context = {"eps": threat.eps, "norm": ART_NORMS[threat.norm], "targeted": threat.targeted,
                   "verbose": False}
        accepted = _accepted_keywords(art_class)
        kwargs = {key: context[key] for key in _CONTEXT_KEYWORDS if key in accepted}
        kwargs.update(self.art_kwargs(threat))
        with seeded(getattr(self.params, "seed", None), device), _model_untouched(model, device):
            if self.needs_gradients:
                assert isinstance(model, nn.Module)
                estimator = white_box_classifier(model, input_shape, nb_classes, threat, device)
            else:
                estimator = _black_box_classifier(model, input_shape, nb_classes, threat, device,
                                                  x.dtype, self.probabilities)
            try:
                attack = art_class(estimator, **kwargs)
            except ValueError as err:
                message = f"ART rejected the settings of art:{self.name}: {err}"
                raise RobustkitError(message) from None
            if self.attacks_prediction and not threat.targeted:
                batch_size = getattr(self.params, "batch_size", 128)
                todo = estimator.predict(x_np, batch_size=batch_size).argmax(axis=1) == labels_np
                x_adv = x_np.copy()
                if todo.any():
                    x_adv[todo] = self._generate(
                        attack, estimator, x_np[todo], labels_np[todo], y_np[todo], threat
                    )
            else:
                x_adv = self._generate(attack, estimator, x_np, labels_np, y_np, threat)
        return torch.from_numpy(x_adv).to(x.device, x.dtype)

    def _generate(self, attack: Any, estimator: Any, x: np.ndarray, labels: np.ndarray,
                  one_hot: np.ndarray, threat: ThreatModel) -> np.ndarray:
        extra = self.generate_kwargs(estimator, x, labels, threat)
        return np.asarray(attack.generate(x, y=one_hot, **extra), dtype=np.float32)


# -- gradient attacks ------------------------------------------------------------------------
@dataclass(frozen=True)
class FGSMParams(ArtParams):
    batch_size: int = batch_size_param()


class FGSM(ArtAttack):
    """Fast gradient sign method (linf) / fast gradient method (l2), one step of size eps."""

    name = "fgsm"
    aliases = ("fgm",)
    norms = frozenset({Norm.LINF, Norm.L2})
    Params = FGSMParams
    art_class = "FastGradientMethod"
    summary = "ART's FastGradientMethod: one gradient step of size eps"

    def art_kwargs(self, threat: ThreatModel) -> dict[str, Any]:
        return super().art_kwargs(threat) | {"eps_step": threat.eps}


@dataclass(frozen=True)
class BIMParams(ArtParams):
    steps: int = param(10, "gradient steps")
    step_size: float | None = _step_size("2.5 * eps / steps")
    batch_size: int = batch_size_param()


class _Iterative(ArtAttack):
    """Shared mapping of ``steps``/``step_size`` (default 2.5 * eps / steps, as robustkit:pgd)."""

    renames = {"steps": "max_iter", "step_size": "eps_step"}

    def art_kwargs(self, threat: ThreatModel) -> dict[str, Any]:
        kwargs = super().art_kwargs(threat)
        if kwargs["eps_step"] is None:
            kwargs["eps_step"] = 2.5 * threat.eps / self.params.steps
        return kwargs


class BIM(_Iterative):
    """Basic iterative method: PGD from the clean input, without random starts."""

    name = "bim"
    aliases = ("i-fgsm",)
    norms = frozenset({Norm.LINF})
    Params = BIMParams
    art_class = "BasicIterativeMethod"
    summary = "ART's BasicIterativeMethod: iterated FGSM from the clean input (Kurakin et al.)"


@dataclass(frozen=True)
class PGDParams(ArtParams):
    steps: int = param(10, "gradient steps per restart")
    step_size: float | None = _step_size("2.5 * eps / steps")
    random_start: bool = param(True, "start from a random point of the eps-ball")
    restarts: int = param(1, "random starts; later ones keep the examples earlier ones found")
    decay: float | None = param(None, "ART: momentum decay factor (None for plain PGD)")
    batch_size: int = batch_size_param()
    seed: int = seed_param()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.restarts > 1 and not self.random_start:
            raise ValueError("restarts > 1 needs random_start (else every restart is the same)")


class PGD(_Iterative):
    """Projected gradient descent (Madry et al.) with random starts."""

    name = "pgd"
    norms = frozenset({Norm.LINF, Norm.L2})
    Params = PGDParams
    art_class = "ProjectedGradientDescent"
    summary = "ART's ProjectedGradientDescent (Madry et al., 2018)"

    def art_kwargs(self, threat: ThreatModel) -> dict[str, Any]:
        kwargs = super().art_kwargs(threat)
        random_start = kwargs.pop("random_start")
        kwargs["num_random_init"] = kwargs.pop("restarts") if random_start else 0
        return kwargs


@dataclass(frozen=True)
class APGDParams(ArtParams):
    steps: int = param(100, "iterations per restart")
    step_size: float | None = _step_size("2 * eps (the initial step; APGD adapts it)")
    restarts: int = param(1, "random starts (APGD always starts at a random point)")
    loss: Literal["ce", "dlr"] = param("ce", "cross-entropy or the difference of logits ratio")
    batch_size: int = batch_size_param()
    seed: int = seed_param()


class APGD(ArtAttack):
    """Auto-PGD (Croce and Hein, 2020): PGD with an adaptive step size and momentum."""

    name = "apgd"
    aliases = ("auto-pgd",)
    norms = frozenset({Norm.LINF, Norm.L2})
    Params = APGDParams
    art_class = "AutoProjectedGradientDescent"
    renames = {"steps": "max_iter", "step_size": "eps_step", "restarts": "nb_random_init"}
    summary = "ART's AutoProjectedGradientDescent (Croce and Hein, 2020)"

    def art_kwargs(self, threat: ThreatModel) -> dict[str, Any]:
        kwargs = super().art_kwargs(threat)
        if kwargs["eps_step"] is None:
            kwargs["eps_step"] = 2 * threat.eps
        losses = {"ce": "cross_entropy", "dlr": "difference_logits_ratio"}
        kwargs["loss_type"] = losses[kwargs.pop("loss")]
        return kwargs


@dataclass(frozen=True)
class CWParams(ArtParams):
    steps: int = param(10, "optimiser steps per inner problem")
    confidence: float = param(0.0, "margin the adversarial class must win by")
    learning_rate: float = param(0.01, "optimiser learning rate")
    initial_const: float | None = param(
        None, "initial trade-off constant c; default ART's (l2 0.01, linf 1e-5)"
    )
    binary_search_steps: int = param(10, "l2 only: binary-search steps over c")
    decrease_factor: float = param(
        0.9, "linf only: factor the linf bound tau shrinks by (smaller is faster)"
    )
    largest_const: float = param(20.0, "linf only: largest c tried")
    const_factor: float = param(2.0, "linf only: factor c grows by")
    batch_size: int = batch_size_param()


class CW(ArtAttack):
    """Carlini and Wagner: an optimised minimal perturbation, then projected into the ball.

    ART's linf variant searches the smallest bound per sample, one sample at a time, down to
    1/256 and tries ~20 constants per bound: slow. A smaller ``decrease_factor`` or a larger
    ``initial_const`` (or smaller ``largest_const``) makes it faster.
    """

    name = "cw"
    fixed_loss = "margin"
    aliases = ("carlini-wagner",)
    norms = frozenset({Norm.L2, Norm.LINF})
    Params = CWParams
    renames = {"steps": "max_iter"}
    summary = "ART's CarliniL2Method / CarliniLInfMethod (Carlini and Wagner, 2017)"
    #: settings that only the other norm's ART class takes
    _other_norm_only: ClassVar[Mapping[Norm, tuple[str, ...]]] = {
        Norm.L2: ("decrease_factor", "largest_const", "const_factor"),
        Norm.LINF: ("binary_search_steps",),
    }

    def art_class_name(self, threat: ThreatModel) -> str:
        return "CarliniL2Method" if threat.norm is Norm.L2 else "CarliniLInfMethod"

    def art_kwargs(self, threat: ThreatModel) -> dict[str, Any]:
        kwargs = super().art_kwargs(threat)
        for key in self._other_norm_only[threat.norm]:
            del kwargs[key]
        if kwargs["initial_const"] is None:
            del kwargs["initial_const"]
        return kwargs


@dataclass(frozen=True)
class DeepFoolParams(ArtParams):
    steps: int = param(50, "iterations")
    overshoot: float = param(0.02, "step past the linearised boundary, as a fraction")
    nb_grads: int = param(10, "ART: classes (most likely first) whose gradients are used")
    batch_size: int = batch_size_param()


class DeepFool(ArtAttack):
    """DeepFool (Moosavi-Dezfooli et al.): minimal l2 steps to the nearest linearised boundary."""

    name = "deepfool"
    fixed_loss = "margin"
    norms = frozenset({Norm.L2})
    Params = DeepFoolParams
    supports_targeted = False
    attacks_prediction = True
    art_class = "DeepFool"
    renames = {"steps": "max_iter", "overshoot": "epsilon"}
    summary = "ART's DeepFool: minimal l2 perturbation (Moosavi-Dezfooli et al., 2016)"


# -- black-box (score- or decision-based) attacks --------------------------------------------
@dataclass(frozen=True)
class SquareParams(ArtParams):
    queries: int = param(1000, "iterations, one model query per sample each")
    p_init: float = param(0.8, "ART: initial share of the image the square covers")
    restarts: int = param(1, "independent restarts")
    batch_size: int = batch_size_param()
    seed: int = seed_param()


class Square(ArtAttack):
    """Square attack (Andriushchenko et al.): random search over squares, scores only."""

    name = "square"
    norms = frozenset({Norm.LINF, Norm.L2})
    Params = SquareParams
    supports_targeted = False
    needs_gradients = False
    art_class = "SquareAttack"
    renames = {"queries": "max_iter", "restarts": "nb_restarts"}
    summary = "ART's SquareAttack: score-based random search, no gradients"


class _DecisionBased(ArtAttack):
    """Attacks that walk from an already-adversarial point towards the input.

    ART draws that point from an unseeded ``np.random.RandomState()``, so its results would
    differ run to run; here the points come from the seeded generator, batched across samples
    (``init_size`` draws at most), and reach ART as ``x_adv_init``. The inputs that reach
    ``generate`` are classified as their label (untargeted), so a start must leave the label.
    """

    attacks_prediction = True

    def generate_kwargs(self, estimator: Any, x: np.ndarray, labels: np.ndarray,
                        threat: ThreatModel) -> dict[str, Any]:
        batch_size = self.params.batch_size
        starts = x.copy()
        missing = np.ones(len(x), dtype=bool)
        for _ in range(self.params.init_size):
            index = np.flatnonzero(missing)
            if not len(index):
                break
            shape = (len(index), *x.shape[1:])
            draws = np.random.uniform(*threat.bounds, size=shape).astype(x.dtype)
            predicted = estimator.predict(draws, batch_size=batch_size).argmax(axis=1)
            found = (predicted == labels[index]) == threat.targeted
            starts[index[found]] = draws[found]
            missing[index[found]] = False
        return {"x_adv_init": starts}


@dataclass(frozen=True)
class HopSkipJumpParams(ArtParams):
    steps: int = param(50, "iterations (gradient estimate, step, binary search)")
    max_eval: int = param(10000, "ART: most queries per gradient estimate")
    init_eval: int = param(100, "ART: queries of the first gradient estimate")
    init_size: int = param(100, "ART: random trials to find a starting adversarial point")
    batch_size: int = batch_size_param(64)
    seed: int = seed_param()


class HopSkipJump(_DecisionBased):
    """HopSkipJump (Chen et al.): decision-based, needs only the predicted labels."""

    name = "hopskipjump"
    aliases = ("hsj",)
    norms = frozenset({Norm.L2, Norm.LINF})
    Params = HopSkipJumpParams
    needs_gradients = False
    art_class = "HopSkipJump"
    renames = {"steps": "max_iter"}
    summary = "ART's HopSkipJump: decision-based, labels only (Chen et al., 2020)"


@dataclass(frozen=True)
class BoundaryParams(ArtParams):
    steps: int = param(5000, "iterations of the random walk along the boundary")
    spherical_step: float = param(0.01, "initial step along the sphere around the input (delta)")
    source_step: float = param(0.01, "initial step towards the input (ART: epsilon)")
    step_adaptation: float = param(0.667, "factor the steps adapt by")
    num_trial: int = param(25, "ART: trials per iteration")
    sample_size: int = param(20, "ART: samples per trial")
    init_size: int = param(100, "ART: random trials to find a starting adversarial point")
    batch_size: int = batch_size_param(64)
    seed: int = seed_param()


class Boundary(_DecisionBased):
    """Boundary attack (Brendel et al.): decision-based walk that shrinks the perturbation."""

    name = "boundary"
    norms = frozenset({Norm.L2})
    Params = BoundaryParams
    needs_gradients = False
    art_class = "BoundaryAttack"
    renames = {"steps": "max_iter", "spherical_step": "delta", "source_step": "epsilon",
               "step_adaptation": "step_adapt"}
    summary = "ART's BoundaryAttack: decision-based, labels only (Brendel et al., 2018)"


@dataclass(frozen=True)
class SimBAParams(ArtParams):
    steps: int = param(3000, "iterations, two model queries each")
    step_size: float = param(0.2, "length of each basis step (ART: epsilon)")
    basis: Literal["dct", "px"] = param("dct", "search directions: low-frequency DCT or pixels")
    order: Literal["random", "diag"] = param("random", "ART: order of the pixel directions")
    freq_dim: int = param(4, "ART: DCT frequencies per side searched first")
    stride: int = param(1, "ART: DCT block stride")
    seed: int = seed_param()


class SimBA(ArtAttack):
    """Simple black-box attack (Guo et al.): steps along basis directions that lower the score."""

    name = "simba"
    norms = frozenset({Norm.L2})
    Params = SimBAParams
    needs_gradients = False
    probabilities = True
    art_class = "SimBA"
    renames = {"steps": "max_iter", "step_size": "epsilon", "basis": "attack"}
    summary = "ART's SimBA: score-based steps along DCT or pixel directions (Guo et al., 2019)"


ATTACKS: tuple[type[ArtAttack], ...] = (
    FGSM, BIM, PGD, APGD, CW, DeepFool, Square, HopSkipJump, Boundary, SimBA,
)
