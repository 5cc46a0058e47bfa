"""What ran an audit or an export (package versions, Python, platform and device), and whether
the CPU it runs on is free enough for torch's threads."""
from __future__ import annotations

import logging
import os
import platform
from importlib import metadata
from typing import Any

import torch

from robustkit.errors import OptionError

log = logging.getLogger("robustkit")


def environment(device: str) -> dict[str, Any]:
    versions = {}
    for dist in ("robustkit", "torch", "robustkit-torchattacks", "torchattacks", "robustkit-art",
                 "adversarial-robustness-toolbox", "onnx", "onnxruntime"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return {**versions, "python": platform.python_version(), "platform": platform.platform(), "device": device,
            "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor()}


def parse_device(spec: str) -> torch.device:
    """``--device`` as a torch device, or a one-line ``OptionError`` saying what is wrong (torch's
    own errors, for a misspelt name or a GPU this machine lacks, read as internal failures)."""
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise OptionError(f"--device {spec!r} is not a device; use cpu, cuda or cuda:N") from None
    available = getattr(getattr(torch, device.type, None), "is_available", None)
    if device.type != "cpu" and (available is None or not available()):
        raise OptionError(f"--device {spec}: no {device.type} device is available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise OptionError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"numbered from 0")
    return device


def busy_cpu_note(device: str) -> str | None:
    """A warning for a CPU job on a machine other processes keep busy, else None.

    torch runs one thread per core; when another process holds a core, its threads wait on each
    other at every operation, and small models run several times slower than on one thread (a
    small CNN's training step on 2 cores with one core taken: 91 ms on 2 threads, 19 ms on 1)."""
    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if on_gpu or not hasattr(os, "getloadavg"):
        return None
    threads = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load = os.getloadavg()[0]  # runnable processes over the last minute, this one not yet among them
    if threads < 2 or load + threads <= cores + 0.5:
        return None
    return (f"the CPU is busy (load {load:.1f} on {cores} cores) and torch runs {threads} threads, which then wait "
            f"on each other: small models can run several times slower; set OMP_NUM_THREADS to the free cores "
            f"(e.g. OMP_NUM_THREADS={max(1, cores - round(load))})")


def warn_if_cpu_busy(device: str) -> None:
    note = busy_cpu_note(device)
    if note:
        log.warning("%s", note)
