"""What embedding-space adversarial training costs and buys on a text classifier.

Plain fine-tuning, FGM, PGD-3 and FreeLB-3 (``robustkit-text``) train the same tiny BERT
(2 layers, hidden 64, 2 heads, fresh weights) on the same synthetic reviews
(``robustkit_text.synthetic``) through robustkit's shared loop, at one embedding radius (in
units of the mean token norm; the absolute norm is reported). For each, over several seeds (the
seed draws the fresh weights, the validation split, the shuffling, dropout and random starts;
the data stay the same): seconds per epoch relative to plain (the loop's own timing, canary
excluded), clean accuracy and robust accuracy at k = 1, 2, 3 token edits on the evaluation split
against the audit's own text attacks (``text_attacks``: HotFlip, the character attack, then
text:swap, which scores every single substitution by a forward pass, so k = 1 is exact here: the
vocabulary is ~70 words; ``k1_exact`` says so per run), and against HotFlip alone, whose
first-order ranking overstates robustness, more on the defences (adversarial training in the
embedding space flattens the loss around the clean embeddings; a substitution jumps far beyond
that). Mean +- sd over seeds. Targets (issue 18): FreeLB-3 at most 4x plain, every defence above
plain at k = 1 and 2 (on the means over seeds, against the full attack set).
The substitutions are unconstrained, so they can change the true label: one edit can tie a
review whose margin is two sentiment words, two can reverse it. ``label_changing_edits``
gives the share of evaluation reviews each budget can tie or reverse by the rule itself.

    OMP_NUM_THREADS=1 python benchmarks/text_training_cost.py [--seeds 3] [--json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from robustkit_text import synthetic
from robustkit_text.attacks import HotFlip, cascade, text_attacks
from robustkit_text.data import TextDataset
from robustkit_text.defences import (
    DEFAULT_EPS,
    FGM,
    EmbeddingPGD,
    FreeLB,
    Plain,
    TextDefence,
    TextTrainingParams,
    default_threat,
)
from robustkit_text.embedding import token_norm
from robustkit_text.model import TextClassifier, encode_data, load_folder

from robustkit.harden.config import RunConfig
from robustkit.models.base import LoadOptions
from robustkit.modules import predict_logits

BUDGETS = (1, 2, 3)


def defences(epochs: int, seed: int) -> list[TextDefence]:
    return [Plain(epochs=epochs, seed=seed), FGM(epochs=epochs, seed=seed),
            EmbeddingPGD(epochs=epochs, seed=seed, steps=3), FreeLB(epochs=epochs, seed=seed, steps=3)]


def measure(defence: TextDefence, folder: Path, text: TextDataset, eps: float) -> dict[str, Any]:
    model = load_folder(str(folder), LoadOptions()).model
    assert isinstance(model, TextClassifier)
    data = encode_data(model, text)
    result = defence.apply(model, data, threat=default_threat(eps), run=RunConfig(progress=False))
    right = predict_logits(model, data.x).argmax(1) == data.y
    worst, notes = cascade(text_attacks(), model, data.x, data.y, max(BUDGETS))
    hotflip = HotFlip().run(model, data.x, data.y, right.long() * max(BUDGETS)).broken_at
    norm = float(token_norm(model, data.x))
    return {
        "defence": defence.name, "seed": defence.params.seed,
        "seconds_per_epoch": sum(r["seconds"] for r in result.history) / len(result.history),
        "epochs_run": len(result.history), "token_norm": norm, "radius": eps * norm,
        "clean": float(right.float().mean()),
        **{f"k={k}": float((right & (worst > k)).float().mean()) for k in BUDGETS},
        **{f"hotflip k={k}": float((right & (hotflip > k)).float().mean()) for k in BUDGETS},
        "k1_exact": not any("NOT exhaustive" in note for note in notes), "attack_notes": notes,
    }


def label_changing_edits(texts: list[str]) -> dict[str, float]:
    """Share of reviews whose true label k edits can tie (margin 2k) or reverse (margin below 2k):
    one substitution moves the sentiment margin by at most 2, so a classifier that follows the rule
    exactly keeps at most the rest (and on ties, what its tie-break gives)."""
    positive, negative = set(synthetic.POSITIVE), set(synthetic.NEGATIVE)
    margins = [abs(sum((w in positive) - (w in negative) for w in t.split())) for t in texts]
    shares = {}
    for k in BUDGETS:
        shares[f"tie k={k}"] = sum(m == 2 * k for m in margins) / len(texts)
        shares[f"reverse k={k}"] = sum(m < 2 * k for m in margins) / len(texts)
    return shares


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the results as one JSON document")
    parser.add_argument("--train", type=int, default=1500, help="training reviews")
    parser.add_argument("--eval", type=int, default=300, help="evaluation reviews")
    parser.add_argument("--epochs", type=int, default=TextTrainingParams.epochs, help="default: the text defences' own")
    parser.add_argument("--seeds", type=int, default=3, help="runs of each defence, seeds 0..N-1")
    parser.add_argument("--eps", type=float, default=DEFAULT_EPS,
                        help="embedding radius (Frobenius) of the defences, in units of the mean token norm")
    args = parser.parse_args()
    keys = ("clean", *(f"k={k}" for k in BUDGETS), *(f"hotflip k={k}" for k in BUDGETS), "cost_vs_plain")
    made = synthetic.generate(args.train, args.eval)
    text = TextDataset("sentiment", made.texts, made.labels, 2, made.train_texts, made.train_labels)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            folder = synthetic.save_tiny_model(Path(tmp) / f"model-{seed}", made.train_texts, seed=seed)
            runs = [measure(defence, folder, text, args.eps) for defence in defences(args.epochs, seed)]
            for row in runs:
                row["cost_vs_plain"] = row["seconds_per_epoch"] / runs[0]["seconds_per_epoch"]
                print(f"seed {seed} {row['defence']}: " + ", ".join(f"{k} {row[k]:.3f}" for k in keys),
                      file=sys.stderr, flush=True)  # progress: a seed takes a minute or two
            rows += runs
    names = list(dict.fromkeys(r["defence"] for r in rows))
    summary = {name: {key: mean_sd([r[key] for r in rows if r["defence"] == name]) for key in keys}
               for name in names}
    above = {name: all(summary[name][k][0] > summary["plain"][k][0] for k in ("k=1", "k=2")) for name in names[1:]}
    document = {"data": f"robustkit_text.synthetic: {args.train} training, {args.eval} evaluation reviews",
                "model": "BERT, 2 layers, hidden 64, 2 heads, fresh weights (seed per run)",
                "eps": args.eps, "eps_unit": "mean word-embedding norm of the batch's real tokens",
                "epochs": args.epochs, "seeds": args.seeds, "torch_threads": torch.get_num_threads(),
                "label_changing_edits": label_changing_edits(made.texts), "rows": rows,
                "summary": {name: {key: {"mean": m, "sd": sd} for key, (m, sd) in cells.items()}
                            for name, cells in summary.items()},
                "targets": {"freelb_at_most_4x_plain": summary["freelb"]["cost_vs_plain"][0] <= 4.0,
                            "every_defence_above_plain_at_k1_k2": all(above.values()), "above_plain": above}}
    document["targets"]["k1_exact_in_every_run"] = all(r["k1_exact"] for r in rows)
    if args.json:
        print(json.dumps(document, indent=2))
        return
    norms = [r["token_norm"] for r in rows]
    print(f"eps {args.eps:g} x mean token norm ({min(norms):.3f}-{max(norms):.3f} after training); "
          f"mean +- sd over {args.seeds} seeds, accuracies in %")
    print(f"{'defence':<8}" + "".join(f"{key:>15}" for key in keys))
    for name, cells in summary.items():
        print(f"{name:<8}" + "".join(f"{m:>8.2f} +- {sd:<4.2f}" if key == "cost_vs_plain"
                                     else f"{100 * m:>7.1f} +- {100 * sd:<4.1f}" for key, (m, sd) in cells.items()))
    print(json.dumps(document["targets"]))


if __name__ == "__main__":
    main()
