"""Pictures of the attacks: the examples pictured are real (inside the ball and the bounds, and
broken where the table says), the PNGs show exactly those arrays, any channel count is drawn,
and inputs that are no images get no pictures and no error."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from matplotlib.image import imread
from safetensors.torch import save_file
from torch import nn

from robustkit.audit.engine import NEVER, ExampleKeeper, KeptExample
from robustkit.audit.pictures import attack_pictures, example_keeper, layout, picture_png, render_pictures
from robustkit.cli import cli
from robustkit.data import load_digits
from robustkit.testing import trained_digits_model

EPS = (0.05, 0.1)


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real audit of the digits CNN, written to a folder."""
    folder = tmp_path_factory.mktemp("audit")
    save_file(trained_digits_model("cnn").state_dict(), str(folder / "cnn.safetensors"))
    with pytest.MonkeyPatch.context() as patch:  # built-in plugins only, for this module
        from robustkit.plugin import host as host_module
        from robustkit.plugin.host import Host

        patch.setattr(host_module, "_host", Host(entry_points=False))
        patch.setattr(host_module, "_plugins_dirs", ())
        result = CliRunner().invoke(cli, ["audit", str(folder / "cnn.safetensors"), "--arch", "builtin:digits-cnn",
                                          "--eps", ",".join(map(str, EPS)), "--limit", "40", "--attack", "fgsm",
                                          "--attack", "pgd", "-o", "steps", "5", "--no-checks", "--no-certify",
                                          "--out", str(folder / "out")])
    assert result.exit_code == 0, result.output
    return folder / "out"


def _panel(png: np.ndarray, box: list[int], scale: int) -> np.ndarray:
    """A panel of the re-read PNG, one value per input pixel (the grey level of its block, 0..255)."""
    left, top, width, height = box
    block = png[top : top + height, left : left + width, :3]
    assert (block[:, :, 0] == block[:, :, 1]).all() and (block[:, :, 0] == block[:, :, 2]).all()  # grey
    levels = block[:, :, 0].reshape(height // scale, scale, width // scale, scale)
    assert (levels == levels[:, :1, :, :1]).all()  # whole blocks: upscaled without interpolation
    return levels[:, 0, :, 0].astype(np.int64)


def test_pictured_examples_are_inside_the_ball_and_the_pngs_show_them(audited: Path) -> None:
    listing = json.loads((audited / "attacks" / "pictures.json").read_text())
    arrays = np.load(audited / "attacks" / "examples.npz")
    with (audited / "per_sample.csv").open() as handle:
        table = {int(row["index"]): row for row in csv.DictReader(handle)}
    pictures = listing["pictures"]
    broken = [p for p in pictures if p["broken"]]
    survived = [p for p in pictures if not p["broken"]]
    assert len(broken) == 4 and len(survived) == 2 and pictures == broken + survived
    assert {p["channels"] for p in pictures} == {"grey"}
    assert [(p["eps"], p["index"]) for p in broken] == sorted((p["eps"], p["index"]) for p in broken)
    smallest = min(float(row["broken_at_eps"]) for row in table.values() if row["broken_at_eps"] not in ("", "0.0"))
    assert broken[0]["eps"] == pytest.approx(smallest)  # the smallest eps first
    model = trained_digits_model("cnn")
    for number, picture in enumerate(pictures):
        index, eps = picture["index"], picture["eps"]
        assert arrays["index"][number] == index
        clean, adversarial = arrays["clean"][number], arrays["adversarial"][number]
        grey_clean, grey_adversarial = clean[0].astype(np.float64), adversarial[0].astype(np.float64)
        assert np.array_equal(clean, load_digits().x[index].numpy())
        assert np.abs(adversarial - clean).max() <= eps * (1 + 1e-5) + 1e-6  # linf ball
        assert adversarial.min() >= 0.0 and adversarial.max() <= 1.0
        after = int(model(torch.from_numpy(adversarial)[None]).argmax())
        assert (after != picture["label"]) == picture["broken"] and after == picture["after"]["label"]
        row = table[index]
        if picture["broken"]:  # where the table says it broke
            assert float(row["broken_at_eps"]) == pytest.approx(eps) and row["broken_by"] == picture["attack"]
        else:
            assert row["broken_at_eps"] == "" and eps == max(EPS)
        # the PNG, re-read, shows these very arrays (8-bit grey), and its own pixels stay in the ball
        png = np.rint(imread(audited / picture["file"]) * 255).astype(np.int64)
        shown_clean = _panel(png, picture["panels"]["clean"], picture["scale"])
        shown_adversarial = _panel(png, picture["panels"]["adversarial"], picture["scale"])
        assert np.array_equal(shown_clean, np.rint(grey_clean * 255))
        assert np.array_equal(shown_adversarial, np.rint(grey_adversarial * 255))
        assert np.abs(shown_adversarial - shown_clean).max() <= eps * 255 + 1
        delta = grey_adversarial - grey_clean
        amplified = np.rint(np.clip(0.5 + delta / (2 * np.abs(delta).max()), 0, 1) * 255)
        assert np.array_equal(_panel(png, picture["panels"]["perturbation"], picture["scale"]), amplified)
    assert picture["scale"] == 16  # 8x8 digits, drawn 128 pixels a side


def test_the_report_embeds_and_links_the_pictures(audited: Path) -> None:
    page = (audited / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 1 + 6  # the plot and six pictures
    assert "Pictures of the attacks" in page and "image-rendering:pixelated" in page
    markdown = (audited / "report.md").read_text()
    assert all(f"(attacks/{n}.png)" in markdown for n in range(1, 7))


def test_the_keeper_keeps_what_the_final_results_pick() -> None:
    """Offers in any order keep the samples broken at the smallest eps (then lowest index) and
    the lowest-index survivors at the largest eps; a later, smaller break replaces an earlier one."""
    keeper = ExampleKeeper(broken=2, survived=1)
    x = torch.arange(6.0).view(6, 1, 1, 1)

    def offer(rows: list[int], eps: float, broken: list[bool]) -> None:
        index = torch.tensor(rows)
        radii = torch.full((len(rows),), eps, dtype=torch.float64)
        keeper.offer("a", index, radii, radii, x[index] + 0.01, torch.tensor(broken),
                     torch.ones(len(rows), dtype=torch.bool))

    offer([0, 1, 2, 3, 4], 0.2, [True, False, True, False, False])
    offer([3, 4, 5], 0.1, [True, False, False])  # 3 breaks at a smaller eps: it replaces 2
    offer([1], 0.3, [True])  # 1 broke after all: it leaves the survivors
    broken_at = torch.tensor([0.2, 0.3, 0.2, 0.1, NEVER, NEVER])
    chosen = keeper.chosen(broken_at)
    assert [(e.index, e.eps, e.broken) for e in chosen] == [(3, pytest.approx(0.1), True),
                                                            (0, pytest.approx(0.2), True)]
    offer([4, 5], 0.3, [False, False])  # survivors at the largest eps
    assert [e.index for e in keeper.chosen(broken_at) if not e.broken] == [4]


class Flat(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :3] * 4


@pytest.mark.parametrize("shape", [(6, 64), (6, 8, 8)])
def test_inputs_that_are_no_images_get_no_pictures_and_no_error(shape: tuple[int, ...], tmp_path: Path) -> None:
    x = torch.rand(shape)
    assert example_keeper(x) is None
    assert attack_pictures(Flat(), x, torch.zeros(6, dtype=torch.long), []) == []
    rendered, files = render_pictures([], (0.0, 1.0))
    assert rendered == [] and files == {}


@pytest.mark.parametrize(("channels", "size", "mode", "scale"), [(3, 32, "RGB", 4), (4, 20, "mean of 4 channels", 7),
                                                                 (1, 300, "grey", 1)])
def test_any_channel_count_and_size_is_drawn(channels: int, size: int, mode: str, scale: int) -> None:
    x = torch.rand(2, channels, size, size)
    example = KeptExample(1, 0.1, "robustkit:pgd", (x[1] + 0.05).clamp(0, 1), True)
    picture = attack_pictures(Flat(), x, torch.tensor([0, 1]), [example])[0]
    png, place = picture_png(picture, (0.0, 1.0))
    assert place == layout(size, size) and place.scale == scale
    image = imread(io.BytesIO(png))
    assert image.shape[:2] == (place.height, place.width)
    left, top, width, height = place.boxes["clean"]
    shown = np.rint(image[top : top + height : scale, left : left + width : scale, :3] * 255)
    expected = x[1].numpy().transpose(1, 2, 0) if channels == 3 else x[1].numpy().mean(0)[:, :, None]
    assert np.abs(shown - np.rint(np.clip(expected, 0, 1) * 255)).max() <= 1
    listing = json.loads(render_pictures([picture], (0.0, 1.0))[1]["attacks/pictures.json"])
    assert listing["pictures"][0]["channels"] == mode
