"""How much the audit engine saves over the naive evaluation, in one run.

Suite: FGSM, PGD-20 and Square (1,000 queries) at 4 linf eps values on builtin:digits-cnn
trained on builtin:digits (360 test digits).
- engine: robustkit's evaluation engine in cascade mode (clean mistakes skipped, eps nested,
  each attack on the survivors of the earlier ones, early stop per sample);
- naive: every attack at every eps on every sample, torchattacks called directly, worst case
  taken per sample afterwards.
Target: at least 3x less wall time with a worst-case robust accuracy equal or lower.

    python benchmarks/audit_cascade.py [--json]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from robustkit.attacks.native import FGSM, PGD
from robustkit.attacks.square import Square
from robustkit.data import load_digits
from robustkit.evaluate import NamedAttack, evaluate
from robustkit.testing import trained_digits_model
from robustkit.threat import Norm, ThreatModel

EPS = (0.025, 0.05, 0.1, 0.2)
STEPS, QUERIES = 20, 1000


def naive(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[float, float]:
    import torchattacks

    worst = {}
    for eps in EPS:
        attacks = [torchattacks.FGSM(model, eps=eps),
                   torchattacks.PGD(model, eps=eps, alpha=2.5 * eps / STEPS, steps=STEPS, random_start=True),
                   torchattacks.Square(model, eps=eps, n_queries=QUERIES, p_init=0.3, seed=0)]
        standing = torch.ones(len(x), dtype=torch.bool)
        for attack in attacks:
            x_adv = attack(x, y)
            with torch.no_grad():
                standing &= model(x_adv).argmax(1) == y
        worst[eps] = float(standing.float().mean())
    return worst


def engine(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[float, float]:
    suite = [NamedAttack("robustkit:fgsm", FGSM()), NamedAttack("robustkit:pgd", PGD(steps=STEPS)),
             NamedAttack("robustkit:square", Square(queries=QUERIES))]
    evaluation = evaluate(model, x, y, suite, [ThreatModel(Norm.LINF, e) for e in EPS], cascade=True)
    return {eps: evaluation.worst_case(eps) for eps in EPS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    model = trained_digits_model("cnn", epochs=8)
    data = load_digits()
    timings, accuracies = {}, {}
    for name, run in (("engine", engine), ("naive", naive)):
        torch.manual_seed(0)
        start = time.perf_counter()
        accuracies[name] = run(model, data.x, data.y)
        timings[name] = time.perf_counter() - start
    result = {
        "eps": list(EPS), "n": len(data.x), "seconds": timings,
        "speedup": timings["naive"] / timings["engine"],
        "worst_case": accuracies,
        "engine_not_weaker": all(accuracies["engine"][e] <= accuracies["naive"][e] for e in EPS),
        "torch_threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"engine {timings['engine']:.1f} s, naive {timings['naive']:.1f} s: {result['speedup']:.1f}x less time")
    for eps in EPS:
        print(f"  eps {eps:g}: worst case engine {accuracies['engine'][eps]:.1%}, naive {accuracies['naive'][eps]:.1%}")


if __name__ == "__main__":
    main()
