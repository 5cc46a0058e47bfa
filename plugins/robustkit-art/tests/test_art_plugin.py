"""The ART plugin: discovery, the attack contract, the parameter mapping, labels, seeds and
the model's state around ART's calls."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch
from robustkit_art.attacks import ATTACKS, PGD, ArtAttack
from torch import Tensor, nn

from robustkit import RobustkitError, ThreatModel
from robustkit.errors import ParamsError
from robustkit.plugin.host import Host
from robustkit.testing import (
    check_attack_contract,
    contract_batch,
    fast_params,
    trained_digits_model,
)

EXPECTED = {
    "fgsm", "bim", "pgd", "apgd", "cw", "deepfool", "square", "hopskipjump", "boundary", "simba",
}
BLACK_BOX = {"square", "hopskipjump", "boundary", "simba"}
#: Settings beyond ``fast_params`` that keep the slow ART attacks quick on 16 digits.
QUICK: dict[str, dict[str, object]] = {
    "cw": {"binary_search_steps": 1, "decrease_factor": 0.3, "initial_const": 1.0,
           "largest_const": 4.0},
    "hopskipjump": {"max_eval": 100, "init_eval": 10, "init_size": 20},
    "boundary": {"num_trial": 5, "sample_size": 5, "init_size": 20},
    "simba": {"steps": 20},
}


@pytest.fixture(scope="module")
def host() -> Host:
    return Host()


def test_plugin_is_discovered_through_its_entry_point(host: Host) -> None:
    record = next(r for r in host.plugins() if r.name == "art")
    assert record.ok, record.status
    assert record.provider == "art"
    assert "robustkit_register_attacks" in record.hooks
    assert {e.name for e in host.attacks.list("art:*")} == EXPECTED
    assert host.attacks.resolve("art:pgd").obj is PGD


def test_declared_capabilities(host: Host) -> None:
    for entry in host.attacks.list("art:*"):
        attack = entry.obj
        assert attack.needs_gradients == (entry.name not in BLACK_BOX), entry.name
        assert attack.norms, entry.name
    assert not host.attacks.resolve("art:square").obj.supports_targeted
    assert not host.attacks.resolve("art:deepfool").obj.supports_targeted
    assert host.attacks.resolve("art:pgd").obj.supports_targeted


def test_plugin_module_imports_neither_torch_nor_art() -> None:
    """Discovery (and so ``robustkit --help``) must not pay for torch or ART."""
    code = (
        "import sys, robustkit_art.plugin\n"
        "heavy = [m for m in ('torch', 'art', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_attack_contract(host: Host, name: str) -> None:
    attack_cls = host.attacks.resolve(f"art:{name}").obj
    attack = attack_cls(**(fast_params(attack_cls) | QUICK.get(name, {})))
    batch = contract_batch(8) if name == "cw" else None  # ART's linf C&W goes one sample at a time
    check_attack_contract(attack, batch=batch)


def test_parameters_map_onto_arts_names() -> None:
    threat = ThreatModel.parse("linf:0.1")
    kwargs = PGD(steps=7, step_size=0.02, restarts=3, batch_size=64).art_kwargs(threat)
    assert kwargs == {
        "max_iter": 7, "eps_step": 0.02, "num_random_init": 3, "decay": None, "batch_size": 64,
    }
    assert PGD(steps=4, random_start=False).art_kwargs(threat)["num_random_init"] == 0
    assert PGD(steps=4).art_kwargs(threat)["eps_step"] == pytest.approx(2.5 * 0.1 / 4)
    attack_cls = {a.name: a for a in ATTACKS}
    apgd = attack_cls["apgd"](loss="dlr")
    assert apgd.art_kwargs(threat)["loss_type"] == "difference_logits_ratio"
    assert "binary_search_steps" not in attack_cls["cw"]().art_kwargs(threat)
    assert "decrease_factor" not in attack_cls["cw"]().art_kwargs(ThreatModel.parse("l2:1"))
    assert attack_cls["boundary"](spherical_step=0.1).art_kwargs(threat)["delta"] == 0.1


def test_arts_own_names_are_rejected_with_the_valid_list() -> None:
    with pytest.raises(ParamsError, match="valid parameters: steps, step_size"):
        PGD.from_options({"max_iter": "3"})
    with pytest.raises(ParamsError, match="random_start"):
        PGD(restarts=2, random_start=False)
    with pytest.raises(ParamsError, match="steps must be >= 1"):
        PGD(steps=0)


def _grads(model: nn.Module) -> list[Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def test_model_mode_and_gradients_survive_an_art_attack() -> None:
    """ART's loss_gradient sets eval mode and calls zero_grad + backward on the model."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.2), nn.Flatten(), nn.Linear(144, 10),
    )
    x, y = contract_batch(8)
    nn.functional.cross_entropy(model(x), y).backward()  # a training step's pending gradients
    model[0].weight.requires_grad_(False)  # a frozen layer must stay frozen
    model.train()
    before = _grads(model)
    flags = [p.requires_grad for p in model.parameters()]
    PGD(steps=2)(model, x, y, threat=ThreatModel.parse("linf:0.1"))
    assert all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    for old, new in zip(before, _grads(model)):
        assert (old is None and new is None) or (
            old is not None and new is not None and torch.equal(old, new)
        )


def test_targeted_attack_reaches_the_targets() -> None:
    model = trained_digits_model("cnn")
    x, y = contract_batch(64)
    targets = (y + 1) % 10
    threat = ThreatModel.parse("linf:0.3", targeted=True)
    result = PGD(steps=20)(model, x, y, threat=threat, targets=targets)
    assert not threat.violations(x, result.x_adv).any()
    reached = (result.logits.argmax(1) == targets).float().mean().item()
    assert reached > 0.8, reached


def test_seed_is_used_and_global_random_state_is_restored() -> None:
    model, (x, y) = trained_digits_model("cnn"), contract_batch(16)
    threat = ThreatModel.parse("linf:0.1")
    np.random.seed(123)
    expected_next = np.random.rand()
    np.random.seed(123)
    first = PGD(steps=1, seed=1)(model, x, y, threat=threat).x_adv
    assert np.random.rand() == expected_next
    other = PGD(steps=1, seed=2)(model, x, y, threat=threat).x_adv
    assert not torch.equal(first, other)


def test_gradient_attack_refuses_a_model_without_gradients() -> None:
    model = trained_digits_model("cnn")

    def scores(batch: Tensor) -> Tensor:  # a plain predict function, as an ONNX session gives
        with torch.no_grad():
            return model(batch)

    x, y = contract_batch(4)
    with pytest.raises(RobustkitError, match="needs gradients"):
        PGD(steps=1)(scores, x, y, threat=ThreatModel.parse("linf:0.1"))


def test_every_attack_is_an_art_adapter() -> None:
    assert {a.name for a in ATTACKS} == EXPECTED
    assert all(issubclass(a, ArtAttack) for a in ATTACKS)


@pytest.mark.parametrize("name", ["deepfool", "hopskipjump"])
def test_inputs_already_misclassified_stay_adversarial(host: Host, name: str) -> None:
    """These ART attacks move away from the model's prediction, ignoring the labels; a wrong
    prediction must not be 'attacked' back to the true class."""
    model = trained_digits_model("cnn")
    x, _ = contract_batch(16)
    with torch.no_grad():
        predicted = model(x).argmax(1)
    labels = torch.where(torch.arange(16) % 2 == 0, (predicted + 1) % 10, predicted)
    attack_cls = host.attacks.resolve(f"art:{name}").obj
    attack = attack_cls(**(fast_params(attack_cls) | QUICK.get(name, {})))
    result = attack(model, x, labels, threat=ThreatModel.parse("l2:2.0"))
    wrong = labels != predicted
    assert torch.equal(result.x_adv[wrong], x[wrong])
    assert result.success[wrong].all()
    assert not torch.equal(result.x_adv[~wrong], x[~wrong])


def test_missing_art_is_a_failed_plugin_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *args: None if name == "art" else real_find_spec(name, *args),
    )
    monkeypatch.delitem(sys.modules, "robustkit_art.plugin", raising=False)
    host = Host()
    record = next(r for r in host.plugins() if r.name == "art")
    assert record.status.startswith("failed:") and "adversarial-robustness-toolbox" in record.status
    assert not host.attacks.list("art:*")
    assert host.attacks.resolve("robustkit:pgd")
