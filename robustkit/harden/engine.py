"""The training engine: one loop for every training defence.

A defence contributes only its *step* (how a batch is perturbed and what loss is minimised);
the engine owns everything else, once: the validation split, data placement and sharding,
precision (bf16/fp16 autocast, a GradScaler for fp16), channels-last, ``torch.compile``, DDP,
the learning-rate schedule, the robust-accuracy canary with catastrophic-overfitting
detection and early stopping, the best weights, atomic checkpoints every epoch, ``--resume``,
and Ctrl-C (SIGINT/SIGTERM finish the batch, write a checkpoint and stop).

Examples are crafted through the *unwrapped* module (``ctx.craft``, never the DDP wrapper,
whose forward would prepare a gradient all-reduce that crafting never runs) and, unless a
defence documents otherwise, with every submodule in eval mode, so BatchNorm neither
normalises a batch by the statistics of its own perturbation nor records them.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from robustkit.attacks.native import PGD
from robustkit.console import progress
from robustkit.data import Dataset, tensors_sha256
from robustkit.distributed import DistContext, init_distributed
from robustkit.errors import RobustkitError
from robustkit.harden import checkpoint
from robustkit.harden import distributed as ddp
from robustkit.harden.base import DefenceResult
from robustkit.harden.config import Precision, RunConfig, TrainingParams
from robustkit.io import atomic_write
from robustkit.modules import eval_mode, predict_logits, seeded
from robustkit.threat import ThreatModel

log = logging.getLogger(__name__)

#: A training step: (x, y) -> (loss, logits of the inputs it trained on), both detached.
Step = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
#: A training loss: (model, x, x_adv, y) -> (loss, logits of x_adv), run under autocast.
TrainLoss = Callable[[nn.Module, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]

LOG_FILENAME = "train_log.jsonl"


class TrainingDefence(Protocol):
    """What the loop needs of a training defence (``robustkit.harden.defences.TrainingDefence``
    is the base class that provides it): a name and params for the recipe, the validation
    metric that picks the best epoch, replays per batch and the step."""

    name: ClassVar[str]
    monitor: ClassVar[str]
    params: Any

    @property
    def replays(self) -> int: ...

    def make_step(self, ctx: StepContext) -> Step: ...
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: fp16 input gradients of a summed loss can underflow; scaling by a power of two before the
#: backward pass and dividing after is exact and keeps them alive.
FP16_INPUT_SCALE = 1024.0
#: Clean validation accuracy may dip this much while robust accuracy collapses and still count
#: as "holding" (catastrophic overfitting, unlike divergence, leaves clean accuracy intact).
CLEAN_SLACK = 0.02
#: Under torchrun, ranks agree on a stop request every this many batches (one tiny all-reduce).
STOP_SYNC_EVERY = 8


class TrainingInterrupted(RobustkitError):
    """Raised after Ctrl-C/SIGTERM once the checkpoint is on disk."""


@dataclass
class StepContext:
    """What a defence's step may use; built by the engine for one run."""

    model: nn.Module  #: the forward pass that trains (DDP-wrapped and/or compiled)
    craft: nn.Module  #: the unwrapped module (compiled if asked): craft examples through this
    threat: ThreatModel
    device: torch.device
    precision: Precision
    generator: torch.Generator  #: random starts (on ``device``); checkpointed with the run
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    seed: int
    world: DistContext
    train_size: int  #: samples in the training split: per-sample state is indexed by position in it
    carry: dict[str, Tensor] = field(default_factory=dict)  #: state kept across batches (checkpointed)
    #: Positions in the training split of the batch being stepped on, on the device that holds
    #: the training data (the training device when it fits there, else the host): per-sample
    #: state belongs there too. Set by the engine before each step.
    batch_index: Tensor | None = None

    def autocast(self) -> AbstractContextManager[Any]:
        dtype = _AUTOCAST.get(self.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def update(self, loss: Tensor) -> float:
        """One optimizer and schedule step on ``loss``.

        Returns the factor by which the backward pass scaled every gradient (the GradScaler's
        scale under fp16, else 1), so a step that also reads input gradients from this backward
        pass (free training) can unscale them.
        """
        self.optimizer.zero_grad(set_to_none=True)
        scale = 1.0
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            scale = self.scaler.get_scale()
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()
        return scale

    def input_gradient(self, x: Tensor, objective: Callable[[Tensor], Tensor]) -> Tensor:
        """Gradient of ``objective(fp32 logits of craft(x))`` with respect to ``x``, in fp32.

        Only the input gradient is computed (parameter ``.grad`` is untouched); under fp16 the
        objective is scaled before the backward pass and the gradient unscaled after.
        """
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            with self.autocast():
                logits = self.craft(x)
            value = objective(logits.float())
            scaled = self.precision == "fp16"
            (grad,) = torch.autograd.grad(value * FP16_INPUT_SCALE if scaled else value, x)
        return grad / FP16_INPUT_SCALE if scaled else grad

    def step_seed(self) -> int:
        """A seed unique to this run, rank and optimizer step, restored exactly on resume."""
        return hash((self.seed, self.world.rank, self.scheduler.last_epoch)) & 0x7FFF_FFFF


def cross_entropy_loss(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Madry's outer objective: cross-entropy at the adversarial examples only."""
    logits = model(x_adv).float()
    return F.cross_entropy(logits, y), logits


def adversarial_step(
    ctx: StepContext,
    perturb: Callable[[Tensor, Tensor], Tensor],
    loss: TrainLoss = cross_entropy_loss,
) -> Step:
    """The usual step: craft ``x_adv = perturb(x, y)``, then one update on ``loss``."""

    def step(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x_adv = perturb(x, y)
        with ctx.autocast():
            value, logits = loss(ctx.model, x, x_adv, y)
        ctx.update(value)
        return value.detach(), logits.detach()

    return step


# -- data ------------------------------------------------------------------------------------
class _Pairs(torch.utils.data.Dataset[tuple[Tensor, Tensor]]):
    """Indexed by a whole batch of indices, so a DataLoader worker gathers a batch at once."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: Tensor) -> tuple[Tensor, Tensor]:
        return self.x[index], self.y[index]


class Batches:
    """Shuffled (and, under torchrun, sharded) batches: on the device when the data fits there,
    else gathered by DataLoader workers into pinned memory and copied asynchronously.

    The order comes from a ``DistributedSampler`` seeded by the run, so it is a function of
    (seed, epoch) alone and both placements yield the same batches.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        *,
        batch_size: int,
        seed: int,
        world: DistContext,
        device: torch.device,
        run: RunConfig,
    ) -> None:
        self.sampler: DistributedSampler[tuple[Tensor, ...]] = DistributedSampler(
            TensorDataset(y),
            num_replicas=world.world_size,
            rank=world.rank,
            shuffle=True,
            seed=seed,
            drop_last=False,
        )
        self.batch_size, self.device, self.workers = batch_size, device, run.workers
        self.memory_format = torch.channels_last if run.channels_last and x.dim() == 4 else torch.contiguous_format
        self.on_device = run.placement == "device" or (run.placement == "auto" and _fits(x, device))
        if self.on_device:
            x, y = x.to(device).contiguous(memory_format=self.memory_format), y.to(device)
        self.x, self.y = x, y

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """(x, y, positions in the split) of the batches of ``epoch`` from batch number ``start``
        on (a resumed epoch skips some)."""
        self.sampler.set_epoch(epoch)
        chunks = torch.tensor(list(self.sampler), dtype=torch.int64).split(self.batch_size)[start:]
        if self.on_device:
            for index in chunks:
                index = index.to(self.device, non_blocking=True)
                yield self.x[index], self.y[index], index
            return
        loader = DataLoader(
            _Pairs(self.x, self.y),
            sampler=list(chunks),
            batch_size=None,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
        )
        for (xb, yb), index in zip(loader, chunks):
            yield (
                xb.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format),
                yb.to(self.device, non_blocking=True),
                index,  # stays with the data, on the host
            )


def _fits(x: Tensor, device: torch.device) -> bool:
    """On CPU the data is already in memory; on a GPU it fits if it takes under a quarter of the
    free memory (the rest is for activations of the attack's forward-backward passes)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return x.numel() * x.element_size() < free / 4


def validation_split(x: Tensor, y: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_val, y_val): a seeded random ``fraction`` held out for the canary."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(fraction * len(x)))
    if n_val >= len(x):
        raise RobustkitError(f"val_fraction {fraction:g} leaves no training samples out of {len(x)}")
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


# -- schedule, optimizer ---------------------------------------------------------------------
def lr_factor(kind: str, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step t, evaluated at the middle of the step."""

    def factor(t: int) -> float:
        position = min(1.0, (t + 0.5) / total_steps)
        if kind == "cyclic":  # Smith's one-cycle as fast AT uses it: up to the peak at 2/5, down to 0
            return position / 0.4 if position < 0.4 else (1.0 - position) / 0.6
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * position))
        return 1.0

    return factor


def make_optimizer(params: TrainingParams, module: nn.Module) -> torch.optim.Optimizer:
    if params.optimizer == "sgd":
        return torch.optim.SGD(
            module.parameters(),
            lr=params.lr,
            momentum=0.9,
            nesterov=True,
            weight_decay=params.weight_decay,
        )
    return torch.optim.Adam(module.parameters(), lr=params.lr, weight_decay=params.weight_decay)


# -- the canary ------------------------------------------------------------------------------
def canary(
    craft: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    params: TrainingParams,
    precision: Precision,
    world: DistContext,
    device: torch.device,
) -> tuple[float, float]:
    """(clean, robust) accuracy on the validation samples under a few-step PGD, over all ranks.

    Same seed every epoch, so epochs are compared on the same random starts.
    """
    attack = PGD(steps=params.canary_steps, precision=precision, seed=params.seed)
    mine = torch.arange(world.rank, len(x), world.world_size)
    clean = robust = 0
    with eval_mode(craft):
        for index in mine.split(512):
            xb, yb = x[index].to(device), y[index].to(device)
            right = predict_logits(craft, xb).argmax(1) == yb
            result = attack(craft, xb, yb, threat=threat)
            clean += int(right.sum())
            robust += int((right & ~result.success).sum())
    clean_sum, robust_sum = ddp.sum_over_ranks([clean, robust], world)
    return clean_sum / len(x), robust_sum / len(x)


# -- run state -------------------------------------------------------------------------------
@dataclass
class RunState:
    """Where a run is; all of it goes into the checkpoint."""

    epoch: int = 0  #: epochs completed
    batch: int = 0  #: batches completed inside the current epoch (after an interrupt)
    running: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])  #: loss, correct, n, s
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None  #: epoch, val_robust, val_clean, model (a CPU state dict)
    stale: int = 0  #: epochs since the best one
    stop_reason: str | None = None


def judge_epoch(
    state: RunState,
    record: dict[str, Any],
    params: TrainingParams,
    monitor: str,
    model_state: Callable[[], dict[str, Tensor]],
) -> list[str]:
    """Update best weights, staleness and the stop reason from one epoch's canary; returns notes.

    The best epoch is the one with the highest ``monitor`` (``val_robust`` for defences; the
    other accuracy breaks ties). Catastrophic overfitting: robust validation accuracy falls at
    least ``overfit_drop`` below the best epoch's while clean accuracy holds (within
    ``CLEAN_SLACK``) - the signature of a model that learned to mask single-step gradients,
    not of divergence, where both fall.
    """
    other = "val_clean" if monitor == "val_robust" else "val_robust"
    best = state.best
    if best is None or (record[monitor], record[other]) > (best[monitor], best[other]):
        state.best = {
            "epoch": record["epoch"],
            "val_robust": record["val_robust"],
            "val_clean": record["val_clean"],
            "model": model_state(),
        }
        state.stale = 0
        record["best"] = True
        return []
    notes = []
    state.stale += 1
    robust, clean = record["val_robust"], record["val_clean"]
    if best["val_robust"] - robust >= params.overfit_drop and clean >= best["val_clean"] - CLEAN_SLACK:
        record["overfit"] = True
        notes.append(
            f"catastrophic overfitting at epoch {record['epoch']}: robust validation accuracy "
            f"fell from {best['val_robust']:.1%} (epoch {best['epoch']}) to {robust:.1%} while "
            f"clean accuracy held at {clean:.1%}; keeping the epoch-{best['epoch']} weights "
            "(lower the step size or lr, use a random start, or use pgd-at)"
        )
        if params.stop_on_overfit:
            state.stop_reason = "catastrophic overfitting"
    if state.stop_reason is None and params.patience and state.stale >= params.patience:
        state.stop_reason = "early stopping"
        notes.append(
            f"early stopping after epoch {record['epoch']}: no better {monitor.replace('_', ' ')} "
            f"accuracy for {state.stale} epochs; keeping the epoch-{best['epoch']} weights"
        )
    return notes


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
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RobustkitError(f"--device {spec}: CUDA is not available here; use --device cpu")
        if world.enabled:  # torchrun: one GPU per local rank
            device = torch.device("cuda", world.local_rank)
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def recipe(defence: TrainingDefence, threat: ThreatModel, x: Tensor, y: Tensor) -> dict[str, Any]:
    """What must match for ``--resume`` to continue the same run."""
    return {
        "defence": defence.name,
        "params": dataclasses.asdict(defence.params),
        "threat": {"norm": threat.norm.value, "eps": threat.eps, "bounds": list(threat.bounds)},
        "train_sha256": tensors_sha256(x, y),
    }


def _recipe_difference(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    for key in ("defence", "threat", "train_sha256"):
        if saved.get(key) != current[key]:
            return f"{key} differs"
    for key, value in current["params"].items():
        if saved["params"].get(key) != value:
            return f"{key} was {saved['params'].get(key)!r}, now {value!r}"
    return None


# -- the loop --------------------------------------------------------------------------------
class Engine:
    """One hardening run of ``defence`` on ``model``; ``run()`` trains and returns the result."""

    def __init__(
        self,
        defence: TrainingDefence,
        model: nn.Module,
        data: Dataset,
        threat: ThreatModel,
        run: RunConfig,
    ) -> None:
        if data.x_train is None or data.y_train is None:
            raise RobustkitError(
                f"data set {data.name!r} has no training split; give an .npz with "
                "x_train/y_train or a data set that has one"
            )
        params: TrainingParams = defence.params
        self.defence, self.params, self.threat, self.run_config = defence, params, threat, run
        self.world = init_distributed(run.device)
        self.device = resolve_device(run.device, self.world)
        if params.batch_size % self.world.world_size:
            raise RobustkitError(
                f"batch_size {params.batch_size} is not divisible by the {self.world.world_size} "
                "processes; batch_size is the global batch"
            )
        self.recipe = recipe(defence, threat, data.x_train, data.y_train)
        x_train, y_train, self.x_val, self.y_val = validation_split(
            data.x_train, data.y_train, params.val_fraction, params.seed
        )
        self.x_val, self.y_val = self.x_val[: params.canary_size], self.y_val[: params.canary_size]
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
        trained = ddp.wrap(self.module, self.world, self.device)
        if run.compile:
            trained = torch.compile(trained) if self.world.enabled else craft  # type: ignore[assignment]
        self.epochs = math.ceil(params.epochs / defence.replays)
        total_steps = self.epochs * len(self.batches) * defence.replays
        optimizer = make_optimizer(params, self.module)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(params.schedule, total_steps))
        scaler = torch.amp.GradScaler(self.device.type) if run.precision == "fp16" else None
        generator = torch.Generator(self.device).manual_seed(params.seed * 1000 + self.world.rank)
        self.ctx = StepContext(
            model=trained,
            craft=craft,
            threat=threat,
            device=self.device,
            precision=run.precision,
            generator=generator,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            seed=params.seed,
            world=self.world,
            train_size=len(y_train),
        )
        self.step = defence.make_step(self.ctx)
        self.state = RunState()
        self.out = run.out_dir if self.world.is_main else None

    # -- checkpoints ---------------------------------------------------------------------------
    def _checkpoint(self) -> None:
        """Gather every rank's random states and carried state; rank 0 writes them atomically."""
        ranks = ddp.gather(
            {
                "rng": checkpoint.capture_rng(self.ctx.generator),
                "carry": {k: v.cpu() for k, v in self.ctx.carry.items()},
            },
            self.world,
        )
        if self.out is None:
            return
        ctx, state = self.ctx, self.state
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
                "optimizer": ctx.optimizer.state_dict(),
                "scheduler": ctx.scheduler.state_dict(),
                "scaler": ctx.scaler.state_dict() if ctx.scaler is not None else None,
            },
        )

    def _resume(self) -> None:
        assert self.run_config.out_dir is not None
        path = self.run_config.out_dir / checkpoint.FILENAME
        if not path.is_file():
            raise RobustkitError(f"--resume: no checkpoint at {path}; run without --resume to start")
        saved = checkpoint.load(path)
        difference = _recipe_difference(saved["recipe"], self.recipe)
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
        ctx = self.ctx
        ctx.optimizer.load_state_dict(saved["optimizer"])
        ctx.scheduler.load_state_dict(saved["scheduler"])
        if ctx.scaler is not None and saved["scaler"] is not None:
            ctx.scaler.load_state_dict(saved["scaler"])
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
            list(saved["running"]),
            list(saved["history"]),
            saved["best"],
            saved["stale"],
            saved["stop_reason"],
        )
        if self.out is not None:  # the log is the history: rewrite it so no epoch appears twice
            atomic_write(self.out / LOG_FILENAME, "".join(json.dumps(r) + "\n" for r in self.state.history))
        log.info("resumed at epoch %d, batch %d", self.state.epoch, self.state.batch)

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
            if self.run_config.resume:
                self._resume()
            elif self.out is not None:
                atomic_write(self.out / LOG_FILENAME, "")
            show = self.run_config.progress and self.world.is_main
            with self._signals() as flag, progress() if show else Progress(disable=True) as bar:
                while self.state.epoch < self.epochs and self.state.stop_reason is None:
                    if ddp.any_rank(flag["stop"], self.world):  # between epochs: that checkpoint is on disk
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
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        count, started = 0, time.perf_counter()
        refresh = max(1, len(self.batches) // 10)  # a host sync 10 times an epoch, for the display
        for number, (xb, yb, index) in enumerate(self.batches.epoch(epoch, state.batch), start=state.batch + 1):
            self.ctx.batch_index = index
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
                else (number % STOP_SYNC_EVERY == 0 and ddp.any_rank(flag["stop"], self.world))
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
        loss_total, correct_total, n = ddp.sum_over_ranks([loss_total, correct_total, n], self.world)
        canary_started = time.perf_counter()
        clean, robust = canary(
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
            "lr": self.ctx.scheduler.get_last_lr()[0],
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
    defence: TrainingDefence,
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
