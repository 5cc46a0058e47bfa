"""torch.distributed under ``torchrun``: detection, setup and the few collectives robustkit needs.

robustkit never runs its own launcher: ``torchrun --nproc_per_node=N -m robustkit ...`` sets
``WORLD_SIZE``/``RANK``; these helpers read them, start the process group (nccl on GPU, gloo on
CPU) and are no-ops in a single process.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: str = "cpu") -> DistContext:
    """Join the process group that ``torchrun`` describes; a single-process context otherwise."""
    if not launched_by_torchrun():
        return DistContext()
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank)


@contextmanager
def distributed_session(device: str = "cpu") -> Iterator[DistContext]:
    """The process group of one job (audit, harden), ended cleanly on every rank and every path.

    When the job succeeds, every rank waits at a barrier until all are done, rank 0 included
    (it alone writes the outputs): a rank that reaches interpreter exit while another still
    works can abort in gloo's teardown ("terminate called without an active exception"), and
    torchrun then kills the rank that was still writing. The group is destroyed in ``finally``
    on every rank, if this session created it (a caller's own group is left to the caller).
    On an error or Ctrl-C the barrier is skipped, so no rank waits for one that has left;
    torchrun ends the others when this rank exits non-zero.
    """
    created = launched_by_torchrun() and not dist.is_initialized()
    ctx = init_distributed(device)
    try:
        yield ctx
        if ctx.enabled:
            barrier(ctx)
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    """Wait until every rank gets here (no-op in one process)."""
    if not ctx.enabled:
        return
    if dist.get_backend() == "nccl":  # nccl wants the device of this rank named
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def _on_wire(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor where the backend can send it: NCCL needs CUDA tensors."""
    return tensor.cuda() if dist.get_backend() == "nccl" else tensor


def all_reduce_min_(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """In-place element-wise minimum over ranks (no-op in one process)."""
    return _all_reduce_(tensor, ctx, dist.ReduceOp.MIN)


def all_reduce_max_(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """In-place element-wise maximum over ranks (no-op in one process)."""
    return _all_reduce_(tensor, ctx, dist.ReduceOp.MAX)


def all_reduce_sum_(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """In-place element-wise sum over ranks (no-op in one process)."""
    return _all_reduce_(tensor, ctx, dist.ReduceOp.SUM)


def _all_reduce_(tensor: torch.Tensor, ctx: DistContext, op: dist.ReduceOp.RedOpType) -> torch.Tensor:
    if ctx.enabled:
        on_wire = _on_wire(tensor)
        dist.all_reduce(on_wire, op=op)
        tensor.copy_(on_wire)
    return tensor


def sum_over_ranks(values: list[float], ctx: DistContext) -> list[float]:
    """Element-wise sums of per-rank numbers (identity in one process), in float64."""
    if not ctx.enabled:
        return values
    return [float(v) for v in _all_reduce_(torch.tensor(values, dtype=torch.float64), ctx, dist.ReduceOp.SUM)]


def all_reduce_sum(value: float, ctx: DistContext) -> float:
    """The sum of one number over ranks."""
    return sum_over_ranks([value], ctx)[0]


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank if it is true on one: how ranks agree to stop at the same batch."""
    if not ctx.enabled:
        return flag
    return bool(_all_reduce_(torch.tensor([int(flag)], dtype=torch.int32), ctx, dist.ReduceOp.MAX).item())


def gather(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj`` (e.g. its random states), in rank order, on every rank."""
    if not ctx.enabled:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_tensors(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Every rank's ``tensor`` (the same shape on each), concatenated in rank order, on every
    rank and on ``tensor``'s device (itself in one process)."""
    if not ctx.enabled:
        return tensor
    wire = _on_wire(tensor.contiguous())
    parts = [torch.empty_like(wire) for _ in range(ctx.world_size)]
    dist.all_gather(parts, wire)
    return torch.cat(parts).to(tensor.device)


def wrap_ddp(module: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(module)`` under torchrun; the module itself otherwise. Every
    rank holds the whole data set and draws its shard from a seeded ``DistributedSampler``."""
    if not ctx.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)
