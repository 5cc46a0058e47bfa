"""The hardening engine and the built-in training defences, on the bundled digits.

Runs are a few epochs long; every check compares against a measured baseline (plain
training, or the uninterrupted run), never against a hard-coded result.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from robustkit.attacks.native import PGD
from robustkit.audit.engine import NamedAttack, evaluate
from robustkit.data import Dataset, load_digits
from robustkit.distributed import DistContext
from robustkit.errors import RobustkitError
from robustkit.harden import checkpoint
from robustkit.harden.base import DefenceResult
from robustkit.harden.batches import Batches, validation_split
from robustkit.harden.canary import RunState, canary, judge_epoch
from robustkit.harden.config import RunConfig, TrainingParams
from robustkit.harden.defences import ATTA, FGSMRS, PGDAT, TRADES, Free, Standard, TrainingDefence
from robustkit.harden.loop import lr_factor
from robustkit.harden.step import Step, StepContext
from robustkit.models.zoo import digits_cnn
from robustkit.testing import check_resume_is_exact, trained_digits_model
from robustkit.threat import Norm, ThreatModel

EPS = 0.2
THREAT = ThreatModel("linf", EPS)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_digits()


def robust_accuracy(model: nn.Module, data: Dataset) -> tuple[float, float]:
    """(clean, PGD-10 robust) accuracy on the evaluation split at EPS."""
    result = evaluate(model.eval(), data.x, data.y, [NamedAttack("pgd", PGD(steps=10))], [THREAT])
    return result.clean_accuracy, result.robust_accuracy(result.outcomes[0], EPS)


def batches_per_epoch(data: Dataset, batch_size: int = 64, val_fraction: float = 0.1) -> int:
    assert data.y_train is not None
    n = len(data.y_train)
    return math.ceil((n - round(val_fraction * n)) / batch_size)


def fresh_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return digits_cnn()


# -- each defence makes the model more robust than plain training ----------------------------
DEFENCE_CASES: dict[str, TrainingDefence] = {
    "pgd-at": PGDAT(epochs=4, steps=3),
    "fgsm-rs": FGSMRS(epochs=5),
    "atta": ATTA(epochs=5),
    "free": Free(epochs=8, replays=2),
    "trades": TRADES(epochs=4, steps=3),
}


@pytest.fixture(scope="module")
def plain_robustness(digits: Dataset) -> tuple[float, float]:
    return robust_accuracy(trained_digits_model("cnn"), digits)


@pytest.mark.parametrize("name", sorted(DEFENCE_CASES))
def test_defence_beats_plain_training(name: str, digits: Dataset, plain_robustness: tuple[float, float]) -> None:
    defence = DEFENCE_CASES[name]
    result = defence.apply(fresh_model(), digits, threat=THREAT, run=RunConfig(progress=False))
    clean, robust = robust_accuracy(result.model, digits)
    plain_clean, plain_robust = plain_robustness
    assert plain_clean > 0.9  # the baseline is a real classifier, just not a robust one
    assert robust >= plain_robust + 0.2, f"{name}: robust {robust:.1%} vs plain {plain_robust:.1%}"
    assert clean > 0.6
    assert not any(r["overfit"] for r in result.history)
    assert [r["epoch"] for r in result.history] == list(range(1, len(result.history) + 1))


def test_atta_carries_each_samples_perturbation_across_epochs(digits: Dataset, tmp_path: Path) -> None:
    ATTA(epochs=2).apply(fresh_model(), digits, threat=THREAT, run=RunConfig(out_dir=tmp_path, progress=False))
    carried = checkpoint.load(tmp_path / checkpoint.FILENAME)["ranks"][0]["carry"]["perturbation"]
    assert digits.y_train is not None
    x_train, _, _, _ = validation_split(digits.x_train, digits.y_train, 0.1, seed=0)
    assert carried.shape == x_train.shape
    assert not carried.isnan().any()  # every training sample was perturbed
    assert carried.abs().max() <= EPS + 1e-6
    # Away from the bounds, one step of eps/2 from a uniform start reaches the edge of the ball
    # for a quarter of the pixels; only a second step, from where epoch 1 left off, goes past.
    interior = (x_train > EPS) & (x_train < 1 - EPS)
    at_edge = float((carried[interior].abs() > EPS - 1e-6).float().mean())
    assert at_edge > 0.32, f"{at_edge:.1%} of the interior pixels at the edge of the ball"


@pytest.mark.parametrize(("defence", "precision"), [(FGSMRS(epochs=5), "bf16"), (Free(epochs=6, replays=2), "fp16")])
def test_reduced_precision_trains(
    defence: TrainingDefence,
    precision: str,
    digits: Dataset,
    plain_robustness: tuple[float, float],
    tmp_path: Path,
) -> None:
    """bf16 autocast, and fp16 with a GradScaler (free reads input gradients from the scaled
    backward pass and must unscale them), train weights kept in fp32."""
    run = RunConfig(precision=precision, out_dir=tmp_path, progress=False)  # type: ignore[arg-type]
    result = defence.apply(fresh_model(), digits, threat=THREAT, run=run)
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
    assert all(np.isfinite(r["loss"]) for r in result.history)
    scaler = checkpoint.load(tmp_path / checkpoint.FILENAME)["scaler"]
    assert (scaler is not None) == (precision == "fp16")
    _, robust = robust_accuracy(result.model, digits)
    assert robust >= plain_robustness[1] + 0.15


def test_any_registered_attack_is_the_inner_maximiser(host: Any, digits: Dataset, monkeypatch: Any) -> None:
    """pgd-at resolves --attack in the registry and passes only the settings the attack has."""
    defence = PGDAT(epochs=1, attack="fgsm", steps=3)
    inner = defence.inner_attack("bf16")
    assert inner.name == "fgsm" and inner.params.precision == "bf16"
    assert PGDAT(steps=4).inner_attack("fp32").params.last_iterate
    with pytest.raises(RobustkitError, match="unknown attack"):
        PGDAT(attack="no-such-attack").check(THREAT)
    class LinfOnly(PGD):
        name = "linf-only"
        norms = frozenset({Norm.LINF})

    monkeypatch.setattr(PGDAT, "_attack_class", lambda self: LinfOnly)
    with pytest.raises(RobustkitError, match="attack 'linf-only' supports linf, not l2"):
        PGDAT(attack="linf-only").check(ThreatModel("l2", 1.0))


# -- resume ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "crash"),
    [
        (lambda: FGSMRS(epochs=2), False),
        (lambda: Free(epochs=4, replays=2), True),
        (lambda: ATTA(epochs=3), False),  # per-sample perturbations carried through the checkpoint
    ],
)
def test_interrupted_and_resumed_run_ends_where_an_uninterrupted_one_does(
    make: Any, crash: bool, digits: Dataset, tmp_path: Path
) -> None:
    histories: dict[Path, list[dict[str, Any]]] = {}

    def train(out: Path, resume: bool) -> dict[str, Tensor]:
        random.seed(123), np.random.seed(123)  # resume must not depend on these (torch's: the helper)
        result = make().apply(fresh_model(), digits, threat=THREAT,  # the same MODEL: another start is refused
                              run=RunConfig(out_dir=out, resume=resume, progress=False))
        histories[out] = result.history
        return result.model.state_dict()

    def saved_position(out: Path) -> None:  # Ctrl-C saves the batch it stopped at; a crash loses the epoch's progress
        saved = checkpoint.load(out / checkpoint.FILENAME)
        assert (saved["epoch"], saved["batch"]) == ((1, 0) if crash else (1, 5))

    at = batches_per_epoch(digits) + 5  # mid-epoch 2
    check_resume_is_exact(train, type(make()), at, tmp_path, crash=crash, between=saved_position)
    whole, resumed = histories[tmp_path / "whole"], histories[tmp_path / "split"]
    assert [r["val_robust"] for r in resumed] == [r["val_robust"] for r in whole]
    log_lines = (tmp_path / "split" / "train_log.jsonl").read_text().splitlines()
    assert len(log_lines) == len(whole)  # no epoch logged twice


def test_resume_refuses_a_checkpoint_of_another_run(digits: Dataset, tmp_path: Path) -> None:
    FGSMRS(epochs=1).apply(fresh_model(), digits, threat=THREAT, run=RunConfig(out_dir=tmp_path, progress=False))
    with pytest.raises(RobustkitError, match=r"another run \(lr was"):
        FGSMRS(epochs=1, lr=0.01).apply(
            fresh_model(),
            digits,
            threat=THREAT,
            run=RunConfig(out_dir=tmp_path, resume=True, progress=False),
        )
    (tmp_path / checkpoint.FILENAME).write_bytes(b"not a checkpoint")
    with pytest.raises(RobustkitError, match="not a readable robustkit checkpoint"):
        FGSMRS(epochs=1).apply(
            fresh_model(),
            digits,
            threat=THREAT,
            run=RunConfig(out_dir=tmp_path, resume=True, progress=False),
        )


# -- catastrophic overfitting ----------------------------------------------------------------
class _ExamplesGoStale(FGSMRS):
    """fgsm-rs whose examples stop being adversarial after ``switch`` optimizer steps."""

    switch = 0

    def make_step(self, ctx: StepContext) -> Step:
        adversarial, clean = super().make_step(ctx), Standard().make_step(ctx)

        def step(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            return (adversarial if ctx.optimization.scheduler.last_epoch < self.switch else clean)(x, y)

        return step


def test_robust_collapse_is_detected_and_the_best_weights_kept(digits: Dataset) -> None:
    """Robust accuracy collapsing while clean accuracy holds must be flagged as catastrophic
    overfitting, stop the run and leave the best epoch's weights.

    FGSM training without a random start did not overfit catastrophically on the 8x8 digits in
    any setting tried (eps 0.2-0.3, lr up to 1e-2, 25 epochs, step up to 3 eps, CNN and
    ResNet), so the collapse is provoked within one run: after four epochs of fgsm-rs the
    examples stop being adversarial, as they do when a model learns to mask its gradients.
    """
    defence = _ExamplesGoStale(epochs=8, schedule="constant", patience=0, overfit_drop=0.15)
    defence.switch = 4 * batches_per_epoch(digits)
    result = defence.apply(fresh_model(), digits, threat=THREAT, run=RunConfig(progress=False))
    flagged = [r for r in result.history if r["overfit"]]
    assert flagged, [(r["val_clean"], r["val_robust"]) for r in result.history]
    assert result.history[-1] is flagged[0] and flagged[0]["epoch"] > 4
    assert result.history[-1]["stop"] == "catastrophic overfitting"
    assert any("catastrophic overfitting" in note for note in result.notes)
    best = [r for r in result.history if r["best"]][-1]
    assert best["epoch"] <= 4
    assert best["val_robust"] - flagged[0]["val_robust"] >= defence.params.overfit_drop
    # the returned model is the best epoch's, not the collapsed last one
    x_train, y_train = digits.x_train, digits.y_train
    assert x_train is not None and y_train is not None
    _, _, x_val, y_val = validation_split(x_train, y_train, defence.params.val_fraction, 0)
    accuracies = canary(result.model, x_val, y_val, THREAT, defence.params, "fp32", DistContext(), torch.device("cpu"))
    assert accuracies == pytest.approx((best["val_clean"], best["val_robust"]))


def _record(epoch: int, clean: float, robust: float) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "val_clean": clean,
        "val_robust": robust,
        "best": False,
        "overfit": False,
    }


@pytest.mark.parametrize(
    ("curve", "overfit", "stop"),
    [
        (
            [(0.6, 0.3), (0.8, 0.45), (0.9, 0.05)],
            [3],
            "catastrophic overfitting",
        ),  # collapse, clean up
        (
            [(0.6, 0.3), (0.8, 0.45), (0.3, 0.05)],
            [],
            None,
        ),  # divergence: both fall, not overfitting
        ([(0.6, 0.3), (0.8, 0.45), (0.8, 0.40), (0.85, 0.44)], [], "early stopping"),  # patience 2
    ],
)
def test_judge_epoch(curve: list[tuple[float, float]], overfit: list[int], stop: str | None) -> None:
    state, params = RunState(), TrainingParams(patience=2)
    for epoch, (clean, robust) in enumerate(curve, start=1):
        record = _record(epoch, clean, robust)
        judge_epoch(state, record, params, "val_robust", "advice", dict)
        state.history.append(record)
    assert [r["epoch"] for r in state.history if r["overfit"]] == overfit
    assert state.stop_reason == stop
    assert state.best is not None and state.best["epoch"] == 2


# -- pieces ----------------------------------------------------------------------------------
def test_schedules() -> None:
    total = 100
    cyclic = [lr_factor("cyclic", total)(t) for t in range(total)]
    assert max(cyclic) == pytest.approx(1.0, abs=0.02) and int(np.argmax(cyclic)) in (39, 40)
    assert cyclic[0] < 0.02 and cyclic[-1] < 0.02
    cosine = [lr_factor("cosine", total)(t) for t in range(total)]
    assert cosine == sorted(cosine, reverse=True) and cosine[-1] < 0.01
    assert {lr_factor("constant", total)(t) for t in range(total)} == {1.0}


def test_batches_are_the_same_on_the_device_and_through_a_dataloader(digits: Dataset) -> None:
    x, y = digits.x[:200], digits.y[:200]
    cpu = torch.device("cpu")

    def batches(placement: str, world: DistContext, start: int = 0) -> list[Tensor]:
        run = RunConfig(placement=placement, workers=1)  # type: ignore[arg-type]
        source = Batches(x, y, batch_size=32, seed=3, world=world, device=cpu, run=run)
        served = []
        for xb, yb, index in source.epoch(2, start):
            assert torch.equal(x[index], xb) and torch.equal(y[index], yb)  # positions name the samples
            served.append(yb)
        return served

    on_device = batches("device", DistContext())
    assert torch.equal(torch.cat(on_device), torch.cat(batches("loader", DistContext())))
    assert torch.equal(torch.cat(on_device[2:]), torch.cat(batches("device", DistContext(), start=2)))
    # two ranks: each global batch of 32 is the union of the two ranks' batches of 16
    halves = [
        Batches(
            x,
            y,
            batch_size=16,
            seed=3,
            world=DistContext(rank, 2, rank),
            device=cpu,
            run=RunConfig(),
        )
        for rank in (0, 1)
    ]
    shards = [[yb for _, yb, _ in h.epoch(2)] for h in halves]
    assert sorted(torch.cat(shards[0] + shards[1]).tolist()) == sorted(y.tolist())


def test_validation_split_is_disjoint_and_seeded(digits: Dataset) -> None:
    x = torch.arange(100.0).view(100, 1, 1, 1)
    y = torch.arange(100)
    _, y_train, _, y_val = validation_split(x, y, 0.1, seed=5)
    assert len(y_val) == 10 and len(y_train) == 90
    assert not set(y_val.tolist()) & set(y_train.tolist())
    assert torch.equal(validation_split(x, y, 0.1, seed=5)[3], y_val)


def test_random_states_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    noise = torch.Generator().manual_seed(7)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    checkpoint.save(tmp_path / "c.pt", {"rng": checkpoint.capture_rng(noise)})
    expected = (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=noise))
    random.seed(2), np.random.seed(2), torch.manual_seed(2), noise.manual_seed(2)
    checkpoint.restore_rng(checkpoint.load(tmp_path / "c.pt")["rng"], noise)
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(1), expected[2]) and torch.equal(torch.rand(1, generator=noise), expected[3])


def test_training_needs_a_training_split(digits: Dataset) -> None:
    no_train = Dataset("eval-only", digits.x, digits.y, 10)
    with pytest.raises(RobustkitError, match="no training split"):
        FGSMRS(epochs=1).apply(fresh_model(), no_train, threat=THREAT)


def test_defence_result_is_the_trained_module(digits: Dataset) -> None:
    model = fresh_model()
    result: DefenceResult = Free(epochs=1, replays=1).apply(model, digits, threat=THREAT, run=RunConfig(progress=False))
    assert result.model is model and not model.training
