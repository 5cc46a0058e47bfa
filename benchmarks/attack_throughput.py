"""Native PGD throughput against torchattacks and ART called directly, in one run.

PGD-10 (linf 8/255, random start, step 2.5 * eps / 10) on the benchmark CNN
(`robustkit.models.zoo.cnn4_bn`, 4 conv layers with BatchNorm, eval mode) with 3x32x32 synthetic
inputs, one batch:
  native fp32 (early_stop=False)   like for like with the libraries, which attack every sample
                                   for every step
  native bf16 (early_stop=False)   bf16 autocast for the forward-backward pass
  native fp32 (early_stop=True)    the default: a sample stops once fooled; a random model
                                   misclassifies most inputs, so this number flatters native PGD
  torchattacks.PGD, ART ProjectedGradientDescentPyTorch (fp32), called directly
  plain loop fp32 / bf16           the few lines of torch every PGD implementation needs: the floor
Runs are interleaved and repeated after a warm-up; medians are reported.
Targets on a CPU: native fp32 >= torchattacks fp32, native bf16 >= 1.7x torchattacks fp32.
The bf16 target needs a CPU with bf16 instructions (avx512_bf16 or AMX); without them oneDNN
is bypassed and bf16 convolutions fall back to a reference kernel about ten times slower than
fp32. The script then says so and times the bf16 runs once on 16 images (images/s is what is
compared), so that it still finishes in minutes.

    python benchmarks/attack_throughput.py [--batch 128] [--repeats 5] [--json]
"""
from __future__ import annotations

import json
from collections.abc import Callable

import torch
import torch.nn.functional as F
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
from torch import Tensor, nn

from robustkit.attacks.native import PGD
from robustkit.threat import Norm, ThreatModel


def plain_pgd(model: nn.Module, x: Tensor, y: Tensor, dtype: torch.dtype | None) -> Tensor:
    """Textbook PGD with a random start; ``dtype`` turns on autocast for the forward-backward."""
    x_adv = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)
    for _ in range(STEPS):
        x_adv.requires_grad_(True)
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(x_adv)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits.float(), y, reduction="sum"), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + STEP * grad.sign(), x - EPS), x + EPS).clamp(0, 1)
    return x_adv


def main() -> None:
    args = arguments(__doc__.splitlines()[0], repeats=5)
    model, x, y = benchmark_setup(args.batch)
    threat = ThreatModel(Norm.LINF, EPS)
    ta_pgd, art = torchattacks_pgd(model), art_pgd(model, args.batch)
    x_np, y_np = x.numpy(), y.numpy()
    bf16_hardware = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    bf16_images = args.batch if bf16_hardware else min(args.batch, 16)
    xb, yb = x[:bf16_images], y[:bf16_images]

    def native(inputs: Tensor, labels: Tensor, **settings: object) -> Callable[[], object]:
        attack = PGD(steps=STEPS, step_size=STEP, **settings)
        return lambda: attack(model, inputs, labels, threat=threat)

    #: name -> (run, images per run, timed repeats)
    runs: dict[str, tuple[Callable[[], object], int, int]] = {
        "native fp32": (native(x, y, early_stop=False), args.batch, args.repeats),
        "native bf16": (native(xb, yb, early_stop=False, precision="bf16"), bf16_images,
                        args.repeats if bf16_hardware else 1),
        "native fp32 early stop": (native(x, y), args.batch, args.repeats),
        "torchattacks fp32": (lambda: ta_pgd(x, y), args.batch, args.repeats),
        "art fp32": (lambda: art.generate(x_np, y=y_np), args.batch, args.repeats),
        "plain loop fp32": (lambda: plain_pgd(model, x, y, None), args.batch, args.repeats),
        "plain loop bf16": (lambda: plain_pgd(model, xb, yb, torch.bfloat16), bf16_images,
                            args.repeats if bf16_hardware else 1),
    }
    median = median_seconds({name: fn for name, (fn, _, _) in runs.items()},
                            {name: repeats for name, (_, _, repeats) in runs.items()})
    rate = {name: runs[name][1] / seconds for name, seconds in median.items()}
    reference = rate["torchattacks fp32"]
    ratios = {
        "native fp32 / torchattacks fp32": rate["native fp32"] / reference,
        "native bf16 / torchattacks fp32": rate["native bf16"] / reference,
        "native fp32 early stop / torchattacks fp32": rate["native fp32 early stop"] / reference,
        "native fp32 / art fp32": rate["native fp32"] / rate["art fp32"],
        "native fp32 / plain loop fp32": rate["native fp32"] / rate["plain loop fp32"],
        "native bf16 / plain loop bf16": rate["native bf16"] / rate["plain loop bf16"],
    }
    targets = {
        "native fp32 >= torchattacks fp32": ratios["native fp32 / torchattacks fp32"] >= 1.0,
        "native bf16 >= 1.7x torchattacks fp32": ratios["native bf16 / torchattacks fp32"] >= 1.7,
    }
    result = {
        "batch": args.batch, "repeats": args.repeats, "steps": STEPS, "eps": EPS, "step_size": STEP,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "bf16_hardware": bf16_hardware,
        "images": {name: images for name, (_, images, _) in runs.items()},
        "timed_repeats": {name: repeats for name, (_, _, repeats) in runs.items()},
        "median_seconds": median, "images_per_second": rate, "ratios": ratios, "targets_met": targets,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"PGD-{STEPS} linf {EPS:.4f}, batch {args.batch}, median of {args.repeats}, "
          f"{torch.get_num_threads()} torch threads, {torch.backends.cpu.get_cpu_capability()}")
    if not bf16_hardware:
        print(f"  no bf16 instructions on this CPU: bf16 runs timed once on {bf16_images} images")
    for name, value in rate.items():
        print(f"  {name:24s} {value:8.1f} images/s")
    for name, value in ratios.items():
        print(f"  {name:44s} {value:5.2f}x")
    for name, met in targets.items():
        print(f"  target {name}: {'met' if met else 'MISSED'}")


if __name__ == "__main__":
    main()
