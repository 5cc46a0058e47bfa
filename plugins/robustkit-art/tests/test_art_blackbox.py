"""ART's black-box attacks on a model that only gives scores: an ONNX graph under onnxruntime."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from robustkit_art.attacks import PGD, Square

import robustkit
from robustkit import RobustkitError, ThreatModel
from robustkit.data import load_digits
from robustkit.testing import trained_digits_model


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> robustkit.LoadedModel:
    path = Path(tmp_path_factory.mktemp("onnx")) / "digits-cnn.onnx"
    torch.onnx.export(
        trained_digits_model("cnn"), (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False,
        input_names=["x"], output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
    )
    return robustkit.load_model(str(path))


def test_square_breaks_the_onnx_model(onnx_model: robustkit.LoadedModel) -> None:
    assert not isinstance(onnx_model.model, torch.nn.Module)  # onnxruntime: scores only
    data = load_digits()
    x, y = data.x[:120], data.y[:120]
    threat = ThreatModel.parse("linf:0.15")
    clean = (onnx_model.model(x).argmax(1) == y).float().mean().item()
    result = Square(queries=60)(onnx_model.model, x, y, threat=threat)
    assert not threat.violations(x, result.x_adv).any()
    robust = (onnx_model.model(result.x_adv).argmax(1) == y).float().mean().item()
    assert result.robust_accuracy == pytest.approx(robust)
    assert clean > 0.9 and robust < clean - 0.2, (clean, robust)


def test_gradient_attack_on_the_onnx_model_says_why_not(onnx_model: robustkit.LoadedModel) -> None:
    data = load_digits()
    with pytest.raises(RobustkitError, match="black-box attack"):
        PGD(steps=1)(onnx_model.model, data.x[:4], data.y[:4], threat=ThreatModel.parse("linf:0.1"))


@pytest.mark.parametrize(("name", "settings", "threat_text"), [
    ("square", {"queries": 10}, "linf:0.1"),
    ("hopskipjump", {"steps": 2, "max_eval": 50, "init_eval": 10, "init_size": 20}, "l2:1.0"),
    ("boundary", {"steps": 3, "num_trial": 5, "sample_size": 5, "init_size": 20}, "l2:1.0"),
    ("simba", {"steps": 20}, "l2:1.0"),
])
def test_every_black_box_attack_runs_on_the_onnx_model(
    onnx_model: robustkit.LoadedModel, name: str, settings: dict[str, int], threat_text: str
) -> None:
    attack = robustkit.get_host().attacks.resolve(f"art:{name}").obj(**settings)
    assert not attack.needs_gradients
    data = load_digits()
    x, y = data.x[:6], data.y[:6]
    threat = ThreatModel.parse(threat_text)
    result = attack(onnx_model.model, x, y, threat=threat)
    assert result.x_adv.shape == x.shape and not threat.violations(x, result.x_adv).any()
