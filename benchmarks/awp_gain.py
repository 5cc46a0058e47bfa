"""What adversarial weight perturbation (``--awp``) buys on the built-in digits: the same defence
with and without it, over several seeds, judged by the worst case of APGD-CE and APGD-DLR
(100 steps each) on the evaluation split (360 digits that neither training nor the canary sees).

    python benchmarks/awp_gain.py        # pgd-at, gamma 1e-2, piecewise lr, 60 epochs, 3 seeds
    python benchmarks/awp_gain.py --eps 0.1      # a radius at which the CNN fits its training set
    python benchmarks/awp_gain.py --warmup 10    # at 0.2, AWP from the first epoch stalls training
    python benchmarks/awp_gain.py --defence fgsm-rs --schedule cyclic --epochs 15 --gamma 5e-3

AWP targets robust overfitting (Rice et al., 2020): robust test accuracy that peaks soon after a
learning-rate decay and then falls while training goes on. So every run trains all its epochs
(no early stopping) and two sets of weights are judged: the last epoch's, where overfitting
shows, and the canary's best epoch (what ``robustkit harden`` returns), which already undoes
part of it. The defaults are the authors' AT-AWP recipe scaled to the digits: piecewise decay
at 1/2 and 3/4 of the run and gamma 1e-2 (their TRADES-AWP uses 5e-3).

A benchmark, not a test: it prints the numbers (mean +- sd over seeds, and the gains) and
asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from robustkit.attacks.apgd import APGD
from robustkit.data import Dataset, load_digits
from robustkit.harden import checkpoint
from robustkit.harden.config import RunConfig
from robustkit.harden.defences import FGSMRS, PGDAT, TRADES, TrainingDefence
from robustkit.models.zoo import digits_cnn
from robustkit.threat import ThreatModel

DEFENCES: dict[str, type[TrainingDefence]] = {"pgd-at": PGDAT, "fgsm-rs": FGSMRS, "trades": TRADES}
#: The weights judged: the canary's best epoch (what harden returns) and the last epoch.
WEIGHTS = ("best", "last")


def worst_case_accuracy(model: torch.nn.Module, data: Dataset, threat: ThreatModel) -> tuple[float, float]:
    """(clean, robust) accuracy: a sample is robust if it is right and neither APGD breaks it."""
    model.eval()
    with torch.no_grad():
        right = model(data.x).argmax(1) == data.y
    clean = float(right.float().mean())
    for loss in ("ce", "dlr"):
        right &= ~APGD(loss=loss, seed=0)(model, data.x, data.y, threat=threat).success
    return clean, float(right.float().mean())


def run(gamma: float, seed: int, args: argparse.Namespace, data: Dataset) -> dict[str, Any]:
    """One training run, judged at its best and at its last epoch."""
    torch.manual_seed(seed)
    model = digits_cnn()
    warmup = {} if args.warmup is None else {"awp_warmup": args.warmup}
    defence = DEFENCES[args.defence](epochs=args.epochs, seed=seed, schedule=args.schedule, patience=0,
                                     awp_gamma=gamma, **warmup)
    threat = ThreatModel("linf", args.eps)
    with tempfile.TemporaryDirectory() as out:  # the checkpoint holds the last epoch's weights
        started = time.perf_counter()
        result = defence.apply(model, data, threat=threat, run=RunConfig(out_dir=Path(out), progress=False))
        seconds = time.perf_counter() - started
        last = checkpoint.load(Path(out) / checkpoint.FILENAME)["model"]
    row: dict[str, Any] = {"awp_gamma": gamma, "seed": seed, "train_seconds": round(seconds, 1),
                           "epochs_run": len(result.history),
                           "best_epoch": next(r["epoch"] for r in reversed(result.history) if r["best"])}
    row["clean_best"], row["robust_best"] = worst_case_accuracy(result.model, data, threat)
    result.model.load_state_dict(last)
    row["clean_last"], row["robust_last"] = worst_case_accuracy(result.model, data, threat)
    print(f"{args.defence} awp_gamma={gamma:g} seed={seed}: robust {row['robust_best']:.1%} at the best epoch "
          f"({row['best_epoch']}), {row['robust_last']:.1%} at the last ({seconds:.0f} s)",
          file=sys.stderr, flush=True)  # progress: a run takes minutes on a small CPU
    return row


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def points(values: list[float]) -> str:
    mean, sd = mean_sd(values)
    return f"{100 * mean:5.1f} +- {100 * sd:3.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--defence", choices=sorted(DEFENCES), default="pgd-at")
    parser.add_argument("--gamma", type=float, default=1e-2, help="AWP gamma (the authors: 1e-2 AT, 5e-3 TRADES)")
    parser.add_argument("--warmup", type=int, help="epochs before AWP starts (default: the defence's, 0 for pgd-at)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--schedule", choices=("cyclic", "piecewise", "cosine", "constant"), default="piecewise")
    parser.add_argument("--eps", type=float, default=0.2, help="linf radius on the [0, 1] digits")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    data = load_digits()
    arms = {gamma: [run(gamma, seed, args, data) for seed in range(args.seeds)] for gamma in (0.0, args.gamma)}
    without, with_awp = arms[0.0], arms[args.gamma]
    gains = {w: [b[f"robust_{w}"] - a[f"robust_{w}"] for a, b in zip(without, with_awp)] for w in WEIGHTS}
    report = {
        "defence": args.defence, "eps": args.eps, "epochs": args.epochs, "schedule": args.schedule,
        "gamma": args.gamma, "warmup": args.warmup, "seeds": args.seeds,
        "judge": "worst case of APGD-CE and APGD-DLR (100 steps) on the evaluation split (360 digits)",
        "runs": without + with_awp,
        "robust_gain_per_seed": gains,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    warmup = "" if args.warmup is None else f", AWP after {args.warmup} epochs"
    print(f"{args.defence} on builtin:digits, linf eps {args.eps:g}, {args.epochs} epochs ({args.schedule} lr"
          f"{warmup}), seeds 0-{args.seeds - 1}; {report['judge']}; mean +- sd over seeds, in %")
    print(f"{'':<18}{'clean (best)':>16}{'robust (best)':>16}{'clean (last)':>16}{'robust (last)':>16}"
          f"{'best epoch':>12}{'train s':>9}")
    for label, group in (("without AWP", without), (f"AWP gamma {args.gamma:g}", with_awp)):
        cells = [points([r[f"{kind}_{w}"] for r in group]) for w in WEIGHTS for kind in ("clean", "robust")]
        epochs = "/".join(str(r["best_epoch"]) for r in group)
        seconds = statistics.mean(r["train_seconds"] for r in group)
        print(f"{label:<18}" + "".join(f"{cell:>16}" for cell in cells) + f"{epochs:>12}{seconds:>9.0f}")
    for w in WEIGHTS:
        print(f"robust accuracy gain, {w} epoch: {points(gains[w]).strip()} points "
              f"(per seed: {', '.join(f'{100 * g:+.1f}' for g in gains[w])})")


if __name__ == "__main__":
    main()
