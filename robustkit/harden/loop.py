"""The training loop: one for every training defence.

A defence contributes only its *step* (``robustkit.harden.step``); the loop owns everything
else, once: the validation split, data placement and sharding (``batches``), precision
(bf16/fp16 autocast, a GradScaler for fp16), channels-last, ``torch.compile``, DDP, the
learning-rate schedule, adversarial weight perturbation (``awp``, after its warm-up), the
robust-accuracy canary with catastrophic-overfitting detection and early stopping (``canary``)
on a split of the training data or on ``--val-data``, the best weights, atomic checkpoints every
epoch, ``--resume``, and Ctrl-C (SIGINT/SIGTERM finish the batch, write a checkpoint and stop).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress
from torch import Tensor, nn

from robustkit import distributed
from robustkit.console import progress
from robustkit.data import Dataset, tensors_sha256
from robustkit.distributed import DistContext, init_distributed
from robustkit.environment import parse_device
from robustkit.errors import Interrupted, RobustkitError
from robustkit.harden import checkpoint
from robustkit.harden.augment import batch_generator, parse_augmentation
from robustkit.harden.awp import WeightPerturbation
from robustkit.harden.base import DefenceResult
from robustkit.harden.batches import Batches, validation_split
from robustkit.harden.canary import RunState, judge_epoch
from robustkit.harden.config import RunConfig, TrainingParams
from robustkit.harden.step import LoopDefence, Optimization, StepContext
from robustkit.io import atomic_write
from robustkit.models.base import state_sha256
from robustkit.modules import seeded
from robustkit.threat import ThreatModel

log = logging.getLogger(__name__)

LOG_FILENAME = "train_log.jsonl"
#: Under torchrun, ranks agree on a stop request every this many batches (one tiny all-reduce).
STOP_SYNC_EVERY = 8


class TrainingInterrupted(Interrupted):
    """Raised after Ctrl-C/SIGTERM once the checkpoint is on disk (exit 130)."""


def lr_factor(kind: str, total_steps: int, milestones: tuple[float, ...] = (0.5, 0.75)) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step t, evaluated at the middle of the step.
    ``milestones``: for the piecewise schedule, the shares of the run after which the rate is
    divided by 10 (Madry et al. and Rice et al. decay at half and three quarters)."""

    def factor(t: int) -> float:
        position = min(1.0, (t + 0.5) / total_steps)
        if kind == "cyclic":  # Smith's one-cycle as fast AT uses it: up to the peak at 2/5, down to 0
            return position / 0.4 if position < 0.4 else (1.0 - position) / 0.6
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * position))
        if kind == "piecewise":
            return 0.1 ** sum(position >= m for m in milestones)
        return 1.0

    return factor


def make_optimizer(params: TrainingParams, module: nn.Module) -> torch.optim.Optimizer:
    if params.optimizer == "sgd":
        return torch.optim.SGD(
            module.parameters(),
            lr=params.lr,
            momentum=0.9,
            nesterov=params.nesterov,
            weight_decay=params.weight_decay,
        )
    return torch.optim.Adam(module.parameters(), lr=params.lr, weight_decay=params.weight_decay)


@contextmanager
def _stop_on_signals() -> Iterator[dict[str, bool]]:
    """SIGINT/SIGTERM set a flag that the loop honours at the next batch; a second Ctrl-C aborts."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag["stop"] and signum == signal.SIGINT:
            signal.default_int_handler(signum, frame)
        flag["stop"] = True
        log.warning(
            "%s: finishing this batch, writing a checkpoint, then stopping (Ctrl-C again aborts)",
            signal.Signals(signum).name,
        )

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def resolve_device(spec: str, world: DistContext) -> torch.device:
    """The device of this process: under torchrun, a CUDA run uses the GPU of its local rank."""
    device = parse_device(spec)
    if device.type == "cuda":
        if world.enabled:  # torchrun: one GPU per local rank
            device = torch.device("cuda", world.local_rank)
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def recipe(
    defence: LoopDefence, threat: ThreatModel, data: Dataset, model: nn.Module, run: RunConfig
) -> dict[str, Any]:
    """What must match for ``--resume`` to continue the same run: the defence and its settings,
    the threat model, the training and validation data, the weights the run started from
    (another MODEL, or other --mean/--std, is another run) and the precision (fp32 and bf16
    epochs must not mix). Device, workers, channels-last and compile may change: they change
    speed, not the run."""
    x, y = data.training_split()
    return {
        "defence": defence.name,
        "params": dataclasses.asdict(defence.params),
        "threat": {"norm": threat.norm.value, "eps": threat.eps, "bounds": list(threat.bounds)},
        "train_sha256": tensors_sha256(x, y),
        "val_sha256": None if data.x_val is None or data.y_val is None else tensors_sha256(data.x_val, data.y_val),
        "start_weights_sha256": state_sha256(model),
        "precision": run.precision,
    }


#: Recipe keys and how a difference is named on resume.
_RECIPE_KEYS = {
    "defence": "the defence",
    "threat": "the threat model",
    "train_sha256": "the training data",
    "val_sha256": "the validation data (--val-data)",
    "start_weights_sha256": "the model's starting weights (another MODEL, --arch or --mean/--std)",
    "precision": "--precision",
}


#: Settings whose absence from a checkpoint means the run went without them, whatever their
#: default is now: text defences clip at 1 by default, and their checkpoints from before
#: clipping existed were trained unclipped (resuming them clipped would be another run).
OFF_WHEN_ABSENT: dict[str, Any] = {"max_grad_norm": 0.0}


def _recipe_difference(saved: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any]) -> str | None:
    """What makes ``saved`` another run than ``current``, or None. A setting missing from
    ``saved`` is newer than its checkpoint (awp_gamma in one written before AWP): that run
    went without it, so it counts as ``defaults[key]`` (the defence's default, or off:
    ``OFF_WHEN_ABSENT``)."""
    for key, what in _RECIPE_KEYS.items():
        if saved.get(key) != current[key]:
            if key == "precision":
                return f"--precision was {saved.get(key)}, now {current[key]}"
            return f"{what} differs"
    for key, value in current["params"].items():
        before = saved["params"].get(key, defaults[key])
        if before != value:
            return f"{key} was {before!r}, now {value!r}"
    return None


class Engine:
    """One hardening run of ``defence`` on ``model``; ``run()`` trains and returns the result."""

    def __init__(
        self,
        defence: LoopDefence,
        model: nn.Module,
        data: Dataset,
        threat: ThreatModel,
        run: RunConfig,
    ) -> None:
        x_all, y_all = data.training_split()
        params: TrainingParams = defence.params
        self.defence, self.params, self.threat, self.run_config = defence, params, threat, run
        self.world = init_distributed(run.device)
        self.device = resolve_device(run.device, self.world)
        if params.batch_size % self.world.world_size:
            raise RobustkitError(
                f"batch_size {params.batch_size} is not divisible by the {self.world.world_size} "
                "processes; batch_size is the global batch"
            )
        self.recipe = recipe(defence, threat, data, model, run)
        if data.x_val is not None and data.y_val is not None:  # --val-data: every training sample trains
            x_train, y_train = x_all, y_all
            chosen = torch.randperm(len(data.y_val), generator=torch.Generator().manual_seed(params.seed))
            self.x_val, self.y_val = data.x_val[chosen], data.y_val[chosen]
            if self.world.is_main:
                log.info("canary on %d of the %d samples of the validation data (val_fraction unused)",
                         min(params.canary_size, len(chosen)), len(chosen))
        else:
            x_train, y_train, self.x_val, self.y_val = validation_split(
                x_all, y_all, params.val_fraction, params.seed
            )
        self.x_val, self.y_val = self.x_val[: params.canary_size], self.y_val[: params.canary_size]
        self.augmentation = parse_augmentation(params.augment, tuple(x_train.shape[1:]), params.crop_padding)
        if self.augmentation.active and self.world.is_main:
            log.info("augmentation on the device: %s (augment=%s)", self.augmentation.describe(), params.augment)
        self.batches = Batches(
            x_train,
            y_train,
            batch_size=params.batch_size // self.world.world_size,
            seed=params.seed,
            world=self.world,
            device=self.device,
            run=run,
        )

        self.module = model.to(self.device)
        if run.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        craft: nn.Module = torch.compile(self.module) if run.compile else self.module  # type: ignore[assignment]
        trained = distributed.wrap_ddp(self.module, self.world, self.device)
        if run.compile:
            trained = torch.compile(trained) if self.world.enabled else craft  # type: ignore[assignment]
        self.epochs = math.ceil(params.epochs / defence.replays)
        total_steps = self.epochs * len(self.batches) * defence.replays
        optimizer = make_optimizer(params, self.module)
        schedule = lr_factor(params.schedule, total_steps, params.milestone_shares())
        optimization = Optimization(
            optimizer,
            torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
            torch.amp.GradScaler(self.device.type) if run.precision == "fp16" else None,
            params.max_grad_norm,
        )
        generator = torch.Generator(self.device).manual_seed(params.seed * 1000 + self.world.rank)
        self.ctx = StepContext(
            model=trained,
            craft=craft,
            threat=threat,
            device=self.device,
            precision=run.precision,
            generator=generator,
            optimization=optimization,
            seed=params.seed,
            world=self.world,
            train_size=len(y_train),
        )
        if params.awp_gamma:
            self.ctx.awp = WeightPerturbation(self.module, params.awp_gamma, self.world, run.compile)
            if self.world.is_main:
                log.info("adversarial weight perturbation: gamma %g from epoch %d", params.awp_gamma,
                         params.awp_warmup + 1)
        self.step = defence.make_step(self.ctx)
        self.state = RunState()
        self.out = run.out_dir if self.world.is_main else None

    # -- checkpoints ---------------------------------------------------------------------------
    def _checkpoint(self) -> None:
        """Gather every rank's random states and carried state; rank 0 writes them atomically."""
        ranks = distributed.gather(
            {
                "rng": checkpoint.capture_rng(self.ctx.generator),
                "carry": {k: v.cpu() for k, v in self.ctx.carry.items()},
                "running": list(self.state.running),  # each rank's share of the epoch's sums
            },
            self.world,
        )
        if self.out is None:
            return
        opt, state = self.ctx.optimization, self.state
        checkpoint.save(
            self.out / checkpoint.FILENAME,
            {
                "recipe": self.recipe,
                "world_size": self.world.world_size,
                "ranks": ranks,
                "epoch": state.epoch,
                "batch": state.batch,
                "running": state.running,
                "history": state.history,
                "best": state.best,
                "stale": state.stale,
                "stop_reason": state.stop_reason,
                "model": self.module.state_dict(),
                "optimizer": opt.optimizer.state_dict(),
                "scheduler": opt.scheduler.state_dict(),
                "scaler": opt.scaler.state_dict() if opt.scaler is not None else None,
            },
        )

    def _resume(self) -> None:
        assert self.run_config.out_dir is not None
        path = self.run_config.out_dir / checkpoint.FILENAME
        if not path.is_file():
            raise RobustkitError(f"--resume: no checkpoint at {path}; run without --resume to start")
        saved = checkpoint.load(path)
        defaults = {**{f.name: f.default for f in dataclasses.fields(self.params)}, **OFF_WHEN_ABSENT}
        difference = _recipe_difference(saved["recipe"], self.recipe, defaults)
        if difference:
            raise RobustkitError(
                f"--resume: the checkpoint in {path.parent} is for another run ({difference}); "
                "resume with the same options or start afresh with another --out"
            )
        try:
            self.module.load_state_dict(saved["model"])
        except RuntimeError as err:
            raise RobustkitError(
                f"--resume: the checkpoint's weights do not fit this model ({str(err).splitlines()[0]})"
            ) from None
        ctx, opt = self.ctx, self.ctx.optimization
        opt.optimizer.load_state_dict(saved["optimizer"])
        opt.scheduler.load_state_dict(saved["scheduler"])
        if opt.scaler is not None and saved["scaler"] is not None:
            opt.scaler.load_state_dict(saved["scaler"])
        if saved["world_size"] == self.world.world_size:
            mine = saved["ranks"][self.world.rank]
            checkpoint.restore_rng(mine["rng"], ctx.generator)
            ctx.carry.update({k: v.to(self.device) for k, v in mine["carry"].items()})
        else:
            log.warning(
                "the checkpoint was written by %d processes, this run has %d: random states start "
                "afresh, so the run will not repeat the original exactly",
                saved["world_size"],
                self.world.world_size,
            )
        self.state = RunState(
            saved["epoch"],
            saved["batch"],
            self._resumed_sums(saved),
            list(saved["history"]),
            saved["best"],
            saved["stale"],
            saved["stop_reason"],
        )
        if self.out is not None:  # the log is the history: rewrite it so no epoch appears twice
            atomic_write(self.out / LOG_FILENAME, "".join(json.dumps(r) + "\n" for r in self.state.history))
        log.info("resumed at epoch %d, batch %d", self.state.epoch, self.state.batch)

    def _resumed_sums(self, saved: dict[str, Any]) -> list[float]:
        """This rank's share of the interrupted epoch's running sums (loss, accuracy, ...), which the
        epoch's end adds up over the ranks: each rank its own, or, with another number of
        processes (or a checkpoint that kept rank 0's only), rank 0 all of them and the others none."""
        shares = [r["running"] for r in saved["ranks"]] if all("running" in r for r in saved["ranks"]) \
            else [saved["running"]]
        if len(shares) == self.world.world_size:
            return list(shares[self.world.rank])
        if self.world.is_main:
            return [sum(column) for column in zip(*shares)]
        return [0.0] * len(saved["running"])

    # -- training ------------------------------------------------------------------------------
    def run(self) -> DefenceResult:
        """Train; torch's global generators (dropout, library attacks) are seeded from the run
        (or restored from the checkpoint) inside, and the caller's are left as they were."""
        with seeded(self.params.seed + self.world.rank, self.device):
            return self._run()

    def _run(self) -> DefenceResult:
        previous_benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = self.device.type == "cuda"  # fixed shapes: pick fast kernels
        try:
            if self.out is not None:  # a checkpoint half-written by a killed process
                for stale in self.out.glob(f".{checkpoint.FILENAME}.*.tmp"):
                    stale.unlink(missing_ok=True)
            if self.run_config.resume:
                self._resume()
            elif self.out is not None:
                atomic_write(self.out / LOG_FILENAME, "")
            show = self.run_config.progress and self.world.is_main
            with self._signals() as flag, progress() if show else Progress(disable=True) as bar:
                while self.state.epoch < self.epochs and self.state.stop_reason is None:
                    if distributed.any_rank(flag["stop"], self.world):  # between epochs: that checkpoint is on disk
                        raise TrainingInterrupted(self._interrupted(f"after epoch {self.state.epoch}"))
                    self._epoch(bar, flag)
        finally:
            torch.backends.cudnn.benchmark = previous_benchmark
        if self.state.best is not None:
            self.module.load_state_dict(self.state.best["model"])
        self.module.eval()
        notes = [note for record in self.state.history for note in record.get("notes", [])]
        return DefenceResult(self.module, self.state.history, notes)

    def _epoch(self, bar: Any, flag: dict[str, bool]) -> None:
        state, epoch = self.state, self.state.epoch
        task = bar.add_task(f"epoch {epoch + 1}/{self.epochs}", total=len(self.batches), completed=state.batch)
        self.module.train()
        if self.ctx.awp is not None:  # off during the warm-up (counted in passes over the data)
            self.ctx.awp.active = (epoch + 1) * self.defence.replays > self.params.awp_warmup
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        count, started = 0, time.perf_counter()
        refresh = max(1, len(self.batches) // 10)  # a host sync 10 times an epoch, for the display
        for number, (xb, yb, index) in enumerate(self.batches.epoch(epoch, state.batch), start=state.batch + 1):
            self.ctx.batch_index = index
            if self.augmentation.active:
                draws = batch_generator(self.device, self.params.seed, self.world.rank, epoch, number)
                xb = self.augmentation(xb, draws, fill=self.threat.bounds[0])
            loss, logits = self.step(xb, yb)
            loss_sum += loss * len(yb)
            correct += (logits.argmax(1) == yb).sum()
            count += len(yb)
            bar.advance(task)
            if not bar.disable and number % refresh == 0:
                bar.update(
                    task,
                    description=f"epoch {epoch + 1}/{self.epochs} loss {float(loss_sum) / count:.3f} "
                    f"adversarial accuracy {float(correct) / count:.1%}",
                )
            stop = (
                flag["stop"]
                if not self.world.enabled
                else (number % STOP_SYNC_EVERY == 0 and distributed.any_rank(flag["stop"], self.world))
            )
            if stop and number < len(self.batches):
                self._accumulate(loss_sum, correct, count, started)
                state.batch = number
                self._checkpoint()
                bar.remove_task(task)
                raise TrainingInterrupted(
                    self._interrupted(f"in epoch {epoch + 1} after batch {number}/{len(self.batches)}")
                )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._accumulate(loss_sum, correct, count, started)
        loss_total, correct_total, n, seconds = state.running
        loss_total, correct_total, n = distributed.sum_over_ranks([loss_total, correct_total, n], self.world)
        canary_started = time.perf_counter()
        clean, robust = self.defence.canary(
            self.ctx.craft,
            self.x_val,
            self.y_val,
            self.threat,
            self.params,
            self.run_config.precision,
            self.world,
            self.device,
        )
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": loss_total / n,
            "train_adv_accuracy": correct_total / n,
            "val_clean": clean,
            "val_robust": robust,
            "lr": self.ctx.optimization.scheduler.get_last_lr()[0],
            "seconds": round(seconds, 4),
            "canary_seconds": round(time.perf_counter() - canary_started, 4),
            "best": False,
            "overfit": False,
        }
        notes = judge_epoch(
            state,
            record,
            self.params,
            self.defence.monitor,
            self.defence.overfit_advice,
            lambda: {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()},
        )
        if notes:
            record["notes"] = notes
            if self.world.is_main:
                for note in notes:
                    log.warning("%s", note)
        record["stop"] = state.stop_reason
        state.history.append(record)
        state.epoch, state.batch, state.running = epoch + 1, 0, [0.0, 0.0, 0.0, 0.0]
        self._checkpoint()
        if self.out is not None:
            with (self.out / LOG_FILENAME).open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        line = f"epoch {epoch + 1}/{self.epochs} loss {record['loss']:.3f} clean {clean:.1%} robust {robust:.1%}" + (
            " *" if record["best"] else ""
        )
        bar.update(task, description=line)
        bar.remove_task(task)
        if not bar.disable:
            bar.console.print(line)
        log.info("%s", line)

    def _signals(self) -> AbstractContextManager[dict[str, bool]]:
        """Without an output folder there is nowhere to save to: Ctrl-C then interrupts at once."""
        return _stop_on_signals() if self.run_config.out_dir is not None else nullcontext({"stop": False})

    def _interrupted(self, where: str) -> str:
        return (
            f"interrupted {where}; the checkpoint in {self.run_config.out_dir} holds the run: "
            "rerun the same command with --resume to continue"
        )

    def _accumulate(self, loss_sum: Tensor, correct: Tensor, count: int, started: float) -> None:
        running = self.state.running
        self.state.running = [
            running[0] + float(loss_sum),
            running[1] + float(correct),
            running[2] + count,
            running[3] + time.perf_counter() - started,
        ]


def train(
    defence: LoopDefence,
    model: nn.Module,
    data: Dataset,
    threat: ThreatModel,
    run: RunConfig | None = None,
) -> DefenceResult:
    """Harden ``model`` in place with ``defence``; returns it with the per-epoch history.

    With ``run.out_dir`` set, checkpoints and the JSON-lines log go there; ``run.resume``
    continues the checkpoint found there.
    """
    run = run or RunConfig()
    if run.out_dir is not None:
        Path(run.out_dir).mkdir(parents=True, exist_ok=True)
    return Engine(defence, model, data, threat, run).run()
