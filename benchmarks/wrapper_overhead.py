"""What robustkit's wrappers cost over calling torchattacks and ART directly, in one run.

PGD-10 (linf 8/255, random start, step 2/255) on the benchmark CNN (`robustkit.models.zoo.cnn4_bn`,
4 conv layers with BatchNorm) with 3x32x32 synthetic inputs, one batch, eval mode:
  robustkit `torchattacks:pgd`  vs  torchattacks.PGD called directly
  robustkit `art:pgd`           vs  ART ProjectedGradientDescentPyTorch called directly
Runs are interleaved and repeated; medians are compared. The wrapper's price includes the
core's fp32 re-check of every example (one extra forward pass) and the projection; so the
script also times each direct call followed by that forward pass (what a direct caller runs
to get a robust accuracy), the like-for-like comparison.
Target: at most 5% over the direct call.

    python benchmarks/wrapper_overhead.py [--batch 128] [--repeats 7] [--json]
"""
from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import torch
from common import (  # benchmarks/ is on sys.path when run as a script
    EPS,
    STEP,
    STEPS,
    arguments,
    art_pgd,
    benchmark_setup,
    median_seconds,
    torchattacks_pgd,
)

from robustkit.plugin.host import Host
from robustkit.threat import Norm, ThreatModel


def main() -> None:
    args = arguments(__doc__.splitlines()[0], repeats=7)
    model, x, y = benchmark_setup(args.batch)
    threat = ThreatModel(Norm.LINF, EPS)
    attacks = Host().attacks
    wrapped_ta = attacks.resolve("torchattacks:pgd").obj(steps=STEPS, step_size=STEP)
    wrapped_art = attacks.resolve("art:pgd").obj(steps=STEPS, step_size=STEP)

    # Built inside each call, as the wrappers build theirs: like for like.
    def direct_art() -> np.ndarray:
        return art_pgd(model, args.batch).generate(x.numpy(), y=y.numpy())

    def judged(x_adv: torch.Tensor | np.ndarray) -> torch.Tensor:
        """What a direct caller runs to get robust accuracy, which the wrapper always computes."""
        with torch.no_grad():
            return model(torch.as_tensor(x_adv)).argmax(1) != y

    def direct_ta() -> torch.Tensor:
        return torchattacks_pgd(model)(x, y)

    runs: dict[str, Callable[[], object]] = {
        "torchattacks direct": direct_ta,
        "torchattacks direct + judge": lambda: judged(direct_ta()),
        "robustkit torchattacks:pgd": lambda: wrapped_ta(model, x, y, threat=threat),
        "art direct": direct_art,
        "art direct + judge": lambda: judged(direct_art()),
        "robustkit art:pgd": lambda: wrapped_art(model, x, y, threat=threat),
    }
    median = median_seconds(runs, dict.fromkeys(runs, args.repeats))
    result = {
        "batch": args.batch, "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
        "median_seconds": median,
        "images_per_second": {name: args.batch / value for name, value in median.items()},
        "overhead": {
            "torchattacks": median["robustkit torchattacks:pgd"] / median["torchattacks direct"] - 1,
            "art": median["robustkit art:pgd"] / median["art direct"] - 1,
        },
        # Like for like: the direct call plus the forward pass that judges success.
        "overhead_vs_judged": {
            "torchattacks": median["robustkit torchattacks:pgd"] / median["torchattacks direct + judge"] - 1,
            "art": median["robustkit art:pgd"] / median["art direct + judge"] - 1,
        },
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for name, value in median.items():
        print(f"{name:28s} {args.batch / value:8.1f} images/s")
    for library, overhead in result["overhead"].items():
        judged_overhead = result["overhead_vs_judged"][library]
        print(f"wrapper overhead over {library}: {overhead:+.1%} (over direct + judging: {judged_overhead:+.1%})")


if __name__ == "__main__":
    main()
