"""benchmarks/gpu_check.py runs once, on a lent GPU, with no second try: its every part runs here
first, on the CPU at tiny sizes, and its targets say they are not judged off the GPU."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"
TINY = ["--device", "cpu", "--images", "8", "--batch", "8", "--image-size", "8", "--audit-images", "8",
        "--fast-epochs", "1", "--no-compile", "--no-extra-rows", "--budget-s", "1e6", "--json"]


@pytest.mark.slow
def test_every_part_runs_on_the_cpu_and_no_target_is_judged() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), *TINY], capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    status = {p["part"]: p["status"] for p in report["parts"]}
    for part in ("row fgsm-rs bf16+channels_last", "row plain bf16+channels_last", "row pgd-at bf16+channels_last",
                 "fast AT", "audit"):
        assert status[part] == "ran", report["parts"]
    skipped = {s["part"]: s["why"] for s in report["skipped"]}
    assert "needs CUDA" in skipped["attack checks"] and "needs CUDA" in skipped["pytest -m cuda"]
    assert skipped["row atta fp32"] == "--no-extra-rows"
    fgsm = next(r for r in report["rows"] if r["defence"] == "fgsm-rs")
    assert fgsm["images_per_s"] > 0
    if report["reference"] is not None:  # ../shared/bench/reference_training.py, beside the checkout
        assert fgsm["reference_images_per_s"] > 0 and "ratio" in fgsm
    else:  # a clone without the shared folder: the target says why it has no value
        assert "ratio" not in fgsm
        (headline,) = [t for t in report["targets"] if "reference" in t["name"]]
        assert headline["value"] is None and "no reference loop" in headline["why"], headline
    assert report["fast_at"]["epochs"] == 1 and report["fast_at"]["wall_s"] > 0
    assert {"clean_accuracy", "worst_case_robust_accuracy", "checks", "seconds"} <= set(report["audit"])
    assert len(report["targets"]) == 3
    for found in report["targets"]:
        assert found["judged"] is False and "not on a GPU" in found["why"]
        assert found["value"] is not None or report["reference"] is None
    assert report["failed"] == []
