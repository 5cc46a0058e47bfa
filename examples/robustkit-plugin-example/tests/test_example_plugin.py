"""Tests of the example plugin, written the way a plugin author would write them.

They use robustkit's own contract check (``robustkit.testing.check_attack_contract``, the same
one every built-in attack passes) and register the plugin module on a ``Host`` exactly as the
entry point would, so they run before the distribution is installed.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from robustkit_plugin_example import plugin
from robustkit_plugin_example.attacks import Momentum
from robustkit_plugin_example.shapes import CLASSES, load_shapes

from robustkit import RobustkitError, ThreatModel
from robustkit.plugin.host import Host
from robustkit.testing import check_attack_contract, contract_batch, fast_params, trained_digits_model


@pytest.fixture
def host() -> Host:
    """Built-ins plus this plugin under its entry-point name, nothing else installed."""
    host = Host(entry_points=False)
    record = host.register(plugin, "example")
    assert record.ok, record.status
    return host


def test_registers_the_attack_and_the_data_set(host: Host) -> None:
    assert host.records["example"].hooks == [
        "robustkit_register_attacks", "robustkit_register_datasets", "robustkit_report_sections"]
    assert host.attacks.resolve("example:momentum").obj is Momentum
    assert host.attacks.resolve("mi-fgsm").obj is Momentum  # a bare alias: only one provider has it
    entry = host.datasets.resolve("example:shapes")
    assert entry.obj is load_shapes and "procedural" in entry.summary


def test_plugin_module_does_not_import_torch() -> None:
    code = "import sys, robustkit_plugin_example.plugin; assert 'torch' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(plugin.__file__).parents[1]), *sys.path])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.mark.parametrize("overrides", [{}, {"loss": "margin", "decay": 0.5}], ids=["ce", "margin"])
def test_attack_contract(overrides: dict[str, object]) -> None:
    check_attack_contract(Momentum(**fast_params(Momentum), **overrides))


def test_attack_is_stronger_than_one_step_untargeted_and_targeted() -> None:
    model = trained_digits_model("cnn")
    x, y = contract_batch(200)
    fgsm = Host(entry_points=False).attacks.resolve("robustkit:fgsm").obj()
    untargeted, targeted = ThreatModel.parse("linf:0.1"), ThreatModel.parse("linf:0.1", targeted=True)
    one_step = fgsm(model, x, y, threat=untargeted).robust_accuracy
    assert Momentum()(model, x, y, threat=untargeted).robust_accuracy <= one_step
    # targeted: towards the most likely wrong class (robustkit picks it when no targets are given)
    hits = Momentum()(model, x, y, threat=targeted).success.float().mean()
    assert hits > fgsm(model, x, y, threat=targeted).success.float().mean()


def test_parameters_are_checked() -> None:
    with pytest.raises(RobustkitError, match="unknown parameter 'alpha' for momentum; valid parameters: steps"):
        Momentum.from_options({"alpha": "0.1"})
    with pytest.raises(RobustkitError, match="decay must be >= 0"):
        Momentum.from_options({"decay": "-1"})
    assert Momentum.from_options({"step-size": "2/255"}).params.step_size == pytest.approx(2 / 255)


def test_shapes_are_deterministic_balanced_and_valid() -> None:
    data = load_shapes(n_train=120, n_eval=60)
    again = load_shapes(n_train=120, n_eval=60)
    assert torch.equal(data.x, again.x) and torch.equal(data.x_train, again.x_train)
    assert not torch.equal(data.x, load_shapes(n_train=120, n_eval=60, seed=1).x)
    assert data.validate() is data  # the input convention robustkit checks for every data set
    assert data.x.shape == (60, 1, 8, 8) and data.num_classes == len(CLASSES)
    assert data.y.bincount(minlength=len(CLASSES)).tolist() == [10] * len(CLASSES)
    # every class is drawn: mean images differ between classes
    means = torch.stack([data.x_train[data.y_train == c].mean(0) for c in range(len(CLASSES))])
    assert torch.cdist(means.flatten(1), means.flatten(1)).fill_diagonal_(1.0).min() > 0.3


def test_report_sections_only_for_this_plugins_pieces(host: Host) -> None:
    ours = {"data": {"source": load_shapes(12, 6).source}, "config": {"attacks": ["example:momentum"]}}
    theirs = {"data": {"source": "builtin:digits"}, "config": {"attacks": ["robustkit:pgd"]}}
    titles = [s.title for _, sections in host.collect("robustkit_report_sections", report=ours) for s in sections or []]
    assert titles == ["About example:shapes", "About example:momentum"]
    assert all(not sections for _, sections in host.collect("robustkit_report_sections", report=theirs))
