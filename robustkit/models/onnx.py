"""ONNX models: checked, refused when unsafe, run by onnxruntime; converted to torch for
white-box audits where the data confirm the conversion.

Loading gives the file as it is deployed: onnxruntime, scores only. An audit then tries a
conversion to torch (onnx2torch) to attack with gradients, and trusts it only if it agrees
with onnxruntime on the audit's own data; otherwise, or on request, it attacks black-box
through onnxruntime. Imported only when an ``.onnx`` file is loaded, so ``onnx``,
``onnxruntime`` and ``onnx2torch`` stay off the start-up path.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from robustkit.data import format_bytes, over_limit
from robustkit.errors import RobustkitError, one_line
from robustkit.models.base import LoadedModel, LoadOptions, file_sha256, verbose
from robustkit.modules import predict_logits

#: Operator domains onnxruntime implements itself; anything else needs custom (native) code.
STANDARD_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}
#: Largest logit difference between the torch conversion and onnxruntime, relative to the
#: largest logit, for the conversion's gradients to stand for the deployed model.
CONVERSION_RTOL = 1e-3
RUNTIME_NOTE = "run by onnxruntime: scores only, no gradients (black-box attacks)"


def runtime_reason(err: BaseException) -> str:
    """onnxruntime's error in one line, without its status prefix and C++ source locations."""
    text = str(err).strip()
    allocation = re.search(r"while running (\w+) node.*?requested buffer of size (\d+)", text, re.DOTALL)
    if allocation:
        return f"its {allocation[1]} node asks for {format_bytes(int(allocation[2]))} of memory"
    if isinstance(err, MemoryError) or not text:
        return type(err).__name__
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text.splitlines()[0])
    text = re.sub(r"/onnxruntime_src/\S+ [^)]*\) ", "", text)
    return text[:200]


def in_fixed_batches(run: Callable[[Tensor], Tensor], x: Tensor, size: int) -> Tensor:
    """``run`` on ``x`` in batches of exactly ``size`` rows, for graphs exported with a fixed batch
    dimension. The last batch is padded with copies of its first row whose outputs are dropped:
    rows are independent at inference, so the result is exact (and differentiable)."""
    outputs = []
    for start in range(0, len(x), size):
        chunk = x[start : start + size]
        pad = size - len(chunk)
        if pad:
            chunk = torch.cat([chunk, chunk[:1].expand(pad, *chunk.shape[1:])])
        outputs.append(run(chunk)[: size - pad])
    return torch.cat(outputs)


class FixedBatch(nn.Module):
    """A torch conversion of a fixed-batch graph (its Reshape targets hold the batch size), run
    on batches of any size through ``in_fixed_batches``."""

    def __init__(self, net: nn.Module, size: int) -> None:
        super().__init__()
        self.net, self.size = net, size

    def forward(self, x: Tensor) -> Tensor:
        return in_fixed_batches(self.net, x, self.size)


class OnnxPredictor:
    """Batched onnxruntime inference with torch tensors in and out (no gradients).

    onnxruntime logs only fatal errors unless robustkit runs with ``-v``: its failures reach
    the user as robustkit's one-line errors naming the file. A graph exported without a dynamic
    batch axis (``batch``: its fixed size) runs in batches of that size.
    """

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        level = 2 if verbose() else 4  # 2: warnings and errors; 4: fatal only
        ort.set_default_logger_severity(level)
        options = ort.SessionOptions()
        options.log_severity_level = level
        self.name = path.name
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime's Fail, InvalidGraph, RuntimeException..., MemoryError
            raise RobustkitError(f"{path.name}: onnxruntime cannot load the graph ({runtime_reason(err)})") from None
        graph_input = self.session.get_inputs()[0]
        self.input_name = graph_input.name
        first = graph_input.shape[0] if graph_input.shape else None  # an int when fixed, else a name or None
        self.batch: int | None = first if isinstance(first, int) and first > 0 else None

    def __call__(self, x: Tensor) -> Tensor:
        if self.batch is not None and len(x) != self.batch:
            return in_fixed_batches(self, x, self.batch)
        array = x.detach().cpu().float().numpy()
        try:
            (out,) = self.session.run(None, {self.input_name: np.ascontiguousarray(array)})[:1]
            return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(x.device)
        except Exception as err:
            raise RobustkitError(f"{self.name}: onnxruntime fails running the graph ({runtime_reason(err)})") from None


def _dtype_size(data_type: int) -> int:
    from onnx import helper

    try:
        return int(np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize)
    except Exception:  # strings and types numpy lacks: count a byte per element
        return 1


def check_onnx_sizes(model: Any, path: Path) -> None:
    """Refuse tensors, and constant-shaped ``ConstantOfShape``/``Expand`` outputs, whose declared
    size is over robustkit's array cap: before onnxruntime or the torch conversion allocates them."""
    import onnx
    from onnx import numpy_helper

    for tensor in onnx.external_data_helper._get_all_tensors(model):
        size = math.prod(int(d) for d in tensor.dims) * _dtype_size(tensor.data_type)
        message = over_limit(f"refusing {path.name}: tensor {tensor.name!r} of shape {tuple(tensor.dims)}", size)
        if message:
            raise RobustkitError(message)
    constants = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)
            if value is not None and node.output:
                constants[node.output[0]] = value
    for node in model.graph.node:
        if node.op_type not in ("ConstantOfShape", "Expand"):
            continue
        index = 0 if node.op_type == "ConstantOfShape" else 1
        shape_tensor = constants.get(node.input[index]) if len(node.input) > index else None
        if shape_tensor is None:
            continue
        try:
            shape = [int(v) for v in numpy_helper.to_array(shape_tensor).reshape(-1)]
        except Exception:
            continue  # onnx.checker reports a malformed tensor
        item = 4
        value = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)
        if value is not None:
            item = _dtype_size(value.data_type)
        size = math.prod(max(v, 0) for v in shape) * item
        name = node.name or (node.output[0] if node.output else "")
        what = f"refusing {path.name}: its {node.op_type} node {name!r} makes a tensor of shape {tuple(shape)} that"
        message = over_limit(what, size)
        if message:
            raise RobustkitError(message)


def check_onnx_file(path: Path) -> None:
    """Refuse corrupt graphs, custom operator domains and external data outside the folder."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:
        raise RobustkitError(f"{path.name} is not a valid ONNX file ({type(err).__name__}: it is truncated, "
                             "corrupt, or not an ONNX model)") from None
    if not model.graph.node and not model.graph.output:
        raise RobustkitError(f"{path.name} is not a valid ONNX file (it holds no graph)")
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
    check_onnx_sizes(model, path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RobustkitError(f"{path.name} fails onnx.checker: {first}") from None


def load_onnx(path: Path, options: LoadOptions) -> LoadedModel:
    check_onnx_file(path)
    predictor = OnnxPredictor(path)
    notes = [RUNTIME_NOTE]
    if predictor.batch is not None:
        notes.append(f"the graph has a fixed batch size of {predictor.batch} (exported without a dynamic batch "
                     "axis): run in batches of that size, the last padded and its padding dropped")
    return LoadedModel(predictor, str(path), "onnx", file_sha256(path), notes=notes)


class ConvertedOnnx(nn.Module):
    """An ONNX graph converted to torch modules; returns the graph's first output."""

    def __init__(self, graph: nn.Module) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, x: Tensor) -> Tensor:
        out = self.graph(x)
        return out[0] if isinstance(out, (tuple, list)) else out


#: The newest opset whose operators onnx2torch converts (its Reshape converter stops at 14).
ONNX2TORCH_OPSET = 17


def convert_to_torch(path: Path) -> nn.Module:
    """onnx2torch's conversion, after rewrites that keep the graph's meaning but that it needs.

    onnxscript's optimizer folds constants into initializers (onnx2torch reads biases and
    shapes only from those), ``Reshape(allowzero=1)`` (what torch's dynamo exporter writes)
    becomes the default form where the target shape is a constant without zeros, the only
    case in which the attribute changes nothing, and graphs of a newer opset than onnx2torch
    knows (torch.onnx.export writes 18-20) are converted down to it by onnx's version converter.
    """
    import onnx
    import onnxscript.optimizer
    from onnx import version_converter
    from onnx2torch import convert

    model = onnxscript.optimizer.optimize(onnx.load(str(path)))
    initializers = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        shape = initializers.get(node.input[1]) if node.op_type == "Reshape" else None
        if shape is not None and 0 not in onnx.numpy_helper.to_array(shape):
            kept = [a for a in node.attribute if a.name != "allowzero"]
            del node.attribute[:]
            node.attribute.extend(kept)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), ONNX2TORCH_OPSET)
    if opset > ONNX2TORCH_OPSET:  # e.g. Reshape-19 (opset 19+) has no onnx2torch converter; Reshape-14 does
        model = version_converter.convert_version(model, ONNX2TORCH_OPSET)
    return ConvertedOnnx(convert(model)).eval()


def choose_access(loaded: LoadedModel, x: Tensor, *, device: str = "cpu", black_box: bool = False) -> None:
    """Swap in a torch conversion of ``loaded`` (white-box) if it agrees with onnxruntime on ``x``.

    With ``black_box`` the model stays onnxruntime's. Without it, a graph that cannot be
    converted, or whose conversion disagrees, is refused: score-only attacks are far weaker
    than gradient attacks and would report a robustness the model does not have.
    """
    if black_box:
        loaded.notes.append("attacked black-box through onnxruntime, as requested (no conversion to torch)")
        return
    fixes = ("pass --black-box to audit it through scores only (weaker attacks: the figure is an upper bound), "
             "or audit the PyTorch weights (safetensors or a state dict with --arch)")
    try:
        converted = convert_to_torch(Path(loaded.source)).to(device)
    except Exception as err:  # unsupported operators surface as many error types
        raise RobustkitError(f"{loaded.source}: no white-box conversion to torch ({one_line(err)}); {fixes}") from err
    if isinstance(loaded.model, OnnxPredictor) and loaded.model.batch is not None:
        converted = FixedBatch(converted, loaded.model.batch)
    expected = predict_logits(loaded.model, x)
    try:
        got = predict_logits(converted, x).cpu()
    except Exception as err:  # e.g. MemoryError from a graph that asks for more than the machine has
        raise RobustkitError(f"{loaded.source}: its torch conversion fails on the data ({one_line(err)}); "
                             f"{fixes}") from None
    diff = float((got - expected).abs().max()) if got.shape == expected.shape else float("inf")
    agree = float((got.argmax(1) == expected.argmax(1)).float().mean()) if got.shape == expected.shape else 0.0
    if agree < 1.0 or not diff <= CONVERSION_RTOL * max(1.0, float(expected.abs().max())):
        raise RobustkitError(f"{loaded.source}: its torch conversion disagrees with onnxruntime on the data (max abs "
                             f"diff {diff:.3g}, argmax agreement {100 * agree:.1f}%); {fixes}")
    loaded.model = converted
    loaded.notes = [n for n in loaded.notes if n != RUNTIME_NOTE]
    loaded.notes.append(f"converted to torch by onnx2torch {metadata.version('onnx2torch')}; it agrees with "
                        f"onnxruntime on {len(x)} samples (max abs diff {diff:.2g}, argmax 100%): attacked white-box "
                        "through it")
