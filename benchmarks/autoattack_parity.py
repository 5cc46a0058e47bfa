"""robustkit's suites against AutoAttack standard (torchattacks), on the same models and samples.

Builds its models from fixed seeds on data it makes (no download): a CIFAR-shape residual CNN
(3x32x32, BatchNorm, three stages) trained plainly and the same adversarially trained
(FGSM-RS), the digits CNN, and a copy of the plain CNN with logits multiplied by 1000 (its
softmax saturates, so cross-entropy gradients vanish). On the same samples per model it runs
robustkit's ``default`` and ``autoattack`` suites (the audit engine, cascade mode) and
torchattacks' ``AutoAttack(version="standard")``, and prints robust accuracy and seconds.

Targets (issue 14): default worst case <= AutoAttack + 0.5 points on every model; ``--suite
autoattack`` within 1 point of AutoAttack; default at one eps in <= 1/3 of AutoAttack's time.

    python benchmarks/autoattack_parity.py [--n 200] [--models cifar-plain,...] [--json]
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkit.audit.engine import evaluate
from robustkit.audit.run import AuditConfig, build_suite
from robustkit.audit.suites import get_suite
from robustkit.data import load_digits
from robustkit.testing import trained_digits_model
from robustkit.threat import Norm, ThreatModel

#: linf radii: 8/255 scaled to this synthetic data (plain nets at 2/255, FGSM-RS-trained at 4/255),
#: and the digits' usual 0.1
EPS = {"cifar": 8 / 255, "digits": 0.1}


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.skip(x))


def cifar_resnet(width: int = 16) -> nn.Module:
    """A small CIFAR-shape residual CNN: stem, three stages of one block each, pooling, linear."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        Block(width, width, 1), Block(width, 2 * width, 2), Block(2 * width, 4 * width, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 10),
    )


class ScaledLogits(nn.Module):
    def __init__(self, net: nn.Module, scale: float) -> None:
        super().__init__()
        self.net, self.scale = net, scale

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) * self.scale


def synthetic_cifar(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """10 classes of faint smooth colour templates under strong noise, shifts and contrast
    changes: a plainly trained net reaches about 90% clean accuracy and is far from robust."""
    g = torch.Generator().manual_seed(1234)  # the templates are fixed; ``seed`` draws the samples
    templates = F.interpolate(torch.rand(10, 3, 4, 4, generator=g), size=32, mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    contrast = 0.35 * (0.4 + 0.6 * torch.rand(n, 1, 1, 1, generator=g))
    x = 0.5 + contrast * (templates[y] - 0.5) + 0.4 * torch.randn(n, 3, 32, 32, generator=g)
    shifts = torch.randint(-3, 4, (n, 2), generator=g)
    x = torch.stack([torch.roll(xi, (int(s[0]), int(s[1])), dims=(1, 2)) for xi, s in zip(x, shifts)])
    return x.clamp(0, 1), y


def train(net: nn.Module, x: Tensor, y: Tensor, *, epochs: int, adversarial_eps: float = 0.0) -> nn.Module:
    """SGD with a one-cycle schedule; FGSM-RS (Wong et al., 2020: alpha 1.25 eps) when
    ``adversarial_eps`` is set."""
    torch.manual_seed(0)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    steps = epochs * ((len(x) + 127) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(128):
            xb, yb = x[idx], y[idx]
            if adversarial_eps:
                delta = (torch.rand_like(xb) * 2 - 1) * adversarial_eps
                delta.requires_grad_(True)
                loss = F.cross_entropy(net((xb + delta).clamp(0, 1)), yb)
                (grad,) = torch.autograd.grad(loss, delta)
                delta = (delta + 1.25 * adversarial_eps * grad.sign()).clamp(-adversarial_eps, adversarial_eps)
                xb = (xb + delta.detach()).clamp(0, 1)
            loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


def models(n: int) -> dict[str, Callable[[], tuple[nn.Module, Tensor, Tensor, float]]]:
    """name -> (model, x, y, eps), built lazily so --models can pick a few."""
    builders: dict[str, Callable[[], tuple[nn.Module, Tensor, Tensor, float]]] = {}
    cache: dict[str, nn.Module] = {}

    def cifar(adversarial: bool) -> nn.Module:
        key = "at" if adversarial else "plain"
        if key not in cache:
            torch.manual_seed(0)
            x, y = synthetic_cifar(4000, seed=1)
            cache[key] = train(cifar_resnet(), x, y, epochs=4 if adversarial else 3,
                               adversarial_eps=EPS["cifar"] / 2 if adversarial else 0.0)
        return cache[key]

    x_test, y_test = synthetic_cifar(n, seed=2)
    digits = load_digits()
    builders["cifar-plain"] = lambda: (cifar(False), x_test, y_test, EPS["cifar"] / 4)
    builders["cifar-fgsm-rs"] = lambda: (cifar(True), x_test, y_test, EPS["cifar"] / 2)
    builders["cifar-plain-logits-x1000"] = lambda: (ScaledLogits(cifar(False), 1000.0).eval(), x_test, y_test,
                                                    EPS["cifar"] / 4)
    builders["digits-cnn"] = lambda: (trained_digits_model("cnn"), digits.x[:n], digits.y[:n], EPS["digits"])
    return builders


def robustkit_suite(model: nn.Module, x: Tensor, y: Tensor, eps_list: list[float], suite: str) -> tuple[float, float]:
    """Worst case at the largest eps of ``eps_list``, and the seconds the whole audit took, run as
    ``robustkit audit --suite SUITE`` runs it (the suite's own gradient-free shortcut included)."""
    attacks = build_suite(AuditConfig(model="benchmark", suite=suite), white_box=True)
    start = time.perf_counter()
    evaluation = evaluate(model, x, y, attacks, [ThreatModel(Norm.LINF, eps) for eps in eps_list], cascade=True,
                          batch_size=256, device=x.device,
                          gradient_free_shortcut=get_suite(suite).gradient_free_shortcut)
    return evaluation.worst_case(max(eps_list)), time.perf_counter() - start


def autoattack(model: nn.Module, x: Tensor, y: Tensor, eps: float) -> tuple[float, float]:
    import torchattacks

    attack = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=10, seed=0)
    start = time.perf_counter()
    x_adv = attack(x, y)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        return float((model(x_adv).argmax(1) == y).float().mean()), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="samples per model")
    parser.add_argument("--models", default="cifar-plain,cifar-fgsm-rs,cifar-plain-logits-x1000,digits-cnn")
    parser.add_argument("--no-suite-autoattack", action="store_true",
                        help="skip robustkit's --suite autoattack (the longest run); its target is then 'not run'")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--device", default="cpu", help="where the models and attacks run (cpu, cuda)")
    args = parser.parse_args()
    rows = []
    builders = models(args.n)
    for name in args.models.split(","):
        model, x, y, eps = builders[name]()
        model, x, y = model.to(args.device), x.to(args.device), y.to(args.device)
        with torch.no_grad():
            clean = float((model(x).argmax(1) == y).float().mean())
        default, default_s = robustkit_suite(model, x, y, [eps], "default")
        default_3, default_3_s = robustkit_suite(model, x, y, [eps / 4, eps / 2, eps], "default")
        ours_aa, ours_aa_s = (None, None) if args.no_suite_autoattack else robustkit_suite(model, x, y, [eps],
                                                                                           "autoattack")
        theirs, theirs_s = autoattack(model, x, y, eps)
        rows.append({"model": name, "eps": eps, "n": len(x), "clean": clean,
                     "default": default, "default_s": default_s,
                     "default_3eps": default_3, "default_3eps_s": default_3_s,
                     "robustkit_autoattack": ours_aa, "robustkit_autoattack_s": ours_aa_s,
                     "torchattacks_autoattack": theirs, "torchattacks_autoattack_s": theirs_s,
                     "default_minus_aa_points": 100 * (default - theirs),
                     "suite_aa_minus_aa_points": None if ours_aa is None else 100 * (ours_aa - theirs),
                     "default_time_share_of_aa": default_s / theirs_s,
                     "default_3eps_time_share_of_aa": default_3_s / theirs_s})
        if not args.json:
            r = rows[-1]
            suite_aa = "not run" if ours_aa is None else f"{ours_aa:6.1%} ({ours_aa_s:6.1f} s)"
            print(f"{name:26s} eps {eps:.4f} clean {clean:6.1%} | default {default:6.1%} ({default_s:6.1f} s) | "
                  f"3 eps {default_3:6.1%} ({default_3_s:6.1f} s) | "
                  f"rk-autoattack {suite_aa} | AutoAttack {theirs:6.1%} ({theirs_s:6.1f} s)"
                  f" | default-AA {r['default_minus_aa_points']:+.1f} pt, time {r['default_time_share_of_aa']:.2f}x,"
                  f" 3 eps {r['default_3eps_time_share_of_aa']:.2f}x", flush=True)
    suite_aa_gaps = [r["suite_aa_minus_aa_points"] for r in rows if r["suite_aa_minus_aa_points"] is not None]
    report = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
              "device": args.device,
              "rows": rows,
              "targets": {
                  "default_le_aa_plus_0.5": all(r["default_minus_aa_points"] <= 0.5 for r in rows),
                  "suite_autoattack_within_1": all(abs(g) <= 1.0 for g in suite_aa_gaps) if suite_aa_gaps
                  else "not run",
                  "default_time_le_third": all(r["default_time_share_of_aa"] <= 1 / 3 for r in rows),
                  "three_eps_time_le_aa": all(r["default_3eps_time_share_of_aa"] <= 1 for r in rows),
                  "three_eps_same_worst_case": all(r["default_3eps"] == r["default"] for r in rows)}}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"cpu capability {report['cpu_capability']}; targets: {report['targets']}")


if __name__ == "__main__":
    main()
