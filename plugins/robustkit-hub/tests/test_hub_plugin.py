"""robustkit-hub: timm, torchvision and Hugging Face models saved as their users save them, loaded
with no glue code, their preprocessing inside the model, and every unsafe or ill-fitting input
refused in one line. Tiny randomly initialised models; nothing is downloaded."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from robustkit_hub import plugin
from robustkit_hub.folders import _processor
from safetensors.torch import save_file
from torch import Tensor, nn

from robustkit import LoadOptions, RobustkitError, load_model
from robustkit.cli import cli
from robustkit.errors import UnsafeFileError
from robustkit.models.loading import check_model_output
from robustkit.plugin import host as host_module
from robustkit.plugin.host import Host

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # ViTImageProcessor's default
N = 8


@pytest.fixture(scope="module", autouse=True)
def host() -> Iterator[Host]:
    """A host with the installed plugins (this one among them) for ``load_model``, offline: a
    download attempt fails the test instead of fetching."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        fresh = Host()
        host_module.set_host(fresh)
        yield fresh
        host_module.set_host(None)


def normalised(x: Tensor, stats: tuple[tuple[float, ...], tuple[float, ...]]) -> Tensor:
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in stats)
    return (x - mean) / std


def images(seed: int = 0) -> Tensor:
    return torch.rand(N, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def save_data(path: Path, x: Tensor, logits: Tensor) -> Path:
    """The library model's own predictions as labels: clean accuracy is 100% exactly when
    robustkit runs the same function of the same inputs."""
    np.savez(path, x=x.numpy(), y=logits.argmax(1).numpy())
    return path


def run(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def error_line(stderr: str) -> str:
    """The command's error: one line (other lines are warnings, e.g. of other plugins)."""
    (line,) = [line for line in stderr.splitlines() if line.startswith("Error")]
    return line


@pytest.fixture(scope="module")
def timm_resnet(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    import timm

    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    path = tmp_path_factory.mktemp("timm") / "resnet18.safetensors"
    save_file(net.state_dict(), str(path))
    return net, path


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                       image_size=32, patch_size=8, num_labels=10)
    net = ViTForImageClassification(config).eval()
    folder = tmp_path_factory.mktemp("hf") / "tiny-vit"
    net.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return net, folder


def test_plugin_module_imports_no_model_library() -> None:
    code = ("import sys, robustkit_hub.plugin; "
            "assert not {'torch', 'timm', 'torchvision', 'transformers'} & set(sys.modules), sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_discovered_through_the_entry_point(host: Host) -> None:
    record = host.records["hub"]
    assert record.status == "ok", record.status
    assert record.hooks == ["robustkit_load_model"]


def test_timm_audit_end_to_end(timm_resnet: tuple[nn.Module, Path], tmp_path: Path) -> None:
    net, path = timm_resnet
    x = images()
    with torch.no_grad():
        expected = net(normalised(x, IMAGENET))
    data = save_data(tmp_path / "data.npz", x, expected)
    code, _, stderr = run("audit", path, "--arch", "timm:resnet18", "--data", data, "--eps", "2/255",
                          "--attack", "fgsm", "--no-checks", "--no-certify", "--out", tmp_path / "report")
    assert code == 0, stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["clean_accuracy"] == 1.0
    notes = report["model"]["notes"]
    assert f"inputs normalised inside the model (timm's pretrained_cfg of resnet18): mean={list(IMAGENET[0])}, " \
           f"std={list(IMAGENET[1])}" in notes, notes
    assert "10 classes, from the weights' classifier 'fc.weight'" in notes
    assert any("input size 3x224x224; the network also runs on other sizes" in n for n in notes), notes
    # the model robustkit attacks is the library's model behind the cfg's normalisation
    with torch.no_grad():
        assert torch.allclose(load_model(str(path), LoadOptions(arch="timm:resnet18")).model(x), expected, atol=1e-5)


def test_a_normalisation_nobody_chose_is_said_on_the_terminal(timm_resnet: tuple[nn.Module, Path],
                                                              caplog: pytest.LogCaptureFixture) -> None:
    _, path = timm_resnet
    with caplog.at_level(logging.WARNING, logger="robustkit.hub"):
        load_model(str(path), LoadOptions(arch="timm:resnet18"))
    assert "inputs normalised with timm's pretrained_cfg of resnet18: mean=[0.485" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="robustkit.hub"):  # the user's own choice: nothing to say
        load_model(str(path), LoadOptions(arch="timm:resnet18", mean=IMAGENET[0], std=IMAGENET[1]))
    assert not caplog.text


def test_mean_std_that_contradict_the_cfg_are_refused(timm_resnet: tuple[nn.Module, Path], tmp_path: Path) -> None:
    _, path = timm_resnet
    data = save_data(tmp_path / "data.npz", images(), torch.zeros(N, 10))
    code, _, stderr = run("audit", path, "--arch", "timm:resnet18", "--data", data, "--mean", "0.5,0.5,0.5",
                          "--std", "0.5,0.5,0.5", "--attack", "fgsm", "--no-checks", "--out", tmp_path / "report")
    line = error_line(stderr)
    assert code == 1 and "contradict" in line and "(timm's pretrained_cfg of resnet18); drop --mean/--std" in line
    assert not (tmp_path / "report" / "report.json").exists()


def test_unknown_timm_name_lists_close_names(timm_resnet: tuple[nn.Module, Path]) -> None:
    _, path = timm_resnet
    with pytest.raises(RobustkitError, match=r"no classifier named 'resnet19'; close names: .*resnet18") as err:
        load_model(str(path), LoadOptions(arch="timm:resnet19"))
    assert "\n" not in str(err.value) and "timm.list_models('*resnet*')" in str(err.value)


def test_weights_of_another_architecture_are_refused(timm_resnet: tuple[nn.Module, Path]) -> None:
    _, path = timm_resnet
    with pytest.raises(RobustkitError, match=r"do not fit --arch timm:resnet34: .*missing key"):
        load_model(str(path), LoadOptions(arch="timm:resnet34"))
    with pytest.raises(RobustkitError, match=r"do not fit --arch timm:vit_tiny_patch16_224: they have no "
                                             r"'head.weight' \(its classifier\)"):
        load_model(str(path), LoadOptions(arch="timm:vit_tiny_patch16_224"))


def test_a_fixed_size_network_refuses_data_of_another_size_before_the_audit(tmp_path: Path) -> None:
    """What audit, harden and export run on the data before any attack (``check_model_output``)."""
    import timm

    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    path = tmp_path / "vit.safetensors"
    save_file(net.state_dict(), str(path))
    loaded = load_model(str(path), LoadOptions(arch="timm:vit_tiny_patch16_224"))
    assert any("input size 3x224x224; the network takes that size only" in n for n in loaded.notes), loaded.notes
    assert loaded.normalisation == HALF
    with pytest.raises(RobustkitError, match=r"fails on inputs of shape \(3, 32, 32\) \(the data's\): .*224") as err:
        check_model_output(loaded.model, images(), 10)
    assert "\n" not in str(err.value)


def test_torchvision_state_dict(tmp_path: Path) -> None:
    """A ``torch.save``d state dict (read with ``weights_only=True``; timm's test reads safetensors)."""
    from torchvision.models import resnet18

    torch.manual_seed(0)
    net = resnet18(num_classes=10).eval()
    path = tmp_path / "resnet18.pt"
    torch.save(net.state_dict(), path)
    loaded = load_model(str(path), LoadOptions(arch="torchvision:resnet18"))
    x = images()
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), net(normalised(x, IMAGENET)), atol=1e-5)
    assert loaded.normalisation == IMAGENET
    assert "inputs normalised inside the model (torchvision's ResNet18_Weights.IMAGENET1K_V1 transforms): " \
           f"mean={list(IMAGENET[0])}, std={list(IMAGENET[1])}" in loaded.notes
    with pytest.raises(RobustkitError, match=r"torchvision has no classifier named 'resnet_18'; close names: resnet18"):
        load_model(str(path), LoadOptions(arch="torchvision:resnet_18"))


def test_hugging_face_folder_audit_end_to_end(vit_folder: tuple[nn.Module, Path], tmp_path: Path) -> None:
    net, folder = vit_folder
    x = images(1)
    with torch.no_grad():
        expected = net(pixel_values=normalised(x, HALF)).logits
    data = save_data(tmp_path / "data.npz", x, expected)
    code, _, stderr = run("audit", folder, "--data", data, "--eps", "2/255", "--attack", "fgsm", "--no-checks",
                          "--no-certify", "--out", tmp_path / "report")
    assert code == 0, stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["clean_accuracy"] == 1.0 and report["model"]["format"] == "transformers"
    notes = report["model"]["notes"]
    assert "inputs normalised inside the model (tiny-vit/preprocessor_config.json): mean=[0.5, 0.5, 0.5], " \
           "std=[0.5, 0.5, 0.5]" in notes, notes
    assert any(n.startswith("tiny-vit/preprocessor_config.json: input size 3x32x32") for n in notes), notes
    loaded = load_model(str(folder))
    assert not loaded.trusted_code
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), expected, atol=1e-5)


def test_custom_code_is_refused_without_trust_code(vit_folder: tuple[nn.Module, Path], tmp_path: Path) -> None:
    folder = shutil.copytree(vit_folder[1], tmp_path / "custom")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForImageClassification": "modeling_evil.EvilForImageClassification"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsafeFileError, match=r"refusing custom: its config.json asks for custom model code "
                                              r"\(modeling_evil.EvilForImageClassification\).*--trust-code"):
        load_model(str(folder))


def test_pickled_weights_are_refused_with_the_fix(vit_folder: tuple[nn.Module, Path], tmp_path: Path) -> None:
    net, source = vit_folder
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(source / "config.json", folder)
    torch.save(net.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(UnsafeFileError, match=r"refusing to unpickle pickled/pytorch_model.bin: .* "
                                              r"model.save_pretrained\(folder, safe_serialization=True\)"):
        load_model(str(folder))


def test_config_that_does_not_fit_the_weights_is_refused(vit_folder: tuple[nn.Module, Path], tmp_path: Path) -> None:
    folder = shutil.copytree(vit_folder[1], tmp_path / "five")
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = {str(i): f"c{i}" for i in range(5)}
    config["label2id"] = {f"c{i}": i for i in range(5)}
    (folder / "config.json").write_text(json.dumps(config))
    # transformers 5 reports the shapes, 4.x the key alone
    with pytest.raises(RobustkitError, match=r"five: its weights do not fit its config.json: 2 shape mismatch\(es\), "
                                             r"e.g. classifier.bias(: file \(10,\) vs config \(5,\))? \(num_labels"):
        load_model(str(folder))


def test_text_model_folders_are_left_to_other_loaders(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForSequenceClassification"],
                                                      "model_type": "bert"}))
    assert plugin.robustkit_load_model(str(tmp_path), LoadOptions()) is None


def test_processor_rescale_is_folded_into_the_normalisation(tmp_path: Path) -> None:
    """A processor that feeds the network 0-255 pixels: robustkit's [0, 1] inputs get the
    same numbers through mean/std divided by 255."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "do_rescale": False, "image_mean": [127.5], "image_std": [64.0], "size": {"shortest_edge": 224}}))
    seen = _processor(tmp_path, {"num_channels": 1})
    assert seen.normalisation == ((0.5,), (64 / 255,)) and seen.input_size is None
    assert "0-255 pixels times 1" in seen.source
