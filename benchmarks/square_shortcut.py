"""What the nested-search shortcut saves on Square, and what it costs in worst case.

Square (the default suite's settings: 1,000 queries) alone on builtin:digits-cnn over the first
N test digits at several linf eps, three ways:
- off: the full evaluation (``gradient_free_shortcut=False``, as ``--suite autoattack`` runs):
  one batch holds the survivors of every eps, each in its own ball;
- shortcut: the engine's nested search (``gradient_free_shortcut=True``, default and quick
  suites): every sample at the largest eps first, then the samples broken there at every smaller
  eps in one batch; a sample Square could not break at the largest eps is not attacked below;
- nested: the same, eps by eps down to the smallest (one batch per eps), to show why the engine
  merges the inner stage for an attack that takes per-sample radii.
Models:
- ``digits``: builtin:digits-cnn on the 1x8x8 digits, at two eps lists: one where the model is
  weak at the largest eps (Square breaks nearly every sample there, so the shortcut has little to
  skip) and one where many samples are robust. A query of this small net costs about the same
  for 10 samples as for 500, so fewer rows save little time;
- ``cifar-shape``: cnn4_bn (the benchmark network, 3x32x32) trained for 3 epochs on the digits
  upsampled to 3x32x32, at 2/255, 4/255, 8/255: most samples robust at every eps, as in the
  issue's audit, and a query's cost grows with the samples it carries.

    python benchmarks/square_shortcut.py [--model digits|cifar-shape] [--n 200] [--queries 1000]
        [--repeats 2] [--threads N] [--json]
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any
from unittest import mock

import torch

from robustkit.attacks.square import Square
from robustkit.audit import engine
from robustkit.audit.engine import NamedAttack, evaluate
from robustkit.data import load_digits
from robustkit.testing import trained_digits_model
from robustkit.threat import Norm, ThreatModel

EPS_LISTS = {"digits": ((0.1, 0.2, 0.3), (0.03, 0.06, 0.1)), "cifar-shape": ((2 / 255, 4 / 255, 8 / 255),)}
WAYS = ("off", "shortcut", "nested")


def run(way: str, model: Any, x: Any, y: Any, eps: tuple[float, ...], queries: int) -> dict[str, Any]:
    suite = [NamedAttack("robustkit:square", Square(queries=queries))]
    threats = [ThreatModel(Norm.LINF, e) for e in eps]
    nested = engine._nested_search

    def eps_by_eps(*args: Any, **kwargs: Any) -> None:
        nested(*args, **kwargs, merge_inner=False)

    with mock.patch.object(engine, "_nested_search", eps_by_eps if way == "nested" else nested):
        start, cpu = time.perf_counter(), time.process_time()
        evaluation = evaluate(model, x, y, suite, threats, gradient_free_shortcut=way != "off")
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    (outcome,) = evaluation.outcomes
    return {"seconds": seconds, "cpu_seconds": cpu, "worst_case": {e: evaluation.worst_case(e) for e in eps},
            "seconds_by_eps": dict(outcome.seconds), "attacked": dict(outcome.attacked),
            "skipped": dict(outcome.skipped), "notes": list(outcome.notes)}


def cifar_shape() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """cnn4_bn trained on the digits upsampled to 3x32x32, and the upsampled test digits."""
    import torch.nn.functional as F

    from robustkit.models.zoo import cnn4_bn
    from robustkit.train import FitConfig, fit

    def upsampled(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=32, mode="bilinear", align_corners=False).clamp(0, 1).repeat(1, 3, 1, 1)

    data = load_digits()
    assert data.x_train is not None and data.y_train is not None
    torch.manual_seed(0)
    model = cnn4_bn()
    fit(model, upsampled(data.x_train), data.y_train, FitConfig(epochs=3))
    return model.eval(), upsampled(data.x), data.y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(EPS_LISTS), default="digits")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each way, interleaved; the fastest counts")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "digits":
        model, data = trained_digits_model("cnn"), load_digits()
        x, y = data.x[: args.n], data.y[: args.n]
    else:
        model, x, y = cifar_shape()
        x, y = x[: args.n], y[: args.n]
    results: dict[str, dict[str, Any]] = {}
    for eps in EPS_LISTS[args.model]:
        key = ",".join(f"{e:.4g}" for e in eps)
        runs: dict[str, list[dict[str, Any]]] = {way: [] for way in WAYS}
        for _ in range(args.repeats):
            for way in WAYS:
                runs[way].append(run(way, model, x, y, eps, args.queries))
        results[key] = {way: {**r[0], "seconds": min(o["seconds"] for o in r), "all_seconds": [o["seconds"] for o in r],
                              "cpu_seconds": min(o["cpu_seconds"] for o in r)} for way, r in runs.items()}
    if args.json:
        print(json.dumps(results, indent=2, default=str))
        return
    for key, ways in results.items():
        print(f"eps {key} (n={args.n}, {args.queries} queries):")
        for way, r in ways.items():
            worst = ", ".join(f"{100 * a:.1f}%" for a in r["worst_case"].values())
            rows = sum(r["attacked"].values())
            print(f"  {way:9s} {r['seconds']:6.1f} s, {r['cpu_seconds']:6.1f} s CPU "
                  f"(runs: {', '.join(f'{s:.1f}' for s in r['all_seconds'])}); "
                  f"worst case {worst}; {rows} (sample, eps) rows attacked; skipped {r['skipped'] or 'none'}")
        for note in ways["shortcut"]["notes"]:
            print(f"    note: {note}")


if __name__ == "__main__":
    main()
