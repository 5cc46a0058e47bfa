"""What embedding-space adversarial training costs and buys on a text classifier.

Plain fine-tuning, FGM, PGD-3 and FreeLB-3 (``robustkit-text``) train the same tiny BERT
(2 layers, hidden 64, 2 heads, fresh weights from one seed) on the same synthetic reviews
(``robustkit_text.synthetic``) through robustkit's shared loop, at one embedding radius. For
each: seconds per epoch relative to plain (the loop's own timing, canary excluded), clean
accuracy and robust accuracy against HotFlip at k = 1, 2, 3 token edits on the evaluation
split, with Wilson intervals. Targets (issue 18): FreeLB-3 at most 4x plain, every defence
above plain at k = 1 and 2.

    OMP_NUM_THREADS=1 python benchmarks/text_training_cost.py --json
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from robustkit_text import synthetic
from robustkit_text.attacks import HotFlip
from robustkit_text.data import TextDataset
from robustkit_text.defences import FGM, EmbeddingPGD, FreeLB, Plain, default_threat
from robustkit_text.model import TextClassifier, encode_data, load_folder

from robustkit.audit.report import accuracy_ci
from robustkit.harden.config import RunConfig
from robustkit.models.base import LoadOptions
from robustkit.modules import predict_logits

BUDGETS = (1, 2, 3)


def measure(defence: Any, folder: Path, text: TextDataset, eps: float) -> dict[str, Any]:
    model = load_folder(str(folder), LoadOptions()).model
    assert isinstance(model, TextClassifier)
    data = encode_data(model, text)
    result = defence.apply(model, data, threat=default_threat(eps), run=RunConfig(progress=False))
    right = predict_logits(model, data.x).argmax(1) == data.y
    broken_at = HotFlip().run(model, data.x, data.y, right.long() * max(BUDGETS)).broken_at
    n = len(data.y)
    robust = {k: float((right & (broken_at > k)).float().mean()) for k in BUDGETS}
    return {
        "defence": defence.name,
        "params": {k: v for k, v in vars(defence.params).items() if k in ("steps", "adv_lr", "init_mag", "epochs",
                                                                           "lr")},
        "seconds_per_epoch": sum(r["seconds"] for r in result.history) / len(result.history),
        "clean_accuracy": float(right.float().mean()),
        "robust_accuracy": {f"k={k}": v for k, v in robust.items()},
        "robust_ci95": {f"k={k}": list(accuracy_ci(v, n)) for k, v in robust.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the results as one JSON document")
    parser.add_argument("--train", type=int, default=1500, help="training reviews")
    parser.add_argument("--eval", type=int, default=300, help="evaluation reviews")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--eps", type=float, default=0.03, help="embedding radius (Frobenius) of the defences")
    args = parser.parse_args()
    made = synthetic.generate(args.train, args.eval)
    text = TextDataset("sentiment", made.texts, made.labels, 2, made.train_texts, made.train_labels)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = synthetic.save_tiny_model(Path(tmp) / "model", made.train_texts)
        for defence in (Plain(epochs=args.epochs), FGM(epochs=args.epochs), EmbeddingPGD(epochs=args.epochs, steps=3),
                        FreeLB(epochs=args.epochs, steps=3)):
            rows.append(measure(defence, folder, text, args.eps))
    plain = rows[0]
    for row in rows:
        row["cost_vs_plain"] = round(row["seconds_per_epoch"] / plain["seconds_per_epoch"], 2)
        row["above_plain_at_k1_k2"] = all(row["robust_accuracy"][k] > plain["robust_accuracy"][k]
                                          for k in ("k=1", "k=2")) if row is not plain else None
    document = {"data": f"robustkit_text.synthetic: {args.train} training, {args.eval} evaluation reviews",
                "model": "BERT, 2 layers, hidden 64, 2 heads, fresh weights (seed 0)", "eps": args.eps,
                "epochs": args.epochs, "torch_threads": torch.get_num_threads(), "rows": rows,
                "targets": {"freelb_at_most_4x_plain": rows[3]["cost_vs_plain"] <= 4.0,
                            "every_defence_above_plain_at_k1_k2": all(r["above_plain_at_k1_k2"] for r in rows[1:])}}
    if args.json:
        print(json.dumps(document, indent=2))
        return
    print(f"{'defence':<8} {'cost':>6} {'clean':>7} " + " ".join(f"{'k=' + str(k):>7}" for k in BUDGETS))
    for row in rows:
        print(f"{row['defence']:<8} {row['cost_vs_plain']:>5.2f}x {100 * row['clean_accuracy']:>6.1f}% "
              + " ".join(f"{100 * row['robust_accuracy'][f'k={k}']:>6.1f}%" for k in BUDGETS))
    print(json.dumps(document["targets"]))


if __name__ == "__main__":
    main()
