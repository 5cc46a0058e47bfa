"""``robustkit demo``: the main job end to end on the built-in default, with no download.

Trains ``builtin:digits-cnn`` on ``builtin:digits``, saves it as safetensors and audits that
file as a user's model would be audited (default suite minus the slowest settings, with the
gradient-masking checks), writing the full report to ``OUT/audit``. It then hardens a fresh
digits-cnn with fast adversarial training and exports that model to verified ONNX.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from robustkit.audit.run import AuditConfig, run_audit
from robustkit.data import load_dataset
from robustkit.export.run import ExportConfig, run_export
from robustkit.harden.api import HardenRequest, run_harden
from robustkit.harden.config import RunConfig
from robustkit.models.base import LoadOptions
from robustkit.models.loading import load_model
from robustkit.threat import Norm
from robustkit.train import FitConfig, fit

DEMO_EPS = (0.05, 0.1, 0.2)
HARDEN_EPS = 0.1
#: Keeps the demo under a minute on two cores; a real audit uses the defaults.
DEMO_AUDIT_OPTIONS = (("square.queries", "200"),)


def run_demo(*, out: Path = Path("robustkit-demo"), epochs: int = 8, seed: int = 0,
             exports: Path = Path("exports")) -> dict[str, Any]:
    start = time.perf_counter()
    torch.manual_seed(seed)
    data = load_dataset("builtin:digits")
    model = load_model("builtin:digits-cnn").model
    assert isinstance(model, torch.nn.Module)
    assert data.x_train is not None and data.y_train is not None
    losses = fit(model, data.x_train, data.y_train, FitConfig(epochs=epochs, seed=seed))
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "digits-cnn.safetensors"
    save_file(model.state_dict(), str(weights))
    report = run_audit(AuditConfig(
        model=str(weights), data="builtin:digits", load=LoadOptions(arch="builtin:digits-cnn"),
        norm=Norm.LINF, eps=DEMO_EPS, options=DEMO_AUDIT_OPTIONS, seed=seed, check_samples=64,
        out=out / "audit",
    ))
    # Harden a fresh digits-cnn with atta (PGD-AT's robustness at the cost of one FGSM step per
    # batch), then ship that model: the deployable copy is verified against torch with
    # onnxruntime, its robustness inside.
    hardened = run_harden(HardenRequest(
        model="builtin:digits-cnn", data="builtin:digits", defence="atta", threat="linf", eps=HARDEN_EPS,
        options={"epochs": epochs, "seed": seed}, run=RunConfig(out_dir=out / "harden", progress=False),
    ))
    exported = run_export(ExportConfig(model=hardened["outputs"]["model"], load=LoadOptions(arch="builtin:digits-cnn"),
                                       eps=HARDEN_EPS, out=exports / "digits-cnn-hardened.onnx"))
    return {
        "model": str(weights),
        "train_loss": [round(v, 4) for v in losses],
        "audit": report,
        "harden": hardened,
        "export": exported.as_dict(),
        "out": str(out),
        "seconds": round(time.perf_counter() - start, 2),
    }


def print_demo(result: dict[str, Any]) -> None:
    from robustkit.cli.audit import print_summary
    from robustkit.cli.export import print_result
    from robustkit.console import stdout

    report = result["audit"]
    stdout.print(f"[bold]robustkit demo[/]: builtin:digits-cnn trained on builtin:digits "
                 f"({report['data']['n_train']} train images, final loss {result['train_loss'][-1]:.3f}), "
                 f"saved to {result['model']}")
    print_summary(report, Path(result["out"]) / "audit")
    hardened = result["harden"]
    before, after = hardened["before"], hardened["after"]
    stdout.print(f"[bold]hardened[/] with {hardened['defence']} against {hardened['threat']}: "
                 f"clean {before['clean_accuracy']:.1%} -> {after['clean_accuracy']:.1%}, "
                 f"PGD {before['robust_accuracy']:.1%} -> {after['robust_accuracy']:.1%} "
                 f"({hardened['epochs_run']} epochs, weights {hardened['outputs']['model']})")
    print_result(result["export"])
    stdout.print(f"done in {result['seconds']:.1f} s")
