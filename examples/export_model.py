"""Export a model from Python: a verified ONNX copy with its robustness summary inside.

    python examples/export_model.py                         # trains a plain digits-cnn first
    python examples/export_model.py --model robustkit-examples/harden/model.safetensors
    python examples/export_model.py --epochs 2 --samples 64 --out /tmp/export

``run_export(ExportConfig(...))`` is ``robustkit export`` as a function: it loads the model
safely, measures a quick robustness summary (clean and PGD accuracy; pass ``report=`` an
audit's report.json instead for the full audit), writes the ONNX graph with the summary in
its metadata, checks it against torch with onnxruntime on real data (outputs at two batch
sizes, and PGD examples) and only then moves the file into place. The script then uses the
file the way a deployment would: onnxruntime only, no torch model.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime

from robustkit import ExportConfig, run_export
from robustkit.data import load_dataset
from robustkit.export.run import METADATA_KEY
from robustkit.models.base import LoadOptions

log = logging.getLogger("export_model")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="safetensors weights of builtin:digits-cnn (default: train one)")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs when no --model is given")
    parser.add_argument("--samples", type=int, default=200, help="evaluation digits that verify the export")
    parser.add_argument("--out", type=Path, default=Path("robustkit-examples/export"), help="output folder")
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.model
    if weights is None:
        from audit_model import train_digits_cnn  # the sibling example's training step

        weights = args.out / "digits-cnn.safetensors"
        log.info("training builtin:digits-cnn for %d epochs", args.epochs)
        train_digits_cnn(weights, args.epochs, seed=0)

    result = run_export(ExportConfig(
        model=str(weights),
        load=LoadOptions(arch="builtin:digits-cnn"),
        format="onnx",  # or "safetensors", or any exporter a plugin registers
        out=args.out / "digits-cnn.onnx",
        data="builtin:digits",
        samples=args.samples,
    ))
    checks = result.checks
    print(f"{result.path}: verified on {checks['samples']} digits, max |onnx - torch| {checks['max_abs_diff']:.1e}, "
          f"PGD accuracy torch {checks['robust_accuracy_torch']:.1%} / onnx {checks['robust_accuracy_exported']:.1%}")
    for warning in result.warnings:
        print(f"warning: {warning}")

    # Deployment side: onnxruntime and the file alone.
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    embedded = json.loads(session.get_modelmeta().custom_metadata_map[METADATA_KEY])
    summary = embedded["robustness"]
    print(f"embedded robustness: clean {summary['clean_accuracy']:.1%}, " + ", ".join(
        f"{summary['threat']['norm']} {row['eps']:.3g}: {row['robust_accuracy']:.1%}" for row in summary["worst_case"]))
    data = load_dataset("builtin:digits")
    (logits,) = session.run(None, {session.get_inputs()[0].name: data.x[:8].numpy()})
    print(f"onnxruntime predicts {np.argmax(logits, axis=1).tolist()} for labels {data.y[:8].tolist()}")
    return result.as_dict()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
