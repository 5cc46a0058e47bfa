"""``robustkit export`` through click's CliRunner, the safetensors exporter's round trip, the
robustness summary taken from an audit report, and lazy imports."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from robustkit.audit.run import AuditConfig, run_audit
from robustkit.cli import cli
from robustkit.data import load_digits
from robustkit.export.run import METADATA_KEY
from robustkit.models.base import LoadOptions, file_sha256
from robustkit.models.loading import load_model
from robustkit.models.zoo import digits_resnet
from robustkit.modules import Normalized

CNN = ("--arch", "builtin:digits-cnn")


#: Built-in plugins only, whatever is installed (tests/conftest.py's ``host`` fixture).
pytestmark = pytest.mark.usefixtures("host")


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def json_of(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # exactly one document


def batchnorm_model() -> nn.Module:
    """Residual BatchNorm network behind a normalisation layer, with non-trivial BN statistics
    (weights need not be trained: the round trip must be exact either way)."""
    torch.manual_seed(0)
    net = digits_resnet()
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    return Normalized(net, [0.3], [0.4]).eval()


def test_safetensors_round_trip_with_model_card(tmp_path: Path) -> None:
    model = batchnorm_model()
    weights = tmp_path / "resnet.safetensors"
    save_file(model.net.state_dict(), str(weights))
    out = tmp_path / "out" / "nbn.safetensors"
    result = json_of(invoke("export", str(weights), "--arch", "builtin:digits-resnet", "--mean", "0.3", "--std", "0.4",
                            "--format", "safetensors", "--out", str(out), "--eps", "0.05", "--no-audit", "--json"))
    card = out.with_suffix(".json")
    assert result["verified"] and result["files"] == [str(out), str(card)]
    assert sorted(p.name for p in out.parent.iterdir()) == ["nbn.json", "nbn.safetensors"]
    assert result["checks"]["argmax_agreement"] == 1.0 and result["checks"]["max_abs_diff"] < 1e-5
    document = json.loads(card.read_text())
    assert document["load"] == "robustkit audit nbn.safetensors --arch builtin:digits-resnet --mean 0.3 --std 0.4"
    assert document["sha256"] == file_sha256(out) and document["robustness"] is None
    with safe_open(str(out), "pt") as handle:
        embedded = json.loads(handle.metadata()[METADATA_KEY])
    assert embedded["source"]["sha256"] == file_sha256(weights)
    # loads back exactly as the card says, to the same outputs
    reloaded = load_model(str(out), LoadOptions(arch="builtin:digits-resnet", mean=(0.3,), std=(0.4,)))
    x = load_digits().x[:37]
    with torch.no_grad():
        assert torch.equal(reloaded.model(x), model(x))


def test_the_summary_comes_from_an_audit_report(cnn_weights: Path, tmp_path: Path) -> None:
    report = run_audit(AuditConfig(str(cnn_weights), load=LoadOptions(arch=CNN[1]), attacks=("pgd",),
                                   options=(("pgd.steps", "10"),), eps=(0.05, 0.1, 0.2), limit=100, run_checks=False,
                                   out=tmp_path / "audit"))
    report_file = tmp_path / "audit" / "report.json"
    out = tmp_path / "cnn.safetensors"
    result = json_of(invoke("export", str(cnn_weights), *CNN, "--format", "safetensors", "--out", str(out),
                            "--report", str(report_file), "--json"))
    robustness = result["metadata"]["robustness"]
    assert robustness["source"] == "audit report" and robustness["attacks"] == ["robustkit:pgd"]
    assert robustness["clean_accuracy"] == report["clean_accuracy"]
    assert robustness["worst_case"] == [{"eps": r["eps"], "robust_accuracy": r["robust_accuracy"]}
                                        for r in report["worst_case"]]
    assert result["checks"]["parity_attack"] == "robustkit:pgd at linf:0.1"  # the report's middle eps

    contradicted = invoke("export", str(cnn_weights), *CNN, "--format", "safetensors", "--out", str(out),
                          "--report", str(report_file), "--threat", "l2")
    assert contradicted.exit_code == 1 and "--threat l2 contradicts the report's linf" in contradicted.stderr
    (tmp_path / "notes.json").write_text('{"hello": 1}')
    wrong = invoke("export", str(cnn_weights), *CNN, "--report", str(tmp_path / "notes.json"))
    assert wrong.exit_code == 1 and "is not an audit report.json (missing schema_version" in wrong.stderr
    other = json.loads(report_file.read_text())
    other["model"]["sha256"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(other))
    refused = invoke("export", str(cnn_weights), *CNN, "--format", "safetensors", "--out", str(tmp_path / "x.st"),
                     "--report", str(tmp_path / "other.json"))
    assert refused.exit_code == 1 and refused.stderr.count("\n") == 1
    assert "the report describes a model with sha256 000000000000..." in refused.stderr
    assert not (tmp_path / "x.st").exists()


def test_text_output_and_default_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke("export", "builtin:digits-cnn", "--format", "safetensors", "--samples", "60", "--eps", "0.05")
    assert result.exit_code == 0, result.output
    assert "exports/digits-cnn.safetensors (safetensors) written and verified on 60 samples" in result.stdout
    assert "adversarial parity (robustkit:pgd at linf:0.05)" in result.stdout
    assert "embedded robustness (quick check by robustkit export" in result.stdout
    assert (tmp_path / "exports" / "digits-cnn.safetensors").is_file()


def test_a_built_in_model_exports_with_its_audit_report(tmp_path: Path) -> None:
    """Fresh built-in weights are drawn alike by audit (at its default --seed 0) and export, so the
    report describes the model exported (they were drawn anew, and refused as another model)."""
    audited = invoke("audit", "builtin:digits-cnn", "--suite", "quick", "--limit", "30", "--no-checks",
                     "--out", str(tmp_path / "audit"))
    assert audited.exit_code == 3 and "at chance" in audited.output, audited.output  # untrained, and said
    result = invoke("export", "builtin:digits-cnn", "--report", str(tmp_path / "audit" / "report.json"),
                    "--samples", "30", "--out", str(tmp_path / "m.onnx"))
    assert result.exit_code == 0, result.output
    assert "embedded robustness (audit report, suite quick)" in result.stdout


def test_exporter_options_are_checked(cnn_weights: Path, tmp_path: Path) -> None:
    result = invoke("export", str(cnn_weights), *CNN, "-o", "opsett", "17", "--out", str(tmp_path / "m.onnx"))
    assert result.exit_code == 2 and "unknown parameter 'opsett'" in result.stderr and "opset" in result.stderr
    result = invoke("export", str(cnn_weights), *CNN, "--format", "tflite")
    assert result.exit_code == 1 and "unknown exporter 'tflite'" in result.stderr


def test_exporters_are_listed_with_their_parameters() -> None:
    names = {row["name"] for row in json_of(invoke("exporters", "list", "--json"))}
    assert {"robustkit:onnx", "robustkit:safetensors"} <= names
    shown = json_of(invoke("exporters", "show", "onnx", "--json"))
    assert shown["suffix"] == ".onnx"
    assert {p["name"]: p["default"] for p in shown["params"]} == {"opset": 17, "dynamo": True}


def test_help_does_not_import_onnx() -> None:
    code = ("import sys; from click.testing import CliRunner; from robustkit.cli import cli; "
            "assert CliRunner().invoke(cli, ['export', '--help']).exit_code == 0; "
            "print(sorted(m for m in ('onnx', 'onnxruntime', 'onnx2torch', 'onnxscript') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
