"""The attack contract over every registered attack, and what the native attacks must achieve.

The contract test builds a host with entry points, so every installed plugin's attacks (ART,
torchattacks, third parties) are held to the same checks as the native ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from robustkit import modules
from robustkit.attacks import base
from robustkit.attacks.base import Attack, AttackResult, ModelTampered
from robustkit.attacks.native import FGSM, PGD
from robustkit.attacks.square import Square
from robustkit.data import load_digits
from robustkit.errors import DataError, RobustkitError
from robustkit.modules import predict_logits
from robustkit.plugin.host import Host
from robustkit.plugin.registry import Entry
from robustkit.testing import (
    check_attack_contract,
    contract_batch,
    contract_model,
    fast_params,
    trained_digits_model,
)
from robustkit.threat import Norm, ThreatModel

#: Every attack a real installation offers, plugins included.
ALL_ATTACKS: list[Entry[Any]] = Host().attacks.list()


@pytest.mark.parametrize("entry", ALL_ATTACKS, ids=[e.qualified_name for e in ALL_ATTACKS])
def test_attack_contract(entry: Entry[Any]) -> None:
    check_attack_contract(entry.obj(**fast_params(entry.obj)))


@pytest.mark.parametrize("entry", ALL_ATTACKS, ids=[e.qualified_name for e in ALL_ATTACKS])
def test_an_empty_batch_gives_an_empty_result(entry: Entry[Any]) -> None:
    """A filtered batch can come out empty (every sample already broken): no error, nothing asked."""
    asked = []
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    net.register_forward_pre_hook(lambda module, args: asked.append(len(args[0])))
    attack = entry.obj(**fast_params(entry.obj))
    norm = Norm.LINF if Norm.LINF in attack.norms else next(iter(attack.norms))
    result = attack(net, torch.rand(0, 1, 8, 8), torch.zeros(0, dtype=torch.long), threat=ThreatModel(norm, 0.1))
    assert result.x_adv.shape == (0, 1, 8, 8) and result.success.shape == (0,) and not asked


def test_contract_covers_the_native_attacks() -> None:
    assert {"robustkit:fgsm", "robustkit:pgd"} <= {e.qualified_name for e in ALL_ATTACKS}


@pytest.mark.parametrize(
    "attack",
    [
        PGD(steps=3, precision="bf16"),
        PGD(steps=3, precision="fp16"),
        PGD(steps=3, loss="margin", restarts=2),
        PGD(steps=3, random_start=False, early_stop=False),
        FGSM(loss="margin", precision="bf16"),
    ],
    ids=repr,
)
def test_native_settings_keep_the_contract(attack: Attack) -> None:
    check_attack_contract(attack)


def test_contract_catches_an_attack_that_breaks_it() -> None:
    class TrainsBatchNorm(FGSM):
        name = "trains-batchnorm"

        def run(self, model: Any, x: Tensor, labels: Tensor, threat: ThreatModel) -> Tensor:
            model.train()  # a forward pass in train mode updates BatchNorm's running statistics
            return super().run(model, x, labels, threat)

    class Drifting(FGSM):
        name = "drifting"
        calls = 0

        def run(self, model: Any, x: Tensor, labels: Tensor, threat: ThreatModel) -> Tensor:
            type(self).calls += 1  # state outside the seed: a different answer on every call
            return x + threat.eps * (-1) ** self.calls

    class Careless(FGSM):
        name = "careless"
        norms = frozenset({Norm.LINF, Norm.L2, Norm.L1})  # claims l1 but ...

        def run(self, model: Any, x: Tensor, labels: Tensor, threat: ThreatModel) -> Tensor:
            return x + threat.eps * torch.ones_like(
                x
            )  # ... leaves the l1 ball (projection fixes it)

    class SmallestRadius(FGSM):
        name = "smallest-radius"
        per_sample_eps = True  # claims per-sample radii but ...

        def run(self, model: Any, x: Tensor, labels: Tensor, threat: ThreatModel,
                radii: Tensor | None = None) -> Tensor:
            eps = threat.eps if radii is None else float(radii.min())  # ... shrinks every ball to the smallest
            return super().run(model, x, labels, threat.with_eps(eps))

    with pytest.raises(AssertionError, match="the largest radius went unused"):
        check_attack_contract(SmallestRadius())
    # the call itself refuses a result obtained by changing the weights (BatchNorm's statistics)
    with pytest.raises(ModelTampered, match="'trains-batchnorm' changed the model's weights"):
        check_attack_contract(TrainsBatchNorm())
    with pytest.raises(AssertionError, match="not deterministic"):
        check_attack_contract(Drifting())
    check_attack_contract(
        Careless()
    )  # __call__ projects, so even a careless run() stays in the ball


@pytest.fixture(scope="module")
def digits() -> tuple[Tensor, Tensor]:
    """160 real test digits: enough for stable accuracies, quick to attack."""
    data = load_digits()
    return data.x[:160], data.y[:160]


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    return trained_digits_model("cnn")


def test_eps_zero_changes_nothing(cnn: nn.Module, digits: tuple[Tensor, Tensor]) -> None:
    x, y = digits
    for norm in (Norm.LINF, Norm.L2):
        result = PGD(steps=3)(cnn, x, y, threat=ThreatModel(norm, 0.0))
        assert torch.equal(result.x_adv, x)
        assert torch.equal(result.success, predict_logits(cnn, x).argmax(1) != y)


def _robust(
    attack: Attack, model: nn.Module, x: Tensor, y: Tensor, threat: str, **kw: Any
) -> AttackResult:
    result = attack(model, x, y, threat=ThreatModel.parse(threat, **kw))
    assert not result.success.dtype.is_floating_point
    return result


def test_pgd_at_least_as_strong_as_fgsm(cnn: nn.Module, digits: tuple[Tensor, Tensor]) -> None:
    x, y = digits
    clean = float((predict_logits(cnn, x).argmax(1) == y).float().mean())
    assert clean > 0.9
    for threat in ("linf:0.1", "l2:1.0"):
        fgsm = _robust(FGSM(), cnn, x, y, threat).robust_accuracy
        pgd = _robust(PGD(), cnn, x, y, threat).robust_accuracy
        assert pgd <= fgsm < clean, threat
    assert _robust(PGD(), cnn, x, y, "linf:0.2").robust_accuracy < 0.2


def test_l2_pgd_stays_in_ball_and_breaks_the_model(
    cnn: nn.Module, digits: tuple[Tensor, Tensor]
) -> None:
    x, y = digits
    threat = ThreatModel.parse("l2:1.5")
    result = PGD(steps=10)(cnn, x, y, threat=threat)
    assert not threat.violations(x, result.x_adv).any()
    assert result.robust_accuracy < 0.3
    radius = (result.x_adv - x).flatten(1).norm(dim=1)
    assert float(radius.max()) <= 1.5 + 1e-4 and float(radius.mean()) > 0.5  # it uses the ball


def test_targeted_pgd_hits_the_targets(cnn: nn.Module, digits: tuple[Tensor, Tensor]) -> None:
    x, y = digits
    targets = (y + 3) % 10
    result = PGD(steps=20)(
        cnn, x, y, threat=ThreatModel.parse("linf:0.3", targeted=True), targets=targets
    )
    predicted = result.logits.argmax(1)
    assert torch.equal(result.success, predicted == targets)
    assert float(result.success.float().mean()) > 0.9
    # without explicit targets the most likely wrong class is the target, never the label
    default = PGD(steps=20)(cnn, x, y, threat=ThreatModel.parse("linf:0.3", targeted=True))
    assert float(default.success.float().mean()) > 0.9
    assert not bool((default.logits.argmax(1)[default.success] == y[default.success]).any())


def test_bf16_close_to_fp32(cnn: nn.Module, digits: tuple[Tensor, Tensor]) -> None:
    x, y = digits
    for threat in ("linf:0.1", "l2:1.0"):
        fp32 = _robust(PGD(), cnn, x, y, threat).robust_accuracy
        bf16 = _robust(PGD(precision="bf16"), cnn, x, y, threat).robust_accuracy
        assert abs(bf16 - fp32) <= 0.05, (threat, fp32, bf16)


def test_reduced_precision_stops_only_on_samples_fooled_in_fp32() -> None:
    """Near ties that bf16 rounding flips: early stop must not take them for broken samples."""
    torch.manual_seed(0)
    x = torch.rand(200, 1, 8, 8) * 0.5 + 0.25
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    difference = torch.randn(64).sign() * 0.004  # class 1's weights differ from class 0's by this
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([torch.full((64,), 0.5), torch.full((64,), 0.5) + difference]))
        model[1].bias.copy_(torch.tensor([0.0, -float((x.flatten(1) @ difference).median())]))
    y = predict_logits(model, x).argmax(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (model(x).float().argmax(1) != y).float().mean() > 0.3  # bf16 flips many clean ties
    threat = ThreatModel(Norm.LINF, 0.02)
    fp32 = PGD(steps=10)(model, x, y, threat=threat)
    bf16 = PGD(steps=10, precision="bf16")(model, x, y, threat=threat)
    assert fp32.robust_accuracy < 0.5
    assert abs(bf16.robust_accuracy - fp32.robust_accuracy) <= 0.02, (bf16.robust_accuracy, fp32.robust_accuracy)


class CountingModel(nn.Module):
    """Records the batch size of every gradient-enabled forward pass (the attack's own work)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.batches: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            self.batches.append(len(x))
        return self.net(x)


def test_restarts_attack_only_survivors(cnn: nn.Module, digits: tuple[Tensor, Tensor]) -> None:
    x, y = digits
    threat = ThreatModel.parse("linf:0.08")
    once = PGD(steps=4, early_stop=False)(cnn, x, y, threat=threat)
    survivors = int((~once.success).sum())
    assert 0 < survivors < len(x)
    counting = CountingModel(cnn)
    twice = PGD(steps=4, restarts=2, early_stop=False)(counting, x, y, threat=threat)
    assert counting.batches == [len(x)] * 4 + [survivors] * 4
    assert twice.robust_accuracy <= once.robust_accuracy
    # what the first restart broke is kept as it was
    assert torch.equal(twice.x_adv[once.success], once.x_adv[once.success])


def test_early_stop_drops_broken_samples(cnn: nn.Module, digits: tuple[Tensor, Tensor]) -> None:
    x, y = digits
    counting = CountingModel(cnn)
    result = PGD(steps=5)(counting, x, y, threat=ThreatModel.parse("linf:0.2"))
    assert counting.batches[0] == len(x)
    assert counting.batches == sorted(counting.batches, reverse=True) and counting.batches[
        -1
    ] < len(x)
    assert result.robust_accuracy < 0.3


def test_unsupported_norm_and_targeted_mode_are_refused() -> None:
    model = contract_model()
    x, y = contract_batch(4)
    with pytest.raises(RobustkitError, match="does not support the l1 norm; it supports: l2, linf"):
        PGD()(model, x, y, threat=ThreatModel.parse("l1:1"))

    class Untargeted(FGSM):
        name = "untargeted"
        supports_targeted = False

    with pytest.raises(RobustkitError, match="no targeted mode"):
        Untargeted()(model, x, y, threat=ThreatModel.parse("linf:0.1", targeted=True))


def test_bad_batches_are_data_errors() -> None:
    model = contract_model()
    x, y = contract_batch(4)
    threat = ThreatModel.parse("linf:0.1")
    with pytest.raises(DataError, match="outside the bounds"):
        FGSM()(model, x * 255, y, threat=threat)
    with pytest.raises(DataError, match="labels must have shape"):
        FGSM()(model, x, y[:3], threat=threat)
    with pytest.raises(DataError, match="floating point"):
        FGSM()(model, (x * 255).to(torch.uint8), y, threat=threat)
    radii = torch.full((4,), 0.05, dtype=torch.float64)
    with pytest.raises(RobustkitError, match="'fgsm' takes one eps per call, not one per sample"):
        FGSM()(model, x, y, threat=threat, radii=radii)
    with pytest.raises(DataError, match=r"radii must have shape \(4,\) and lie in \[0, 0.1\]"):
        Square(queries=5)(model, x, y, threat=threat, radii=radii + 0.1)
    with pytest.raises(DataError, match=r"radii must have shape \(4,\)"):
        Square(queries=5)(model, x, y, threat=threat, radii=radii[:3])


def test_int32_labels_are_accepted() -> None:
    model = contract_model().eval()
    x, y = contract_batch(8)
    threat = ThreatModel.parse("linf:0.1")
    as_int64 = PGD(steps=2)(model, x, y, threat=threat)
    as_int32 = PGD(steps=2)(model, x, y.to(torch.int32), threat=threat)
    assert torch.equal(as_int32.x_adv, as_int64.x_adv)
    assert torch.equal(as_int32.success, as_int64.success)


def test_attack_keeps_device_of_inputs_and_params_rejects_mixed_construction() -> None:
    with pytest.raises(TypeError, match="not both"):
        PGD(PGD.Params(), steps=3)
    assert PGD(steps=3).params.steps == 3
    assert repr(FGSM()) == "FGSM(FGSMParams(loss='ce', precision='fp32'))"


# -- channels-last on the CPU (robustkit.modules.fast_layout) ---------------------------------
class ViewsAfterConv(nn.Module):
    """``.view`` on a convolution's output: fails in channels-last, so must be left alone."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.head = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: Tensor) -> Tensor:
        features = self.convs(x)
        return self.head(features.view(len(x), -1))


def test_channels_last_leaves_the_model_and_inputs_as_they_were(
    cnn: nn.Module, digits: tuple[Tensor, Tensor]
) -> None:
    x, y = digits
    before = [(p.data_ptr(), p.is_contiguous()) for p in cnn.parameters()]
    result = PGD(steps=2)(cnn, x, y, threat=ThreatModel(Norm.LINF, 0.1))
    assert [(p.data_ptr(), p.is_contiguous()) for p in cnn.parameters()] == before
    assert result.x_adv.is_contiguous() and x.is_contiguous()
    assert modules._CHANNELS_LAST_OK[cnn][(tuple(x.shape[1:]), x.dtype)] is True


def test_channels_last_gives_the_attack_contiguous_inputs_would(
    cnn: nn.Module, digits: tuple[Tensor, Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    x, y = digits
    threat = ThreatModel(Norm.LINF, 0.1)
    fast = FGSM()(cnn, x, y, threat=threat)

    @contextmanager
    def as_given(model: nn.Module, inputs: Tensor) -> Iterator[Tensor]:
        yield inputs

    monkeypatch.setattr(base, "fast_layout", as_given)
    plain = FGSM()(cnn, x, y, threat=threat)
    # The sign of a gradient that rounds to about zero may flip; nothing else may differ.
    assert (fast.x_adv == plain.x_adv).float().mean() > 0.999
    assert torch.allclose(fast.logits, plain.logits, atol=1e-3)
    assert torch.equal(fast.success, plain.success)


def test_a_model_that_fails_in_channels_last_runs_as_given(digits: tuple[Tensor, Tensor]) -> None:
    torch.manual_seed(0)
    model = ViewsAfterConv()
    x, y = digits
    result = FGSM()(model, x, y, threat=ThreatModel(Norm.LINF, 0.1))
    assert modules._CHANNELS_LAST_OK[model][(tuple(x.shape[1:]), x.dtype)] is False
    assert torch.equal(result.logits, predict_logits(model, result.x_adv))
    assert all(p.is_contiguous() for p in model.parameters())
