"""Audit a model's robustness from Python: train ``builtin:digits-cnn``, save it, audit the file.

    python examples/audit_model.py                       # 4 epochs, audit of 200 digits
    python examples/audit_model.py --epochs 2 --limit 40 --out /tmp/audit

``run_audit(AuditConfig(...))`` is ``robustkit audit`` as a function: the same loading (the
saved weights are read with ``--arch builtin:digits-cnn``), attacks, sanity checks and report
files, and it returns the report document (the ``report.json`` contract) as a dict.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from robustkit import AuditConfig, run_audit
from robustkit.data import load_dataset
from robustkit.models.base import LoadOptions
from robustkit.models.loading import load_model
from robustkit.threat import Norm
from robustkit.train import FitConfig, fit

log = logging.getLogger("audit_model")


def train_digits_cnn(path: Path, epochs: int, seed: int) -> None:
    """A plain (undefended) model to audit, saved as safetensors as a user's model would be."""
    torch.manual_seed(seed)
    data = load_dataset("builtin:digits")
    model = load_model("builtin:digits-cnn").model  # the architecture with fresh weights
    assert isinstance(model, torch.nn.Module) and data.x_train is not None and data.y_train is not None
    fit(model, data.x_train, data.y_train, FitConfig(epochs=epochs, seed=seed))
    save_file(model.state_dict(), str(path))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4, help="training epochs of the model to audit")
    parser.add_argument("--limit", type=int, default=200, help="audit the first N of the 360 evaluation digits")
    parser.add_argument("--steps", type=int, default=10, help="PGD steps")
    parser.add_argument("--check-samples", type=int, default=32, help="samples for the sanity checks")
    parser.add_argument("--out", type=Path, default=Path("robustkit-examples/audit"), help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / "digits-cnn.safetensors"
    log.info("training builtin:digits-cnn for %d epochs", args.epochs)
    train_digits_cnn(weights, args.epochs, args.seed)

    config = AuditConfig(
        model=str(weights),
        data="builtin:digits",
        load=LoadOptions(arch="builtin:digits-cnn"),
        attacks=("fgsm", "pgd", "square"),  # leave empty for the default suite
        options=(("pgd.steps", str(args.steps)), ("square.queries", "200")),
        norm=Norm.LINF,
        eps=(0.05, 0.1, 0.2),
        limit=args.limit,
        check_samples=args.check_samples,
        seed=args.seed,
        out=args.out / "report",  # report.json, report.md, report.html, per_sample.csv, robustness.png
    )
    report = run_audit(config)

    # Results go to stdout, as the CLI does; everything else is in the report folder.
    print(f"clean accuracy {report['clean_accuracy']:.1%} on n = {report['n']}")
    for row in report["worst_case"]:
        low, high = row["ci95"]
        print(f"linf eps {row['eps']:g}: robust accuracy {row['robust_accuracy']:.1%} (95% CI {low:.1%}-{high:.1%})")
    for check in report["checks"]:
        print(f"check {check['name']}: {check['status']} ({check['detail']})")
    print(f"report: {config.out}/report.html")
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
