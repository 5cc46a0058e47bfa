"""robustkit, torchattacks and ART agree on the same model and threat model.

The first-party plugins' own suites compare each against its library called directly; this
test puts the three providers side by side, on a plain CNN and on a BatchNorm network with
normalisation inside, both trained on builtin:digits.
"""
from __future__ import annotations

import pytest
import torch

from robustkit.data import load_digits
from robustkit.host import Host
from robustkit.testing import trained_digits_model
from robustkit.threat import Norm, ThreatModel

PROVIDERS = ("robustkit", "torchattacks", "art")
SETTINGS = {"fgsm": ({}, 0.01), "pgd": ({"steps": 10, "random_start": True}, 0.03)}


@pytest.fixture(scope="module")
def attacks():
    host = Host()
    missing = [p for p in PROVIDERS[1:] if not host.attacks.list(f"{p}:pgd")]
    assert not missing, f"first-party plugins not installed or failed: {missing}; see `robustkit plugins`"
    return host.attacks


@pytest.mark.parametrize("kind", ["cnn", "normalized-bn"])
@pytest.mark.parametrize("eps", [0.05, 0.1])
@pytest.mark.parametrize("name", ["fgsm", "pgd"])
def test_providers_agree(attacks, kind, eps, name):
    model = trained_digits_model(kind)
    data = load_digits()
    threat = ThreatModel(Norm.LINF, eps)
    options, tolerance = SETTINGS[name]
    if name == "pgd":
        options = {**options, "step_size": 2.5 * eps / options["steps"]}
    accuracy = {}
    for provider in PROVIDERS:
        attack = attacks.resolve(f"{provider}:{name}").obj(**options)
        result = attack(model, data.x, data.y, threat=threat)
        assert not bool(threat.violations(data.x, result.x_adv).any()), provider
        with torch.no_grad():
            still_correct = model(result.x_adv).argmax(1) == data.y  # judged here, not by the wrapper
        accuracy[provider] = float(still_correct.float().mean())
    spread = max(accuracy.values()) - min(accuracy.values())
    assert spread <= tolerance, accuracy
    clean = float((model(data.x).argmax(1) == data.y).float().mean())
    assert max(accuracy.values()) < clean - 0.01, (accuracy, clean)  # the attacks did something
