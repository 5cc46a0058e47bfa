"""DistributedDataParallel for hardening runs under ``torchrun``.

Every rank holds the whole data set and draws its shard from a ``DistributedSampler`` seeded
by the run (so the shards, like a single process's shuffles, are a pure function of the seed
and the epoch: nothing to save, and a resumed run draws the same batches). Decisions that end
or steer the run (early stopping, an interrupt) are taken from numbers all-reduced over the
ranks, so every rank takes the same one and none is left waiting in a collective.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from robustkit.distributed import DistContext


def wrap(module: nn.Module, world: DistContext, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(module)`` under torchrun; the module itself otherwise."""
    if not world.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def _on_wire(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.cuda() if dist.get_backend() == "nccl" else tensor


def sum_over_ranks(values: list[float], world: DistContext) -> list[float]:
    """Element-wise sums of per-rank numbers (identity in one process), in float64."""
    if not world.enabled:
        return values
    tensor = _on_wire(torch.tensor(values, dtype=torch.float64))
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return [float(v) for v in tensor.cpu()]


def any_rank(flag: bool, world: DistContext) -> bool:
    """True on every rank if it is true on one: how ranks agree to stop at the same batch."""
    if not world.enabled:
        return flag
    tensor = _on_wire(torch.tensor([int(flag)], dtype=torch.int32))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def gather(obj: Any, world: DistContext) -> list[Any]:
    """Every rank's ``obj`` (e.g. its random states), in rank order, on every rank."""
    if not world.enabled:
        return [obj]
    gathered: list[Any] = [None] * world.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_tensors(tensor: torch.Tensor, world: DistContext) -> torch.Tensor:
    """Every rank's ``tensor`` (the same shape on each), concatenated in rank order, on every
    rank and on ``tensor``'s device (itself in one process)."""
    if not world.enabled:
        return tensor
    wire = _on_wire(tensor.contiguous())
    parts = [torch.empty_like(wire) for _ in range(world.world_size)]
    dist.all_gather(parts, wire)
    return torch.cat(parts).to(tensor.device)
