"""The built-in ``onnx`` exporter.

The graph takes the same inputs the audit attacked (in the bounds, normalisation inside the
model), has a dynamic batch axis and the opset asked for. torch's dynamo exporter goes first;
when it fails or cannot produce that opset, the TorchScript-based exporter takes over, and the
result says which one wrote the file and why. The TorchScript tracer's warnings (Python-side
computation it could not record) and random operators in the graph become export warnings.

Imported only when an ONNX export runs, so ``onnx`` stays off the start-up path.
"""
from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustkit.errors import RobustkitError, one_line
from robustkit.export.run import METADATA_KEY, Exporter, ExportResult
from robustkit.modules import Model
from robustkit.params import param

log = logging.getLogger(__name__)

INPUT, OUTPUT = "input", "logits"
#: Each graph input (in the model's argument order) and its dynamic axes; the output's axis 0 is "batch".
Axes = dict[str, dict[int, str]]
IMAGE_AXES: Axes = {INPUT: {0: "batch"}}
#: Operators whose outputs change from run to run: a deployed model should not hold them.
RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}
#: Above this a model cannot be one protobuf; its weights go to ``NAME.onnx.data`` beside it.
EXTERNAL_DATA_BYTES = 1_800_000_000
#: Loggers of the exporters, which report recoverable trouble at warning level on stderr.
_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript", "onnx_ir")


@dataclass(frozen=True)
class OnnxParams:
    opset: int = param(17, "ONNX opset of the default domain")
    dynamo: bool = param(True, "try torch's dynamo exporter first (the TorchScript exporter is the fallback)")

    def __post_init__(self) -> None:
        if not 13 <= self.opset <= 23:
            raise ValueError("opset must be between 13 and 23")


@contextmanager
def _quiet() -> Iterator[None]:
    """Keep the exporters' progress and recoverable warnings off the user's terminal."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _opset(proto: Any) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _dynamo(model: nn.Module, example: tuple[Tensor, ...], opset: int, axes: Axes) -> Any:
    # one Dim per axis name: inputs that share "batch" must agree on it
    dims = {name: torch.export.Dim(name) for named in axes.values() for name in named.values()}
    # torch.export prints the failing graph to stderr; keep it for -v rather than the terminal.
    printed = io.StringIO()
    try:
        with _quiet(), redirect_stdout(printed), redirect_stderr(printed):
            program = torch.onnx.export(
                model, example, None, dynamo=True, opset_version=opset, input_names=list(axes),
                output_names=[OUTPUT], verbose=False,
                dynamic_shapes=tuple({axis: dims[name] for axis, name in named.items()} for named in axes.values()),
            )
    finally:
        if printed.getvalue().strip():
            log.debug("dynamo exporter output:\n%s", printed.getvalue())
    assert program is not None
    proto = program.model_proto
    if _opset(proto) != opset:
        raise RobustkitError(f"it writes opset {_opset(proto)} and the export targets opset {opset} "
                             "(the opset parameter)")
    return proto


def _torchscript(model: nn.Module, example: tuple[Tensor, ...], opset: int, path: Path, axes: Axes
                 ) -> tuple[Any, list[str]]:
    """The TorchScript-based exporter, and the tracer's warnings about what it could not record."""
    import onnx

    with _quiet(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        torch.onnx.export(
            model, example, str(path), dynamo=False, opset_version=opset, input_names=list(axes),
            output_names=[OUTPUT], dynamic_axes={**axes, OUTPUT: {0: "batch"}},
        )
    tracer = sorted({str(w.message).strip().splitlines()[0] for w in caught
                     if issubclass(w.category, torch.jit.TracerWarning)})
    return onnx.load(str(path)), tracer


class OnnxExporter(Exporter):
    """ONNX graph for onnxruntime and other runtimes, verified against torch."""

    name = "onnx"
    suffix = ".onnx"
    Params = OnnxParams
    summary = "ONNX graph with the normalisation inside and a dynamic batch axis, verified with onnxruntime"

    def wrote(self, path: Path) -> bool:
        """Our graphs carry robustkit's metadata property."""
        import onnx

        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception:  # not an ONNX file: not ours
            return False
        return any(prop.key == METADATA_KEY for prop in proto.metadata_props)

    def export(self, model: nn.Module, example: Tensor, path: Path, *, metadata: dict[str, Any]) -> ExportResult:
        return self.write(model, (example,), path, metadata=metadata, axes=IMAGE_AXES)

    def write(self, model: nn.Module, example: tuple[Tensor, ...], path: Path, *, metadata: dict[str, Any],
              axes: Axes) -> ExportResult:
        """``export`` of a model with any inputs (``axes``), for jobs that verify on their own
        (text classifiers take token ids and an attention mask)."""
        import onnx

        p: OnnxParams = self.params
        details: dict[str, Any] = {}
        found: list[str] = []
        proto = None
        if p.dynamo:
            try:
                proto = _dynamo(model, example, p.opset, axes)
                details["exporter"] = "dynamo"
            except Exception as err:  # any failure hands over to the fallback
                details["dynamo_failed"] = str(err) if isinstance(err, RobustkitError) else one_line(err)
        if proto is None:
            try:
                proto, tracer = _torchscript(model, example, p.opset, path, axes)
            except Exception as err:
                tried = f"dynamo: {details['dynamo_failed']}; " if p.dynamo else ""
                raise RobustkitError(f"the model cannot be exported to ONNX ({tried}torchscript: {one_line(err)})"
                                     ) from None
            details["exporter"] = "torchscript"
            found += [f"the TorchScript tracer could not record everything, so the graph may differ from the "
                      f"model on other inputs: {message}" for message in tracer]
        details["opset"] = _opset(proto)
        random_ops = sorted({node.op_type for node in proto.graph.node} & RANDOM_OPS)
        if random_ops:
            found.append(f"the graph holds random operators ({', '.join(random_ops)}): its outputs change "
                         "from run to run")
        onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(metadata, default=str)})
        external = proto.ByteSize() > EXTERNAL_DATA_BYTES
        data_file = path.with_name(f"{path.name}.data")
        onnx.save_model(proto, str(path), save_as_external_data=external, location=data_file.name)
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except Exception as err:  # the checker raises several types
            raise RobustkitError(f"the exported graph fails onnx.checker ({one_line(err)})") from None
        files = [path, data_file] if external else [path]
        return ExportResult(path, "onnx", files, details=details, warnings=found)

    def load(self, path: Path, model: nn.Module) -> Model:
        from robustkit.models.onnx import OnnxPredictor

        return OnnxPredictor(path)
