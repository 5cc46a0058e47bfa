"""``robustkit demo``: the main job end to end on the built-in default, with no download.

Trains ``builtin:digits-cnn`` on ``builtin:digits`` and attacks it with FGSM and PGD over a
few epsilons. Later stages (audit report, hardening, export) extend this same function.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from robustkit.evaluate import NamedAttack, evaluate
from robustkit.host import get_host
from robustkit.loading import load_model
from robustkit.data import load_dataset
from robustkit.threat import Norm, ThreatModel
from robustkit.train import FitConfig, fit

DEMO_EPS = (0.05, 0.1, 0.2)


def run_demo(*, epochs: int = 8, seed: int = 0) -> dict[str, Any]:
    start = time.perf_counter()
    torch.manual_seed(seed)
    data = load_dataset("builtin:digits")
    loaded = load_model("builtin:digits-cnn")
    model = loaded.model
    assert isinstance(model, torch.nn.Module)
    assert data.x_train is not None and data.y_train is not None
    losses = fit(model, data.x_train, data.y_train, FitConfig(epochs=epochs, seed=seed))
    registry = get_host().attacks
    attacks = [NamedAttack(entry.qualified_name, entry.obj()) for entry in map(registry.resolve, ("fgsm", "pgd"))]
    threats = [ThreatModel(Norm.LINF, eps) for eps in DEMO_EPS]
    evaluation = evaluate(model, data.x, data.y, attacks, threats)
    rows = [
        {"attack": o.name, "eps": eps, "robust_accuracy": evaluation.robust_accuracy(o, eps),
         "seconds": round(o.seconds[eps], 3)}
        for o in evaluation.outcomes for eps in evaluation.eps
    ]
    rows += [{"attack": "worst case", "eps": eps, "robust_accuracy": evaluation.worst_case(eps), "seconds": None}
             for eps in evaluation.eps]
    return {
        "model": "builtin:digits-cnn",
        "data": data.describe(),
        "train_loss": [round(v, 4) for v in losses],
        "clean_accuracy": evaluation.clean_accuracy,
        "threat": "linf",
        "results": rows,
        "seconds": round(time.perf_counter() - start, 2),
    }


def print_demo(result: dict[str, Any]) -> None:
    from rich.table import Table

    from robustkit.console import stdout

    stdout.print(f"[bold]robustkit demo[/]: builtin:digits-cnn trained on builtin:digits "
                 f"({result['data']['n_train']} train / {result['data']['n_eval']} test images)")
    stdout.print(f"clean accuracy: {result['clean_accuracy']:.1%}")
    table = Table("attack", *[f"linf {eps:g}" for eps in DEMO_EPS], title="robust accuracy")
    by_attack: dict[str, dict[float, float]] = {}
    for row in result["results"]:
        by_attack.setdefault(row["attack"], {})[row["eps"]] = row["robust_accuracy"]
    for name, values in by_attack.items():
        table.add_row(name, *[f"{values[eps]:.1%}" for eps in DEMO_EPS])
    stdout.print(table)
    stdout.print(f"done in {result['seconds']:.1f} s")
