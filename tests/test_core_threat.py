"""Threat models (parsing, projections, checks) and the coercion of ``-o KEY VALUE`` into params."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest
import torch

from robustkit.attacks.native import PGD, PGDParams
from robustkit.errors import ParamsError, RobustkitError
from robustkit.params import coerce, describe, param
from robustkit.threat import Norm, ThreatModel, eps_text, parse_number, per_sample_norm


@pytest.mark.parametrize(
    ("text", "norm", "eps"),
    [
        ("linf:8/255", Norm.LINF, 8 / 255),
        ("Linf:0.03", Norm.LINF, 0.03),
        ("inf:1e-2", Norm.LINF, 0.01),
        ("l2:0.5", Norm.L2, 0.5),
        ("L2: 3/4", Norm.L2, 0.75),
        ("l1:12", Norm.L1, 12.0),
    ],
)
def test_parse(text: str, norm: Norm, eps: float) -> None:
    threat = ThreatModel.parse(text)
    assert threat.norm is norm
    assert threat.eps == pytest.approx(eps)
    assert threat.bounds == (0.0, 1.0) and not threat.targeted


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("linf", "NORM:EPS"),
        ("l3:0.1", "unknown norm"),
        ("linf:abc", "not a number"),
        ("linf:1/0", "not a number"),
        ("linf:-0.1", "eps must be"),
        ("linf:2", "exceeds the input range"),
        ("l2:nan", "not a number"),
    ],
)
def test_parse_errors(text: str, message: str) -> None:
    with pytest.raises(RobustkitError, match=message):
        ThreatModel.parse(text)


def test_eps_range_depends_on_bounds() -> None:
    assert ThreatModel.parse("linf:2", bounds=(0, 255)).eps == 2.0
    assert ThreatModel.parse("l2:5").eps == 5.0  # l2 radii may exceed the per-pixel range
    with pytest.raises(RobustkitError, match="low < high"):
        ThreatModel(Norm.LINF, 0.1, bounds=(1.0, 0.0))


def test_parse_number() -> None:
    assert parse_number("8/255") == pytest.approx(8 / 255)
    assert parse_number(" 0.5 ") == 0.5
    assert parse_number(3) == 3.0


def _cloud(seed: int, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, 3, 3, generator=generator)
    x_adv = x + 0.8 * torch.randn(n, 2, 3, 3, generator=generator)
    return x, x_adv


def test_linf_projection() -> None:
    threat = ThreatModel.parse("linf:0.1")
    x, x_adv = _cloud(0)
    projected = threat.project(x, x_adv)
    expected = torch.minimum(torch.maximum(x_adv, x - 0.1), x + 0.1).clamp(0, 1)
    assert torch.equal(projected, expected)
    assert not threat.violations(x, projected).any()
    assert threat.violations(x, x_adv).all()


def test_l2_projection() -> None:
    threat = ThreatModel(Norm.L2, 0.5, bounds=(-10.0, 10.0))  # wide bounds: the ball alone acts
    x, x_adv = _cloud(1)
    projected = threat.project(x, x_adv)
    delta = x_adv - x
    norms = delta.flatten(1).norm(dim=1)
    expected = x + delta * (0.5 / norms).clamp(max=1).view(-1, 1, 1, 1)
    assert torch.allclose(projected, expected, atol=1e-6)
    assert torch.allclose(per_sample_norm(projected - x, Norm.L2), norms.clamp(max=0.5), atol=1e-5)
    inside = x + 0.1 * delta / norms.view(-1, 1, 1, 1)
    assert torch.equal(threat.project(x, inside), inside)


def _l1_projection_brute_force(v: torch.Tensor, eps: float) -> torch.Tensor:
    """Projection onto the l1 ball by bisection on the soft threshold (independent of sorting)."""
    if v.abs().sum() <= eps:
        return v
    low, high = 0.0, float(v.abs().max())
    for _ in range(100):
        theta = (low + high) / 2
        if (v.abs() - theta).clamp_min(0).sum() > eps:
            low = theta
        else:
            high = theta
    return v.sign() * (v.abs() - high).clamp_min(0)


def test_l1_projection_against_bisection() -> None:
    threat = ThreatModel(Norm.L1, 2.0, bounds=(-10.0, 10.0))
    x, x_adv = _cloud(2)
    projected = threat.project(x, x_adv) - x
    for row, delta in zip(projected, x_adv - x, strict=True):
        assert torch.allclose(
            row, _l1_projection_brute_force(delta.double(), 2.0).float(), atol=1e-5
        )
    assert torch.allclose(projected.flatten(1).abs().sum(1), torch.full((len(x),), 2.0), atol=1e-4)


def test_l1_projection_known_case() -> None:
    threat = ThreatModel(Norm.L1, 1.0, bounds=(-5.0, 5.0))
    x = torch.zeros(2, 1, 1, 3)
    x_adv = torch.tensor([[3.0, 1.0, -0.5], [0.2, -0.3, 0.1]]).view(2, 1, 1, 3)
    projected = threat.project(x, x_adv).view(2, 3)
    assert torch.allclose(projected[0], torch.tensor([1.0, 0.0, 0.0]))  # theta = 2
    assert torch.allclose(projected[1], torch.tensor([0.2, -0.3, 0.1]))  # already inside


def _dykstra_l1_box(x: torch.Tensor, v: torch.Tensor, eps: float, steps: int = 200) -> torch.Tensor:
    """The projection of each row of ``v`` onto (l1 ball around ``x``) ∩ [0, 1] by Dykstra's
    alternating projections, which converge to the projection onto an intersection of convex
    sets (independent of the multiplier search under test)."""
    point, p, q = v.clone(), torch.zeros_like(v), torch.zeros_like(v)
    for _ in range(steps):
        y = x + _l1_projection_brute_force_rows(point + p - x, eps)
        p = point + p - y
        point_next = (y + q).clamp(0, 1)
        q = y + q - point_next
        point = point_next
    return point


def test_l1_projection_onto_the_ball_and_box_together() -> None:
    """Near the box's faces, projecting onto the ball and clipping after wastes l1 budget; the
    projection onto the intersection is the one Dykstra's method finds, and it is closer."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(6, 10, generator=g, dtype=torch.float64) ** 3  # many coordinates near 0
    v = x + 0.8 * torch.randn(6, 10, generator=g, dtype=torch.float64)
    threat = ThreatModel(Norm.L1, 1.5)
    projected = threat.project(x, v)
    assert torch.allclose(projected, _dykstra_l1_box(x, v, 1.5), atol=1e-6)
    assert not threat.violations(x, projected).any()
    clipped_after = (x + _l1_projection_brute_force_rows(v - x, 1.5)).clamp(0, 1)
    assert ((projected - v).norm(dim=1) <= (clipped_after - v).norm(dim=1) + 1e-9).all()
    assert ((projected - v).norm(dim=1) < (clipped_after - v).norm(dim=1) - 1e-3).any()


def _l1_projection_brute_force_rows(v: torch.Tensor, eps: float) -> torch.Tensor:
    """``_l1_projection_brute_force`` on each row at once."""
    size = v.abs()
    low, high = torch.zeros(len(v), dtype=v.dtype), size.amax(dim=1)
    for _ in range(100):
        theta = (low + high) / 2
        over = (size - theta.unsqueeze(1)).clamp_min(0).sum(dim=1) > eps
        low, high = torch.where(over, theta, low), torch.where(over, high, theta)
    inside = size.sum(dim=1) <= eps
    high = torch.where(inside, torch.zeros_like(high), high)
    return v.sign() * (size - high.unsqueeze(1)).clamp_min(0)


def test_projection_clips_to_bounds_and_stays_in_ball() -> None:
    for norm, eps in ((Norm.LINF, 0.3), (Norm.L2, 1.0), (Norm.L1, 3.0)):
        threat = ThreatModel(norm, eps)
        x, x_adv = _cloud(3)
        projected = threat.project(x, x_adv)
        assert projected.min() >= 0 and projected.max() <= 1
        assert not threat.violations(x, projected).any(), norm


def test_violations_flag_each_problem() -> None:
    threat = ThreatModel.parse("linf:0.1")
    x = torch.full((4, 1, 2, 2), 0.5)
    x_adv = x.clone()
    x_adv[1, 0, 0, 0] = 0.65  # outside the ball
    x_adv[2, 0, 0, 0] = float("nan")
    x_adv[3] = 0.5 + 0.1 + 1e-7  # within float slack
    assert threat.violations(x, x_adv).tolist() == [False, True, True, False]
    low_x = torch.zeros(1, 1, 2, 2)
    assert threat.violations(low_x, low_x - 0.05).tolist() == [True]  # outside the bounds


def test_per_sample_radii_project_and_check_each_row_in_its_own_ball() -> None:
    for norm, eps in ((Norm.LINF, 0.3), (Norm.L2, 1.0), (Norm.L1, 3.0)):
        threat = ThreatModel(norm, eps)
        x, x_adv = _cloud(3)
        radii = torch.tensor([eps, eps / 3, 0.0] * (len(x) // 3) + [eps] * (len(x) % 3), dtype=torch.float64)
        projected = threat.project(x, x_adv, radii=radii)
        for radius in (eps, eps / 3, 0.0):
            rows = radii == radius
            assert torch.equal(projected[rows], threat.with_eps(radius).project(x[rows], x_adv[rows])), norm
        assert torch.equal(projected[radii == 0], x[radii == 0])
        assert not threat.violations(x, projected, radii=radii).any(), norm
        # the same examples against the smaller radius everywhere: the rows at eps leave it
        flagged = threat.violations(x, projected, radii=torch.full_like(radii, eps / 3))
        assert bool(flagged[radii == eps].any()) and not bool(flagged[radii < eps].any()), norm


def test_with_eps_and_str() -> None:
    threat = ThreatModel.parse("l2:0.5", targeted=True)
    assert threat.with_eps(1.0) == ThreatModel(Norm.L2, 1.0, targeted=True)
    assert str(threat) == "l2:0.5 (targeted)"
    assert str(ThreatModel.parse("linf:8/255")) == "linf:8/255"  # as written, and parse reads it back
    assert ThreatModel.parse(str(ThreatModel(Norm.LINF, 8 / 255))).eps == 8 / 255


# -- params ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoParams:
    steps: int = param(10, "steps")
    step_size: float | None = param(None, "step length")
    rate: float = param(0.1, "a float")
    flag: bool = param(False, "a switch")
    mode: Literal["ce", "margin"] = param("ce", "objective")
    label: str = param("x", "free text")


def test_coerce_text_values() -> None:
    params = coerce(
        DemoParams,
        {
            "steps": "20",
            "step-size": "2/255",
            "rate": "1e-3",
            "flag": "yes",
            "mode": "margin",
            "label": "7",
        },
    )
    assert params == DemoParams(20, 2 / 255, 1e-3, True, "margin", "7")
    assert coerce(DemoParams, {"step_size": "none", "flag": "off"}) == DemoParams(
        step_size=None, flag=False
    )
    assert coerce(DemoParams, {"steps": "1e2", "step_size": 0.5}) == DemoParams(
        steps=100, step_size=0.5
    )
    assert coerce(DemoParams) == DemoParams()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"steps": "2.5"}, "steps must be an integer"),
        ({"steps": True}, "steps must be an integer"),
        ({"flag": "maybe"}, "flag must be true or false"),
        ({"mode": "hinge"}, "mode must be one of ce, margin"),
        ({"rate": "fast"}, "rate must be a number"),
        ({"step_size": "big"}, "step_size must be a number"),
    ],
)
def test_coerce_rejects_ill_typed_values(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ParamsError, match=message):
        coerce(DemoParams, overrides)


def test_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(ParamsError) as info:
        coerce(DemoParams, {"stpes": "3"}, owner="pgd")
    assert str(info.value) == (
        "unknown parameter 'stpes' for pgd; valid parameters: steps, step_size, rate, flag, mode, label"
    )


def test_post_init_validation_becomes_params_error() -> None:
    with pytest.raises(ParamsError, match="steps and restarts must be >= 1"):
        PGD.from_options({"steps": "0"})
    with pytest.raises(ParamsError, match="valid parameters: steps, step_size"):
        PGD(stepz=3)


def test_describe_lists_types_defaults_and_help() -> None:
    infos = {i.name: i for i in describe(PGDParams)}
    assert infos["steps"].type == "int" and infos["steps"].default == 10 and infos["steps"].help
    assert infos["step_size"].type == "float?" and infos["step_size"].default is None
    assert infos["precision"].type == "fp32|bf16|fp16"
    assert all(i.help for i in infos.values())


@pytest.mark.parametrize(
    ("value", "text"),
    [(8 / 255, "8/255"), (2 / 255, "2/255"), (0.1, "0.1"), (0.2, "0.2"), (0.5, "0.5"), (1.0, "1"),
     (float(torch.tensor(8 / 255, dtype=torch.float32)), "8/255"), (0.0314, "0.0314"), (1e-5, "1e-05")],
)
def test_eps_is_shown_as_people_write_it(value: float, text: str) -> None:
    assert eps_text(value) == text
