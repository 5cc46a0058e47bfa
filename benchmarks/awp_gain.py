"""What adversarial weight perturbation (``--awp``) buys on the built-in digits: the same defence
with and without it, over several seeds, judged by the worst case of APGD-CE and APGD-DLR
(100 steps each) on the held-out evaluation split.

    python benchmarks/awp_gain.py                       # fgsm-rs, gamma 5e-3, 3 seeds, 15 epochs
    python benchmarks/awp_gain.py --defence pgd-at --json

A benchmark, not a test: it prints the numbers (mean +- sd over seeds, and the gain) and
asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch

from robustkit.attacks.apgd import APGD
from robustkit.data import Dataset, load_digits
from robustkit.harden.config import RunConfig
from robustkit.harden.defences import FGSMRS, PGDAT, TrainingDefence
from robustkit.models.zoo import digits_cnn
from robustkit.threat import ThreatModel

DEFENCES: dict[str, type[TrainingDefence]] = {"pgd-at": PGDAT, "fgsm-rs": FGSMRS}


def worst_case_accuracy(model: torch.nn.Module, data: Dataset, threat: ThreatModel) -> tuple[float, float]:
    """(clean, robust) accuracy: a sample is robust if it is right and neither APGD breaks it."""
    model.eval()
    with torch.no_grad():
        right = model(data.x).argmax(1) == data.y
    for loss in ("ce", "dlr"):
        right &= ~APGD(loss=loss, seed=0)(model, data.x, data.y, threat=threat).success
    with torch.no_grad():
        clean = float((model(data.x).argmax(1) == data.y).float().mean())
    return clean, float(right.float().mean())


def run(defence: str, gamma: float, seed: int, args: argparse.Namespace, data: Dataset) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = digits_cnn()
    settings = {"epochs": args.epochs, "seed": seed, "awp_gamma": gamma}
    started = time.perf_counter()
    threat = ThreatModel("linf", args.eps)
    result = DEFENCES[defence](**settings).apply(model, data, threat=threat, run=RunConfig(progress=False))
    seconds = time.perf_counter() - started
    clean, robust = worst_case_accuracy(result.model, data, threat)
    print(f"{defence} awp_gamma={gamma:g} seed={seed}: clean {clean:.1%} robust {robust:.1%} ({seconds:.0f} s)",
          file=sys.stderr, flush=True)  # progress: a run takes minutes on a small CPU
    return {"defence": defence, "awp_gamma": gamma, "seed": seed, "clean": clean, "robust": robust,
            "train_seconds": round(seconds, 1)}


def summarise(rows: list[dict[str, Any]], key: str) -> tuple[float, float]:
    values = [r[key] for r in rows]
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--defence", choices=sorted(DEFENCES), default="fgsm-rs")
    parser.add_argument("--gamma", type=float, default=5e-3, help="AWP gamma (Wu et al. use 5e-3)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--eps", type=float, default=0.2, help="linf radius on the [0, 1] digits")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    data = load_digits()
    rows = [run(args.defence, gamma, seed, args, data) for gamma in (0.0, args.gamma) for seed in range(args.seeds)]
    without = [r for r in rows if r["awp_gamma"] == 0.0]
    with_awp = [r for r in rows if r["awp_gamma"] != 0.0]
    gain = [b["robust"] - a["robust"] for a, b in zip(without, with_awp)]
    report = {
        "defence": args.defence, "eps": args.eps, "epochs": args.epochs, "gamma": args.gamma,
        "judge": "worst case of APGD-CE and APGD-DLR (100 steps) on the evaluation split (360 digits)",
        "runs": rows,
        "gain_per_seed": gain,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{args.defence} on builtin:digits, linf eps {args.eps:g}, {args.epochs} epochs, "
          f"{args.seeds} seeds; {report['judge']}")
    print(f"{'':<22}{'clean':>16}{'robust':>16}")
    for label, group in (("without AWP", without), (f"AWP gamma {args.gamma:g}", with_awp)):
        (cm, cs), (rm, rs) = summarise(group, "clean"), summarise(group, "robust")
        print(f"{label:<22}{100 * cm:>9.1f} +- {100 * cs:3.1f}{100 * rm:>9.1f} +- {100 * rs:3.1f}")
    mean_gain = statistics.mean(gain)
    sd_gain = statistics.stdev(gain) if len(gain) > 1 else 0.0
    print(f"robust accuracy gain: {100 * mean_gain:+.1f} +- {100 * sd_gain:.1f} points "
          f"(per seed: {', '.join(f'{100 * g:+.1f}' for g in gain)})")


if __name__ == "__main__":
    main()
