"""What robustness costs: robustkit's training defences against plain training, in one run.

On builtin:digits (linf eps 0.2, 15 epochs, builtin:digits-cnn, Adam, batch 64), trains plain
training, fgsm-rs, atta, pgd-at (7 steps), free and trades through the same engine and reports, for
each, the training time per pass over the data relative to plain training (the per-epoch
canary is timed apart) and the PGD-20 robust accuracy of the weights it returns; then bf16
against fp32 time. With a GPU (or --resnet-images N), it also times one epoch of each defence
on synthetic 3x32x32 data with a CIFAR ResNet-18, fp32 against bf16 + channels-last, in
images per second.

    python benchmarks/training_cost.py            # a table
    python benchmarks/training_cost.py --json     # one JSON document
    python benchmarks/training_cost.py --seeds 3  # accuracies averaged over 3 seeds

Targets (issue 5): fgsm-rs <= 2.2x plain per epoch and >= 50% robust; pgd-at <= (K+1)x and
>= 57%; a fast defence within 3 points of pgd-at's robust accuracy at under 40% of its time.
Timings on a shared machine are noisy: run it on an idle one before trusting small ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkit.attacks.native import PGD
from robustkit.audit.engine import NamedAttack, evaluate
from robustkit.data import Dataset, load_digits
from robustkit.harden.config import RunConfig
from robustkit.harden.defences import ATTA, FGSMRS, PGDAT, TRADES, Free, Standard, TrainingDefence
from robustkit.models.zoo import digits_cnn
from robustkit.threat import ThreatModel

DEFENCES = ("plain", "fgsm-rs", "atta", "pgd-at", "free", "trades")
CPU_CAPABILITY = torch.backends.cpu.get_cpu_capability()
PGD_STEPS = 7


def make_defence(name: str, epochs: int, batch_size: int, **extra: Any) -> TrainingDefence:
    """Every defence with its defaults, the same epochs and batch size, and no early stopping
    (each trains the full budget; the best epoch by the canary is still the one returned)."""
    common: dict[str, Any] = {"epochs": epochs, "batch_size": batch_size, "patience": 0, **extra}
    if name == "pgd-at":
        return PGDAT(steps=PGD_STEPS, **common)
    classes: dict[str, type[TrainingDefence]] = {
        "plain": Standard,
        "fgsm-rs": FGSMRS,
        "atta": ATTA,
        "free": Free,
        "trades": TRADES,
    }
    return classes[name](**common)


def train(
    defence: TrainingDefence, model: nn.Module, data: Dataset, threat: ThreatModel, run: RunConfig
) -> dict[str, Any]:
    """Train; training seconds per pass over the data and canary seconds per epoch.

    Medians over the epochs (an epoch of free training is ``replays`` passes), so that a burst
    of load on a shared machine moves the figure less than a mean would.
    """
    started = time.perf_counter()
    result = defence.apply(model, data, threat=threat, run=run)
    wall = time.perf_counter() - started
    history = result.history
    return {
        "model": result.model,
        "passes": len(history) * defence.replays,
        "train_s_per_pass": statistics.median(r["seconds"] for r in history) / defence.replays,
        "canary_s_per_epoch": statistics.median(r["canary_seconds"] for r in history),
        "wall_s": wall,
        "best_epoch": [r["epoch"] for r in history if r["best"]][-1],
        "stop": history[-1]["stop"],
        "history": history,
    }


def digits_table(args: argparse.Namespace) -> dict[str, Any]:
    data = load_digits()
    threat = ThreatModel("linf", args.eps)
    judge = [NamedAttack("robustkit:pgd (20 steps)", PGD(steps=20))]
    rows: dict[str, dict[str, Any]] = {}
    for name in args.defences:
        runs = []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            model = digits_cnn().to(args.device)
            measured = train(
                make_defence(name, args.epochs, args.batch_size, seed=seed),
                model,
                data,
                threat,
                RunConfig(device=args.device, progress=False),
            )
            evaluation = evaluate(measured.pop("model"), data.x, data.y, judge, [threat], device=args.device)
            measured.pop("history")
            runs.append(
                {
                    **measured,
                    "clean_accuracy": evaluation.clean_accuracy,
                    "pgd20_robust_accuracy": evaluation.robust_accuracy(evaluation.outcomes[0], args.eps),
                }
            )
        # Seed 0's run in full; accuracies as the mean over seeds, each seed's kept alongside.
        rows[name] = {
            **runs[0],
            "train_s_per_pass": statistics.median(r["train_s_per_pass"] for r in runs),
            "clean_accuracy": statistics.mean(r["clean_accuracy"] for r in runs),
            "pgd20_robust_accuracy": statistics.mean(r["pgd20_robust_accuracy"] for r in runs),
            "pgd20_robust_by_seed": [round(r["pgd20_robust_accuracy"], 4) for r in runs],
        }
        logging.info("%s: %s", name, rows[name])
    base = rows["plain"]["train_s_per_pass"] if "plain" in rows else float("nan")
    for row in rows.values():
        row["relative_time"] = row["train_s_per_pass"] / base
    precision = {}
    for name in args.precision_defences:
        seconds = {}
        for dtype in ("fp32", "bf16"):
            torch.manual_seed(0)
            measured = train(
                make_defence(name, args.precision_epochs, args.batch_size),
                digits_cnn(),
                data,
                threat,
                RunConfig(device=args.device, precision=dtype, progress=False),
            )
            seconds[dtype] = measured["train_s_per_pass"]
        precision[name] = {**seconds, "bf16_over_fp32": seconds["bf16"] / seconds["fp32"]}
    return {"rows": rows, "precision": precision, "targets": targets(rows)}


def targets(rows: dict[str, dict[str, Any]]) -> dict[str, bool]:
    needed = {"plain", "fgsm-rs", "pgd-at"}
    if not needed <= set(rows):
        return {}
    fgsm, pgd = rows["fgsm-rs"], rows["pgd-at"]
    fast = [rows[n] for n in ("fgsm-rs", "atta", "free") if n in rows]
    return {
        "fgsm-rs <= 2.2x plain per epoch": fgsm["relative_time"] <= 2.2,
        "fgsm-rs >= 50% robust": fgsm["pgd20_robust_accuracy"] >= 0.50,
        f"pgd-at <= {PGD_STEPS + 1}x plain per epoch": pgd["relative_time"] <= PGD_STEPS + 1,
        "pgd-at >= 57% robust": pgd["pgd20_robust_accuracy"] >= 0.57,
        "a fast defence within 3 points of pgd-at at < 40% of its time": any(
            pgd["pgd20_robust_accuracy"] - r["pgd20_robust_accuracy"] <= 0.03
            and r["relative_time"] < 0.4 * pgd["relative_time"]
            for r in fast
        ),
    }


# -- ResNet-18 on synthetic CIFAR-shaped data ------------------------------------------------
class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.skip: nn.Module = nn.Sequential()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + self.skip(x))


def resnet18(classes: int = 10) -> nn.Module:
    """The CIFAR ResNet-18 of /work/shared/bench/reference_training.py (3x3 stem, no max-pool)."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_Block(cin, cout, stride), _Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes)]
    return nn.Sequential(*layers)


#: robustkit's defences and the modes of ../shared/bench/reference_training.py they match
REFERENCE_MODES = {"plain": "plain", "fgsm-rs": "fgsm_rs", "pgd-at": f"pgd{PGD_STEPS}"}
VARIANTS = (("fp32", "fp32", False), ("bf16", "bf16", False), ("bf16+channels_last", "bf16", True))


def load_reference(path: Path) -> Any | None:
    """The plain-PyTorch reference loop, imported from its file (None, said, when absent)."""
    if not path.is_file():
        logging.warning("no reference loop at %s: robustkit's figures are shown without ratios", path)
        return None
    spec = importlib.util.spec_from_file_location("reference_training", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_images(n: int, size: int = 32) -> Dataset:
    """Seeded random 3 x size x size images: ``n`` to train on and 64 to evaluate. Noise, as
    the reference loop uses: for timing only, there is nothing to learn."""
    generator = torch.Generator().manual_seed(0)
    return Dataset(
        "synthetic",
        torch.rand(64, 3, size, size, generator=generator),
        torch.randint(0, 10, (64,), generator=generator),
        10,
        torch.rand(n, 3, size, size, generator=generator),
        torch.randint(0, 10, (n,), generator=generator),
    )


def resnet_row(
    name: str,
    variant: tuple[str, str, bool],
    data: Dataset,
    batch: int,
    device: str,
    reference: Any | None = None,
    compile: bool = False,
) -> dict[str, Any]:
    """Images/s of robustkit's second of two epochs of ``name`` (the first pays kernel selection
    and any compilation) beside the reference loop's epoch on the same images, batch, device and
    precision. ``variant`` is one of ``VARIANTS``; the reference loop has no compiled variant."""
    assert data.x_train is not None and data.y_train is not None
    label, precision, channels_last = variant
    torch.manual_seed(0)
    defence = make_defence(
        name,
        2,
        batch,
        val_fraction=0.02,
        canary_steps=1,
        canary_size=64,
        augment="none",  # the reference loop does not augment
        **({"replays": 1} if name == "free" else {}),
    )
    run = RunConfig(device=device, precision=precision, channels_last=channels_last, compile=compile, progress=False)
    history = train(defence, resnet18(), data, threat=ThreatModel("linf", 8 / 255), run=run)["history"]
    trained = len(data.y_train) - max(1, round(0.02 * len(data.y_train)))  # as validation_split holds out
    row: dict[str, Any] = {
        "defence": name,
        "variant": label + ("+compile" if compile else ""),
        "images_per_s": round(trained * defence.replays / history[-1]["seconds"], 1),
    }
    if reference is not None and name in REFERENCE_MODES:
        on_device = torch.device(device)
        x_ref, y_ref = data.x_train.to(on_device), data.y_train.to(on_device)
        ips = reference.epoch(REFERENCE_MODES[name], label, x_ref, y_ref, batch, on_device.type)
        row["reference_images_per_s"] = round(ips, 1)
        row["ratio"] = round(row["images_per_s"] / ips, 3)
        # bf16 targets are judged only where the hardware has bf16 (AVX2 runs reference kernels)
        row["judged"] = precision == "fp32" or on_device.type == "cuda" or "AVX512" in CPU_CAPABILITY
        row["meets_0.95"] = row["ratio"] >= 0.95
    return row


def resnet_table(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``resnet_row`` for each defence and precision variant asked for, in one run."""
    data = synthetic_images(args.resnet_images)
    reference = load_reference(args.reference)
    rows = []
    for name in args.defences:
        for variant in (v for v in VARIANTS if v[0] in args.resnet_variants):
            rows.append(resnet_row(name, variant, data, args.resnet_batch, args.device, reference))
            logging.info("%s", rows[-1])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--eps", type=float, default=0.2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--seeds", type=int, default=1, help="train each defence from this many seeds; accuracies are their mean"
    )
    parser.add_argument("--defences", default=",".join(DEFENCES), type=lambda s: s.split(","))
    parser.add_argument(
        "--precision-defences",
        default="plain,fgsm-rs",
        type=lambda s: [x for x in s.split(",") if x],
        help="defences timed in bf16 against fp32 (empty to skip)",
    )
    parser.add_argument("--precision-epochs", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--resnet-images",
        type=int,
        default=50_000 if torch.cuda.is_available() else 0,
        help="synthetic 3x32x32 images per ResNet-18 epoch (0 skips; default 50,000 on a GPU)",
    )
    parser.add_argument("--resnet-batch", type=int, default=512)
    parser.add_argument(
        "--resnet-variants",
        default=",".join(v[0] for v in VARIANTS) if torch.cuda.is_available() or "AVX512" in CPU_CAPABILITY else "fp32",
        type=lambda s: s.split(","),
        help="precision variants of the ResNet-18 rows (default: all where bf16 is fast, else fp32 only)",
    )
    parser.add_argument(
        "--reference",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "shared" / "bench" / "reference_training.py",
        help="the plain-PyTorch loop timed beside robustkit on the ResNet-18 (default: ../shared/bench/)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO if not args.json else logging.WARNING,
        stream=sys.stderr,
        format="%(message)s",
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    report: dict[str, Any] = {
        "device": device_name,
        "cpu_capability": CPU_CAPABILITY,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "epochs": args.epochs,
        "eps": args.eps,
        "batch_size": args.batch_size,
        "seeds": args.seeds,
        **digits_table(args),
    }
    if args.resnet_images:
        report["resnet18"] = resnet_table(args)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return
    print_report(report)


def print_report(report: dict[str, Any]) -> None:
    print(
        f"builtin:digits, linf eps {report['eps']}, {report['epochs']} epochs, "
        f"batch {report['batch_size']}, {report['device']} ({report['threads']} threads), "
        f"accuracies: mean of {report['seeds']} seed(s)"
    )
    header = ("defence", "s/pass", "x plain", "canary s", "clean", "PGD-20", "best ep")
    print("{:10s} {:>8s} {:>8s} {:>9s} {:>7s} {:>7s} {:>7s}  stop".format(*header))
    for name, r in report["rows"].items():
        cells = (
            name,
            r["train_s_per_pass"],
            r["relative_time"],
            r["canary_s_per_epoch"],
            r["clean_accuracy"],
            r["pgd20_robust_accuracy"],
            r["best_epoch"],
            r["stop"] or "",
        )
        print("{:10s} {:8.2f} {:8.2f} {:9.2f} {:7.1%} {:7.1%} {:7d}  {}".format(*cells))
    for name, p in report["precision"].items():
        print(
            f"{name}: bf16 {p['bf16']:.2f} s/pass, fp32 {p['fp32']:.2f} s/pass (bf16/fp32 = {p['bf16_over_fp32']:.2f})"
        )
    for target, met in report["targets"].items():
        print(f"[{'met' if met else 'MISSED'}] {target}")
    for row in report.get("resnet18", []):
        versus = (f"  reference {row['reference_images_per_s']:8.1f} img/s  ratio {row['ratio']:.2f}"
                  + ("" if row["judged"] else " (bf16 not judged: no bf16 instructions here)")
                  if "ratio" in row else "")
        print(f"resnet18 {row['defence']:8s} {row['variant']:20s} {row['images_per_s']:10.1f} img/s{versus}")


if __name__ == "__main__":
    main()
