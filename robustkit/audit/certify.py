"""Certified robustness by linear bound propagation (CROWN; Zhang et al., 2018).

A sample is *certified* at eps when a proof shows that no input in the threat ball (and in the
bounds) changes its prediction. That is stronger than an attack failing to find an example.
The engine uses certificates for two things:
- it skips samples that no attack can break, and so it stops spending a score-based attack's
  whole query budget on them;
- the report shows certified accuracy as a lower bound, under the upper bound that the attacks
  give.

How the bounds are computed:
- **Intermediate layers, forward.** Each neuron gets a lower and an upper linear function of
  the input, carried forward layer by layer. The cost grows with the input's size, so it suits
  small inputs.
- **Logit margins, backward.** The margins are bounded backward from the output, as in CROWN,
  using those intermediate bounds. That costs about one backward pass per class.

Supported models are ``nn.Sequential`` trees (``Normalized`` included) made of:
- affine layers: Linear, Conv2d, BatchNorm in eval mode, Flatten, average pooling,
  Dropout/Identity;
- nonlinear layers: ReLU and non-overlapping MaxPool2d.

Any other model is reported as unsupported, and nothing is skipped for it.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv2d_input
from torch.nn.modules.utils import _pair

from robustkit.modules import Model, Normalized, eval_mode
from robustkit.threat import Norm, ThreatModel

#: Affine layers whose weights have both signs, so bounds split into positive and negative parts.
_SIGNED = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)
#: Affine layers with a non-negative Jacobian: they map lower bounds to lower bounds.
_MONOTONE = (nn.Flatten, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Identity, nn.Dropout)
#: Every class the certifier knows, so that a subclass with its own forward is refused.
_KNOWN = (nn.Sequential, Normalized, *_SIGNED, *_MONOTONE, nn.ReLU, nn.MaxPool2d)
#: Largest input (values per sample) the forward bounds take on: their cost grows with it.
MAX_INPUT_SIZE = 4096
#: Entries of the largest bound tensor held at once; samples are taken in chunks below it.
_CHUNK_ENTRIES = 2**23
#: Margin a certificate needs above zero, against the rounding of fp32 sums.
MARGIN_TOLERANCE = 1e-4


class Unsupported(Exception):
    """The model is outside what the certifier can bound; the message says why."""


def check_norm(norm: Norm) -> None:
    """Raise ``Unsupported`` for a norm the bounds cannot handle (they do linf and l2)."""
    if norm not in (Norm.LINF, Norm.L2):
        raise Unsupported(f"the {norm.value} norm is not supported (linf and l2 only)")


class _Standardize(nn.Module):
    """The affine half of ``Normalized``, as a layer of its own."""

    def __init__(self, normalized: Normalized) -> None:
        super().__init__()
        self.standardize = normalized.standardize

    def forward(self, x: Tensor) -> Tensor:
        return self.standardize(x)


def _leaves(module: nn.Module) -> Iterator[nn.Module]:
    # a subclass that overrides forward computes something else than the layer bounded here
    if any(isinstance(module, cls) and type(module).forward is not cls.forward for cls in _KNOWN):
        raise Unsupported(f"{type(module).__name__} overrides its layer's forward; only the torch layers "
                          "themselves are supported")
    if module._forward_hooks or module._forward_pre_hooks:  # they can change what a layer computes
        raise Unsupported(f"{type(module).__name__} has forward hooks, which the bounds cannot see")
    if isinstance(module, nn.Sequential):
        for child in module:
            yield from _leaves(child)
    elif isinstance(module, Normalized):
        yield _Standardize(module)
        yield from _leaves(module.net)
    elif isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        raise Unsupported("convolutions with non-zero padding modes are not supported")
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and module.running_var is None:
        raise Unsupported("BatchNorm without running statistics is not supported")
    elif isinstance(module, (*_SIGNED, *_MONOTONE, nn.ReLU)):
        yield module
    elif isinstance(module, nn.MaxPool2d):
        if (module.kernel_size != module.stride or module.padding not in (0, (0, 0))
                or module.dilation not in (1, (1, 1)) or module.ceil_mode):
            raise Unsupported("only non-overlapping MaxPool2d (stride = kernel, no padding) is supported")
        yield module
    else:
        raise Unsupported(f"{type(module).__name__} layers are not supported (Sequential ReLU networks only)")


def _linear_part(module: nn.Module, v: Tensor, absolute: bool) -> Tensor:
    """The layer's map without its bias, or with its weights' absolute values (``|W| v``)."""
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        assert module.running_var is not None
        scale = torch.rsqrt(module.running_var + module.eps)
        scale = scale * module.weight if module.weight is not None else scale
        return v * (scale.abs() if absolute else scale).view(1, -1, *[1] * (v.dim() - 2))
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        # contiguous: the bound tensors are, and a channels-last weight (fast_layout) would make
        # oneDNN convert one side on every call
        weight = module.weight.contiguous()
        weight = weight.abs() if absolute else weight
        if isinstance(module, nn.Linear):
            return F.linear(v, weight)
        return F.conv2d(v, weight, None, module.stride, module.padding, module.dilation, module.groups)
    # a non-negative Jacobian (flatten, pooling, standardising): |W| = W, and f(v) - f(0) is W v
    return module(v) - module(torch.zeros((1, *v.shape[1:]), device=v.device, dtype=v.dtype))


@dataclass
class _ReluRelaxation:
    """CROWN's linear bounds of a ReLU: ``lower_slope * z <= relu(z) <= upper_slope * z + intercept``."""

    lower_slope: Tensor
    upper_slope: Tensor
    intercept: Tensor

    @classmethod
    def of(cls, low: Tensor, high: Tensor) -> _ReluRelaxation:
        unstable = (low < 0) & (high > 0)
        upper = torch.where(low >= 0, 1.0, torch.where(unstable, high / (high - low).clamp_min(1e-12), 0.0))
        # CROWN's adaptive lower line: slope 1 where the neuron is more often on than off
        lower = torch.where(low >= 0, 1.0, torch.where(unstable & (high > -low), 1.0, 0.0))
        return cls(lower, upper, torch.where(unstable, -upper * low, 0.0))


@dataclass
class _PoolRelaxation:
    """Bounds of a max-pool window from its inputs' bounds.

    Lower: the input with the largest lower bound (``index``). Upper: that same input where it
    dominates its window (its lower bound above every other upper bound), else the window's
    largest upper bound, a constant.
    """

    size: tuple[int, int]
    index: Tensor  #: (N, C, Ho, Wo) flat position of the chosen input in its plane
    dominates: Tensor
    top_high: Tensor
    in_size: tuple[int, int]

    @classmethod
    def of(cls, layer: nn.MaxPool2d, low: Tensor, high: Tensor) -> _PoolRelaxation:
        size = _pair(layer.kernel_size)
        top_low, index = F.max_pool2d(low, size, size, return_indices=True)
        others = high.flatten(2).scatter(2, index.flatten(2), -math.inf).view_as(high)
        dominates = top_low >= F.max_pool2d(others, size, size)
        return cls(size, index, dominates, F.max_pool2d(high, size, size), (low.shape[-2], low.shape[-1]))

    def gather(self, functions: Tensor) -> Tensor:
        """``functions`` (N, K, C, H, W) at each window's chosen input: (N, K, C, Ho, Wo)."""
        n, k, c = functions.shape[:3]
        index = self.index.flatten(2).unsqueeze(1).expand(n, k, c, -1)
        return functions.flatten(3).gather(3, index).view(n, k, *self.index.shape[1:])

    def scatter(self, rows: Tensor) -> Tensor:
        """Coefficients (N, R, C, Ho, Wo) on the window outputs, moved to the chosen inputs."""
        n, r = rows.shape[:2]
        index = self.index.unsqueeze(1).expand_as(rows).reshape(n * r, *rows.shape[2:])
        out = F.max_unpool2d(rows.reshape(n * r, *rows.shape[2:]), index, self.size, self.size,
                             output_size=self.in_size)
        return out.view(n, r, *out.shape[1:])


@dataclass
class _Layer:
    module: nn.Module
    in_shape: tuple[int, ...]
    bias: Tensor  #: the layer's output at zero, flattened (its constant term)


def _affine_backward(layer: _Layer, lam: Tensor) -> Tensor:
    """``lam @ J`` for an affine layer with Jacobian ``J``: rows of output coefficients to input ones."""
    module = layer.module
    if isinstance(module, nn.Linear):
        return lam @ module.weight
    if isinstance(module, nn.Conv2d) and not isinstance(module.padding, str):
        return conv2d_input((len(lam), *layer.in_shape), module.weight.contiguous(), lam, module.stride,
                            module.padding, module.dilation, module.groups)
    zeros = torch.zeros((len(lam), *layer.in_shape), dtype=lam.dtype, device=lam.device, requires_grad=True)
    with torch.enable_grad():  # exact for an affine map: its vector-Jacobian product anywhere
        (grad,) = torch.autograd.grad(module(zeros), zeros, lam)
    return grad


class Certifier:
    """Bounds for one model (in eval mode, whatever its mode) and one input shape."""

    def __init__(self, model: Model, sample_shape: tuple[int, ...], device: torch.device) -> None:
        if not isinstance(model, nn.Module):
            raise Unsupported("the model is not a torch module (an ONNX graph or a function)")
        self.input_size = math.prod(sample_shape)
        if self.input_size > MAX_INPUT_SIZE:
            raise Unsupported(f"inputs of {self.input_size} values are too large for bound propagation "
                              f"(at most {MAX_INPUT_SIZE})")
        self.model = model
        self.layers: list[_Layer] = []
        probe = torch.zeros((1, *sample_shape), device=device)
        with torch.no_grad(), eval_mode(model):
            for module in _leaves(model):
                in_shape = tuple(probe.shape[1:])
                probe = module(probe)
                bias = module(torch.zeros((1, *in_shape), device=device)).flatten()
                self.layers.append(_Layer(module, in_shape, bias))
        if probe.dim() != 2:
            raise Unsupported("the model's output is not (N, classes) scores")
        self.widest = max(math.prod(layer.in_shape) for layer in self.layers)

    @torch.no_grad()
    def certify(self, x: Tensor, y: Tensor, threat: ThreatModel) -> Tensor:
        """Boolean (N,): the prediction provably equals ``y`` everywhere in the threat ball."""
        lower = self.margin_bounds(x, y, threat)
        return lower.min(dim=1).values > MARGIN_TOLERANCE

    @torch.no_grad()
    def margin_bounds(self, x: Tensor, y: Tensor, threat: ThreatModel) -> Tensor:
        """Lower bounds, over the threat ball, of ``logit[y] - logit[j]`` for every class j (+inf at y)."""
        check_norm(threat.norm)
        x = x.float().contiguous()
        step = max(1, _CHUNK_ENTRIES // ((self.input_size + 1) * self.widest))
        if not len(x):
            return x.new_zeros(0, len(self.layers[-1].bias))
        with eval_mode(self.model):
            return torch.cat([self._margin_bounds(x[i:i + step], y[i:i + step], threat)
                              for i in range(0, len(x), step)])

    def _margin_bounds(self, x: Tensor, y: Tensor, threat: ThreatModel) -> Tensor:
        relaxations = self._forward_relaxations(x, threat)
        classes = len(self.layers[-1].bias)
        eye = torch.eye(classes, device=x.device)
        rows = eye[y].unsqueeze(1) - eye.unsqueeze(0)  # (N, classes, classes): e_y - e_j
        const = torch.zeros(rows.shape[:2], device=x.device)
        n, r = rows.shape[:2]
        for layer, relaxation in zip(reversed(self.layers), reversed(relaxations)):
            if isinstance(relaxation, _ReluRelaxation):
                positive, negative = rows.clamp(min=0), rows.clamp(max=0)
                const = const + (negative * relaxation.intercept.unsqueeze(1)).flatten(2).sum(-1)
                rows = positive * relaxation.lower_slope.unsqueeze(1) + negative * relaxation.upper_slope.unsqueeze(1)
            elif isinstance(relaxation, _PoolRelaxation):
                positive, negative = rows.clamp(min=0), rows.clamp(max=0)
                dominates = relaxation.dominates.unsqueeze(1)
                const = const + (torch.where(dominates, 0.0, negative * relaxation.top_high.unsqueeze(1))
                                 ).flatten(2).sum(-1)
                rows = relaxation.scatter(positive + torch.where(dominates, negative, 0.0))
            else:
                const = const + rows.flatten(2) @ layer.bias
                rows = _affine_backward(layer, rows.reshape(n * r, *rows.shape[2:])).view(n, r, *layer.in_shape)
        centre, spread = _centre_and_spread(rows.flatten(2).transpose(1, 2), x, threat)
        return (const + centre - spread).scatter(1, y.view(-1, 1), math.inf)

    def _forward_relaxations(self, x: Tensor, threat: ThreatModel) -> list[_ReluRelaxation | _PoolRelaxation | None]:
        """Carry linear lower and upper bounds of every neuron forward; relax each nonlinearity.

        The bounds are functions of the input, held as their midpoint and half-width: tensors
        (N, D + 1, *shape), where column ``d < D`` is the coefficient of input value ``d`` and
        column ``D`` the constant. Through an affine map W they become ``W mid`` and ``|W| half``:
        two products where lower and upper bounds would need four. ``half`` is None while the
        functions are exact (before the first nonlinearity).
        """
        d = self.input_size
        # Until the first nonlinearity the functions are exact and the same for every sample: one copy.
        mid = torch.eye(d + 1, d, device=x.device).view(1, d + 1, *x.shape[1:])
        half: Tensor | None = None
        relaxations: list[_ReluRelaxation | _PoolRelaxation | None] = []
        for layer in self.layers:  # the last one too: a model may end in a nonlinearity
            module = layer.module
            if isinstance(module, (nn.ReLU, nn.MaxPool2d)):
                lower, upper = (mid, mid) if half is None else (mid - half, mid + half)
                low, high = self._concretise(lower, upper, x, threat)
                if isinstance(module, nn.ReLU):
                    relu = _ReluRelaxation.of(low, high)
                    lower = lower * relu.lower_slope.unsqueeze(1)
                    upper = upper * relu.upper_slope.unsqueeze(1)
                    upper[:, d] += relu.intercept
                    relaxations.append(relu)
                else:
                    pool = _PoolRelaxation.of(module, low, high)
                    lower, upper = (t.expand(len(x), *t.shape[1:]) for t in (lower, upper))
                    lower, chosen = pool.gather(lower), pool.gather(upper)
                    constant = torch.zeros_like(chosen)
                    constant[:, d] = pool.top_high
                    upper = torch.where(pool.dominates.unsqueeze(1), chosen, constant)
                    relaxations.append(pool)
                mid, half = (upper + lower).mul_(0.5), upper.sub_(lower).mul_(0.5)
            else:
                mid, half = self._affine_forward(layer, mid, half)
                relaxations.append(None)
        return relaxations

    @staticmethod
    def _affine_forward(layer: _Layer, mid: Tensor, half: Tensor | None) -> tuple[Tensor, Tensor | None]:
        n, k = mid.shape[:2]
        new_mid = _linear_part(layer.module, mid.reshape(n * k, *mid.shape[2:]), absolute=False)
        shape = (n, k, *new_mid.shape[1:])
        new_mid = new_mid.view(shape)
        new_mid[:, -1] += layer.bias.view(shape[2:])  # the bias belongs to the constant column only
        if half is None:
            return new_mid, None
        return new_mid, _linear_part(layer.module, half.reshape(n * k, *half.shape[2:]), absolute=True).view(shape)

    def _concretise(self, lower: Tensor, upper: Tensor, x: Tensor, threat: ThreatModel) -> tuple[Tensor, Tensor]:
        """Interval bounds of each neuron: its lower function's minimum and upper function's maximum."""
        d, n, shape = self.input_size, len(x), lower.shape[2:]
        low_centre, low_spread = _centre_and_spread(lower[:, :d].reshape(len(lower), d, -1), x, threat)
        if lower is upper:
            high_centre, high_spread = low_centre, low_spread
        else:
            high_centre, high_spread = _centre_and_spread(upper[:, :d].reshape(len(upper), d, -1), x, threat)
        low = (low_centre - low_spread).view(n, *shape) + lower[:, d]
        return low, (high_centre + high_spread).view(n, *shape) + upper[:, d]


def _centre_and_spread(coef: Tensor, x: Tensor, threat: ThreatModel) -> tuple[Tensor, Tensor]:
    """For linear functions ``coef[:, :, k] . x'`` (coef (N or 1, D, K)) over the threat ball around
    each ``x``: their value at the ball's centre and their largest deviation, both (N, K).

    The minimum is centre - spread, the maximum centre + spread.
    """
    n, d = len(x), coef.shape[1]

    def apply(v: Tensor, c: Tensor) -> Tensor:  # (N, D) against (N or 1, D, K): a plain product if shared
        return v @ c[0] if len(c) == 1 else (v.unsqueeze(1) @ c).squeeze(1)

    if threat.norm is Norm.LINF:  # the box's centre and half-widths: the deviation is r . |coef|
        low, high = (b.reshape(n, d) for b in _input_box(x, threat))
        return apply((high + low) / 2, coef), apply((high - low) / 2, coef.abs())
    # l2: the bounds only shrink the ball, so leaving them out keeps the bounds sound
    return apply(x.reshape(n, d), coef), (threat.eps * coef.norm(dim=1)).expand(n, -1)


def _input_box(x: Tensor, threat: ThreatModel) -> tuple[Tensor, Tensor]:
    """Per-coordinate bounds of the threat ball inside the input bounds (exact for linf)."""
    low, high = threat.bounds
    return (x - threat.eps).clamp(low, high), (x + threat.eps).clamp(low, high)
