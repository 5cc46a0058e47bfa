"""What only a GPU can show, in one call (run it where a GPU is lent): robustkit's native
attacks on CUDA, in fp32 and bf16, are as strong as on the CPU and deterministic for a seed;
and the tests marked ``cuda`` (``pytest -m cuda``: fp16 AMP, DDP over NCCL, the pinned loader).

    python benchmarks/gpu_check.py      # exits 1 if a check fails; prints one line per check
"""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import torch

from robustkit.attacks.apgd import APGD, APGDT
from robustkit.attacks.fmn import FMN
from robustkit.data import load_digits
from robustkit.testing import trained_digits_model
from robustkit.threat import Norm, ThreatModel


def robust_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x_adv).argmax(1) == y).float().mean())


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device here: nothing checked")
        return 1
    device = torch.device("cuda")
    model = trained_digits_model("cnn")
    data = load_digits()
    x, y = data.x, data.y
    threat = ThreatModel(Norm.LINF, 0.1)
    on_cpu = robust_accuracy(model, x, y, APGD(steps=20)(model, x, y, threat=threat).x_adv)
    gpu_model = copy.deepcopy(model).to(device)
    xg, yg = x.to(device), y.to(device)
    failed = 0
    for attack in (APGD(steps=20), APGD(steps=20, loss="dlr", precision="bf16"), APGDT(steps=10, n_target_classes=3),
                   FMN(steps=50)):
        result = attack(gpu_model, xg, yg, threat=threat)
        accuracy = robust_accuracy(gpu_model, xg, yg, result.x_adv)
        again = attack(gpu_model, xg, yg, threat=threat).x_adv
        ok = result.x_adv.device.type == "cuda" and accuracy <= on_cpu + 0.03 and torch.equal(again, result.x_adv)
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {attack!r}: robust accuracy {accuracy:.1%} on CUDA "
              f"(APGD-CE fp32 on the CPU: {on_cpu:.1%}), deterministic: {torch.equal(again, result.x_adv)}")
    suite = Path(__file__).parents[1] / "tests"
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", str(suite)], check=False)
    failed += tests.returncode != 0
    print(f"{'ok  ' if tests.returncode == 0 else 'FAIL'} pytest -m cuda (fp16 AMP, DDP over NCCL, pinned loader)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
