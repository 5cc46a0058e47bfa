"""The Python API examples in ``examples/`` run as scripts, on builtin:digits, at small sizes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(script: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "ROBUSTKIT_NO_PROGRESS": "1"}
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


@pytest.mark.slow
def test_audit_example(tmp_path: Path) -> None:
    stdout = run_example("audit_model.py", "--epochs", "1", "--limit", "40", "--check-samples", "16",
                         "--out", "out", cwd=tmp_path)
    report = json.loads((tmp_path / "out" / "report" / "report.json").read_text())
    assert report["n"] == 40 and report["config"]["attacks"] == ["robustkit:fgsm", "robustkit:pgd", "robustkit:square"]
    assert stdout.startswith(f"clean accuracy {report['clean_accuracy']:.1%} on n = 40\n")
    assert f"linf eps 0.2: robust accuracy {report['worst_case'][-1]['robust_accuracy']:.1%}" in stdout
    assert len([line for line in stdout.splitlines() if line.startswith("check ")]) == len(report["checks"]) > 0
    assert (tmp_path / "out" / "report" / "report.html").is_file()


@pytest.mark.slow
def test_harden_example(tmp_path: Path) -> None:
    stdout = run_example("harden_model.py", "--epochs", "1", "--out", "out", cwd=tmp_path)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["defence"] == "robustkit:fgsm-rs" and summary["epochs_run"] == 1
    assert summary["after"]["clean_accuracy"] > summary["before"]["clean_accuracy"]  # it trained
    assert f"after:  clean {summary['after']['clean_accuracy']:.1%}" in stdout
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.slow
def test_export_example(tmp_path: Path) -> None:
    stdout = run_example("export_model.py", "--epochs", "1", "--samples", "32", "--out", "out", cwd=tmp_path)
    onnx_file = tmp_path / "out" / "digits-cnn.onnx"
    assert onnx_file.is_file()
    assert stdout.startswith(f"{Path('out') / 'digits-cnn.onnx'}: verified on 32 digits")
    assert "embedded robustness: clean " in stdout and "onnxruntime predicts [" in stdout
