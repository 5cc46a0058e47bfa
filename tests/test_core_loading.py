"""Safe model loading: weights into a named architecture, and nothing that runs code unless trusted."""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from robustkit.attacks.native import FGSM
from robustkit.errors import RobustkitError, UnsafeFileError
from robustkit.models.base import LoadOptions
from robustkit.models.loading import check_model_output, load_model
from robustkit.models.zoo import digits_cnn
from robustkit.modules import Normalized
from robustkit.plugin.host import Host
from robustkit.threat import ThreatModel

ARCH = "builtin:digits-cnn"


@pytest.fixture
def net() -> nn.Module:
    torch.manual_seed(0)
    return digits_cnn().eval()


@pytest.fixture
def x() -> Tensor:
    return torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def same_outputs(a: Any, b: Any, x: Tensor) -> bool:
    with torch.no_grad():
        return torch.allclose(a(x), b(x), atol=1e-5)


def test_safetensors_with_arch(host: Host, tmp_path: Path, net: nn.Module, x: Tensor) -> None:
    path = tmp_path / "net.safetensors"
    save_file(net.state_dict(), str(path))
    loaded = load_model(str(path), LoadOptions(arch=ARCH))
    assert (loaded.format, loaded.sha256, loaded.white_box, loaded.trusted_code) == (
        "safetensors",
        sha256(path),
        True,
        False,
    )
    assert not loaded.model.training  # type: ignore[attr-defined]
    assert same_outputs(loaded.model, net, x)
    assert loaded.describe()["sha256"] == sha256(path)


def test_wrong_architecture_is_one_line_naming_the_mismatch(
    host: Host, tmp_path: Path, net: nn.Module
) -> None:
    path = tmp_path / "net.safetensors"
    save_file(net.state_dict(), str(path))
    with pytest.raises(RobustkitError) as info:
        load_model(str(path), LoadOptions(arch="builtin:digits-resnet"))
    message = str(info.value)
    assert "do not fit --arch builtin:digits-resnet" in message
    assert (
        "missing key(s), e.g. 1.weight" in message and "unexpected key(s), e.g. 0.bias" in message
    )
    assert "\n" not in message


def test_shape_mismatch_through_a_factory_file(host: Host, tmp_path: Path, net: nn.Module) -> None:
    factory = tmp_path / "nets.py"
    factory.write_text(
        "from robustkit.models.zoo import digits_cnn\n\ndef twelve():\n    return digits_cnn(num_classes=12)\n"
    )
    path = tmp_path / "net.safetensors"
    save_file(net.state_dict(), str(path))
    with pytest.raises(
        RobustkitError,
        match=r"2 shape mismatch\(es\), e.g. 8.weight: file \(10, 128\) vs "
        r"architecture \(12, 128\)",
    ):
        load_model(str(path), LoadOptions(arch=f"{factory}:twelve"))


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        (None, "holds weights only; name the architecture with --arch"),
        ("builtin:nope", "unknown built-in architecture 'nope'"),
        ("no_colon", "needs the form module:factory"),
        ("robustkit.models.zoo:missing", "has no callable 'missing'"),
        ("not_a_module_xyz:f", "cannot import 'not_a_module_xyz'"),
    ],
)
def test_bad_arch(
    host: Host, tmp_path: Path, net: nn.Module, arch: str | None, message: str
) -> None:
    path = tmp_path / "net.safetensors"
    save_file(net.state_dict(), str(path))
    with pytest.raises(RobustkitError, match=message):
        load_model(str(path), LoadOptions(arch=arch))


@pytest.fixture
def recorded_torch_loads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """The keyword arguments of every ``torch.load`` call (to prove ``weights_only=True``)."""
    calls: list[dict[str, Any]] = []
    real = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    yield calls


@pytest.mark.parametrize("layout", ["plain", "checkpoint"])
def test_state_dict_pt_uses_weights_only(
    host: Host,
    tmp_path: Path,
    net: nn.Module,
    x: Tensor,
    layout: str,
    recorded_torch_loads: list[dict[str, Any]],
) -> None:
    path = tmp_path / "net.pt"
    state = net.state_dict()
    torch.save(state if layout == "plain" else {"state_dict": state, "epoch": 3}, path)
    loaded = load_model(str(path), LoadOptions(arch=ARCH))
    assert (loaded.format, loaded.sha256) == ("state-dict", sha256(path))
    assert same_outputs(loaded.model, net, x)
    assert recorded_torch_loads == [{"map_location": "cpu", "weights_only": True}]


class Payload:
    """Unpickling this runs a shell command that creates ``marker``: what an attacker ships."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".pkl"])
def test_malicious_pickle_never_runs(
    host: Host, tmp_path: Path, writer: str, suffix: str, recorded_torch_loads: list[dict[str, Any]]
) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    bomb = {"weight": torch.zeros(1), "payload": Payload(marker)}
    if writer == "torch.save":
        torch.save(bomb, path)
    else:
        path.write_bytes(pickle.dumps(bomb))
    for options in (None, LoadOptions(arch=ARCH), LoadOptions(arch=ARCH, trust_code=False)):
        with pytest.raises(UnsafeFileError) as info:
            load_model(str(path), options)
        assert not marker.exists(), "the pickle ran"
        message = str(info.value)
        assert "--trust-code" in message and "safetensors" in message and "\n" not in message
    # torch.load was only ever asked for weights
    assert all(call.get("weights_only") is True for call in recorded_torch_loads)


def test_pickled_module_only_with_trust(
    host: Host, tmp_path: Path, net: nn.Module, x: Tensor
) -> None:
    path = tmp_path / "whole.pt"
    torch.save(net, path)
    with pytest.raises(UnsafeFileError, match=r"refusing to unpickle whole\.pt"):
        load_model(str(path))
    loaded = load_model(str(path), LoadOptions(trust_code=True))
    assert (loaded.format, loaded.trusted_code) == ("pickled-module", True)
    assert same_outputs(loaded.model, net, x)


@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")
def test_torchscript_needs_trust_code(
    host: Host,
    tmp_path: Path,
    net: nn.Module,
    x: Tensor,
    recorded_torch_loads: list[dict[str, Any]],
) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.script(net).save(str(path))
    with pytest.raises(UnsafeFileError) as info:
        load_model(str(path), LoadOptions(arch=ARCH))
    assert "TorchScript" in str(info.value) and "safetensors" in str(info.value)
    assert recorded_torch_loads == []  # refused before anything was read as a pickle
    loaded = load_model(str(path), LoadOptions(trust_code=True))
    assert (loaded.format, loaded.trusted_code, loaded.sha256) == (
        "torchscript",
        True,
        sha256(path),
    )
    assert same_outputs(loaded.model, net, x)


def test_torch_export_needs_trust_code(
    host: Host, tmp_path: Path, net: nn.Module, x: Tensor
) -> None:
    path = tmp_path / "exported.pt2"
    torch.export.save(torch.export.export(net, (x,)), str(path))
    with pytest.raises(UnsafeFileError, match=r"torch\.export program"):
        load_model(str(path))
    loaded = load_model(str(path), LoadOptions(trust_code=True))
    assert (loaded.format, loaded.trusted_code) == ("torch.export", True)
    assert same_outputs(loaded.model, net, x)
    # attacks switch modes around every call: that must work on an exported graph too
    result = FGSM()(loaded.model, x, torch.arange(5), threat=ThreatModel.parse("linf:0.1"))
    assert torch.equal(
        result.x_adv, FGSM()(net, x, torch.arange(5), threat=ThreatModel.parse("linf:0.1")).x_adv
    )


def _linear_onnx(path: Path, weight: np.ndarray, bias: np.ndarray) -> None:
    """A hand-built ONNX graph: Flatten then Gemm, N x 1 x 8 x 8 -> N x 10 logits."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["x"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "w", "b"], ["y"]),
        ],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])],
        initializer=[numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_onnx_is_a_black_box(host: Host, tmp_path: Path, x: Tensor) -> None:
    rng = np.random.default_rng(0)
    weight, bias = (
        rng.normal(size=(64, 10)).astype(np.float32),
        rng.normal(size=10).astype(np.float32),
    )
    path = tmp_path / "linear.onnx"
    _linear_onnx(path, weight, bias)
    loaded = load_model(str(path))
    assert (loaded.format, loaded.white_box, loaded.sha256) == ("onnx", False, sha256(path))
    expected = x.flatten(1).numpy() @ weight + bias
    assert np.allclose(loaded.model(x).numpy(), expected, atol=1e-4)
    with pytest.raises(RobustkitError, match="--mean/--std need a torch model"):
        load_model(str(path), LoadOptions(mean=(0.5,), std=(0.5,)))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupted_onnx_is_refused(host: Host, tmp_path: Path, damage: str) -> None:
    path = tmp_path / "broken.onnx"
    if damage == "garbage":
        path.write_bytes(b"\x08\xff\xff\xff this is not protobuf" * 10)
    else:
        _linear_onnx(path, np.zeros((64, 10), np.float32), np.zeros(10, np.float32))
        path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(RobustkitError, match=r"broken\.onnx") as info:
        load_model(str(path))
    assert "\n" not in str(info.value)


def test_mean_std_wrap_a_normalisation_layer(
    host: Host, tmp_path: Path, net: nn.Module, x: Tensor
) -> None:
    path = tmp_path / "net.safetensors"
    save_file(net.state_dict(), str(path))
    loaded = load_model(str(path), LoadOptions(arch=ARCH, mean=(0.3,), std=(0.4,)))
    assert isinstance(loaded.model, Normalized)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), net((x - 0.3) / 0.4), atol=1e-5)
    assert any("mean=[0.3]" in note for note in loaded.notes)
    with pytest.raises(RobustkitError, match="--mean and --std go together"):
        load_model(str(path), LoadOptions(arch=ARCH, mean=(0.3,)))


def test_builtin_and_missing_and_unknown_files(host: Host, tmp_path: Path) -> None:
    loaded = load_model(ARCH)
    assert loaded.format == "builtin" and len(loaded.sha256) == 64
    with pytest.raises(RobustkitError, match="does not exist"):
        load_model(str(tmp_path / "missing.safetensors"))
    other = tmp_path / "model.h5"
    other.write_bytes(b"hdf5?")
    with pytest.raises(RobustkitError, match=r"no loader recognises .*use safetensors"):
        load_model(str(other))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(RobustkitError, match="not a valid safetensors file"):
        load_model(str(bad), LoadOptions(arch=ARCH))


class Softmaxed(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).softmax(dim=1)


def test_check_model_output(net: nn.Module, x: Tensor) -> None:
    check = check_model_output(net, x, num_classes=10)
    assert (check.num_classes, check.warnings) == (10, ())
    (warning,) = check_model_output(Softmaxed(net), x, num_classes=10).warnings
    assert "probabilities" in warning
    with pytest.raises(
        RobustkitError, match=r"returns shape \(5, 10, 1\) for 5 inputs; expected \(N, C\)"
    ):
        check_model_output(lambda t: net(t).unsqueeze(-1), x)
    with pytest.raises(RobustkitError, match="has 10 outputs but the data has 12 classes"):
        check_model_output(net, x, num_classes=12)
    with pytest.raises(RobustkitError, match="non-finite"):
        check_model_output(lambda t: net(t) * float("nan"), x)
    with pytest.raises(RobustkitError, match=r"fails on inputs of shape \(3, 8, 8\)"):
        check_model_output(net, torch.rand(2, 3, 8, 8))
