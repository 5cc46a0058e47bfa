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

Floating point. A certificate is about the model as it runs: its fp32 forward pass, which is
not exact arithmetic. Two things keep it sound:
- **The bounds are computed in fp64**, on a float64 copy of the layers (the fp32 weights and
  statistics, converted exactly; made at each call, so the bounds follow the model) and of the
  inputs. Their own rounding, about 1e-16 relative, is left out: fp64's unit roundoff is 2^29
  times smaller than fp32's, whose error is accounted for below.
- **The model's rounding is bounded, not guessed.** Each layer's output as computed,
  ``fl(layer(a))``, differs from the exact ``layer(a)`` by at most the standard forward error
  bound (Higham, *Accuracy and Stability of Numerical Algorithms*, 3.1 and 3.5): with ``u`` the
  unit roundoff (2^-24 for fp32) and ``gamma(k) = k u / (1 - k u)``,

  - Linear and Conv2d, fan-in ``n``: ``|fl(W a + b) - (W a + b)| <= g (|W| |a| + |b|)`` with
    ``g = gamma(n + 1)``, for any order of summation, blocking or FMA; when torch may round
    the operands to TF32 or bf16 (see below), ``g = (1 + v)^2 (1 + gamma(n + 1)) - 1`` with
    ``v`` the unit roundoff of that format (2^-11, 2^-8);
  - BatchNorm and the standardisation of ``Normalized``, per channel ``s a + t``:
    ``gamma(10) (|s| |a| + |s| |mean| + |bias|)`` (10 roundings cover any order of computing the
    scale and shift, fused, with an approximate reciprocal square root), ``gamma(3)`` for
    ``(a - mean) / std``;
  - average pooling over ``k`` values: ``gamma(k + 2)`` times the average of ``|a|``;
  - ReLU, max-pooling, Flatten, Identity, Dropout (eval): exact.

  Plus an absolute ``2 (n + 1)`` times the smallest normal number for underflow. The error of
  the computed activations ``E`` is carried forward with the bounds of their size ``A``
  (``|computed activation| <= A``): through an affine layer ``E' = |W| E + g (|W| A + |b|)``;
  ReLU keeps ``min(E, relu(high + E))``, a max-pool takes each window's largest ``E``. ``A``
  comes from the interval bounds at each nonlinearity (``max(|low|, |high|) + E``) and from
  ``|W| A + |b|`` (plus rounding) in between. At the logits, ``margin_bounds`` returns the exact
  lower bound of ``logit[y] - logit[j]`` minus ``E[y] + E[j]``: a lower bound of the margin the
  fp32 model computes, anywhere in the ball. ``certify`` needs it above zero, so the fp32
  argmax is y with no tie. There is no fixed tolerance: the margin needed scales with the
  model's weights and activations (on the digits test models 3e-5 to 1.5e-2 in logit units,
  about 0.1% of the largest logit for the CNN; it proved the same samples as a 1e-4 tolerance).

What is assumed of the model's evaluation: IEEE arithmetic with round-to-nearest, in the dtype
of its parameters (fp32, or fp64 with u = 2^-53; half-precision models are refused, as the
bound grows past use with fan-in), without autocast, as the engine judges every attack's
success; matmuls and convolutions that sum products (direct, GEMM, any order, FMA). TF32 and
bf16 "fast fp32" modes are read when certifying (``torch.get_float32_matmul_precision()``,
``torch.backends.cuda.matmul``/``cudnn``'s ``allow_tf32`` and ``fp32_precision``, the oneDNN
``fp32_precision`` on the CPU) and widen the bound of the affected layers; cuDNN's TF32
convolutions are on by default on the GPU, so GPU certificates are looser there. Not covered:
FFT or Winograd convolution algorithms (``torch.backends.cudnn.benchmark`` may pick them),
whose error is not bounded by ``|W| |a|``, and settings changed between certifying and attacking.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv2d_input
from torch.nn.modules.utils import _pair
from torch.nn.utils import parametrize

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
#: Entries of the largest bound tensor held at once (fp64: 64 MiB); samples are taken in chunks below it.
_CHUNK_ENTRIES = 2**23
#: The dtype the bounds are computed in: its rounding is negligible next to the model's.
_BOUND_DTYPE = torch.float64
#: Unit roundoff of the dtypes a model may run in (half precision is refused).
_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}
#: Unit roundoff of the operands of an fp32 matmul or convolution under torch's "fast fp32" settings.
_OPERAND_ROUNDOFF = {"tf32": 2.0**-11, "high": 2.0**-11, "bf16": 2.0**-8, "medium": 2.0**-8}
#: Roundings allowed for a per-channel affine map (BatchNorm: var + eps, sqrt, reciprocal, the
#: scale, the shift, the product and the sum, with room for an approximate rsqrt and fusion).
_BATCHNORM_ROUNDINGS = 10
#: ... and for the standardisation of ``Normalized``, ``(x - mean) / std`` (or a reciprocal's product).
_STANDARDIZE_ROUNDINGS = 3


class Unsupported(Exception):
    """The model is outside what the certifier can bound; the message says why."""


def check_norm(norm: Norm) -> None:
    """Raise ``Unsupported`` for a norm the bounds cannot handle (they do linf and l2)."""
    if norm not in (Norm.LINF, Norm.L2):
        raise Unsupported(f"the {norm.value} norm is not supported (linf and l2 only)")


class _Standardize(nn.Module):
    """The affine half of ``Normalized``, ``(x - mean) / std``, as a layer of its own."""

    mean: Tensor
    std: Tensor

    def __init__(self, normalized: Normalized) -> None:
        super().__init__()
        # the model's own tensors (not copies), so that the bounds follow them
        self.register_buffer("mean", normalized.mean)
        self.register_buffer("std", normalized.std)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


#: What runs when a module is called: a class or an object that sets one of these computes
#: something else than the layer bounded here.
_CALL_PATH = ("forward", "__call__", "_call_impl", "_wrapped_call_impl")


def _leaves(module: nn.Module) -> Iterator[nn.Module]:
    known = next((cls for cls in _KNOWN if isinstance(module, cls)), None)
    if known is not None and any(getattr(type(module), name) is not getattr(known, name) for name in _CALL_PATH):
        raise Unsupported(f"{type(module).__name__} overrides its layer's forward; only the torch layers "
                          "themselves are supported")
    if set(_CALL_PATH) & set(vars(module)):
        raise Unsupported(f"this {type(module).__name__} has a forward of its own, set on the object")
    if module._forward_hooks or module._forward_pre_hooks:  # they can change what a layer computes
        raise Unsupported(f"{type(module).__name__} has forward hooks, which the bounds cannot see")
    if isinstance(module, nn.Sequential):
        for child in module:
            yield from _leaves(child)
    elif isinstance(module, Normalized):
        if type(module).standardize is not Normalized.standardize:
            raise Unsupported(f"{type(module).__name__} overrides Normalized.standardize")
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


def _in_bound_dtype(module: nn.Module) -> nn.Module:
    """An fp64 copy of a leaf in eval mode, with the values the model computes in its own dtype."""
    module = copy.deepcopy(module).eval()
    if parametrize.is_parametrized(module):  # weight norm &c.: keep the weight as computed, then convert
        names: nn.ModuleDict = module.parametrizations  # type: ignore[assignment]
        for name in list(names):
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return module.to(_BOUND_DTYPE)


def _gamma(k: int, unit: float) -> float:
    """Higham's ``gamma_k = k u / (1 - k u)``: the relative error bound of k roundings (inf past k u = 1/2)."""
    return k * unit / (1 - k * unit) if k * unit < 0.5 else math.inf


def _precision_setting(*path: str) -> str:
    """A ``torch.backends`` ``fp32_precision`` setting, or '' where this torch has none."""
    obj: object = torch.backends
    for name in path:
        obj = getattr(obj, name, None)
    return str(getattr(obj, "fp32_precision", ""))


def _operand_roundoff(module: nn.Module, device: torch.device) -> float:
    """Unit roundoff to which torch may round the operands of this fp32 matmul or convolution.

    0 in full fp32 ("highest", "ieee"); 2^-11 where TF32 is allowed, 2^-8 where bf16 is. Read at
    each call, as these are global settings.
    """
    settings = [torch.get_float32_matmul_precision()]
    matmul = isinstance(module, nn.Linear)
    if device.type == "cuda":
        tf32 = torch.backends.cuda.matmul.allow_tf32 if matmul else torch.backends.cudnn.allow_tf32
        settings += ["tf32" if tf32 else "", _precision_setting(*(("cuda", "matmul") if matmul else ("cudnn", "conv")))]
    else:
        settings.append(_precision_setting("mkldnn", "matmul" if matmul else "conv"))
    return max(_OPERAND_ROUNDOFF.get(setting, 0.0) for setting in settings)


@dataclass
class _Rounding:
    """What the model's own rounding does to the activations it computes, over the whole ball.

    ``error`` bounds ``|computed - exact|`` and ``size`` bounds ``|computed|``, per sample and
    neuron, for the activations entering the next layer (fp64 tensors (N, *shape)).
    ``overflow`` (N,) marks samples where a computed value may exceed the dtype's range.
    """

    error: Tensor
    size: Tensor
    dtype: torch.dtype  #: the model's
    device: torch.device  #: where the model runs (for its TF32 settings)

    def __post_init__(self) -> None:
        self.unit = _UNIT_ROUNDOFF[self.dtype]
        self.tiny = torch.finfo(self.dtype).tiny  # the error of an underflow, flushed to zero or not
        self.overflow = torch.zeros(len(self.size), dtype=torch.bool, device=self.size.device)

    def affine(self, module: nn.Module, in_shape: tuple[int, ...]) -> None:
        """Through an affine layer: its Jacobian carries the error in, and its own rounding adds."""
        error, size = self.error, self.size
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            fan_in = module.weight[0].numel()  # in_features, or in_channels / groups * kernel area
            operand = _operand_roundoff(module, self.device) if self.dtype == torch.float32 else 0.0
            g = (1 + operand) ** 2 * (1 + _gamma(fan_in + 1, self.unit)) - 1
            floor = 2 * (fan_in + 1) * self.tiny
            both = _linear_part(module, torch.cat([error + g * size, size]), absolute=True)
            spread, size = both[:len(error)], both[len(error):]
            bias: Tensor | float = 0.0
            if module.bias is not None:  # along the last dim (Linear) or the channels (Conv2d)
                bias = module.bias.abs().view(-1, 1, 1) if isinstance(module, nn.Conv2d) else module.bias.abs()
            self.error, self.size = spread + g * bias + floor, (1 + g) * (size + bias) + floor
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, _Standardize)):
            if isinstance(module, _Standardize):  # (a - mean) / std
                scale, shift = 1 / module.std, module.mean.abs() / module.std
                g = _gamma(_STANDARDIZE_ROUNDINGS, self.unit)
            else:  # (a - mean) * weight / sqrt(var + eps) + bias, |shift| <= |scale mean| + |bias|
                assert module.running_var is not None and module.running_mean is not None
                scale = torch.rsqrt(module.running_var + module.eps)
                scale = scale * module.weight if module.weight is not None else scale
                shift = (scale * module.running_mean).abs()
                shift = shift + module.bias.abs() if module.bias is not None else shift
                g = _gamma(_BATCHNORM_ROUNDINGS, self.unit)
            view = (1, -1, *[1] * (error.dim() - 2))
            scale, shift = scale.abs().reshape(view), shift.reshape(view)
            floor = 2 * _BATCHNORM_ROUNDINGS * self.tiny
            self.error = scale * (error + g * size) + g * shift + floor
            self.size = (1 + g) * (scale * size + shift) + floor
        elif isinstance(module, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):  # a sum of k values, divided
            k = math.prod(_pair(module.kernel_size)) if isinstance(module, nn.AvgPool2d) else math.prod(in_shape[-2:])
            g = _gamma(k + 2, self.unit)
            self.error = module(error + g * size) + 2 * (k + 2) * self.tiny
            self.size = (1 + g) * module(size) + 2 * (k + 2) * self.tiny
        else:  # Flatten, Identity, Dropout in eval mode: values are moved, not computed
            self.error, self.size = module(error), module(size)
        self.overflow |= ~(self.size <= torch.finfo(self.dtype).max).flatten(1).all(1)  # nan included

    def nonlinear(self, module: nn.Module, low: Tensor, high: Tensor) -> None:
        """Through a ReLU or max-pool, given the exact pre-activation bounds ``[low, high]``."""
        error = self.error
        size = torch.minimum(self.size, torch.maximum(low.abs(), high.abs()) + error)
        if isinstance(module, nn.ReLU):  # 1-Lipschitz; both values lie in [0, relu(high + error)]
            cap = (high + error).clamp_min(0)
            self.error, self.size = torch.minimum(error, cap), torch.minimum(size, cap)
        else:  # a window's max moves by at most its largest error
            window = _pair(module.kernel_size)
            self.error, self.size = F.max_pool2d(error, window, window), F.max_pool2d(size, window, window)


class Certifier:
    """Bounds for one model (in eval mode, whatever its mode) and one input shape.

    The layers are found here; their weights are read (and converted to fp64) at each call.
    """

    def __init__(self, model: Model, sample_shape: tuple[int, ...], device: torch.device) -> None:
        if not isinstance(model, nn.Module):
            raise Unsupported("the model is not a torch module (an ONNX graph or a function)")
        self.input_size = math.prod(sample_shape)
        if self.input_size > MAX_INPUT_SIZE:
            raise Unsupported(f"inputs of {self.input_size} values are too large for bound propagation "
                              f"(at most {MAX_INPUT_SIZE})")
        self.model = model
        self.device = torch.device(device)
        leaves = list(_leaves(model))
        dtypes = {t.dtype for leaf in leaves for t in (*leaf.parameters(), *leaf.buffers()) if t.is_floating_point()}
        if len(dtypes) > 1:
            raise Unsupported(f"the model mixes dtypes ({', '.join(sorted(map(str, dtypes)))})")
        #: The dtype the model runs in, whose rounding the certificates allow for.
        self.dtype = dtypes.pop() if dtypes else torch.float32
        if self.dtype not in _UNIT_ROUNDOFF:
            raise Unsupported(f"{self.dtype} models are not supported: the rounding bounds cover fp32 and fp64")
        self.leaves: list[tuple[nn.Module, tuple[int, ...]]] = []
        probe = torch.zeros((1, *sample_shape), device=device, dtype=self.dtype)
        with torch.no_grad(), eval_mode(model):
            for module in leaves:
                self.leaves.append((module, tuple(probe.shape[1:])))
                probe = module(probe)
        if probe.dim() != 2:
            raise Unsupported("the model's output is not (N, classes) scores")
        self.classes = probe.shape[1]
        self.widest = max(math.prod(in_shape) for _, in_shape in self.leaves)

    @torch.no_grad()
    def check_reproduces(self, x: Tensor, threat: ThreatModel, seed: int = 0) -> None:
        """Raise ``Unsupported`` unless the layers found, run in turn, give the model's own
        logits on ``x`` and on random points of the threat ball around it: the bounds are about
        those layers, so a model that computes anything else (a global hook, a patched call, a
        wrapper the layer walk cannot see) would get certificates about another function."""
        if not len(x):
            return
        generator = torch.Generator().manual_seed(seed)
        noise = torch.rand(x.shape, generator=generator, dtype=torch.float64) * 2 - 1
        if threat.norm is Norm.L2:
            noise = noise / noise.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
        low, high = threat.bounds
        nearby = (x.double() + threat.eps * noise.to(x.device)).clamp(low, high)
        with eval_mode(self.model):
            for points in (x.to(self.device, self.dtype), nearby.to(self.device, self.dtype)):
                expected = self.model(points)
                found = points
                for module, _ in self.leaves:
                    found = module(found)
                scale = float(found.abs().max().clamp_min(1))
                if not isinstance(expected, Tensor) or expected.shape != found.shape or not torch.allclose(
                        found.double(), expected.double(), rtol=1e-5, atol=1e-5 * scale):
                    raise Unsupported("the model's output is not what its layers compute in turn (a hook, a "
                                      "patched forward or call?): the bounds would be about another function")

    @torch.no_grad()
    def certify(self, x: Tensor, y: Tensor, threat: ThreatModel) -> Tensor:
        """Boolean (N,): the model's prediction, as computed in its dtype, is ``y`` everywhere in the threat ball."""
        return self.margin_bounds(x, y, threat).min(dim=1).values > 0

    @torch.no_grad()
    def margin_bounds(self, x: Tensor, y: Tensor, threat: ThreatModel) -> Tensor:
        """Lower bounds, over the threat ball, of ``logit[y] - logit[j]`` for every class j (+inf at y).

        The logits are those the model computes in its own dtype (fp32), rounding included (see
        the module's docstring); the bounds are fp64.
        """
        check_norm(threat.norm)
        x = x.to(_BOUND_DTYPE).contiguous()
        step = max(1, _CHUNK_ENTRIES // ((self.input_size + 1) * self.widest))
        if not len(x):
            return x.new_zeros(0, self.classes)
        layers = self._layers()
        return torch.cat([self._margin_bounds(layers, x[i:i + step], y[i:i + step], threat)
                          for i in range(0, len(x), step)])

    def _layers(self) -> list[_Layer]:
        """The model's layers now, as fp64 copies in eval mode, with their constant terms."""
        layers = []
        for module, in_shape in self.leaves:
            copied = _in_bound_dtype(module)
            bias = copied(torch.zeros((1, *in_shape), device=self.device, dtype=_BOUND_DTYPE)).flatten()
            layers.append(_Layer(copied, in_shape, bias))
        return layers

    def _margin_bounds(self, layers: list[_Layer], x: Tensor, y: Tensor, threat: ThreatModel) -> Tensor:
        relaxations, rounding = self._forward_relaxations(layers, x, threat)
        eye = torch.eye(self.classes, device=x.device, dtype=x.dtype)
        rows = eye[y].unsqueeze(1) - eye.unsqueeze(0)  # (N, classes, classes): e_y - e_j
        const = torch.zeros(rows.shape[:2], device=x.device, dtype=x.dtype)
        n, r = rows.shape[:2]
        for layer, relaxation in zip(reversed(layers), reversed(relaxations)):
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
        # the computed margin is off the exact one by at most error[y] + error[j]; a computed
        # value past the dtype's range (inf, nan) proves nothing
        error = rounding.error.gather(1, y.view(-1, 1)) + rounding.error
        lower = torch.where(rounding.overflow.unsqueeze(1), -math.inf, const + centre - spread - error)
        return lower.scatter(1, y.view(-1, 1), math.inf)

    def _forward_relaxations(self, layers: list[_Layer], x: Tensor, threat: ThreatModel
                             ) -> tuple[list[_ReluRelaxation | _PoolRelaxation | None], _Rounding]:
        """Carry linear lower and upper bounds of every neuron forward; relax each nonlinearity.

        The bounds are functions of the input, held as their midpoint and half-width: tensors
        (N, D + 1, *shape), where column ``d < D`` is the coefficient of input value ``d`` and
        column ``D`` the constant. Through an affine map W they become ``W mid`` and ``|W| half``:
        two products where lower and upper bounds would need four. ``half`` is None while the
        functions are exact (before the first nonlinearity).

        Alongside, the bound of the model's rounding error is carried to the logits.
        """
        d = self.input_size
        # Until the first nonlinearity the functions are exact and the same for every sample: one copy.
        mid = torch.eye(d + 1, d, device=x.device, dtype=x.dtype).view(1, d + 1, *x.shape[1:])
        half: Tensor | None = None
        relaxations: list[_ReluRelaxation | _PoolRelaxation | None] = []
        # the inputs are the attack's fp32 values themselves: exact, and inside the ball's box
        box = _input_box(x, threat)
        rounding = _Rounding(torch.zeros_like(x), torch.maximum(box[0].abs(), box[1].abs()), self.dtype, self.device)
        for layer in layers:  # the last one too: a model may end in a nonlinearity
            module = layer.module
            if isinstance(module, (nn.ReLU, nn.MaxPool2d)):
                lower, upper = (mid, mid) if half is None else (mid - half, mid + half)
                low, high = self._concretise(lower, upper, x, threat)
                rounding.nonlinear(module, low, high)
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
                rounding.affine(module, layer.in_shape)
                relaxations.append(None)
        return relaxations, rounding

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
