"""What weakens the robustness figures an export embeds travels with them: a gradient-masked
model's quick check, a quick or modified suite's caveat and failed checks reach the ONNX
metadata and the terminal; and ONNX graphs exported with a fixed batch size are audited."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import save_file

from robustkit.audit.run import AuditConfig, run_audit
from robustkit.cli import cli
from robustkit.data import load_digits
from robustkit.export.run import METADATA_KEY, QUICK_CAVEAT
from robustkit.models.base import LoadOptions
from robustkit.models.loading import load_model
from robustkit.models.onnx import OnnxPredictor
from robustkit.testing import trained_digits_model

CNN = ("--arch", "builtin:digits-cnn")
#: An architecture file: the digits CNN behind 8-bit rounding, whose input gradient is zero.
ROUNDED = '''
import torch
from torch import nn
from robustkit.models.zoo import digits_cnn

class Rounded(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = digits_cnn()

    def forward(self, x):
        return self.net(torch.round(x * 255) / 255)

def rounded():
    return Rounded()
'''

#: Built-in plugins only, whatever is installed (tests/conftest.py's ``host`` fixture).
pytestmark = pytest.mark.usefixtures("host")


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def embedded(path: Path) -> dict[str, Any]:
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    return json.loads(props[METADATA_KEY])["robustness"]


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "rounded"])
def test_the_quick_check_marks_a_gradient_masked_model(masked: bool, cnn_weights: Path, tmp_path: Path) -> None:
    if masked:
        (tmp_path / "rounded.py").write_text(ROUNDED)
        weights = tmp_path / "rounded.safetensors"
        save_file({f"net.{k}": v for k, v in trained_digits_model("cnn").state_dict().items()}, str(weights))
        model = (str(weights), "--arch", f"{tmp_path / 'rounded.py'}:rounded")
    else:
        model = (str(cnn_weights), *CNN)
    out = tmp_path / "m.onnx"
    result = invoke("export", *model, "--data", "builtin:digits", "--samples", "120", "--out", str(out))
    assert result.exit_code == 0, result.output
    robustness = embedded(out)
    texts = [c["text"] for c in robustness["caveats"]]
    assert QUICK_CAVEAT in texts and QUICK_CAVEAT in result.stdout  # never a robustness claim
    if masked:
        # PGD breaks nothing: the clean-looking figure is there, but marked and said out loud
        assert robustness["worst_case"][0]["robust_accuracy"] == robustness["clean_accuracy"]
        assert "gradients" in robustness["checks_failed"]
        assert [c for c in robustness["caveats"] if c["level"] == "fail"]
        assert "FAILED checks (gradients" in result.stdout
        assert "adversarial parity (robustkit:pgd at linf:8/255) untested: the attack broke no sample" in result.stdout
    else:
        assert robustness["checks_failed"] == [] and robustness["worst_case"][0]["robust_accuracy"] < 0.95
        assert {c["name"] for c in robustness["checks"]} >= {"gradients", "large-eps probe"}
        assert "FAILED" not in result.stdout and "adversarial parity (robustkit:pgd" in result.stdout


def test_a_reports_caveats_reach_metadata_and_terminal(cnn_weights: Path, tmp_path: Path) -> None:
    run_audit(AuditConfig(str(cnn_weights), load=LoadOptions(arch=CNN[1]), suite="quick", eps=(0.05,), limit=100,
                          run_checks=False, certify=False, out=tmp_path / "audit"))
    report = json.loads((tmp_path / "audit" / "report.json").read_text())
    caveat = report["config"]["suite"]["caveat"]
    assert caveat.startswith("quick suite")
    # what a failed check and an -o change look like in a report
    report["checks"].append({"name": "large-eps probe", "status": "fail", "detail": "made up"})
    report["config"]["suite"]["modified"] = [{"attack": "robustkit:apgd", "parameter": "steps", "suite": 20,
                                              "used": 2}]
    (tmp_path / "report.json").write_text(json.dumps(report))
    out = tmp_path / "q.onnx"
    result = invoke("export", str(cnn_weights), *CNN, "--report", str(tmp_path / "report.json"), "--samples", "120",
                    "--out", str(out))
    assert result.exit_code == 0, result.output
    robustness = embedded(out)
    assert robustness["suite"]["name"] == "quick" and robustness["suite"]["caveat"] == caveat
    assert robustness["suite"]["modified"] == report["config"]["suite"]["modified"]
    assert robustness["checks_failed"] == ["large-eps probe"]
    levels = {c["text"]: c["level"] for c in robustness["caveats"]}
    assert levels[caveat] == "warn"
    assert [level for text, level in levels.items() if "modified" in text and "apgd" in text] == ["warn"]
    assert [level for text, level in levels.items() if "large-eps probe" in text] == ["fail"]
    assert "embedded robustness (audit report, suite quick)" in result.stdout
    assert caveat[:40] in result.stdout and "FAILED checks (large-eps probe)" in result.stdout


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter's
@pytest.mark.parametrize(("batch", "dynamo"), [(1, False), (8, True)])
def test_a_graph_with_a_fixed_batch_size_is_audited(batch: int, dynamo: bool, cnn_weights: Path,
                                                     tmp_path: Path) -> None:
    """The dynamo exporter writes the batch size into Reshape targets too: the torch conversion
    must run in fixed batches as well as onnxruntime."""
    model = trained_digits_model("cnn")
    x = load_digits().x
    path = tmp_path / f"fixed{batch}.onnx"
    torch.onnx.export(model, (x[:batch],), str(path), input_names=["x"], dynamo=dynamo)
    loaded = load_model(str(path), LoadOptions())
    assert isinstance(loaded.model, OnnxPredictor) and loaded.model.batch == batch
    assert any(f"fixed batch size of {batch}" in note for note in loaded.notes)
    with torch.no_grad():
        assert float((loaded.model(x[:37]) - model(x[:37])).abs().max()) < 1e-4  # 37: a padded last batch
    config = AuditConfig(str(path), attacks=("pgd",), options=(("pgd.steps", "5"),), eps=(0.05,), limit=40,
                         run_checks=False, certify=False, out=tmp_path / "onnx")
    audited = run_audit(config)
    reference = run_audit(replace(config, model=str(cnn_weights), load=LoadOptions(arch=CNN[1]),
                                  out=tmp_path / "torch"))
    assert audited["attack_access"] == reference["attack_access"]  # white-box, through the conversion
    assert audited["clean_accuracy"] == reference["clean_accuracy"]
    assert audited["worst_case"][0]["robust_accuracy"] == pytest.approx(reference["worst_case"][0]["robust_accuracy"],
                                                                        abs=1 / 40 + 1e-6)
