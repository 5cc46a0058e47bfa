"""What a GPU run of harden uses, tested where it can be without a GPU (fp16 with a GradScaler on
the CPU, the pinned-memory decision and the loader's copies, torch.compile), and the tests that
need one, marked ``cuda``: skipped here, run with ``pytest -m cuda`` (benchmarks/gpu_check.py)."""
from __future__ import annotations

import dataclasses
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustkit.data import Dataset, float_inputs, load_digits
from robustkit.distributed import DistContext
from robustkit.harden import checkpoint
from robustkit.harden.batches import Batches
from robustkit.harden.config import RunConfig
from robustkit.harden.defences import FGSMRS
from robustkit.harden.step import Optimization
from robustkit.threat import ThreatModel

THREAT = ThreatModel("linf", 0.1)
cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 8 * 8, 10))


def _small_digits(n: int = 300, stored: bool = False) -> Dataset:
    data = load_digits()
    assert data.x_train is not None and data.y_train is not None
    x_train = data.x_train[:n]
    if stored:  # as a uint8 file keeps it
        x_train = (x_train * 255).round().to(torch.uint8)
    return dataclasses.replace(data, x_train=x_train, y_train=data.y_train[:n])


SETTINGS: dict[str, Any] = {"epochs": 1, "canary_size": 32, "canary_steps": 2, "awp_gamma": 5e-3}


# -- on the CPU ------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")  # the skipped step
def test_grad_scaler_skips_an_overflowing_step_and_unscales_the_others() -> None:
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    optimization = Optimization(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0), scaler)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    before = [p.detach().clone() for p in model.parameters()]
    optimization.update(model(x).sum() * float("inf"))  # overflowing gradients
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # the step was skipped
    assert scaler.get_scale() == 2.0**9

    reference = nn.Linear(4, 3)
    reference.load_state_dict(model.state_dict())
    F.cross_entropy(reference(x), y).backward()
    expected = [p.detach() - 0.5 * p.grad for p in reference.parameters() if p.grad is not None]
    assert optimization.update(F.cross_entropy(model(x), y)) == 2.0**9  # the scale the gradients carried
    for p, e in zip(model.parameters(), expected):
        assert torch.equal(p.detach(), e)  # unscaled exactly (a power of two)


def test_fp16_with_a_grad_scaler_and_awp_trains_on_the_cpu(tmp_path: Path) -> None:
    result = FGSMRS(**SETTINGS).apply(_net(), _small_digits(), threat=THREAT,
                                      run=RunConfig(precision="fp16", out_dir=tmp_path, progress=False))
    assert all(p.dtype == torch.float32 and bool(p.isfinite().all()) for p in result.model.parameters())
    saved = checkpoint.load(tmp_path / checkpoint.FILENAME)
    assert saved["scaler"] is not None and saved["scaler"]["scale"] > 0
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)


def test_pinning_follows_the_device_and_loader_batches_match_device_batches() -> None:
    """pin_memory needs a CUDA driver in this torch build, so the CPU checks the decision and the
    loader path's copies (non_blocking, uint8 converted on arrival, channels-last kept)."""
    data = _small_digits(96, stored=True)
    assert data.x_train is not None and data.y_train is not None
    x, y = data.x_train, data.y_train

    def batches(placement: str, device: torch.device) -> Batches:
        run = RunConfig(placement=placement, workers=1, channels_last=True)  # type: ignore[arg-type]
        return Batches(x, y, batch_size=32, seed=0, world=DistContext(), device=device, run=run)

    assert not batches("loader", torch.device("cpu")).pin
    assert batches("loader", torch.device("cuda")).pin  # decided without touching a GPU
    served = list(batches("loader", torch.device("cpu")).epoch(0))
    for (xb, yb, index), (xd, yd, index_d) in zip(served, batches("device", torch.device("cpu")).epoch(0)):
        assert xb.dtype == torch.float32 and xb.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(xb, float_inputs(x[index])) and torch.equal(xb, xd) and torch.equal(yb, yd)
        assert torch.equal(index, index_d)
    assert len(served) == 3


def test_compile_trains_an_epoch_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--compile`` through torch.compile's graph capture and AOT autograd, the run's and AWP's
    modules alike; the aot_eager backend stands in for inductor, whose C++ code generation takes
    minutes on a 2-core CI machine (gpu_check runs inductor)."""
    compiled: list[nn.Module] = []
    real = torch.compile

    def compile_(module: Any, **kwargs: Any) -> Any:
        compiled.append(module)
        return real(module, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile_)
    data = _small_digits()
    eager = FGSMRS(**SETTINGS).apply(_net(), data, threat=THREAT, run=RunConfig(progress=False))
    fast = FGSMRS(**SETTINGS).apply(_net(), data, threat=THREAT, run=RunConfig(compile=True, progress=False))
    assert len(compiled) == 2  # the trained module and AWP's proxy
    torch._dynamo.reset()
    for key, value in eager.model.state_dict().items():
        torch.testing.assert_close(fast.model.state_dict()[key], value, rtol=1e-4, atol=1e-5)


# -- on a GPU (pytest -m cuda) ---------------------------------------------------------------
@cuda
@needs_cuda
def test_fp16_amp_on_cuda(tmp_path: Path) -> None:
    result = FGSMRS(**SETTINGS).apply(_net(), _small_digits(), threat=THREAT,
                                      run=RunConfig(device="cuda", precision="fp16", out_dir=tmp_path, progress=False))
    assert all(p.dtype == torch.float32 and bool(p.isfinite().all()) for p in result.model.parameters())
    assert checkpoint.load(tmp_path / checkpoint.FILENAME)["scaler"] is not None


@cuda
@needs_cuda
def test_pinned_loader_on_cuda() -> None:
    data = _small_digits(96, stored=True)
    assert data.x_train is not None and data.y_train is not None
    x, y, device = data.x_train, data.y_train, torch.device("cuda")

    def batches(placement: str) -> list[torch.Tensor]:
        run = RunConfig(placement=placement, workers=1)  # type: ignore[arg-type]
        source = Batches(x, y, batch_size=32, seed=0, world=DistContext(), device=device, run=run)
        assert source.pin and source.on_device == (placement == "device")
        return [xb for xb, _, _ in source.epoch(0)]

    loaded, resident = batches("loader"), batches("device")
    assert all(b.device.type == "cuda" and b.dtype == torch.float32 for b in loaded)
    assert all(torch.equal(a, b) for a, b in zip(loaded, resident))


@cuda
@needs_cuda
def test_ddp_over_nccl_on_one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-process NCCL group: DDP's gradient all-reduce and robustkit's collectives run over it."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from robustkit import distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        device = torch.device("cuda", 0)
        model = _net().to(device)
        wrapped = DistributedDataParallel(model, device_ids=[0])
        x = torch.rand(16, 1, 8, 8, device=device)
        y = torch.randint(0, 10, (16,), device=device)
        F.cross_entropy(wrapped(x), y).backward()
        reference = _net().to(device)
        F.cross_entropy(reference(x), y).backward()
        for p, r in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, r.grad)
        # AWP's all-reduce over NCCL (a context that claims two ranks, so the collective runs; the group has one)
        ones = torch.ones(3, device=device)
        assert torch.equal(distributed.all_reduce_sum_(ones, DistContext(0, 2, 0)), torch.ones(3, device=device))
    finally:
        dist.destroy_process_group()
