"""ART's input-transformation defences as robustkit ``transform`` defences.

Each wraps the model so that its forward pass first runs ART's numpy preprocessor (feature
squeezing, JPEG compression, median smoothing). Autograd cannot see through numpy, so by
default the gradient through the transform is zero: exactly the shattered gradient that makes
such defences look strong against gradient attacks. An audit shows it: gradient attacks
barely move while a score-based attack (``square``) still breaks the model, or
``gradient=bpda`` (the straight-through estimate ART itself uses) breaks it with gradients.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from robustkit import Dataset, Defence, DefenceResult, Model, RobustkitError, RunConfig, ThreatModel
from robustkit.params import param


class _NumpyTransform(torch.autograd.Function):
    """Apply an ART preprocessor; backward is zero, or the identity (BPDA) on request."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, preprocessor: Any, bpda: bool) -> Tensor:
        ctx.bpda = bpda
        out, _ = preprocessor(x.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(out).to(x.device, x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return (grad if ctx.bpda else torch.zeros_like(grad)), None, None


class PreprocessedModel(nn.Module):
    """``model(transform(x))`` with an ART preprocessor as the transform."""

    def __init__(self, model: Model, preprocessor: Any, *, bpda: bool = False) -> None:
        super().__init__()
        self.model = model
        self.preprocessor = preprocessor
        self.bpda = bpda

    def forward(self, x: Tensor) -> Tensor:
        return self.model(_NumpyTransform.apply(x, self.preprocessor, self.bpda))


@dataclass(frozen=True)
class TransformParams:
    gradient: Literal["zero", "bpda"] = param("zero", "gradient through the transform: zero, bpda")


class ArtTransform(Defence):
    """The one adapter behind every ART input-transformation defence; subclasses declare."""

    kind = "transform"
    masks_gradients = True
    Params = TransformParams
    art_class: ClassVar[str]  #: class name in ``art.defences.preprocessor``
    fixed: ClassVar[dict[str, Any]] = {}  #: ART keywords that robustkit's convention fixes

    def apply(
        self, model: nn.Module, data: Dataset | None, *, threat: ThreatModel, run: RunConfig | None = None
    ) -> DefenceResult:
        from art.defences import preprocessor

        settings = dataclasses.asdict(self.params)
        gradient = settings.pop("gradient")
        try:
            transform = getattr(preprocessor, self.art_class)(
                clip_values=threat.bounds, apply_fit=False, apply_predict=True,
                **self.fixed, **settings,
            )
        except ValueError as err:
            message = f"ART rejected the settings of art:{self.name}: {err}"
            raise RobustkitError(message) from None
        how = ("straight-through (BPDA)" if gradient == "bpda" else
               "zero, so gradient attacks are masked: audit with a score-based attack (square)")
        notes = [
            f"ART {self.art_class} runs in numpy before the model; its gradient is {how}",
            "not exported: the transform is numpy code outside the torch graph, so an ONNX export "
            "would contain the undefended model only",
        ]
        wrapped = PreprocessedModel(model, transform, bpda=gradient == "bpda")
        return DefenceResult(wrapped, notes=notes, survives_export=False)


@dataclass(frozen=True)
class FeatureSqueezingParams(TransformParams):
    bit_depth: int = param(8, "bits per value kept (1 to 64)")


class FeatureSqueezing(ArtTransform):
    """Feature squeezing (Xu et al.): quantise each input value to a few bits."""

    name = "feature-squeezing"
    aliases = ("squeeze",)
    Params = FeatureSqueezingParams
    art_class = "FeatureSqueezing"
    summary = "ART's FeatureSqueezing: reduce the bit depth of the inputs (Xu et al., 2018)"


@dataclass(frozen=True)
class JpegParams(TransformParams):
    quality: int = param(50, "JPEG quality (1 to 95)")


class JpegCompression(ArtTransform):
    """JPEG compression of the inputs (Dziugaite et al., 2016)."""

    name = "jpeg"
    aliases = ("jpeg-compression",)
    Params = JpegParams
    art_class = "JpegCompression"
    fixed = {"channels_first": True, "verbose": False}
    summary = "ART's JpegCompression: JPEG-compress the inputs before the model"


@dataclass(frozen=True)
class SpatialSmoothingParams(TransformParams):
    window_size: int = param(3, "side of the median filter's window")


class SpatialSmoothing(ArtTransform):
    """Median filtering of the inputs (Xu et al., 2018)."""

    name = "spatial-smoothing"
    aliases = ("median-filter",)
    Params = SpatialSmoothingParams
    art_class = "SpatialSmoothing"
    fixed = {"channels_first": True}
    summary = "ART's SpatialSmoothing: median-filter the inputs before the model"


DEFENCES: tuple[type[Defence], ...] = (FeatureSqueezing, JpegCompression, SpatialSmoothing)
