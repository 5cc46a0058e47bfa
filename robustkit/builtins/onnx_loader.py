"""ONNX models: checked, refused when unsafe, run by onnxruntime as a black box.

Imported only when an ``.onnx`` file is loaded, so ``onnx`` and ``onnxruntime`` stay off the
start-up path.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from robustkit.errors import RobustkitError
from robustkit.loading import LoadedModel, LoadOptions, file_sha256

#: Operator domains onnxruntime implements itself; anything else needs custom (native) code.
STANDARD_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}


class OnnxPredictor:
    """Batched onnxruntime inference with torch tensors in and out (no gradients)."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: Tensor) -> Tensor:
        array = x.detach().cpu().float().numpy()
        (out,) = self.session.run(None, {self.input_name: np.ascontiguousarray(array)})[:1]
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(x.device)


def check_onnx_file(path: Path) -> None:
    """Refuse corrupt graphs, custom operator domains and external data outside the folder."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - protobuf decode errors have many types
        raise RobustkitError(f"{path.name} is not a valid ONNX file ({type(err).__name__})") from None
    folder = path.parent.resolve()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if uses_external_data(tensor):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            target = (folder / location).resolve()
            if not target.is_relative_to(folder) or Path(location).is_absolute():
                raise RobustkitError(
                    f"refusing {path.name}: tensor {tensor.name!r} reads external data from {location!r}, outside "
                    "the model's folder; keep external data next to the model"
                )
    domains = {node.domain for node in model.graph.node} | {o.domain for o in model.opset_import}
    custom = sorted(domains - STANDARD_DOMAINS)
    if custom:
        raise RobustkitError(
            f"refusing {path.name}: it uses custom operator domain(s) {', '.join(custom)}, which need native "
            "code outside the graph; export with standard ONNX operators"
        )
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as err:  # noqa: BLE001
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RobustkitError(f"{path.name} fails onnx.checker: {first}") from None


def load_onnx(path: Path, options: LoadOptions) -> LoadedModel:
    check_onnx_file(path)
    return LoadedModel(
        OnnxPredictor(path), str(path), "onnx", file_sha256(path),
        notes=["run by onnxruntime: scores only, no gradients (black-box attacks)"],
    )
