"""A user's own torch text classifier (weights + ``--arch``, tokenizer beside the weights) through
audit, harden and export on the command line: examples/text_arch.py's TextCNN, the calling
convention's variants, and the one-line refusals of what robustkit cannot use."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from robustkit_text import synthetic
from robustkit_text.data import load_text_data
from robustkit_text.model import TextClassifier, as_classifier, perturbed
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from robustkit import LoadOptions, load_model
from robustkit.cli import cli

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "text_arch.py"
ARCH = f"{EXAMPLE}:factory"
#: Variants of the example's network, written as the user's file ``nets.py`` of each test.
VARIANTS = f'''
import importlib.util
import torch
from torch import nn

spec = importlib.util.spec_from_file_location("text_arch_example", {str(EXAMPLE)!r})
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)


class Positional(example.TextCNN):
    """Two embeddings: the token ids' and the positions'."""

    def __init__(self):
        super().__init__()
        self.position = nn.Embedding(64, 32)

    def forward(self, input_ids, attention_mask=None):
        return super().forward(input_ids, attention_mask) + self.position.weight[:1, :2]


class Declared(Positional):
    def get_input_embeddings(self):
        return self.embed


class PerToken(example.TextCNN):
    """Logits for every token (N x L x C), not one row per text."""

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.embed(input_ids))


class NoMask(example.TextCNN):
    def forward(self, input_ids):
        return super().forward(input_ids)


factory = example.factory


def positional():
    return Positional()


def declared():
    return Declared()


def per_token():
    return PerToken()


def no_mask():
    return NoMask()
'''


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("text_arch_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args))


def user_files(folder: Path, factory: str, reviews: synthetic.SyntheticText, tokenizer: bool = True) -> Path:
    """``nets.py`` (the variants), fresh weights of ``factory`` and the example's tokenizer.json."""
    example = load_example()
    weights = example.write_model(folder, reviews.train_texts)
    (folder / "nets.py").write_text(VARIANTS)
    if factory != "factory":
        spec = importlib.util.spec_from_file_location("nets", folder / "nets.py")
        assert spec is not None and spec.loader is not None
        nets = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(nets)
        save_file(getattr(nets, factory)().state_dict(), str(weights))
    if not tokenizer:
        (folder / "tokenizer.json").unlink()
    return weights


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory, reviews: synthetic.SyntheticText) -> Path:
    return user_files(tmp_path_factory.mktemp("user"), "factory", reviews)


@pytest.fixture(scope="module")
def hardened(fresh: Path, data_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """``robustkit harden`` of the fresh weights with FGM: the output folder and the printed summary."""
    out = tmp_path_factory.mktemp("hard")
    result = invoke("harden", str(fresh), "--arch", ARCH, "--data", str(data_folder), "--defence", "text:fgm",
                    "--epochs", "3", "-o", "lr", "0.01", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


@pytest.fixture(scope="module")
def audited(hardened: tuple[Path, dict[str, Any]], data_folder: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, Any]:
    """The audit of the hardened weights file, run as the summary's note says."""
    _, summary = hardened
    command = next(n for n in summary["notes"] if n.startswith("audit it with: ")).removeprefix("audit it with: ")
    report = tmp_path_factory.mktemp("audit")
    result = invoke(*command.split()[1:], "--eps", "1,2", "--check-samples", "16",
                    "-o", "embedding_eps", "0.5", "--out", str(report))
    assert result.exit_code in (0, 3), result.output
    return json.loads((report / "report.json").read_text())


def test_the_example_is_wrapped_by_the_convention(fresh: Path, reviews: synthetic.SyntheticText) -> None:
    loaded = load_model(str(fresh), LoadOptions(arch=ARCH))
    model = as_classifier(loaded, str(fresh))
    net = model.net
    assert isinstance(model, TextClassifier) and not model.training and model.takes_mask
    assert model.embedding is net.embed and "called as net(input_ids, attention_mask=mask); input embedding: embed" \
        in loaded.notes
    vocab = len(model.tokenizer)
    assert vocab < 128 and set(range(vocab, 128)) <= model.special_ids  # rows no text spells are never written
    ids = model.encode(reviews.texts[:4])
    assert (ids[:, 0] == model.tokenizer.convert_tokens_to_ids("[CLS]")).all()
    assert not model.editable(ids)[:, 0].any() and model.decode(ids[:1]) == [reviews.texts[0]]
    with torch.no_grad():
        padded = torch.cat([ids, torch.full((4, 5), model.pad_id)], 1)
        mask = (ids != model.pad_id).long()
        clean = model(ids)
        assert torch.equal(clean, net(ids, attention_mask=mask))
        assert torch.allclose(model(padded), clean, atol=1e-6)  # the mask hides the padding
        with perturbed(model.embedding, torch.ones(4, ids.shape[1], 32)):  # the hook sits on net.embed
            assert not torch.allclose(net(ids, attention_mask=mask), clean)


def test_the_example_script_writes_what_its_command_audits(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    weights = load_example().main(["--out", str(tmp_path / "text-model")])
    assert capsys.readouterr().out.endswith(f"robustkit audit {weights} --arch {EXAMPLE.as_posix()}:factory "
                                            "--data text:sentiment\n")
    loaded = load_model(str(weights), LoadOptions(arch=ARCH))
    assert as_classifier(loaded, str(weights)).pad_id == 0 and sorted(p.name for p in weights.parent.iterdir()) == [
        "tokenizer.json", "weights.safetensors"]


def test_harden_writes_the_module_weights_and_its_tokenizer(hardened: tuple[Path, dict[str, Any]], fresh: Path,
                                                              data_folder: Path) -> None:
    out, summary = hardened
    folder = out / "model"
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "tokenizer.json", "tokenizer_config.json",
                                                  "special_tokens_map.json"}
    before, after = load_file(str(fresh)), load_file(str(folder / "model.safetensors"))
    assert after.keys() == before.keys() and not torch.equal(after["embed.weight"], before["embed.weight"])
    assert summary["arch"] == ARCH and json.loads((out / "config.json").read_text())["arch"] == ARCH
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert f"audit it with: robustkit audit {folder / 'model.safetensors'} --arch {ARCH} --data {data_folder}" \
        in summary["notes"]
    assert summary["after"]["clean_accuracy"] >= summary["before"]["clean_accuracy"] + 0.2  # it trained


def test_the_audit_of_the_hardened_file_matches_the_summary(audited: dict[str, Any],
                                                            hardened: tuple[Path, dict[str, Any]]) -> None:
    _, summary = hardened
    assert audited["n"] == 100 and audited["model"]["format"] == "safetensors"
    assert abs(audited["clean_accuracy"] - summary["after"]["clean_accuracy"]) < 1e-6
    worst = [row["robust_accuracy"] for row in audited["worst_case"]]
    assert abs(worst[0] - summary["after"]["robust_accuracy"]) < 1e-6  # the same attacks at one edit
    assert worst[1] <= worst[0] < audited["clean_accuracy"]  # they break some texts
    assert {row["attack"] for row in audited["results"]} == {"text:hotflip", "text:charbug", "text:swap"}
    statuses = {c["name"]: c["status"] for c in audited["checks"]}
    assert statuses["gradients"] == "pass" and statuses["valid examples"] == "pass"
    assert "Embedding-space PGD (training-time diagnostic)" in [s["title"] for s in audited["sections"]]
    assert audited["model"]["notes"][:2] == [f"architecture {ARCH}", "called as net(input_ids, attention_mask=mask); "
                                             "input embedding: embed"]


def test_export_takes_the_module(hardened: tuple[Path, dict[str, Any]], audited: dict[str, Any], data_folder: Path,
                                 tmp_path: Path) -> None:
    out, _ = hardened
    weights, report = out / "model" / "model.safetensors", tmp_path / "report.json"
    report.write_text(json.dumps(audited))
    graph = tmp_path / "cnn.onnx"
    result = invoke("export", str(weights), "--arch", ARCH, "--data", str(data_folder), "--report", str(report),
                    "--samples", "40", "--out", str(graph), "--json")
    assert result.exit_code == 0, result.output
    exported = json.loads(result.stdout)
    assert exported["verified"] and exported["checks"]["argmax_agreement"] == 1.0
    metadata = exported["metadata"]
    assert metadata["labels"] == ["0", "1"] and metadata["robustness"]["source"] == "audit report"
    assert metadata["robustness"]["clean_accuracy"] == audited["clean_accuracy"]
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in session.get_inputs()] == [
        (name, ["batch", "sequence"]) for name in ("input_ids", "attention_mask")]
    net = load_example().factory()
    net.load_state_dict(load_file(str(weights)))
    tokenizer = AutoTokenizer.from_pretrained(graph.with_suffix(".tokenizer"))
    texts = load_text_data(str(data_folder)).texts[40:50]  # not seen by the verification
    batch = tokenizer(texts, padding=True, return_tensors="np")
    (logits,) = session.run(None, {name: batch[name].astype(np.int64) for name in ("input_ids", "attention_mask")})
    with torch.no_grad():
        reference = net.eval()(*(torch.from_numpy(batch[name]).long() for name in ("input_ids", "attention_mask")))
    assert np.abs(logits - reference.numpy()).max() < 1e-4


def test_a_module_without_a_mask_keeps_both_graph_inputs(tmp_path: Path, reviews: synthetic.SyntheticText,
                                                         data_folder: Path) -> None:
    weights = user_files(tmp_path / "user", "no_mask", reviews)
    graph = tmp_path / "cnn.onnx"  # the TorchScript exporter drops inputs a graph does not read
    result = invoke("export", str(weights), "--arch", f"{tmp_path / 'user' / 'nets.py'}:no_mask", "--data",
                    str(data_folder), "--samples", "12", "--no-audit", "-o", "dynamo", "false", "--out", str(graph),
                    "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["details"]["exporter"] == "torchscript"
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]


def test_get_input_embeddings_names_the_embedding_among_several(tmp_path: Path,
                                                                 reviews: synthetic.SyntheticText) -> None:
    weights = user_files(tmp_path, "declared", reviews)
    loaded = load_model(str(weights), LoadOptions(arch=f"{tmp_path / 'nets.py'}:declared"))
    model = as_classifier(loaded, str(weights))
    assert model.embedding is model.net.embed and model.embedding_path is None
    assert "called as net(input_ids, attention_mask=mask); input embedding: get_input_embeddings()" in loaded.notes


@pytest.mark.parametrize(("factory", "change", "message"), [
    ("factory", "no tokenizer", "weights.safetensors: no tokenizer beside the weights in "),
    ("factory", "no padding", "weights.safetensors: the tokenizer has no padding token; set one (tokenizer.pad_token"),
    ("positional", "", "Positional has 2 torch.nn.Embedding layers (embed, position); text attacks and defences need "
                       "the embedding of the token ids: define get_input_embeddings() returning that nn.Embedding"),
    ("per_token", "", "PerToken returns shape (16, "),
    ("factory", "--mean", "a mean/std normalisation (--mean/--std or the file's metadata) does not apply to token ids"),
    ("factory", "hf folder", "--arch does not apply to "),
])
def test_what_cannot_be_used_is_one_line(factory: str, change: str, message: str, tmp_path: Path,
                                         reviews: synthetic.SyntheticText, data_folder: Path, fresh_model: Path
                                         ) -> None:
    weights = user_files(tmp_path, factory, reviews, tokenizer=change != "no tokenizer")
    if change == "no padding":
        tokenizer = synthetic.build_tokenizer(reviews.train_texts).backend_tokenizer
        tokenizer.save(str(tmp_path / "tokenizer.json"))
    model = str(shutil.copytree(fresh_model, tmp_path / "hf")) if change == "hf folder" else str(weights)
    extra = ["--mean", "0.5", "--std", "0.25"] if change == "--mean" else []
    result = invoke("audit", model, "--arch", f"{tmp_path / 'nets.py'}:{factory}", "--data", str(data_folder),
                    "--limit", "16", "--no-checks", *extra)
    assert result.exit_code == 1 and message in result.stderr and result.stderr.count("\n") == 1, result.output
    if factory == "per_token":
        assert "a text classifier is called as net(input_ids), or net(input_ids, attention_mask=mask)" in result.stderr
    if change == "no tokenizer":
        assert "(tokenizer.save(folder/'tokenizer.json') or tokenizer.save_pretrained(folder))" in result.stderr
