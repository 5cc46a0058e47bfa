"""What only a GPU can show, in one call of at most 10 minutes on a lent GPU (issue 16 item 6).

Parts, most important first; each is started only if its estimate (from the epochs already
timed) fits what is left of ``--budget-s``, else it is skipped and the JSON says why:
  1. fgsm-rs in bf16+channels-last: robustkit's epoch of the CIFAR-shape ResNet-18 (synthetic
     images, batch 512) beside ../shared/bench/reference_training.py's, in images/s
  2. plain and pgd-at (K=7) in bf16+channels-last, beside the reference
  3. 15 epochs of fast AT (the fast-at recipe, fgsm-rs, bf16+channels-last, no compile) on
     learnable synthetic images (a smooth pattern per class plus noise), held on the device;
     wall seconds include the per-epoch canary (PGD-5 on 512 held-out images)
  4. an audit (robustkit.run_audit, default suite, linf 8/255) of that model on held-out images
  5. robustkit's native attacks on the device against the CPU (as strong, deterministic), and
     ``pytest -m cuda`` (fp16 AMP, DDP over NCCL on the one GPU, the pinned loader)
  6. the other rows: fp32 and bf16, atta, and bf16+channels-last with torch.compile
Targets on one H100/H200 (judged nowhere else, and only at the CIFAR shape, batch 512):
fgsm-rs >= 0.95x the reference's images/s; pgd-at time <= 1.05 x (K+1) x plain; 15 epochs of
fast AT on 50,000 images <= 60 s. Exit code 1 if a judged target or a check fails, or a part errs.

    python benchmarks/gpu_check.py --json                 # on the GPU: one JSON document
    python benchmarks/gpu_check.py --device cpu --images 8 --batch 8 --image-size 8 --audit-images 8 \\
        --fast-epochs 1 --no-compile --no-extra-rows --budget-s 1e6 --json   # a CPU smoke run
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import training_cost  # benchmarks/ is on sys.path when run as a script
from safetensors.torch import save_file
from torch import Tensor, nn
from training_cost import (
    CPU_CAPABILITY,
    PGD_STEPS,
    REFERENCE_MODES,
    VARIANTS,
    load_reference,
    make_defence,
    resnet18,
    resnet_row,
    synthetic_images,
    train,
)

from robustkit import AuditConfig, LoadOptions, run_audit
from robustkit.attacks.apgd import APGD, APGDT
from robustkit.attacks.fmn import FMN
from robustkit.data import Dataset, load_digits
from robustkit.harden.config import RunConfig
from robustkit.harden.recipes import get_recipe
from robustkit.testing import trained_digits_model
from robustkit.threat import Norm, ThreatModel

EPS = 8 / 255
HEADLINE = "bf16+channels_last"
#: forward-backward passes per image of an epoch of each defence
UNITS = {"plain": 1, "fgsm-rs": 2, "atta": 2, "pgd-at": PGD_STEPS + 1}
#: a variant not yet timed is estimated at this many times the slowest one timed
UNKNOWN_FACTOR = 3.0
#: passes per image of a default-suite audit with its checks (an upper bound: the cascade
#: attacks only what the earlier attacks left standing)
AUDIT_PASSES = 400
#: first guesses where nothing timed tells: inductor's compilation of a row, the attack
#: checks, and pytest -m cuda (collection of the whole suite and three small trainings)
COMPILE_GUESS_S, ATTACK_CHECKS_GUESS_S, CUDA_TESTS_GUESS_S = 120.0, 30.0, 120.0
CANARY_SIZE = 512


class Plan:
    """Runs the parts in order of importance within the time budget, recording for each what it
    was estimated at, what it took, or why it did not run (skipped, or failed with an error)."""

    def __init__(self, budget_s: float) -> None:
        self.started, self.budget_s = time.perf_counter(), budget_s
        self.parts: list[dict[str, Any]] = []
        self.unit_s: dict[str, float] = {}  #: seconds per pass per image, by precision variant
        self.compile_s: float | None = None  #: measured compilation overhead of a row

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def unit(self, variant: str) -> float | None:
        """Seconds per pass per image of ``variant``: timed, else guessed from the slowest timed."""
        if variant in self.unit_s:
            return self.unit_s[variant]
        return max(self.unit_s.values()) * UNKNOWN_FACTOR if self.unit_s else None

    def run(self, part: str, estimate: float | None, fn: Callable[[], Any], why_not: str | None = None) -> Any:
        record: dict[str, Any] = {"part": part, "estimate_s": None if estimate is None else round(estimate, 1)}
        self.parts.append(record)
        left = self.left()
        if why_not is None and estimate is not None and estimate > left:
            why_not = f"estimated {estimate:.0f} s, {max(left, 0):.0f} s left of the {self.budget_s:.0f} s budget"
        if why_not is not None:
            record.update(status="skipped", why=why_not)
            logging.warning("skipped %s: %s", part, why_not)
            return None
        started = time.perf_counter()
        try:
            result = fn()
        except Exception as err:  # one broken part must not cost the others' figures
            traceback.print_exc(file=sys.stderr)
            record.update(status="error", why=f"{type(err).__name__}: {err}".splitlines()[0])
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None
        record.update(status="ran", seconds=round(time.perf_counter() - started, 1))
        logging.warning("%s: %.1f s", part, record["seconds"])
        return result


# -- ResNet-18 rows ---------------------------------------------------------------------------
def row_passes(name: str, reference: Any | None) -> int:
    """Epochs a row runs: robustkit's two, and the reference's one where it has the mode."""
    return 2 + (reference is not None and name in REFERENCE_MODES)


def timed_row(plan: Plan, args: argparse.Namespace, data: Dataset, reference: Any | None, name: str,
              variant: tuple[str, str, bool], compile: bool = False, why_not: str | None = None
              ) -> dict[str, Any] | None:
    """``resnet_row`` as a part of the plan; an uncompiled row teaches the plan its variant's cost."""
    label = variant[0] + ("+compile" if compile else "")
    passes = UNITS[name] * row_passes(name, reference) * args.images
    unit = plan.unit(variant[0])
    estimate = None if unit is None else passes * unit
    if compile and estimate is not None:
        estimate += plan.compile_s if plan.compile_s is not None else COMPILE_GUESS_S
    if compile and not args.compile:
        why_not = why_not or "--no-compile"
    started = time.perf_counter()
    row = plan.run(f"row {name} {label}", estimate,
                   lambda: resnet_row(name, variant, data, args.batch, args.device, reference, compile), why_not)
    if row is None:
        return None
    seconds = time.perf_counter() - started
    row["seconds"] = round(seconds, 1)
    if compile:
        row["reference_variant"] = variant[0]  # the reference loop is never compiled
        if unit is not None:
            plan.compile_s = max(seconds - passes * unit, 0.0)
    else:
        plan.unit_s[variant[0]] = seconds / passes
    return row


def variant(label: str) -> tuple[str, str, bool]:
    return next(v for v in VARIANTS if v[0] == label)


# -- fast AT and the audit ----------------------------------------------------------------------
def learnable_images(n: int, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded images a network can learn (an untrained model sits at chance and the audit then
    skips its attacks): one smooth pattern per class, shared by every split, plus noise."""
    patterns = F.interpolate(torch.rand(10, 3, 4, 4, generator=torch.Generator().manual_seed(0)), size=size,
                             mode="bilinear", align_corners=False)
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=generator)
    x = (0.25 + 0.5 * patterns[y] + 0.1 * torch.randn(n, 3, size, size, generator=generator)).clamp(0, 1)
    return x, y


def fast_at(args: argparse.Namespace, data: Dataset) -> dict[str, Any]:
    """The fast-at recipe's settings (SGD 0.2 one-cycle, step 1.25 eps, crop and flip) at the
    given epochs and batch, trained through robustkit's engine as ``robustkit harden`` does."""
    recipe = get_recipe("fast-at")
    settings = {k: v for k, v in recipe.params.items() if k not in ("epochs", "batch_size")}
    defence = make_defence(recipe.defence, args.fast_epochs, args.batch, canary_size=CANARY_SIZE, **settings)
    run = RunConfig(device=args.device, precision="bf16", channels_last=True, progress=False)
    torch.manual_seed(0)
    measured = train(defence, resnet18(), data, ThreatModel(Norm.LINF, EPS), run)
    last = measured["history"][-1]
    assert data.x_train is not None
    return {
        "model": measured["model"],
        "images": len(data.x_train),
        "epochs": len(measured["history"]),
        "wall_s": round(measured["wall_s"], 2),
        "canary_s": round(sum(r["canary_seconds"] for r in measured["history"]), 2),
        "wall_includes": "model transfer, every epoch and its canary (PGD-5 on the held-out images)",
        "val_clean": last["val_clean"],
        "val_robust_pgd5": last["val_robust"],
        "best_epoch": measured["best_epoch"],
        "stop": measured["stop"],
    }


def audit(args: argparse.Namespace, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Any]:
    """``robustkit.run_audit`` as a user runs it: the weights as safetensors with the ResNet-18's
    factory as the architecture, the images as an .npz, the default suite at linf 8/255."""
    with tempfile.TemporaryDirectory() as folder:
        weights, images = Path(folder) / "model.safetensors", Path(folder) / "audit.npz"
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(weights))
        np.savez(images, x=x.numpy(), y=y.numpy())
        config = AuditConfig(model=str(weights), data=str(images), eps=(EPS,),
                             load=LoadOptions(arch=f"{training_cost.__file__}:resnet18", device=args.device))
        report = run_audit(config)
    return {
        "images": report["n"],
        "seconds": report["seconds"],
        "clean_accuracy": report["clean_accuracy"],
        "worst_case_robust_accuracy": {str(r["eps"]): r["robust_accuracy"] for r in report["worst_case"]},
        "attacks": {r["attack"]: r["robust_accuracy"] for r in report["results"]},
        "checks": {c["name"]: c["status"] for c in report["checks"]},
    }


# -- the GPU's own checks -----------------------------------------------------------------------
def attack_checks(device: torch.device) -> list[dict[str, Any]]:
    """Native attacks on ``device`` are as strong as APGD-CE fp32 on the CPU and deterministic."""
    model = trained_digits_model("cnn")
    data = load_digits()
    threat = ThreatModel(Norm.LINF, 0.1)

    def robust(net: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor) -> float:
        with torch.no_grad():
            return float((net(x_adv).argmax(1) == y).float().mean())

    on_cpu = robust(model, data.x, data.y, APGD(steps=20)(model, data.x, data.y, threat=threat).x_adv)
    moved = copy.deepcopy(model).to(device)
    x, y = data.x.to(device), data.y.to(device)
    found = []
    for attack in (APGD(steps=20), APGD(steps=20, loss="dlr", precision="bf16"), APGDT(steps=10, n_target_classes=3),
                   FMN(steps=50)):
        result = attack(moved, x, y, threat=threat)
        accuracy = robust(moved, x, y, result.x_adv)
        same = torch.equal(attack(moved, x, y, threat=threat).x_adv, result.x_adv)
        found.append({"name": repr(attack), "ok": result.x_adv.device.type == device.type and same
                      and accuracy <= on_cpu + 0.03, "robust_accuracy": accuracy, "apgd_ce_fp32_cpu": on_cpu,
                      "deterministic": same})
    return found


def cuda_tests(timeout_s: float) -> dict[str, Any]:
    suite = Path(__file__).parents[1] / "tests"
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", str(suite)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"ok": False, "detail": f"timed out after {timeout_s:.0f} s"}
    return {"ok": done.returncode == 0, "returncode": done.returncode, "tail": done.stdout[-2000:]}


# -- targets -----------------------------------------------------------------------------------
def not_judged_because(args: argparse.Namespace) -> str | None:
    """Why no target can be judged here, or None."""
    if args.device_type != "cuda":
        return "not on a GPU: the targets are set for one H100/H200"
    if not any(gpu in args.device_name for gpu in ("H100", "H200")):
        return f"{args.device_name}: the targets are set for one H100/H200"
    if args.image_size != 32 or args.batch != 512:
        return f"{args.image_size}x{args.image_size} images in batches of {args.batch}: the targets are set " \
               "for the CIFAR shape (32x32) in batches of 512"
    return None


def target(name: str, value: float | None, threshold: float, at_most: bool, why: str | None) -> dict[str, Any]:
    if value is None and why is None:
        why = "its part did not run (see parts)"
    met = None if value is None else (value <= threshold if at_most else value >= threshold)
    return {"name": name, "value": value, "threshold": threshold, "met": met, "judged": why is None, "why": why}


def targets(args: argparse.Namespace, rows: list[dict[str, Any]], fast: dict[str, Any] | None) -> list[dict[str, Any]]:
    why = not_judged_because(args)
    headline = {r["defence"]: r for r in rows if r["variant"] == HEADLINE}
    fgsm = headline.get("fgsm-rs", {})
    ratio = fgsm.get("ratio")
    plain, pgd = headline.get("plain"), headline.get("pgd-at")
    slowdown = round(plain["images_per_s"] / pgd["images_per_s"], 3) if plain and pgd else None
    size_why = (None if fast is None or (fast["images"] >= 50_000 and fast["epochs"] >= 15) else
                f"{fast['epochs']} epochs on {fast['images']} images: the target is 15 epochs on 50,000")
    missing = None if fgsm == {} or ratio is not None else f"no reference loop at {args.reference} to compare with"
    return [
        target(f"fgsm-rs {HEADLINE} >= 0.95x the reference's images/s", ratio, 0.95, False,
               "; ".join(r for r in (why, missing) if r) or None),
        target(f"pgd-at (K={PGD_STEPS}) time <= 1.05 x (K+1) x plain, {HEADLINE} (plain/pgd-at images/s)",
               slowdown, round(1.05 * (PGD_STEPS + 1), 2), True, why),
        target("15 epochs of fast AT on 50,000 images <= 60 s (wall, canary included)",
               None if fast is None else fast["wall_s"], 60.0, True, why or size_why),
    ]


# -- the run -----------------------------------------------------------------------------------
def collect(args: argparse.Namespace) -> dict[str, Any]:
    plan = Plan(args.budget_s)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the reference loop's own main sets it
    reference = load_reference(args.reference)
    timing = synthetic_images(args.images, args.image_size)
    rows: list[dict[str, Any]] = []

    def add(name: str, label: str, compile: bool = False, extra: bool = True) -> None:
        row = timed_row(plan, args, timing, reference, name, variant(label), compile,
                        None if args.extra_rows or not extra else "--no-extra-rows")
        if row is not None:
            rows.append(row)

    for name in ("fgsm-rs", "plain", "pgd-at"):
        add(name, HEADLINE, extra=False)

    x_train, y_train = learnable_images(args.images, args.image_size, seed=1)
    x_val, y_val = learnable_images(min(CANARY_SIZE, args.images), args.image_size, seed=2)
    x_audit, y_audit = learnable_images(args.audit_images, args.image_size, seed=3)
    learnable = Dataset("synthetic-patterns", x_audit, y_audit, 10, x_train, y_train, x_val=x_val, y_val=y_val)
    unit = plan.unit(HEADLINE)
    fast_estimate = None if unit is None else (2 * args.images + 6 * len(y_val)) * args.fast_epochs * unit
    fast = plan.run("fast AT", fast_estimate, lambda: fast_at(args, learnable))
    model: nn.Module | None = None if fast is None else fast.pop("model")

    fp32 = plan.unit("fp32")
    audited = plan.run("audit", None if fp32 is None else AUDIT_PASSES * args.audit_images * fp32,
                       lambda: audit(args, model, x_audit, y_audit) if model is not None else None,
                       None if model is not None else "needs the fast-AT model, which is missing")
    gpu_why = None if device.type == "cuda" else "needs CUDA: they compare it with the CPU"
    native = plan.run("attack checks", ATTACK_CHECKS_GUESS_S, lambda: attack_checks(device), gpu_why)
    tests = plan.run("pytest -m cuda", CUDA_TESTS_GUESS_S, lambda: cuda_tests(max(plan.left(), 1.0)),
                     None if device.type == "cuda" else "needs CUDA: the cuda-marked tests skip without one")

    for label in ("fp32", "bf16"):
        for name in ("fgsm-rs", "plain", "pgd-at"):
            add(name, label)
    for label, _, _ in VARIANTS:
        add("atta", label)
    for name in ("fgsm-rs", "plain", "pgd-at", "atta"):
        add(name, HEADLINE, compile=True)

    checks = [*(native or []), *([{"name": "pytest -m cuda", **tests}] if tests else [])]
    found = targets(args, rows, fast)
    failed = ([t["name"] for t in found if t["judged"] and not t["met"]] + [c["name"] for c in checks if not c["ok"]]
              + [p["part"] for p in plan.parts if p["status"] == "error"])
    if audited is not None and device.type == "cuda":
        failed += [f"audit check {name}" for name, status in audited["checks"].items() if status == "fail"]
    return {
        "device": args.device_name,
        "torch": torch.__version__,
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "reference", "device_name")},
        "reference": str(args.reference) if reference is not None else None,
        "rows": rows,
        "fast_at": fast,
        "audit": audited,
        "checks": checks,
        "targets": found,
        "skipped": [{"part": p["part"], "why": p["why"]} for p in plan.parts if p["status"] == "skipped"],
        "parts": plan.parts,
        "seconds": round(time.perf_counter() - plan.started, 1),
        "failed": failed,
    }


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu for a smoke run")
    parser.add_argument("--images", type=int, default=50_000, help="synthetic training images per epoch")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=32, help="pixels a side (32: the CIFAR shape)")
    parser.add_argument("--audit-images", type=int, default=1000)
    parser.add_argument("--fast-epochs", type=int, default=15)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="time the torch.compile rows (default: on for cuda)")
    parser.add_argument("--extra-rows", action=argparse.BooleanOptionalAction, default=True,
                        help="part 6: the fp32, bf16, atta and compiled rows (--no-extra-rows: a quick smoke run)")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="seconds to spend; parts that would not fit are skipped, least important first")
    parser.add_argument("--reference", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared" / "bench" / "reference_training.py")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.device_type = device.type
    args.compile = device.type == "cuda" if args.compile is None else args.compile
    args.device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else f"cpu ({CPU_CAPABILITY}, {torch.get_num_threads()} threads)")
    return args


def print_report(report: dict[str, Any]) -> None:
    print(f"{report['device']}, torch {report['torch']}, {report['seconds']} s")
    for row in report["rows"]:
        versus = f"  reference {row['reference_images_per_s']:9.1f}  ratio {row['ratio']:.3f}" if "ratio" in row else ""
        print(f"{row['defence']:8s} {row['variant']:28s} {row['images_per_s']:9.1f} img/s{versus}")
    for name in ("fast_at", "audit"):
        print(f"{name}: {report[name]}")
    for check in report["checks"]:
        print(f"{'ok  ' if check['ok'] else 'FAIL'} {check['name']}")
    for t in report["targets"]:
        verdict = ("met" if t["met"] else "MISSED") if t["judged"] else f"not judged ({t['why']})"
        print(f"[{verdict}] {t['name']}: {t['value']}")
    for skipped in report["skipped"]:
        print(f"skipped {skipped['part']}: {skipped['why']}")


def main() -> int:
    args = arguments()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the report alone
        report = collect(args)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print_report(report)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
