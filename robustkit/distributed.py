"""torch.distributed under ``torchrun``: detection, setup and the few collectives robustkit needs.

robustkit never runs its own launcher: ``torchrun --nproc_per_node=N -m robustkit ...`` sets
``WORLD_SIZE``/``RANK``; these helpers read them, start the process group (nccl on GPU, gloo on
CPU) and are no-ops in a single process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def all_reduce_min_(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """In-place element-wise minimum over ranks (no-op in one process)."""
    return _all_reduce_(tensor, ctx, dist.ReduceOp.MIN)


def all_reduce_max_(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """In-place element-wise maximum over ranks (no-op in one process)."""
    return _all_reduce_(tensor, ctx, dist.ReduceOp.MAX)


def _all_reduce_(tensor: torch.Tensor, ctx: DistContext, op: dist.ReduceOp.RedOpType) -> torch.Tensor:
    if ctx.enabled:
        on_wire = tensor.cuda() if dist.get_backend() == "nccl" else tensor
        dist.all_reduce(on_wire, op=op)
        tensor.copy_(on_wire)
    return tensor


def all_reduce_sum(value: float, ctx: DistContext) -> float:
    if not ctx.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.item())
