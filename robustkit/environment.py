"""What ran an audit or an export: package versions, Python, platform and device."""
from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

import torch


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
