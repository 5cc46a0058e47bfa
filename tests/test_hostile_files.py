"""Hostile or odd input files (issue 15): every one is refused with one line of our own that names
the file and the problem, before it can take the machine's memory or run code, or it loads
correctly. Each test builds its hostile file in tmp_path and runs what a user would type."""

from __future__ import annotations

import io
import os
import pickle
import struct
import time
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from numpy.lib import format as npy
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from robustkit.cli import cli
from robustkit.data import MAX_ARRAY_BYTES_ENV, Dataset, load_dataset, max_array_bytes
from robustkit.errors import DataError, RobustkitError, UnsafeFileError
from robustkit.models.base import LoadOptions
from robustkit.models.loading import load_model
from robustkit.models.zoo import digits_cnn
from robustkit.plugin.host import Host

ARCH = "builtin:digits-cnn"
X = np.full((4, 1, 8, 8), 0.5, dtype=np.float32)
Y = np.array([0, 1, 2, 3])


def audit(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, ["audit", *map(str, args)])


def audit_model(path: Path, *extra: str) -> Result:
    """``robustkit audit FILE --arch builtin:digits-cnn``: fails while loading the model."""
    return audit(path, "--arch", ARCH, "--limit", "4", "--attack", "fgsm", "--no-checks", *extra)


def audit_data(path: Path, *extra: str) -> Result:
    """``robustkit audit builtin:digits-cnn --data PATH``: fails while loading the data."""
    return audit(ARCH, "--data", path, "--attack", "fgsm", "--no-checks", *extra)


def one_line_error(result: Result, *needles: str) -> str:
    """Exit 1, one line of ours on stderr that contains every needle; returns the line."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert result.stderr.count("\n") == 1, result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)
    return result.stderr


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def npy_header(shape: tuple[int, ...], dtype: str) -> bytes:
    """A ``.npy`` header alone: what a file declares, whatever data follows it."""
    buffer = io.BytesIO()
    npy.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def write_npz(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for key, data in members.items():
            archive.writestr(f"{key}.npy", data)
    return path


# --- 12, 19: arrays that inflate to gigabytes, or declare terabytes ---------------------------


def test_npz_over_the_size_cap_is_refused_before_reading_and_limit_reads_only_the_head(
    host: Host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MAX_ARRAY_BYTES_ENV, "1M")
    assert max_array_bytes() == 1 << 20
    bomb = tmp_path / "bomb.npz"  # 8 MiB of zeros in a ~10 KiB file: the 3 MB -> 3 GB archive, scaled down
    np.savez_compressed(bomb, x=np.zeros((2048, 1, 32, 32), np.float32), y=np.zeros(2048, np.int64))
    assert bomb.stat().st_size < 100_000
    one_line_error(audit_data(bomb), "bomb.npz", "'x'", "8 MiB", "limit of 1 MiB", f"{MAX_ARRAY_BYTES_ENV}=8M")
    # what --limit needs is read (16 rows: 64 KiB, under the cap), not the whole array
    data = load_dataset(str(bomb), limit=16)
    assert data.x.shape == (16, 1, 32, 32) and data.y.shape == (16,) and data.x_train is None
    monkeypatch.setenv(MAX_ARRAY_BYTES_ENV, "a lot")
    one_line_error(audit_data(bomb), MAX_ARRAY_BYTES_ENV, "is not a size")


def test_npz_declaring_a_trillion_elements_is_refused_at_once(host: Host, tmp_path: Path) -> None:
    huge = write_npz(tmp_path / "huge.npz", {"x": npy_header((10**12, 1, 8, 8), "<f4") + bytes(64),
                                              "y": npy_bytes(Y)})
    started = time.perf_counter()
    one_line_error(audit_data(huge), "huge.npz", "'x'", "truncated", "(1000000000000, 1, 8, 8)")
    with pytest.raises(DataError, match="truncated"):
        load_dataset(str(huge), limit=16)
    assert time.perf_counter() - started < 10


def _onnx_graph(path: Path, nodes: list[Any], initializers: list[Any], output: str = "z") -> Path:
    """Flatten -> Gemm (N x 1 x 8 x 8 -> N x 10) followed by ``nodes`` that produce ``output``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["flat"], axis=1), helper.make_node("Gemm", ["flat", "w", "b"], ["y"]),
         *nodes],
        "hostile",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["n", 10] if output == "y" else ["a", "b"])],
        initializer=[numpy_helper.from_array(np.zeros((64, 10), np.float32), "w"),
                     numpy_helper.from_array(np.zeros(10, np.float32), "b"), *initializers],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _zeros_of_shape(shape_input: str) -> Any:
    from onnx import TensorProto, helper

    return helper.make_node("ConstantOfShape", [shape_input], ["c"],
                            value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0]))


def test_onnx_graphs_that_ask_for_terabytes(
    host: Host, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from onnx import TensorProto, helper, numpy_helper

    big = TensorProto(name="big", data_type=TensorProto.FLOAT, dims=[10**11, 1, 10], raw_data=bytes(16))
    add = helper.make_node("Add", ["y", "big"], ["z"])
    declared = _onnx_graph(tmp_path / "declared.onnx", [add], [big])
    one_line_error(audit_model(declared), "refusing declared.onnx", "tensor 'big'", "3.64 TiB", "limit of 4 GiB")

    shape = numpy_helper.from_array(np.array([10**11, 1, 10], np.int64), "shape")
    constant = _onnx_graph(tmp_path / "constant.onnx", [_zeros_of_shape("shape"), helper.make_node(
        "Add", ["y", "c"], ["z"])], [shape])
    one_line_error(audit_model(constant), "refusing constant.onnx", "ConstantOfShape", "3.64 TiB")

    # a shape computed from the input cannot be checked ahead: onnxruntime's failure becomes our line
    factor = numpy_helper.from_array(np.array([10**5, 10**5, 10**3, 1], np.int64), "factor")
    runtime = _onnx_graph(tmp_path / "runtime.onnx", [
        helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Mul", ["s", "factor"], ["huge"]),
        _zeros_of_shape("huge"), helper.make_node("ReduceSum", ["c"], ["r"], keepdims=0),
        helper.make_node("Add", ["y", "r"], ["z"])], [factor])
    capfd.readouterr()
    one_line_error(audit_model(runtime, "--black-box"), "runtime.onnx: onnxruntime fails running the graph",
                   "ConstantOfShape node asks for 9.09 PiB")
    # onnxruntime's own (coloured) log line stays quiet without -v
    assert "onnxruntime" not in capfd.readouterr().err


# --- 13, 15: truncated, empty and random files --------------------------------------------


def test_npz_array_shorter_than_its_header_is_truncated_not_pickled(host: Host, tmp_path: Path) -> None:
    short = write_npz(tmp_path / "short.npz", {"x": npy_header((4, 1, 8, 8), "<f4") + bytes(100),
                                                "y": npy_bytes(Y)})
    line = one_line_error(audit_data(short), "short.npz", "array 'x' is truncated", "1 KiB", "100 B")
    assert "pickle" not in line
    # what a pickled array really looks like is still called that, and never unpickled
    pickled = write_npz(tmp_path / "pickled.npz", {"x": npy_bytes(X), "y": npy_header((4,), "|O") + b"\x80\x04N."})
    one_line_error(audit_data(pickled), "pickled.npz", "array 'y' holds pickled objects")
    single = tmp_path / "single.npz"  # np.save output named .npz
    single.write_bytes(npy_bytes(X))
    one_line_error(audit_data(single), "single.npz", "single .npy array")


def _good_file(path: Path) -> None:
    torch.manual_seed(0)
    state = digits_cnn().state_dict()
    if path.suffix in (".pt", ".pth"):
        torch.save(state, path)
    elif path.suffix == ".safetensors":
        save_file(state, str(path))
    elif path.suffix == ".onnx":
        _onnx_graph(path, [], [], output="y")
    else:
        np.savez(path, x=X, y=Y)


@pytest.mark.parametrize("damage", ["empty", "truncated", "random"])
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors", ".onnx", ".npz"])
def test_every_broken_file_gets_a_message(host: Host, tmp_path: Path, suffix: str, damage: str) -> None:
    path = tmp_path / f"broken{suffix}"
    _good_file(path)
    whole = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": whole[: len(whole) // 2],
                      "random": np.random.default_rng(0).bytes(3000)}[damage])
    result = audit_data(path) if suffix == ".npz" else audit_model(path)
    line = one_line_error(result, path.name)
    assert not line.rstrip().endswith("()") and "IndexError" not in line, line
    if damage == "empty":
        assert "empty" in line


def test_odd_paths_are_refused_by_name(host: Host, tmp_path: Path) -> None:
    (tmp_path / "folder.pt").mkdir()
    one_line_error(audit_model(tmp_path / "folder.pt"), "folder.pt", "not a regular file")
    random_pt = tmp_path / "noise.pt"
    random_pt.write_bytes(np.random.default_rng(1).bytes(500))
    one_line_error(audit_model(random_pt, "--trust-code"), "noise.pt", "even with --trust-code")


# --- 14: labels of any integer dtype ------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.array([0, 1, 2**63, 2**64 - 1], np.uint64), "label 9223372036854775808 at index 2 of 'y' is too large"),
        (np.array([0, 1, -3, 1], np.int8), "label -3 at index 2 is outside the 2 classes 0..1"),
        (np.array([-1, -2, -1, -1], np.int16), "label -1 at index 0 is outside the 1 class 0"),
        (np.array([0.0, 1.0, 2.0, 1.0], np.float64), "y has dtype float64; give integer class indices (y.astype"),
        (np.array([0, 2**63 - 1, 1, 1], np.int64), "the data has 9223372036854775808 classes"),
    ],
    ids=["uint64-past-int64", "int8-negative", "all-negative", "whole-floats", "int64-max"],
)
def test_labels_are_checked_in_their_own_dtype(host: Host, tmp_path: Path, labels: np.ndarray, message: str) -> None:
    path = write_npz(tmp_path / "labels.npz", {"x": npy_bytes(X), "y": npy_bytes(labels)})
    one_line_error(audit_data(path), message)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int32, np.dtype(">i8")])
def test_any_integer_label_dtype_loads_as_int64(host: Host, tmp_path: Path, dtype: Any) -> None:
    path = write_npz(tmp_path / "labels.npz", {"x": npy_bytes(X), "y": npy_bytes(np.array([0, 1, 2, 100], dtype))})
    data = load_dataset(str(path))
    assert data.y.dtype == torch.int64 and data.y.tolist() == [0, 1, 2, 100] and data.num_classes == 101


def test_dataset_objects_with_unsigned_labels(host: Host) -> None:
    wide = torch.from_numpy(np.array([0, 2**63 + 5], np.uint64))
    with pytest.raises(DataError, match=r"label 9223372036854775813 at index 1 is outside the 4 classes"):
        Dataset("plugin", torch.full((2, 1, 2, 2), 0.5), wide, num_classes=4).validate()
    small = Dataset("plugin", torch.full((2, 1, 2, 2), 0.5), torch.tensor([0, 3], dtype=torch.uint8), 4).validate()
    assert small.y.dtype == torch.int64 and small.y.tolist() == [0, 3]


# --- 16: dtypes that cannot hold the parameter's values -----------------------------------


def _bn_arch(tmp_path: Path) -> str:
    factory = tmp_path / "bn_net.py"
    factory.write_text(
        "from torch import nn\n\n"
        "def net():\n"
        "    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(72, 10))\n"
    )
    return f"{factory}:net"


@pytest.mark.parametrize(
    ("key", "cast", "message"),
    [
        ("0.weight", torch.int64, "tensor '0.weight' is torch.int64 but the architecture holds torch.float32"),
        ("3.bias", torch.bool, "tensor '3.bias' is torch.bool"),
        ("1.num_batches_tracked", torch.float32, "tensor '1.num_batches_tracked' is torch.float32 but the "
                                                 "architecture holds torch.int64"),
        ("0.weight", torch.float16, None),
        ("0.weight", torch.bfloat16, None),
        ("3.weight", torch.float64, None),
        ("1.num_batches_tracked", torch.int32, None),
    ],
)
def test_safetensors_dtype_must_hold_the_parameter(
    host: Host, tmp_path: Path, key: str, cast: torch.dtype, message: str | None
) -> None:
    arch = _bn_arch(tmp_path)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(72, 10))
    state = {k: (v.to(cast) if k == key else v) for k, v in net.state_dict().items()}
    path = tmp_path / "weights.safetensors"
    save_file(state, str(path))
    if message is None:
        loaded = load_model(str(path), LoadOptions(arch=arch))
        x = torch.rand(3, 1, 8, 8)
        with torch.no_grad():
            assert torch.allclose(loaded.model(x), net.eval()(x), atol=1e-2)
        return
    one_line_error(audit(path, "--arch", arch, "--data", "builtin:digits", "--limit", "4"), "weights.safetensors",
                   message)


# --- 17, 21: pickles -----------------------------------------------------------------------


class Payload:
    """Unpickling this runs a shell command that creates ``marker``: what an attacker ships."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("writer", ["torch.save", "torch.save-legacy", "pickle-2", "pickle-5"])
@pytest.mark.parametrize("suffix", [".pt", ".pkl"])
def test_pickle_refusal_names_the_offending_global(host: Host, tmp_path: Path, writer: str, suffix: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    bomb = {"weight": torch.zeros(1), "payload": Payload(marker)}
    if writer.startswith("torch.save"):
        torch.save(bomb, path, _use_new_zipfile_serialization=writer == "torch.save")
    else:
        path.write_bytes(pickle.dumps(bomb, protocol=int(writer[-1])))
    line = one_line_error(audit_model(path), path.name, f"imports {os.system.__module__}.system", "--trust-code")
    assert "pytorch.org" not in line and "Check the documentation" not in line
    assert not marker.exists(), "the pickle ran"


def test_trust_code_loads_a_raw_pickle(host: Host, tmp_path: Path) -> None:
    import joblib

    torch.manual_seed(0)
    net = digits_cnn().eval()
    x = torch.rand(5, 1, 8, 8)
    whole = tmp_path / "whole.pkl"
    whole.write_bytes(pickle.dumps(net))
    line = one_line_error(audit_model(whole), "refusing to load whole.pkl", "--trust-code",
                          "torch.nn.modules.container.Sequential")
    assert "pytorch.org" not in line
    loaded = load_model(str(whole), LoadOptions(trust_code=True))
    assert (loaded.format, loaded.trusted_code) == ("pickled-module", True)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), net(x))
    state = tmp_path / "state.pkl"
    state.write_bytes(pickle.dumps(net.state_dict()))
    loaded = load_model(str(state), LoadOptions(trust_code=True, arch=ARCH))
    assert (loaded.format, loaded.trusted_code) == ("pickled-state-dict", True)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), net(x))
    dumped = tmp_path / "net.joblib"
    joblib.dump(net, dumped)
    assert load_model(str(dumped), LoadOptions(trust_code=True)).format == "pickled-module"
    other = tmp_path / "list.pkl"
    other.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(RobustkitError, match=r"list\.pkl holds a builtins\.list, not a torch\.nn\.Module"):
        load_model(str(other), LoadOptions(trust_code=True))
    data = tmp_path / "data.npz"
    np.savez(data, x=x.numpy(), y=np.arange(5))
    result = audit(whole, "--trust-code", "--data", data, "--attack", "fgsm", "--no-checks", "--no-certify", "--json")
    assert result.exit_code in (0, 3), result.output  # 3: the untrained net fails the clean-accuracy check
    assert '"pickled-module"' in result.stdout


def test_pickled_module_without_trust_is_still_unsafe(host: Host, tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(digits_cnn(), path)
    with pytest.raises(UnsafeFileError, match=r"whole\.pt: it imports torch\.nn\.modules\.container\.Sequential"):
        load_model(str(path))


# --- 18: images ----------------------------------------------------------------------------


def _png_declaring(width: int, height: int, body: bytes) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` grey pixels, whatever its data holds."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(body))
            + chunk(b"IEND", b""))


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8), value).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"just some text\n", "not a readable image"),
        (b"", "is empty"),
        (_png(9)[:40], "not a readable image"),
        (_png_declaring(8, 8, bytes(3)), "cannot decode the image (image file is truncated"),
        (_png_declaring(100_000, 100_000, bytes(100)), "refusing an image of 10,000,000,000 pixels"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n", "not a readable image"),
    ],
    ids=["text", "empty", "cut-header", "short-data", "decompression-bomb", "eps-never-run"],
)
def test_broken_images_name_the_file(host: Host, tmp_path: Path, content: bytes, message: str) -> None:
    root = tmp_path / "images"
    for name, value in (("cat", 0), ("dog", 255)):
        (root / name).mkdir(parents=True)
        (root / name / "good.png").write_bytes(_png(value))
    (root / "dog" / "zz.png").write_bytes(content)
    limit_before = Image.MAX_IMAGE_PIXELS
    one_line_error(audit_data(root), str(root / "dog" / "zz.png"), message)
    assert limit_before == Image.MAX_IMAGE_PIXELS  # the cap is robustkit's, not left on Pillow


def test_image_cap_follows_the_array_cap(host: Host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "images"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        (root / name / "big.png").write_bytes(_png(3))
    assert load_dataset(str(root)).x.shape == (2, 1, 8, 8)
    monkeypatch.setenv(MAX_ARRAY_BYTES_ENV, str(12 * 50))  # 50 pixels of three float32 channels
    one_line_error(audit_data(root), "big.png", "64 pixels", "limit of 50 pixels", MAX_ARRAY_BYTES_ENV)
