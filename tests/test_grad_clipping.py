"""Gradient clipping (``-o max_grad_norm``): the update is made with the gradient scaled to the
norm asked for (unscaled first under fp16, overflowing steps still skipped), 0 leaves it
untouched, and every step of a ``robustkit harden`` run goes through it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import Tensor, nn

from robustkit.cli import cli
from robustkit.harden.config import TrainingParams
from robustkit.harden.step import Optimization

LR = 0.5


def _model_and_loss() -> tuple[nn.Linear, Tensor]:
    """A linear model and a loss whose gradient norm is far above 1."""
    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    x, y = torch.randn(16, 8) * 100, torch.randint(0, 3, (16,))
    return model, F.cross_entropy(model(x), y)


def _optimization(model: nn.Module, max_grad_norm: float, scaler: torch.amp.GradScaler | None = None) -> Optimization:
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)  # plain SGD: the update is -lr * gradient
    return Optimization(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0), scaler, max_grad_norm)


def _update(max_grad_norm: float, scaler: torch.amp.GradScaler | None = None) -> tuple[Tensor, Tensor]:
    """(the gradient before any clipping, the update the step made), each flattened."""
    model, loss = _model_and_loss()
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    grad = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)])
    _optimization(model, max_grad_norm, scaler).update(loss)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    return grad, after - before


def test_the_update_uses_the_gradient_clipped_to_max_grad_norm() -> None:
    grad, update = _update(1.0)
    assert grad.norm() > 10
    torch.testing.assert_close(-update / LR, grad * (1.0 / grad.norm()), rtol=1e-4, atol=1e-6)


def test_zero_leaves_the_gradient_untouched() -> None:
    grad, update = _update(0.0)
    torch.testing.assert_close(-update / LR, grad, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")  # the overflowing step is skipped
def test_fp16_clips_the_unscaled_gradient_and_still_skips_overflowing_steps() -> None:
    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    except (RuntimeError, TypeError, AssertionError) as error:
        pytest.skip(f"this torch has no GradScaler on the CPU: {error}")
    grad, update = _update(1.0, scaler)
    torch.testing.assert_close(-update / LR, grad * (1.0 / grad.norm()), rtol=1e-4, atol=1e-6)

    model, _ = _model_and_loss()
    before = [p.detach().clone() for p in model.parameters()]
    opt = _optimization(model, 1.0, torch.amp.GradScaler("cpu", init_scale=1024.0))
    opt.update(model.weight.sum() * float("inf"))
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert opt.scaler is not None and opt.scaler.get_scale() < 1024.0  # the overflow was seen and backed off


def test_max_grad_norm_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="max_grad_norm"):
        TrainingParams(max_grad_norm=-1.0)


def test_harden_clips_before_every_update_at_the_norm_given_with_o(host: Any, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[Any] = []
    clip, adam_step = torch.nn.utils.clip_grad_norm_, torch.optim.Adam.step

    def spy_clip(parameters: Any, max_norm: float, *args: Any, **kwargs: Any) -> Tensor:
        events.append(max_norm)
        return clip(parameters, max_norm, *args, **kwargs)

    def spy_step(self: torch.optim.Adam, *args: Any, **kwargs: Any) -> Any:
        events.append("step")
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy_clip)
    monkeypatch.setattr(torch.optim.Adam, "step", spy_step)
    # free: each batch replayed, an update per replay, through ctx.train rather than adversarial_step
    result = CliRunner().invoke(cli, ["harden", "builtin:digits-cnn", "--data", "builtin:digits", "--defence", "free",
                                      "--epochs", "2", "--eps", "0.2", "-o", "canary_size", "64", "-o", "replays", "2",
                                      "-o", "max_grad_norm", "0.25", "--out", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    assert len(events) > 10 and events == [0.25, "step"] * (len(events) // 2)


def test_a_negative_max_grad_norm_is_a_one_line_error(host: Any, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["harden", "builtin:digits-cnn", "--defence", "fgsm-rs",
                                      "-o", "max_grad_norm", "-1", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "max_grad_norm must be >= 0" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
