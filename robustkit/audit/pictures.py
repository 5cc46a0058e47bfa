"""Pictures of the attacks: what an attack did to a few inputs, which convinces a reader more
than a table does.

The engine keeps the few examples (``engine.ExampleKeeper``): samples broken at the smallest
eps first, then some the attacks could not break. Each becomes one PNG: the clean input, the
adversarial one and the perturbation amplified to be visible, with the true class and the
model's answer and confidence before and after. Panels are placed pixel for pixel
(``Figure.figimage``), upscaled by a whole factor without interpolation, so an 8x8 digit stays
sharp and the PNG can be read back: ``attacks/pictures.json`` gives each panel's box, and
``attacks/examples.npz`` the exact arrays. Only inputs shaped C x H x W are pictured.
"""
from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from robustkit.audit.engine import ExampleKeeper, KeptExample
from robustkit.modules import Model, predict_logits
from robustkit.threat import eps_text

#: Samples pictured: broken ones (smallest eps first), then ones that survived.
BROKEN_PICTURES = 4
SURVIVED_PICTURES = 2
#: Panels are upscaled (nearest, by a whole factor) to at least this many pixels a side.
PANEL_PIXELS = 128
FOLDER = "attacks"
_MARGIN, _GAP, _TITLE, _LABEL, _DPI = 10, 16, 44, 22, 100
PANELS = ("clean", "adversarial", "perturbation")


@dataclass(frozen=True)
class Answer:
    """The model's predicted class and its softmax confidence."""

    label: int
    confidence: float


@dataclass(frozen=True)
class AttackPicture:
    """One pictured sample: its clean and adversarial input and the model's answers."""

    example: KeptExample
    clean: Tensor  #: (C, H, W), fp32
    label: int
    before: Answer
    after: Answer
    names: tuple[str, ...] = ()  #: class names, when the data has them

    def name(self, label: int) -> str:
        return self.names[label] if 0 <= label < len(self.names) else str(label)


def is_image(x: Tensor) -> bool:
    """Inputs shaped N x C x H x W (anything else is no picture)."""
    return x.dim() == 4


def example_keeper(x: Tensor) -> ExampleKeeper | None:
    """A keeper for the engine, or None for inputs that are no images."""
    return ExampleKeeper(BROKEN_PICTURES, SURVIVED_PICTURES) if is_image(x) else None


def attack_pictures(model: Model, x: Tensor, y: Tensor, kept: Sequence[KeptExample],
                    names: Sequence[str] = ()) -> list[AttackPicture]:
    """The model's answers (fp32) on the clean and adversarial inputs of ``kept``."""
    if not kept:
        return []
    clean = torch.stack([x[e.index].detach().float().cpu() for e in kept])
    adversarial = torch.stack([e.x_adv for e in kept])
    probabilities = predict_logits(model, torch.cat([clean, adversarial])).float().softmax(1).cpu()
    confidence, label = probabilities.max(1)
    n = len(kept)
    return [AttackPicture(e, clean[i], int(y[e.index]), Answer(int(label[i]), float(confidence[i])),
                          Answer(int(label[n + i]), float(confidence[n + i])), tuple(names))
            for i, e in enumerate(kept)]


@dataclass(frozen=True)
class Layout:
    """Where the panels of a picture lie, in pixels from the top left."""

    scale: int  #: each input pixel is a scale x scale block
    width: int
    height: int
    boxes: Mapping[str, tuple[int, int, int, int]]  #: panel -> (left, top, width, height)


def layout(height: int, width: int) -> Layout:
    scale = max(1, math.ceil(PANEL_PIXELS / max(height, width)))
    w, h = width * scale, height * scale
    boxes = {name: (_MARGIN + i * (w + _GAP), _TITLE, w, h) for i, name in enumerate(PANELS)}
    return Layout(scale, 2 * _MARGIN + 3 * w + 2 * _GAP, _TITLE + h + _LABEL, boxes)


def channel_mode(count: int) -> str:
    """How inputs with ``count`` channels are drawn: grey, RGB, or the mean of the channels in grey."""
    return {1: "grey", 3: "RGB"}.get(count, f"mean of {count} channels")


def _channels(image: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (H, W, 3) floats for display, as ``channel_mode`` says."""
    count = image.shape[0]
    if count == 3:
        return image.transpose(1, 2, 0)
    return np.repeat((image[0] if count == 1 else image.mean(0))[:, :, None], 3, axis=2)


def _pixels(image: np.ndarray, scale: int) -> np.ndarray:
    """Values in [0, 1] as uint8 RGB, each pixel a scale x scale block (nearest: no blur)."""
    levels = np.rint(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    return np.kron(levels, np.ones((scale, scale, 1), dtype=np.uint8))


def _title(picture: AttackPicture) -> str:
    e = picture.example
    return f"sample {e.index}: {'broken by' if e.broken else 'survived'} {e.attack} at eps {eps_text(e.eps)}"


def _answers(picture: AttackPicture) -> str:
    return (f"true {picture.name(picture.label)}; before: {picture.name(picture.before.label)} "
            f"({picture.before.confidence:.1%}); after: {picture.name(picture.after.label)} "
            f"({picture.after.confidence:.1%})")


def caption(picture: AttackPicture) -> str:
    """One line: what happened to the sample, in words (the picture's two title lines)."""
    return f"{_title(picture)}; {_answers(picture)}"


def picture_png(picture: AttackPicture, bounds: tuple[float, float]) -> tuple[bytes, Layout]:
    """The picture as a PNG (object API: pyplot's global state stays untouched) and its layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    low, high = bounds
    clean = picture.clean.numpy().astype(np.float64)
    adversarial = picture.example.x_adv.numpy().astype(np.float64)
    delta = adversarial - clean
    largest = float(np.abs(delta).max())
    shown_clean = _channels((clean - low) / (high - low))
    shown_adversarial = _channels((adversarial - low) / (high - low))
    shown_delta = _channels(0.5 + delta / (2 * largest) if largest > 0 else np.full_like(delta, 0.5))
    amplified = (high - low) / (2 * largest) if largest > 0 else 1.0
    place = layout(clean.shape[1], clean.shape[2])
    fig = Figure(figsize=(place.width / _DPI, place.height / _DPI), dpi=_DPI)
    FigureCanvasAgg(fig)
    labels = {"clean": f"clean ({channel_mode(clean.shape[0])})", "adversarial": "adversarial",
              "perturbation": f"perturbation x{amplified:.0f} (grey: 0)"}
    for name, image in zip(PANELS, (shown_clean, shown_adversarial, shown_delta)):
        left, top, w, h = place.boxes[name]
        fig.figimage(_pixels(image, place.scale), xo=left, yo=place.height - top - h, origin="upper")
        fig.text((left + w / 2) / place.width, (place.height - top - h - 4) / place.height, labels[name],
                 ha="center", va="top", fontsize=8)
    colour = "#b42318" if picture.example.broken else "#1b7f3b"
    fig.text(_MARGIN / place.width, 1 - 6 / place.height, _title(picture), ha="left", va="top", fontsize=9,
             color=colour, weight="bold")
    fig.text(_MARGIN / place.width, 1 - 24 / place.height, _answers(picture), ha="left", va="top", fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)  # no bbox_inches: the layout's pixels stay where they are
    return buffer.getvalue(), place


@dataclass(frozen=True)
class RenderedPicture:
    file: str  #: path under the report folder
    png: bytes
    caption: str


def render_pictures(pictures: Sequence[AttackPicture],
                    bounds: tuple[float, float]) -> tuple[list[RenderedPicture], dict[str, bytes | str]]:
    """The pictures as PNGs, and the files to write: the PNGs, ``pictures.json`` (what each shows
    and where its panels lie) and ``examples.npz`` (the exact clean and adversarial arrays)."""
    rendered, records = [], []
    for number, picture in enumerate(pictures, 1):
        png, place = picture_png(picture, bounds)
        file = f"{FOLDER}/{number}.png"
        rendered.append(RenderedPicture(file, png, caption(picture)))
        e = picture.example
        records.append({"file": file, "index": e.index, "label": picture.label, "broken": e.broken,
                        "attack": e.attack, "eps": e.eps, "eps_text": eps_text(e.eps),
                        "before": vars(picture.before), "after": vars(picture.after),
                        "channels": channel_mode(picture.clean.shape[0]), "scale": place.scale,
                        "panels": {k: list(v) for k, v in place.boxes.items()}})
    files: dict[str, bytes | str] = {r.file: r.png for r in rendered}
    if pictures:
        arrays = io.BytesIO()
        np.savez_compressed(arrays, index=np.array([p.example.index for p in pictures]),
                            clean=np.stack([p.clean.numpy() for p in pictures]),
                            adversarial=np.stack([p.example.x_adv.numpy() for p in pictures]))
        files[f"{FOLDER}/examples.npz"] = arrays.getvalue()
        files[f"{FOLDER}/pictures.json"] = json.dumps(
            {"bounds": list(bounds), "pictures": records}, indent=2)
    return rendered, files


def describe_selection() -> str:
    """The rule that chose the pictured samples, for the report."""
    return (f"Up to {BROKEN_PICTURES} samples broken at the smallest eps (ties: lowest index), then up to "
            f"{SURVIVED_PICTURES} that no attack broke, attacked at the largest eps. Perturbations are amplified "
            "to fill the grey scale (mid-grey: unchanged).")

