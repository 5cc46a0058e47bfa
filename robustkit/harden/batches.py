"""Training batches: shuffled, sharded under torchrun, on the device when the data fits there."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from robustkit.data import float_inputs
from robustkit.distributed import DistContext
from robustkit.errors import RobustkitError
from robustkit.harden.config import RunConfig


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
    else gathered by DataLoader workers into pinned memory and copied asynchronously. uint8
    data stays uint8 until a batch is on the device (a quarter of the memory and of the copy).

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
        self.pin = device.type == "cuda"  #: host batches in pinned memory, so the copy to the GPU is asynchronous
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
                yield self.floats(self.x[index]), self.y[index], index
            return
        loader = DataLoader(
            _Pairs(self.x, self.y),
            sampler=list(chunks),
            batch_size=None,
            num_workers=self.workers,
            pin_memory=self.pin,
        )
        for (xb, yb), index in zip(loader, chunks):
            yield (
                self.floats(xb.to(self.device, non_blocking=True)),
                yb.to(self.device, non_blocking=True),
                index,  # stays with the data, on the host
            )


    def floats(self, xb: Tensor) -> Tensor:
        """A batch on the device as float inputs (uint8 storage converted here), in the run's layout."""
        return float_inputs(xb).contiguous(memory_format=self.memory_format)


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
