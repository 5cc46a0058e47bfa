"""Contract checks every attack must pass, for robustkit's tests and for plugin authors.

    from robustkit.testing import check_attack_contract
    def test_my_attack():
        check_attack_contract(MyAttack(steps=3))

The checks run on a small BatchNorm + Dropout network over real digits, so an attack that
forgets eval mode (dropout noise) or mutates BatchNorm statistics is caught.
``check_resume_is_exact`` is the matching check for a training defence: Ctrl-C, then
``--resume``, must end where an uninterrupted run does.
"""
from __future__ import annotations

import copy
import os
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest import mock

import torch
from torch import Tensor, nn

from robustkit.attacks.base import Attack
from robustkit.errors import RobustkitError
from robustkit.threat import Norm, ThreatModel, per_sample_norm

if TYPE_CHECKING:
    from robustkit.harden.defences import TrainingDefence

#: Radii used by the contract for each norm, in [0, 1] input units of 1x8x8 digits.
CONTRACT_EPS = {Norm.LINF: 0.1, Norm.L2: 1.0, Norm.L1: 4.0}


def contract_model(seed: int = 0, num_classes: int = 10) -> nn.Module:
    """A tiny conv net with BatchNorm and Dropout (so mode handling matters) for 1x8x8 inputs."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3),
        nn.Flatten(), nn.Linear(8 * 8 * 8, num_classes),
    )


def contract_batch(n: int = 16) -> tuple[Tensor, Tensor]:
    """``n`` real digits (first of the built-in evaluation split) and their labels."""
    from robustkit.data import load_digits

    data = load_digits()
    return data.x[:n].clone(), data.y[:n].clone()


def _run(attack: Attack, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, seed: int) -> Tensor:
    torch.manual_seed(seed)
    return attack(model, x, y, threat=threat).x_adv


def check_attack_contract(attack: Attack, *, model: nn.Module | None = None,
                          batch: tuple[Tensor, Tensor] | None = None) -> None:
    """Assert the interface contract for ``attack`` on every norm it declares.

    - the result keeps shape, dtype and device, and lies in the eps-ball and the bounds;
    - the model's mode (including a mixed train/eval mode) and weights are unchanged;
    - an unsupported norm is refused with a RobustkitError;
    - the same seed gives the same examples;
    - an attack with ``per_sample_eps`` keeps each sample in its own ball (radius 0 leaves it
      unchanged) and uses the radius it is given, not the smallest;
      an attack without it refuses per-sample radii.
    """
    model = model if model is not None else contract_model()
    x, y = batch if batch is not None else contract_batch()
    model.train()
    batch_norm = next((m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)), None)
    if batch_norm is not None:
        batch_norm.eval()  # a mixed mode must be restored exactly, not just "train"
    modes = [m.training for m in model.modules()]
    state = copy.deepcopy(model.state_dict())
    for norm in sorted(attack.norms, key=lambda n: n.value):
        threat = ThreatModel(norm, CONTRACT_EPS[norm])
        x_adv = _run(attack, model, x, y, threat, seed=0)
        assert x_adv.shape == x.shape, f"{attack.name}: shape {tuple(x_adv.shape)} != {tuple(x.shape)}"
        assert x_adv.dtype == x.dtype, f"{attack.name}: dtype {x_adv.dtype} != {x.dtype}"
        assert x_adv.device == x.device, f"{attack.name}: device {x_adv.device} != {x.device}"
        bad = threat.violations(x, x_adv)
        assert not bool(bad.any()), f"{attack.name} ({norm.value}): {int(bad.sum())} examples outside ball/bounds"
        assert [m.training for m in model.modules()] == modes, f"{attack.name}: model modes were not restored"
        for key, value in model.state_dict().items():
            assert torch.equal(value, state[key]), f"{attack.name}: model state {key!r} changed"
        again = _run(attack, model, x, y, threat, seed=0)
        assert torch.allclose(x_adv, again, atol=1e-6), f"{attack.name} ({norm.value}): not deterministic under a seed"
        _check_radii(attack, model, x, y, threat)
    unsupported = [n for n in Norm if n not in attack.norms]
    if unsupported:
        threat = ThreatModel(unsupported[0], CONTRACT_EPS[unsupported[0]])
        try:
            attack(model, x, y, threat=threat)
        except RobustkitError:
            pass
        else:
            raise AssertionError(f"{attack.name}: accepted the unsupported norm {unsupported[0].value}")


def _check_radii(attack: Attack, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel) -> None:
    radii = torch.tensor([threat.eps, threat.eps / 4, 0.0], dtype=torch.float64).repeat(len(x))[: len(x)]
    if not (attack.per_sample_eps or attack.minimum_norm):
        try:
            attack(model, x, y, threat=threat, radii=radii)
        except RobustkitError:
            return
        raise AssertionError(f"{attack.name}: accepted per-sample radii without declaring per_sample_eps")
    torch.manual_seed(0)
    x_adv = attack(model, x, y, threat=threat, radii=radii).x_adv
    label = f"{attack.name} ({threat.norm.value}, per-sample radii)"
    assert not bool(threat.violations(x, x_adv, radii=radii).any()), f"{label}: examples outside their own ball"
    assert torch.equal(x_adv[radii == 0], x[radii == 0]), f"{label}: radius 0 moved a sample"
    if attack.minimum_norm:  # it rightly leaves a sample where it is when that is already adversarial
        return
    moved = per_sample_norm(x_adv - x, threat.norm)
    assert float(moved[radii == threat.eps].max()) > threat.eps / 4 + 1e-6, f"{label}: the largest radius went unused"


def fast_params(attack_cls: type[Attack]) -> dict[str, Any]:
    """Settings that keep contract tests quick (few steps/queries) where an attack has them."""
    fields = {f for f in getattr(attack_cls.Params, "__dataclass_fields__", {})}
    wanted = {"steps": 3, "max_iter": 3, "restarts": 1, "queries": 20, "max_queries": 20, "n_queries": 20,
              # budgets of C&W, HopSkipJump and Boundary (their defaults take minutes per batch)
              "binary_search_steps": 1, "decrease_factor": 0.3, "initial_const": 1.0, "largest_const": 4.0,
              "max_eval": 100, "init_eval": 10, "init_size": 20, "num_trial": 5, "sample_size": 5}
    return {k: v for k, v in wanted.items() if k in fields}


def trained_digits_model(kind: str = "cnn", *, epochs: int = 6, seed: int = 0) -> nn.Module:
    """A model trained on ``builtin:digits`` in a few seconds, for agreement tests.

    ``kind="cnn"``: ``builtin:digits-cnn`` (plain). ``kind="normalized-bn"``: the residual
    BatchNorm network behind a ``Normalized`` layer, i.e. normalisation inside the model.
    Cached per process, returned in eval mode; do not train it further in a test.
    """
    key = (kind, epochs, seed)
    if key not in _TRAINED:
        from robustkit.data import load_digits
        from robustkit.models.zoo import digits_cnn, digits_resnet
        from robustkit.modules import Normalized
        from robustkit.train import FitConfig, fit

        torch.manual_seed(seed)
        if kind == "cnn":
            net: nn.Module = digits_cnn()
        elif kind == "normalized-bn":
            net = Normalized(digits_resnet(), mean=[0.30], std=[0.40])
        else:
            raise ValueError(f"unknown kind {kind!r}; use 'cnn' or 'normalized-bn'")
        data = load_digits()
        assert data.x_train is not None and data.y_train is not None
        fit(net, data.x_train, data.y_train, FitConfig(epochs=epochs, seed=seed))
        _TRAINED[key] = net.eval()
    return _TRAINED[key]


_TRAINED: dict[tuple[str, int, int], nn.Module] = {}


# -- agreement tests: a wrapped attack against robustkit's own and its library called directly --
def builtin_attack(name: str, **params: Any) -> Attack:
    """robustkit's own attack, by the name a user types (``pgd`` is ``robustkit:pgd``)."""
    from robustkit.plugin.host import Host

    attack_cls: type[Attack] = Host(entry_points=False).attacks.resolve(f"robustkit:{name}").obj
    return attack_cls(**params)


def checked_robust_accuracy(model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor, threat: ThreatModel) -> float:
    """Percentage of samples the model still classifies correctly at ``x_adv``, computed from
    the model's own predictions; fails on any example off the threat model, whoever made it."""
    bad = threat.violations(x, x_adv)
    if bad.any():
        raise AssertionError(f"{int(bad.sum())} adversarial examples leave the eps-ball or the bounds")
    with torch.no_grad():
        return 100 * float((model(x_adv).argmax(1) == y).float().mean())


def attack_digits(attack: Attack, kind: str, eps: float, seed: int = 0) -> tuple[float, Tensor]:
    """(robust accuracy in %, examples) of ``attack`` through robustkit on the 360 test digits
    against ``trained_digits_model(kind)`` at linf ``eps``."""
    from robustkit.data import load_digits

    model, data = trained_digits_model(kind), load_digits()
    threat = ThreatModel(Norm.LINF, eps)
    torch.manual_seed(seed)
    x_adv = attack(model, data.x, data.y, threat=threat).x_adv
    return checked_robust_accuracy(model, data.x, data.y, x_adv, threat), x_adv


def assert_close_to_builtin(wrapped: float, builtin: str, kind: str, eps: float, points: float, **params: Any) -> None:
    """A wrapped attack's robust accuracy (``wrapped``, in %, from ``attack_digits``) is within
    ``points`` of robustkit's own ``builtin`` attack with ``params`` on the same model and eps."""
    native, _ = attack_digits(builtin_attack(builtin, **params), kind, eps)
    assert abs(wrapped - native) <= points, (wrapped, native)


# -- resume: a hardening run stopped by Ctrl-C and resumed is the run that was never stopped --
def check_resume_is_exact(
    train: Callable[[Path, bool], Mapping[str, Tensor]],
    defence: type[TrainingDefence],
    interrupt_at: int,
    folder: Path,
    *,
    crash: bool = False,
    between: Callable[[Path], None] | None = None,
) -> Mapping[str, Tensor]:
    """Assert that a hardening run sent SIGINT (Ctrl-C) during its ``interrupt_at``-th training
    step, then resumed, ends with the very weights, bit for bit, of the same run left alone.

    ``train(out, resume)`` runs the hardening with its output folder ``out`` (``resume``: with
    ``--resume``) and returns the final weights; it is called for ``folder/"whole"``, then twice
    for ``folder/"split"``. ``defence``'s ``make_step`` is wrapped for the interrupted run only,
    so the signal arrives where a user's would: mid-epoch, inside the loop. ``crash``: the step
    raises ``RuntimeError`` instead (a crash keeps only the last epoch's checkpoint).
    ``between(folder/"split")`` runs after the interruption, before the resume (to inspect the
    checkpoint). Returns the uninterrupted run's weights, for the caller's own checks.
    """
    from robustkit.harden.loop import TrainingInterrupted

    whole = train(folder / "whole", False)
    make_step, steps = defence.make_step, [0]

    def interrupted(self: TrainingDefence, ctx: Any) -> Any:
        inner = make_step(self, ctx)

        def step(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            steps[0] += 1
            if steps[0] == interrupt_at and crash:
                raise RuntimeError("simulated crash")
            if steps[0] == interrupt_at:
                os.kill(os.getpid(), signal.SIGINT)
            return inner(x, y)

        return step

    expected: type[BaseException] = RuntimeError if crash else TrainingInterrupted
    with mock.patch.object(defence, "make_step", interrupted):
        try:
            train(folder / "split", False)
        except expected:
            pass
        else:
            raise AssertionError(f"the run ended after {steps[0]} steps without reaching step {interrupt_at}")
    if between is not None:
        between(folder / "split")
    torch.manual_seed(99)  # resuming must not depend on the caller's global generator
    resumed = train(folder / "split", True)
    for key, value in whole.items():
        assert torch.equal(resumed[key], value), f"resumed weights differ from the uninterrupted run's at {key!r}"
    return whole
