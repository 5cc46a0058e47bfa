"""ONNX export: round trips verified with onnxruntime, metadata, warnings, failures that leave
no file, refused files, and audits of ONNX models white-box (converted) and black-box."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import Tensor, nn

from robustkit.audit.run import AuditConfig, run_audit
from robustkit.cli import cli
from robustkit.data import load_digits
from robustkit.errors import RobustkitError
from robustkit.export import onnx as onnx_export
from robustkit.export.onnx import OnnxExporter
from robustkit.export.run import METADATA_KEY, ExportConfig, ExportResult, export_model, run_export
from robustkit.harden.base import DefenceResult
from robustkit.models import onnx as onnx_loader
from robustkit.models.base import LoadOptions, file_sha256
from robustkit.models.loading import load_model
from robustkit.models.zoo import digits_cnn
from robustkit.plugin.host import Host, set_host
from robustkit.testing import trained_digits_model
from robustkit.threat import ThreatModel

THREAT = ThreatModel.parse("linf:0.05")


#: Built-in plugins only, whatever is installed (tests/conftest.py's ``host`` fixture).
pytestmark = pytest.mark.usefixtures("host")


@pytest.fixture(scope="module")
def digits() -> tuple[Tensor, Tensor]:
    data = load_digits()
    return data.x, data.y


@pytest.fixture(scope="module")
def cnn_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExportResult, Path]:
    """``builtin:digits-cnn`` trained, saved as safetensors and exported with the defaults."""
    set_host(Host(entry_points=False))
    folder = tmp_path_factory.mktemp("cnn")
    weights = folder / "cnn.safetensors"
    save_file(trained_digits_model("cnn").state_dict(), str(weights))
    result = run_export(ExportConfig(model=str(weights), load=LoadOptions(arch="builtin:digits-cnn"),
                                     out=folder / "cnn.onnx", eps=0.05))
    set_host(None)
    return result, weights


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_session(sess: ort.InferenceSession, x: Tensor) -> np.ndarray:
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def test_cnn_round_trip_at_batch_sizes_1_and_37(cnn_export: tuple[ExportResult, Path], digits) -> None:
    result, _ = cnn_export
    x, _ = digits
    assert result.verified and result.path.is_file() and result.files == [result.path]
    assert result.details["exporter"] == "dynamo" and result.details["opset"] == 17
    assert [d.dim_param for d in onnx.load(str(result.path)).graph.input[0].type.tensor_type.shape.dim[:1]] == ["batch"]
    model, sess = trained_digits_model("cnn"), session(result.path)
    for size in (1, 37):
        expected = model(x[:size]).detach().numpy()
        got = run_session(sess, x[:size])
        assert got.shape == (size, 10)
        assert np.abs(got - expected).max() < 1e-4
    checks = result.checks
    assert checks["batch_sizes"] == [1, 37] and checks["samples"] == len(x)
    assert checks["argmax_agreement"] == 1.0 and checks["max_abs_diff"] < 1e-4
    assert checks["parity_gap"] <= 0.005
    assert checks["robust_accuracy_torch"] < 0.9  # eps 0.05 does break some digits: parity is not vacuous


def test_metadata_is_readable_from_onnxruntime(cnn_export: tuple[ExportResult, Path], digits) -> None:
    result, weights = cnn_export
    x, y = digits
    document = json.loads(session(result.path).get_modelmeta().custom_metadata_map[METADATA_KEY])
    assert document == json.loads(json.dumps(result.metadata, default=str))
    assert document["source"]["sha256"] == file_sha256(weights)
    assert document["source"]["arch"] == "builtin:digits-cnn"
    assert {"robustkit", "torch", "onnx", "onnxruntime"} <= set(document["versions"])
    robustness = document["robustness"]
    clean = float((trained_digits_model("cnn")(x).argmax(1) == y).float().mean())
    assert robustness["clean_accuracy"] == pytest.approx(clean)
    assert robustness["threat"]["norm"] == "linf" and robustness["threat"]["eps"] == [0.05]
    worst = robustness["worst_case"][0]
    assert worst["eps"] == 0.05 and 0.0 < worst["robust_accuracy"] < robustness["clean_accuracy"]
    assert document["input"]["bounds"] == [0.0, 1.0] and document["input"]["shape"] == [1, 8, 8]


def test_normalisation_batchnorm_and_residuals_live_in_the_graph(tmp_path: Path, digits) -> None:
    model = trained_digits_model("normalized-bn")
    x, y = digits
    path = tmp_path / "nbn.onnx"
    result = export_model(model, OnnxExporter(), path, x=x, y=y, threat=THREAT, metadata={"test": True})
    # dynamo cannot write this graph at opset 17 with torch 2.14: the fallback must say why
    assert result.details["exporter"] in ("dynamo", "torchscript") and result.details["opset"] == 17
    assert (result.details["exporter"] == "dynamo") != ("dynamo_failed" in result.details)
    sess = session(path)
    for size in (1, 37):
        got = run_session(sess, x[:size])  # raw [0, 1] inputs
        assert np.abs(got - model(x[:size]).detach().numpy()).max() < 1e-4
        assert np.abs(got - model.net(x[:size]).detach().numpy()).max() > 0.1  # not the bare network
    assert result.checks["argmax_agreement"] == 1.0 and result.checks["parity_gap"] <= 0.005


def test_dynamo_failure_falls_back_to_torchscript_and_says_so(monkeypatch, tmp_path: Path, digits) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("no graph today")

    monkeypatch.setattr(onnx_export, "_dynamo", broken)
    x, y = digits
    result = export_model(trained_digits_model("cnn"), OnnxExporter(), tmp_path / "m.onnx", x=x[:64], y=y[:64],
                          threat=THREAT, metadata={})
    assert result.details == {"exporter": "torchscript", "dynamo_failed": "RuntimeError: no graph today", "opset": 17}
    assert result.verified


class Branchy(nn.Module):
    """Python control flow on the data: the tracer records one branch as a constant."""

    def __init__(self, net: nn.Module, threshold: float) -> None:
        super().__init__()
        self.net, self.threshold = net, threshold

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) if x.mean() > self.threshold else -self.net(x)


def test_failed_verification_leaves_no_file(tmp_path: Path, digits) -> None:
    x, y = digits
    path = tmp_path / "branchy.onnx"
    path.write_bytes(b"the previous export")
    median = float(x.flatten(1).mean(1).median())  # one sample at a time, half go each way
    with pytest.raises(RobustkitError, match="export verification failed") as info:
        export_model(Branchy(trained_digits_model("cnn"), median), OnnxExporter(dynamo=False), path, x=x, y=y,
                     threat=THREAT, metadata={}, force=True)  # the file in the way is not ours: replace it
    message = str(info.value)
    assert "\n" not in message and "TorchScript tracer" in message and "nothing was written" in message
    assert path.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["branchy.onnx"]  # no staging folder left


def test_what_cannot_survive_export_is_a_warning(tmp_path: Path, digits) -> None:
    x, y = digits
    noisy = nn.Dropout(0.2)
    outside = nn.Identity()
    outside.survives_export = False  # e.g. a transform that runs in numpy
    model = nn.Sequential(outside, trained_digits_model("cnn"), noisy).train()
    defence = DefenceResult(model, notes=["JPEG compression runs in numpy before the model"], survives_export=False)
    result = export_model(model, OnnxExporter(dynamo=False), tmp_path / "d.onnx", x=x[:64], y=y[:64], threat=THREAT,
                          metadata={}, defence=defence)
    text = " | ".join(result.warnings)
    assert "random layers in train mode (2)" in text
    assert "0 declare(s) that they do not survive export" in text
    assert "JPEG compression runs in numpy" in text
    assert model.training and noisy.training  # the caller's modes are restored


class Jitter(nn.Module):
    """Zero-scaled noise: harmless to verification, but a random operator in the graph."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x + 0.0 * torch.randn_like(x))


def test_random_operators_in_the_graph_are_a_warning(tmp_path: Path, digits) -> None:
    x, y = digits
    result = export_model(Jitter(trained_digits_model("cnn")), OnnxExporter(dynamo=False), tmp_path / "j.onnx",
                          x=x[:64], y=y[:64], threat=THREAT, metadata={})
    assert any("random operators (RandomNormalLike)" in w for w in result.warnings), result.warnings


# --- refused files ---------------------------------------------------------------------------

def test_corrupted_export_is_refused(cnn_export: tuple[ExportResult, Path], tmp_path: Path) -> None:
    path = tmp_path / "corrupt.onnx"
    data = bytearray(cnn_export[0].path.read_bytes())
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(RobustkitError, match=r"corrupt\.onnx") as info:
        load_model(str(path))
    assert "\n" not in str(info.value)


def test_external_data_outside_the_folder_is_refused(cnn_export: tuple[ExportResult, Path], tmp_path: Path) -> None:
    model = onnx.load(str(cnn_export[0].path))
    tensor = model.graph.initializer[0]
    size = len(tensor.raw_data)
    (tmp_path / "secret.bin").write_bytes(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", str(size))):
        tensor.external_data.add(key=key, value=value)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "evil.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(RobustkitError, match=r"refusing evil.onnx: .*outside the model's folder") as info:
        load_model(str(folder / "evil.onnx"))
    assert "\n" not in str(info.value)


def test_custom_operator_domains_are_refused(cnn_export: tuple[ExportResult, Path], tmp_path: Path) -> None:
    model = onnx.load(str(cnn_export[0].path))
    model.graph.node[-1].domain = "com.example.native"
    model.opset_import.append(onnx.helper.make_opsetid("com.example.native", 1))
    path = tmp_path / "custom.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(RobustkitError, match=r"custom operator domain.*com\.example\.native"):
        load_model(str(path))


def test_an_onnx_model_is_not_exported_again(cnn_export: tuple[ExportResult, Path], tmp_path: Path) -> None:
    with pytest.raises(RobustkitError, match="export needs a torch model"):
        run_export(ExportConfig(model=str(cnn_export[0].path), out=tmp_path / "again.onnx"))


# --- audits of ONNX models -------------------------------------------------------------------

def _unconvertible(source: Path, target: Path) -> None:
    """The export with a final Shrink (identity here): onnxruntime runs it, onnx2torch cannot."""
    model = onnx.load(str(source))
    output = model.graph.output[0].name
    model.graph.node[-1].output[0] = "raw_logits"
    model.graph.node.append(onnx.helper.make_node("Shrink", ["raw_logits"], [output], lambd=0.0, bias=0.0))
    onnx.save(model, str(target))


def test_conversion_is_trusted_only_when_it_agrees_with_onnxruntime(
    cnn_export: tuple[ExportResult, Path], monkeypatch, tmp_path: Path, digits
) -> None:
    x, _ = digits
    path = cnn_export[0].path
    loaded = load_model(str(path))
    onnx_loader.choose_access(loaded, x)
    assert loaded.white_box and any("converted to torch by onnx2torch" in n for n in loaded.notes)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), trained_digits_model("cnn")(x), atol=1e-4)

    _unconvertible(path, tmp_path / "shrink.onnx")
    loaded = load_model(str(tmp_path / "shrink.onnx"))
    with pytest.raises(RobustkitError, match=r"no white-box conversion to torch .*Shrink.*--black-box"):
        onnx_loader.choose_access(loaded, x)  # never a silent fall-back to weaker, score-only attacks

    monkeypatch.setattr(onnx_loader, "convert_to_torch", lambda p: digits_cnn().eval())  # a wrong "conversion"
    loaded = load_model(str(path))
    with pytest.raises(RobustkitError, match=r"disagrees with onnxruntime.*--black-box"):
        onnx_loader.choose_access(loaded, x)


@pytest.mark.parametrize("dynamo", [True, False])
def test_what_torch_onnx_export_writes_today_is_audited_white_box(tmp_path: Path, digits, dynamo: bool) -> None:
    """torch.onnx.export (opset 20; dynamo writes Reshape-19 with allowzero) converts exactly."""
    x, _ = digits
    net = trained_digits_model("cnn").eval()
    path = tmp_path / "model.onnx"
    shapes = {"dynamic_shapes": ({0: torch.export.Dim("batch")},)} if dynamo else {"dynamic_axes": {"x": {0: "n"}}}
    torch.onnx.export(net, (x[:2],), str(path), dynamo=dynamo, input_names=["x"], **shapes)
    assert onnx.load(str(path)).opset_import[0].version >= 18
    loaded = load_model(str(path))
    onnx_loader.choose_access(loaded, x)
    assert loaded.white_box
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), net(x), atol=1e-4)


def test_onnx_audit_white_box_matches_the_torch_audit(cnn_export: tuple[ExportResult, Path]) -> None:
    result, weights = cnn_export
    common = {"attacks": ("pgd",), "options": (("pgd.steps", "10"),), "eps": (0.05, 0.1), "limit": 120,
              "run_checks": False}
    onnx_report = run_audit(AuditConfig(str(result.path), **common))
    torch_report = run_audit(AuditConfig(str(weights), load=LoadOptions(arch="builtin:digits-cnn"), **common))
    assert onnx_report["attack_access"].startswith("white-box") and onnx_report["model"]["format"] == "onnx"
    assert any("onnx2torch" in note for note in onnx_report["model"]["notes"])
    assert onnx_report["clean_accuracy"] == torch_report["clean_accuracy"]
    for ours, theirs in zip(onnx_report["worst_case"], torch_report["worst_case"]):
        assert abs(ours["robust_accuracy"] - theirs["robust_accuracy"]) <= 2 / 120


def test_onnx_audit_black_box_only_on_request(
    cnn_export: tuple[ExportResult, Path], tmp_path: Path
) -> None:
    path = cnn_export[0].path
    common = {"eps": (0.1,), "limit": 60, "options": (("square.queries", "150"),), "run_checks": False}
    cli_run = CliRunner().invoke(cli, ["audit", str(path), "--data", "builtin:digits", "--black-box", "--eps", "0.1",
                                       "--limit", "60", "-o", "square.queries", "150", "--no-checks", "--json"])
    assert cli_run.exit_code == 0, cli_run.output
    requested = json.loads(cli_run.stdout)
    assert requested["attack_access"].startswith("black-box")
    assert requested["config"]["attacks"] == ["robustkit:square"]
    assert any("as requested" in note for note in requested["model"]["notes"])
    assert requested["worst_case"][0]["robust_accuracy"] < requested["clean_accuracy"]  # square still bites
    with pytest.raises(RobustkitError, match="need gradients"):
        run_audit(AuditConfig(str(path), black_box=True, attacks=("pgd",), eps=(0.1,), limit=8))

    _unconvertible(path, tmp_path / "shrink.onnx")
    with pytest.raises(RobustkitError, match="no white-box conversion"):
        run_audit(AuditConfig(str(tmp_path / "shrink.onnx"), **common))
    refused = CliRunner().invoke(cli, ["audit", str(tmp_path / "shrink.onnx"), "--data", "builtin:digits",
                                       "--eps", "0.1", "--limit", "60"])
    assert refused.exit_code == 1 and "--black-box" in refused.output and "Shrink" in refused.output
    forced = run_audit(AuditConfig(str(tmp_path / "shrink.onnx"), black_box=True, **common))
    assert forced["attack_access"].startswith("black-box")
    assert forced["worst_case"] == requested["worst_case"]  # same runtime, same seeded attack
