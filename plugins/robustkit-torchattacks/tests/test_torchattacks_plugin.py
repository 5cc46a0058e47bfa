"""The torchattacks plugin: discovery, the attack contract, and the adapter's conventions."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torchattacks
from robustkit_torchattacks.attacks import APGD, APGDT, ATTACKS, FAB, PGD, AutoAttack, Square
from torch import nn

from robustkit import RobustkitError, ThreatModel
from robustkit.plugin.host import Host
from robustkit.testing import check_attack_contract, contract_batch, contract_model, fast_params

EXPECTED = {"fgsm", "bim", "pgd", "mifgsm", "eotpgd", "apgd", "apgdt", "fab", "square",
            "autoattack", "cw", "deepfool"}


def test_plugin_module_imports_neither_torch_nor_torchattacks() -> None:
    code = ("import sys, robustkit_torchattacks.plugin; "
            "assert not {'torch', 'torchattacks', 'robustbench'} & set(sys.modules), sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_discovered_through_the_entry_point() -> None:
    host = Host()
    record = host.records["torchattacks"]
    assert record.status == "ok", record.status
    assert record.hooks == ["robustkit_register_attacks"]
    entries = host.attacks.list("torchattacks:*")
    assert {e.name for e in entries} == EXPECTED == {cls.name for cls in ATTACKS}
    assert host.attacks.resolve("torchattacks:pgd").obj is PGD
    assert all(e.plugin == "torchattacks" and e.summary for e in entries)
    square = host.attacks.resolve("torchattacks:square").obj
    assert not square.needs_gradients and square.supports_targeted
    assert {n.value for n in PGD.norms} == {"linf", "l2"}


@pytest.mark.parametrize("attack_cls", ATTACKS, ids=lambda cls: cls.name)
def test_attack_contract(attack_cls: type) -> None:
    check_attack_contract(attack_cls(**fast_params(attack_cls)))


def test_unknown_option_is_rejected_with_the_valid_list() -> None:
    valid = r"valid parameters: steps, step_size, random_start, seed$"
    with pytest.raises(RobustkitError, match=r"unknown parameter 'alpha' for pgd; " + valid):
        PGD.from_options({"alpha": "0.01"})
    attack = PGD.from_options({"step-size": "2/255", "random_start": "off"})
    assert attack.params.step_size == 2 / 255 and attack.params.random_start is False
    with pytest.raises(RobustkitError, match="steps must be >= 1"):
        PGD.from_options({"steps": "0"})


def test_train_mode_is_restored_and_the_attack_runs_in_eval_mode() -> None:
    model = contract_model()  # BatchNorm + Dropout: train-mode forward passes are random
    model.train()
    x, y = contract_batch(32)
    result = PGD(steps=5)(model, x, y, threat=ThreatModel.parse("linf:0.1"))
    assert all(m.training for m in model.modules())
    model.eval()
    assert torch.equal(result.logits, model(result.x_adv))


def test_targeted_mode_aims_at_the_given_targets() -> None:
    model = contract_model().eval()
    x, y = contract_batch(64)
    targets = (model(x).argmax(1) + 3) % 10
    threat = ThreatModel.parse("linf:0.3", targeted=True)
    result = PGD(steps=20)(model, x, y, threat=threat, targets=targets)
    assert not threat.violations(x, result.x_adv).any()
    hit = model(result.x_adv).argmax(1) == targets
    assert torch.equal(hit, result.success)
    assert hit.float().mean() > 0.8


def test_classes_come_from_the_model_not_a_default_of_ten() -> None:
    model = contract_model(num_classes=5).eval()  # torchattacks' n_classes=10 fails on 5 classes
    x, y = contract_batch(16)
    threat = ThreatModel.parse("linf:0.1")
    for attack in (APGDT(steps=3), FAB(steps=3, multi_targeted=True), AutoAttack()):
        result = attack(model, x, y % 5, threat=threat)
        assert not threat.violations(x, result.x_adv).any()


def _count_forwards(model: nn.Module, call: object) -> int:
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        torch.manual_seed(0)
        call()  # type: ignore[operator]
    finally:
        handle.remove()
    return len(calls)


def test_no_extra_forward_passes() -> None:
    """The wrapper adds only Attack.__call__'s fp32 check (+1), and the class count if used."""
    model = contract_model().eval()
    x, y = contract_batch(16)
    threat = ThreatModel.parse("linf:0.1")
    direct = _count_forwards(model, lambda: torchattacks.PGD(model, eps=0.1, alpha=0.025)(x, y))
    assert _count_forwards(model, lambda: PGD()(model, x, y, threat=threat)) == direct + 1
    direct = _count_forwards(model, lambda: torchattacks.APGDT(model, eps=0.1, steps=3)(x, y))
    assert _count_forwards(model, lambda: APGDT(steps=3)(model, x, y, threat=threat)) == direct + 2


def test_seeded_attacks_leave_the_callers_rng_alone() -> None:
    model = contract_model().eval()
    x, y = contract_batch(8)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    APGD(steps=3, seed=7)(model, x, y, threat=ThreatModel.parse("linf:0.1"))
    assert torch.equal(torch.rand(3), expected)


def test_other_bounds_are_mapped_onto_the_unit_interval() -> None:
    """A model on [-1, 1] inputs is attacked exactly like the same model on [0, 1] inputs."""
    unit = contract_model().eval()
    x, y = contract_batch(32)

    class Symmetric(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = unit

        def forward(self, v: torch.Tensor) -> torch.Tensor:
            return self.net((v + 1) / 2)

    symmetric = Symmetric().eval()
    cases = ((PGD(steps=5), "linf"), (PGD(steps=5), "l2"), (Square(queries=30), "linf"))
    for attack, norm in cases:
        unit_threat = ThreatModel.parse(f"{norm}:0.1")
        wide_threat = ThreatModel.parse(f"{norm}:0.2", bounds=(-1.0, 1.0))
        torch.manual_seed(0)
        reference = attack(unit, x, y, threat=unit_threat)
        torch.manual_seed(0)
        result = attack(symmetric, 2 * x - 1, y, threat=wide_threat)
        assert not wide_threat.violations(2 * x - 1, result.x_adv).any()
        assert torch.allclose((result.x_adv + 1) / 2, reference.x_adv, atol=1e-5)
        assert torch.equal(result.success, reference.success)


def test_square_attacks_a_plain_predict_function() -> None:
    """A score-only model (no module, no parameters) works for the gradient-free attack."""
    model = contract_model().eval()
    x, y = contract_batch(16)
    threat = ThreatModel.parse("linf:0.1")

    def scores(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(batch)

    result = Square(queries=50)(scores, x, y, threat=threat)
    assert not threat.violations(x, result.x_adv).any()
    assert torch.equal(result.success, model(result.x_adv).argmax(1) != y)
