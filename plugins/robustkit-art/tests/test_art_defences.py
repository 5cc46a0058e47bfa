"""ART's input transformations as defences, and what their gradient masking looks like."""
from __future__ import annotations

import pytest
import torch
from robustkit_art.defences import DEFENCES, PreprocessedModel

from robustkit import Defence, Model, RobustkitError, ThreatModel
from robustkit.data import load_digits
from robustkit.plugin.host import Host
from robustkit.testing import trained_digits_model

THREAT = ThreatModel.parse("linf:0.1")
NAMES = sorted(d.name for d in DEFENCES)


@pytest.fixture(scope="module")
def host() -> Host:
    return Host()


def _defend(host: Host, name: str, **settings: object) -> PreprocessedModel:
    defence: Defence = host.defences.resolve(f"art:{name}").obj(**settings)
    result = defence.apply(trained_digits_model("cnn"), None, threat=THREAT)
    assert not result.survives_export
    assert any("gradient" in note for note in result.notes)
    assert isinstance(result.model, PreprocessedModel)
    return result.model


def _input_gradient(model: Model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def test_transforms_are_registered_as_gradient_masking_transforms(host: Host) -> None:
    transforms = [e for e in host.defences.list("art:*") if e.obj.kind == "transform"]
    assert {e.name for e in transforms} == set(NAMES)
    assert all(e.obj.masks_gradients for e in transforms)


@pytest.mark.parametrize("name", NAMES)
def test_forward_applies_arts_transform_and_gradient_is_masked(host: Host, name: str) -> None:
    data = load_digits()
    x, y = data.x[:32], data.y[:32]
    masked = _defend(host, name)
    transformed, _ = masked.preprocessor(x.numpy())
    expected = masked.model(torch.from_numpy(transformed).float())
    assert torch.allclose(masked(x), expected, atol=1e-6)
    assert torch.count_nonzero(_input_gradient(masked, x, y)) == 0
    # BPDA: the gradient of the model at the transformed input, passed straight through.
    bpda = _defend(host, name, gradient="bpda")
    at_transformed = _input_gradient(bpda.model, torch.from_numpy(transformed).float(), y)
    assert torch.allclose(_input_gradient(bpda, x, y), at_transformed, atol=1e-6)
    assert torch.count_nonzero(at_transformed) > 0


def test_audit_shows_feature_squeezing_only_masks_gradients(host: Host) -> None:
    """PGD through the zero gradient barely moves; square (scores only) and PGD with BPDA
    gradients break the same squeezed model: the robustness was gradient masking."""
    data = load_digits()
    x, y = data.x[:120], data.y[:120]
    masked = _defend(host, "feature-squeezing", bit_depth=3)
    bpda = _defend(host, "feature-squeezing", bit_depth=3, gradient="bpda")
    with torch.no_grad():
        clean = float((masked(x).argmax(1) == y).float().mean())
    pgd = host.attacks.resolve("robustkit:pgd").obj(steps=10)
    square = host.attacks.resolve("art:square").obj(queries=60)
    masked_pgd = pgd(masked, x, y, threat=THREAT).robust_accuracy
    square_acc = square(masked, x, y, threat=THREAT).robust_accuracy
    bpda_pgd = pgd(bpda, x, y, threat=THREAT).robust_accuracy
    assert clean > 0.9
    assert masked_pgd >= clean - 0.03, (clean, masked_pgd)
    assert square_acc <= clean - 0.1, (clean, square_acc)
    assert bpda_pgd <= clean - 0.3, (clean, bpda_pgd)


def test_settings_art_rejects_are_a_one_line_error(host: Host) -> None:
    with pytest.raises(RobustkitError, match="art:feature-squeezing"):
        _defend(host, "feature-squeezing", bit_depth=0)
