"""Adversarial weight perturbation (--awp): the update is the paper's (gradient at weights moved
layer-wise relative to their norm, then applied to the restored weights), the weights come back
bit for bit, BatchNorm's statistics see no extra pass, a resumed run is identical, and loops
that cannot do it refuse it."""
from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkit.data import Dataset, load_digits
from robustkit.distributed import DistContext
from robustkit.errors import ParamsError, RobustkitError
from robustkit.harden import checkpoint
from robustkit.harden.api import HardenRequest, resolve_defence
from robustkit.harden.awp import WeightPerturbation, perturbed_weights
from robustkit.harden.base import OWN_LOOP, Defence, DefenceResult
from robustkit.harden.config import RunConfig
from robustkit.harden.defences import FGSMRS, TRADES
from robustkit.harden.step import Optimization, StepContext, cross_entropy_loss
from robustkit.plugin.hookspecs import hookimpl
from robustkit.testing import check_resume_is_exact
from robustkit.threat import ThreatModel

THREAT = ThreatModel("linf", 0.1)
GAMMA = 5e-3


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 8 * 8, 10))


def _batch() -> tuple[Tensor, Tensor]:
    data = load_digits()
    assert data.x_train is not None and data.y_train is not None
    return data.x_train[:32], data.y_train[:32]


def _context(model: nn.Module, lr: float, awp: WeightPerturbation | None) -> StepContext:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    optimization = Optimization(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0))
    return StepContext(model=model, craft=model, threat=THREAT, device=torch.device("cpu"), precision="fp32",
                       generator=torch.Generator(), optimization=optimization, seed=0, world=DistContext(),
                       train_size=32, awp=awp)


def test_the_update_is_the_gradient_at_the_perturbed_weights_applied_to_the_restored_ones() -> None:
    x, y = _batch()
    lr = 0.1
    reference = _net().train()
    # by hand: g at w (train mode, on a copy), v = gamma ||w|| g / ||g|| for weights of dim > 1,
    # the gradient at w + v, then w - lr * that gradient
    probe = _net().train()
    F.cross_entropy(probe(x), y).backward()
    moved = _net().train()
    with torch.no_grad():
        for p, q in zip(moved.parameters(), probe.parameters()):
            if p.dim() > 1:
                assert q.grad is not None
                p.add_(GAMMA * p.norm() / q.grad.norm() * q.grad)
    F.cross_entropy(moved(x), y).backward()
    expected = {name: p.detach() - lr * q.grad for (name, p), q in zip(reference.named_parameters(),
                                                                       moved.parameters()) if q.grad is not None}

    model = _net().train()
    awp = WeightPerturbation(model, GAMMA, DistContext())
    awp.active = True
    _context(model, lr, awp).train(cross_entropy_loss, x, x, y)
    without = _net().train()
    _context(without, lr, None).train(cross_entropy_loss, x, x, y)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-6)
    changed = [n for n, p in without.named_parameters() if not torch.equal(p, dict(model.named_parameters())[n])]
    assert changed, "AWP changed nothing"
    # BatchNorm's running statistics saw the training pass (at the perturbed weights) alone
    assert int(model[1].num_batches_tracked) == 1
    torch.testing.assert_close(model[1].running_mean, moved[1].running_mean, rtol=1e-5, atol=1e-7)


def test_weights_are_perturbed_inside_and_restored_exactly() -> None:
    x, y = _batch()
    model = _net().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    awp = WeightPerturbation(model, GAMMA, DistContext())
    assert [n for n, _ in perturbed_weights(model)] == ["0.weight", "4.weight"]  # no bias, no BatchNorm
    awp.active = True
    with awp.applied(cross_entropy_loss, x, x, y, nullcontext()):
        inside = model.state_dict()
        for name in ("0.weight", "4.weight"):
            shift = (inside[name] - before[name]).norm() / before[name].norm()
            assert abs(float(shift) - GAMMA) < 1e-4  # relative to the layer's norm
        assert torch.equal(inside["0.bias"], before["0.bias"]) and torch.equal(inside["1.weight"], before["1.weight"])
        assert torch.equal(inside["1.running_mean"], before["1.running_mean"])  # the proxy's statistics moved
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    awp.active = False  # the warm-up: nothing moves
    with awp.applied(cross_entropy_loss, x, x, y, nullcontext()):
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _small_digits() -> Dataset:
    data = load_digits()
    assert data.x_train is not None and data.y_train is not None
    return dataclasses.replace(data, x_train=data.x_train[:600], y_train=data.y_train[:600])


def test_resume_with_awp_is_bit_identical(tmp_path: Path) -> None:
    data = _small_digits()  # 540 training samples: 9 batches an epoch
    settings: dict[str, Any] = {"epochs": 2, "canary_size": 32, "canary_steps": 2, "awp_gamma": GAMMA,
                                "awp_warmup": 1}

    def train(out: Path, resume: bool) -> dict[str, Tensor]:
        run = RunConfig(out_dir=out, resume=resume, progress=False)
        return FGSMRS(**settings).apply(_net(), data, threat=THREAT, run=run).model.state_dict()

    whole = check_resume_is_exact(train, FGSMRS, 13, tmp_path)  # epoch 2, batch 4: after the warm-up
    plain = FGSMRS(**{**settings, "awp_gamma": 0.0}).apply(_net(), data, threat=THREAT, run=RunConfig(progress=False))
    assert any(not torch.equal(a, b) for a, b in zip(whole.values(), plain.model.state_dict().values()))  # AWP acted
    with pytest.raises(RobustkitError, match=r"awp_gamma was 0\.005, now 0\.01"):  # another gamma is another run
        FGSMRS(**{**settings, "awp_gamma": 0.01}).apply(_net(), data, threat=THREAT,
                                                         run=RunConfig(out_dir=tmp_path / "split", resume=True,
                                                                       progress=False))


def test_a_checkpoint_older_than_awp_resumes(tmp_path: Path) -> None:
    """A checkpoint written before AWP (and --val-data) existed has no awp_* settings: it ran
    without AWP, so it resumes as a run at their defaults, and only as one."""
    data = _small_digits()
    settings: dict[str, Any] = {"epochs": 1, "canary_size": 32, "canary_steps": 2}
    first = FGSMRS(**settings).apply(_net(), data, threat=THREAT, run=RunConfig(out_dir=tmp_path, progress=False))
    path = tmp_path / checkpoint.FILENAME
    saved = checkpoint.load(path)
    for name in ("awp_gamma", "awp_warmup"):
        del saved["recipe"]["params"][name]
    del saved["recipe"]["val_sha256"]
    checkpoint.save(path, {k: v for k, v in saved.items() if k != "format"})
    resumed = FGSMRS(**settings).apply(_net(), data, threat=THREAT,
                                       run=RunConfig(out_dir=tmp_path, resume=True, progress=False))
    assert resumed.history == first.history
    with pytest.raises(RobustkitError, match=r"awp_gamma was 0\.0, now 0\.005"):
        FGSMRS(**settings, awp_gamma=GAMMA).apply(_net(), data, threat=THREAT,
                                                  run=RunConfig(out_dir=tmp_path, resume=True, progress=False))


@dataclasses.dataclass(frozen=True)
class _ClippingParams(FGSMRS.Params):  # type: ignore[name-defined]
    max_grad_norm: float = 1.0  # clipping on by default, as the text defences have it


class _ClippingFGSMRS(FGSMRS):
    Params = _ClippingParams


def test_a_checkpoint_older_than_clipping_resumes_only_unclipped(tmp_path: Path) -> None:
    """A checkpoint without max_grad_norm was trained unclipped, whatever the defence's default is
    now: resuming it with clipping on would be another run (loop.OFF_WHEN_ABSENT)."""
    data = _small_digits()
    settings: dict[str, Any] = {"epochs": 1, "canary_size": 32, "canary_steps": 2, "max_grad_norm": 0.0}
    first = _ClippingFGSMRS(**settings).apply(_net(), data, threat=THREAT,
                                              run=RunConfig(out_dir=tmp_path, progress=False))
    path = tmp_path / checkpoint.FILENAME
    saved = checkpoint.load(path)
    del saved["recipe"]["params"]["max_grad_norm"]
    checkpoint.save(path, {k: v for k, v in saved.items() if k != "format"})
    resume = RunConfig(out_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(RobustkitError, match=r"max_grad_norm was 0\.0, now 1\.0"):
        _ClippingFGSMRS(**{**settings, "max_grad_norm": 1.0}).apply(_net(), data, threat=THREAT, run=resume)
    assert _ClippingFGSMRS(**settings).apply(_net(), data, threat=THREAT, run=resume).history == first.history


def test_warmup_defaults_and_limits() -> None:
    assert FGSMRS().params.awp_warmup == 0 and TRADES().params.awp_warmup == 10  # the paper's code
    with pytest.raises(ValueError, match="awp_warmup 10 leaves none of the 10 epochs"):
        TRADES(epochs=10, awp_gamma=GAMMA)
    TRADES(epochs=10)  # without AWP the warm-up is moot


class _OwnLoop(Defence):
    name = "ownloop"
    kind = "training"
    loop = OWN_LOOP
    summary = "a defence that trains in a library's loop"

    def apply(self, model: nn.Module, data: Dataset | None, *, threat: ThreatModel,
              run: RunConfig | None = None) -> DefenceResult:
        raise AssertionError("refused before training")


def test_awp_is_refused_for_a_defence_with_its_own_loop(host: Any, register_plugin: Any) -> None:
    class Plugin:
        @hookimpl
        def robustkit_register_defences(self, registry: Any) -> None:
            registry.add(_OwnLoop)

    register_plugin(Plugin(), "fake", provider="fake")
    request = HardenRequest(model="builtin:digits-cnn", data="builtin:digits", defence="fake:ownloop", awp=GAMMA)
    with pytest.raises(RobustkitError, match=r"^defence 'fake:ownloop' trains in its own loop, which cannot "
                                             r"honour --awp; drop"):
        resolve_defence(request)
    _, defence = resolve_defence(dataclasses.replace(request, defence="fgsm-rs"))
    assert defence.params.awp_gamma == GAMMA


def test_a_step_that_updates_by_itself_refuses_awp() -> None:
    model = _net()
    ctx = _context(model, 0.1, WeightPerturbation(model, GAMMA, DistContext()))
    with pytest.raises(RobustkitError, match="cannot perturb the weights"):
        ctx.update(model(_batch()[0]).sum())


def test_a_negative_gamma_is_a_one_line_error() -> None:
    with pytest.raises(ParamsError, match="awp_gamma and awp_warmup must be >= 0"):
        resolve_defence(HardenRequest(model="m", data="d", defence="fgsm-rs", awp=-1.0))
