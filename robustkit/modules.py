"""Small torch helpers shared by loaders, attacks and engines."""
from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from robustkit.errors import OptionError

#: Anything that maps a batch of inputs in the bounds to (N, C) scores: an ``nn.Module`` for
#: white-box attacks, or a plain predict function (an ONNX session) for black-box ones.
Model = Callable[[Tensor], Tensor]


class Normalized(nn.Module):
    """``net((x - mean) / std)``: keeps the normalisation inside the model.

    This is the one input convention of robustkit: every attack and backend sees inputs in the
    bounds, epsilons are in input units, and an exported graph takes the same inputs.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        finite = all(math.isfinite(value) for value in (*mean, *std))
        if len(mean) != len(std) or not finite or any(s <= 0 for s in std):
            raise OptionError(f"--mean and --std need one finite value per channel each and a positive std; "
                              f"got mean {tuple(mean)}, std {tuple(std)}")
        self.net = net
        self.mean: Tensor
        self.std: Tensor
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.standardize(x))

    def standardize(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


@contextmanager
def seeded(seed: int, device: str | torch.device = "cpu") -> Iterator[None]:
    """Seed torch's global generators for the block and restore them afterwards.

    Our own attacks and steps draw from ``torch.Generator``s; this is for what we do not
    control (ART's and torchattacks' attacks, fresh weights, dropout), so that a job is
    reproducible without changing the global random state of the program that called it.
    """
    cuda = torch.device(device).type == "cuda"
    devices = [torch.device(device).index or torch.cuda.current_device()] if cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Put every submodule in eval mode and restore each one's own mode afterwards.

    Saving per-submodule flags (not only ``model.training``) keeps mixed modes intact, e.g. a
    frozen BatchNorm inside a model that is otherwise training.
    """
    if not isinstance(model, nn.Module):
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


#: Per model and input signature: does it run, and agree, in channels-last (probed once)?
_CHANNELS_LAST_OK: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], bool]] = weakref.WeakKeyDictionary()


@contextmanager
def fast_layout(model: Any, x: Tensor) -> Iterator[Tensor]:
    """Run a CPU conv net in channels-last while inside; yields ``x`` in that layout.

    oneDNN's CPU convolutions and pooling are faster in NHWC (docs/performance.md); the whole network
    switches only when the convolution weights do (a 1-channel input cannot carry the layout
    by itself). The 4-D weights are swapped for channels-last copies while inside and the
    original tensors put back after, so the caller's model is left exactly as it was (an
    optimizer or a DDP wrapper still points at the same storage). Each model is probed once
    per input shape, on the batch given: one that fails or disagrees in channels-last (a
    ``.view`` after a convolution) is left alone. Only ``nn.Module``s on the CPU with 4-D inputs are touched;
    compiled modules are skipped, as a layout change would recompile them.
    """
    swap = [p for p in _conv_weights(model) if not p.is_contiguous(memory_format=torch.channels_last)]
    if x.dim() != 4 or not len(x) or x.device.type != "cpu" or not swap or hasattr(model, "_orig_mod"):
        yield x
        return
    originals = [p.data for p in swap]
    known = _CHANNELS_LAST_OK.setdefault(model, {})
    signature = (tuple(x.shape[1:]), x.dtype)
    try:
        probe = signature not in known
        reference = _outputs(model, x) if probe else None
        for p in swap:
            p.data = p.data.contiguous(memory_format=torch.channels_last)
        if probe:
            fast = _outputs(model, x.contiguous(memory_format=torch.channels_last))
            known[signature] = reference is not None and _same(fast, reference)
        if not known[signature]:
            for p, original in zip(swap, originals):
                p.data = original
            yield x
        else:
            yield x.contiguous(memory_format=torch.channels_last)
    finally:
        for p, original in zip(swap, originals):
            p.data = original


def _conv_weights(model: Any) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.dim() == 4] if isinstance(model, nn.Module) else []


@torch.no_grad()
def _outputs(model: nn.Module, x: Tensor) -> Tensor | None:
    """The eval-mode output for a probe, or None if the model fails on this batch.

    Any failure counts (a ``.view`` raises RuntimeError, an exported graph's shape guard
    AssertionError): the model is then run as given, and a real error surfaces there.
    """
    with eval_mode(model):
        try:
            out = model(x)
        except Exception:
            return None
    return out if isinstance(out, Tensor) else None


def _same(fast: Tensor | None, reference: Tensor) -> bool:
    """Equal up to the rounding a different convolution algorithm brings."""
    if fast is None or fast.shape != reference.shape:
        return False
    scale = max(float(reference.abs().max()), 1.0) if reference.numel() else 1.0
    return bool(torch.allclose(fast.float(), reference.float(), rtol=1e-3, atol=1e-4 * scale))


def model_device(model: Any) -> torch.device:
    """Device of a module's first parameter or buffer (CPU for parameter-free callables)."""
    if isinstance(model, nn.Module):
        for parameter in model.parameters():
            return parameter.device
        for buffer in model.buffers():
            return buffer.device
    return torch.device("cpu")


@torch.no_grad()
def predict_logits(model: Model, x: Tensor, batch_size: int = 512) -> Tensor:
    """fp32 logits in batches, without autocast: the reference every success is judged by."""
    device = model_device(model)
    outputs = []
    with torch.autocast(device.type, enabled=False):
        for start in range(0, len(x), batch_size):
            batch = x[start : start + batch_size].to(device, torch.float32)
            outputs.append(model(batch).float())
    if not outputs:
        return torch.empty(0, 0)
    return torch.cat(outputs)
