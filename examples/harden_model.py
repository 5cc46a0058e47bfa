"""Harden a model from Python: adversarially train ``builtin:digits-cnn`` on ``builtin:digits``.

    python examples/harden_model.py                                  # fast adversarial training
    python examples/harden_model.py --defence pgd-at --epochs 5      # slower, stronger
    python examples/harden_model.py --epochs 2 --out /tmp/harden

``robustkit.run_harden(HardenRequest(...))`` is ``robustkit harden`` as a function. It audits the model with
PGD at the training eps before and after, trains with the defence (checkpoints every epoch,
a robust-accuracy canary that keeps the best epoch and stops at catastrophic overfitting) and
writes model.safetensors, config.json, train_log.jsonl, curves.png and summary.json to the
output folder. The returned summary is summary.json as a dict.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from robustkit import HardenRequest, RunConfig, run_harden

log = logging.getLogger("harden_model")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--defence", default="fgsm-rs", help="a training defence (robustkit defences list)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--eps", default="0.1", help="linf radius to train against, e.g. 0.1 or 8/255")
    parser.add_argument("--out", type=Path, default=Path("robustkit-examples/harden"), help="output folder")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    args = parser.parse_args(argv)

    request = HardenRequest(
        model="builtin:digits-cnn",  # fresh weights; a file plus arch="module:factory" works the same
        data="builtin:digits",  # hardening needs a training split
        defence=args.defence,
        threat="linf",
        eps=args.eps,
        options={"epochs": args.epochs},  # the defence's parameters, as -o KEY VALUE on the CLI
        run=RunConfig(device=args.device, out_dir=args.out, progress=False),
    )
    log.info("hardening builtin:digits-cnn with %s against linf %s", args.defence, args.eps)
    summary = run_harden(request)

    before, after = summary["before"], summary["after"]
    print(f"{summary['defence']} against {summary['threat']}, {summary['epochs_run']} epochs "
          f"(best {summary['best_epoch']}, stopped: {summary['stop_reason'] or 'no'})")
    print(f"before: clean {before['clean_accuracy']:.1%}, PGD {before['robust_accuracy']:.1%}")
    print(f"after:  clean {after['clean_accuracy']:.1%}, PGD {after['robust_accuracy']:.1%}")
    print(f"hardened weights: {summary['outputs']['model']} (audit them with --arch builtin:digits-cnn)")
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
