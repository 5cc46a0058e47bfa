"""``robustkit export`` of a text classifier: an ONNX graph of token ids checked in onnxruntime
on real texts, its tokenizer beside it, the audit's figures inside; non-text models left to
robustkit's exporters; bad inputs and failed verification as one-line errors."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from robustkit_text import plugin
from robustkit_text.data import load_text_data
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from robustkit import AuditConfig, ExportConfig, run_audit
from robustkit.cli import cli
from robustkit.export.run import METADATA_KEY

#: Evaluation texts the audit and the export's verification use; the tests check on the rest.
SAMPLES = 40


@pytest.fixture(scope="module")
def report(trained_model: Path, data_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("audit")
    run_audit(AuditConfig(str(trained_model), str(data_folder), attacks=("text:hotflip",), eps=(1.0, 2.0),
                          limit=SAMPLES, run_checks=False, options=(("embedding_eps", ""),), out=out))
    return out / "report.json"


@pytest.fixture(scope="module")
def exported(trained_model: Path, data_folder: Path, report: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[Path, dict[str, Any]]:
    """The trained model exported through the CLI with the audit's report: the .onnx and the result."""
    out = tmp_path_factory.mktemp("export") / "model.onnx"
    result = CliRunner().invoke(cli, ["export", str(trained_model), "--data", str(data_folder), "--report",
                                      str(report), "--samples", str(SAMPLES), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def export(*args: str) -> Any:
    return CliRunner().invoke(cli, ["export", *args])


def test_the_export_is_verified_at_two_batch_sizes_and_lengths(exported: tuple[Path, dict[str, Any]]) -> None:
    out, result = exported
    assert result["verified"] and result["format"] == "onnx" and result["details"]["exporter"] == "dynamo"
    checks = result["checks"]
    assert checks["samples"] == SAMPLES and checks["batch_sizes"] == [1, 5] and checks["argmax_agreement"] == 1.0
    assert len(set(checks["sequence_lengths"])) == 2 and checks["max_abs_diff"] <= checks["tolerance"] <= 1e-3
    tokenizer = out.with_suffix(".tokenizer")
    assert result["files"][0] == str(out) and str(tokenizer / "tokenizer.json") in result["files"]
    assert result["details"]["tokenizer"] == str(tokenizer) and not list(out.parent.glob(".*.tmp"))


def test_onnxruntime_matches_torch_on_real_texts(exported: tuple[Path, dict[str, Any]], trained_model: Path,
                                                 data_folder: Path) -> None:
    out, _ = exported
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type, i.shape) for i in session.get_inputs()] == [
        (name, "tensor(int64)", ["batch", "sequence"]) for name in ("input_ids", "attention_mask")]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    saved = AutoTokenizer.from_pretrained(out.with_suffix(".tokenizer"))
    original = AutoTokenizer.from_pretrained(trained_model)
    net = AutoModelForSequenceClassification.from_pretrained(trained_model, use_safetensors=True).eval()
    texts = load_text_data(str(data_folder)).texts[SAMPLES : SAMPLES + 10]  # not seen by the verification
    assert saved(texts)["input_ids"] == original(texts)["input_ids"]
    shapes = set()
    for size in (1, 5):
        for padding in (True, "max_length"):  # to the longest text of the batch, and to the model's 64
            for start in range(0, len(texts), size):
                batch = saved(texts[start : start + size], padding=padding, truncation=True, max_length=64,
                              return_tensors="np")
                ids, mask = batch["input_ids"].astype(np.int64), batch["attention_mask"].astype(np.int64)
                (logits,) = session.run(None, {"input_ids": ids, "attention_mask": mask})
                with torch.no_grad():
                    reference = net(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
                assert np.abs(logits - reference.numpy()).max() < 1e-4
                assert (logits.argmax(1) == reference.numpy().argmax(1)).all()
                shapes.add(ids.shape)
    assert {shape[0] for shape in shapes} == {1, 5} and len({shape[1] for shape in shapes}) >= 3


def test_the_metadata_holds_the_reports_figures(exported: tuple[Path, dict[str, Any]], report: Path) -> None:
    out, result = exported
    audit = json.loads(report.read_text())
    metadata = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}[METADATA_KEY])
    assert metadata == json.loads(json.dumps(result["metadata"]))
    robustness = metadata["robustness"]
    assert robustness["source"] == "audit report" and robustness["clean_accuracy"] == audit["clean_accuracy"]
    assert robustness["worst_case"] == [{"eps": r["eps"], "robust_accuracy": r["robust_accuracy"]}
                                        for r in audit["worst_case"]]
    assert robustness["worst_case"][0]["robust_accuracy"] < robustness["clean_accuracy"]  # HotFlip broke some
    assert robustness["threat"]["norm"] == "edits" and robustness["threat"]["eps"] == [1.0, 2.0]
    assert metadata["threat_model"]["budgets"] == [1, 2] and metadata["source"]["sha256"] == audit["model"]["sha256"]
    assert metadata["labels"] == ["LABEL_0", "LABEL_1"]
    assert metadata["input"]["max_length"] == 64 and metadata["input"]["tokenizer"] == "model.tokenizer"


def test_a_model_that_is_not_text_goes_to_robustkits_exporters(tmp_path: Path) -> None:
    assert plugin.robustkit_export_job(ExportConfig(model="builtin:digits-cnn")) is None
    out = tmp_path / "cnn.safetensors"
    result = export("builtin:digits-cnn", "--format", "safetensors", "--no-audit", "--samples", "32", "--out",
                    str(out), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["format"] == "safetensors" and out.is_file()


@pytest.mark.parametrize(("args", "message"), [
    (("--report", "REPORT"), r"the report describes a model with sha256 "),
    (("--data", "builtin:digits"), r"is verified on text: give --data FILE.csv or FILE.jsonl"),
    (("--eps", "1"), r"--eps does not apply to text classifiers"),
    (("--format", "safetensors"), r"--format safetensors: text classifiers export to onnx"),
])
def test_bad_inputs_fail_with_one_line(args: tuple[str, ...], message: str, fresh_model: Path, data_folder: Path,
                                       report: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    given = [str(report) if arg == "REPORT" else arg for arg in args]
    data = [] if "--data" in args else ["--data", str(data_folder)]
    result = export(str(fresh_model), *data, *given, "--samples", "8", "--out", str(out))  # the report: trained
    assert result.exit_code == 1 and message in result.stderr and result.stderr.count("\n") == 1, result.output
    assert list(tmp_path.iterdir()) == []


def test_the_fallback_is_said_and_a_failed_check_writes_nothing(trained_model: Path, data_folder: Path,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    from robustkit_text import export as text_export

    from robustkit.export import onnx as exporter

    def no_dynamo(*args: object) -> None:
        raise RuntimeError("no dynamo here")

    monkeypatch.setattr(exporter, "_dynamo", no_dynamo)
    out = tmp_path / "model.onnx"
    (tmp_path / "model.tokenizer").mkdir()
    args = [str(trained_model), "--data", str(data_folder), "--samples", "12", "--no-audit", "--out", str(out)]
    refused = export(*args)
    assert refused.exit_code == 1 and "model.tokenizer exists and was not written by robustkit" in refused.stderr
    (tmp_path / "model.tokenizer").rmdir()
    for _ in range(2):  # the second run replaces the first one's files
        result = export(*args)
        assert result.exit_code == 0, result.output
        assert "the newer dynamo exporter was tried first and not used: RuntimeError: no dynamo here" in result.stdout
        assert f"its tokenizer: {tmp_path / 'model.tokenizer'}/" in result.stdout
    written = out.read_bytes()
    monkeypatch.setattr(text_export, "LOGIT_TOLERANCE", -1.0)  # any difference, even none, is too much
    failed = export(*args[:-1], str(tmp_path / "other.onnx"))
    assert failed.exit_code == 1 and failed.stderr.count("\n") == 1, failed.output
    assert "export verification failed: onnxruntime and torch differ at batch size 1" in failed.stderr
    assert "nothing was written" in failed.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.tokenizer"]
    assert out.read_bytes() == written


def test_adversarial_texts_are_classified_alike_by_the_graph(exported: tuple[Path, dict[str, Any]]) -> None:
    checks = exported[1]["checks"]
    assert checks["parity_attack"].startswith("text:hotflip") and checks["parity_gap"] <= 0.005
    assert checks["robust_accuracy_exported"] == pytest.approx(checks["robust_accuracy_torch"], abs=0.005)
    assert checks["adversarial_argmax_agreement"] == 1.0
    assert checks["parity_broken"] > 0  # HotFlip broke texts, so the agreement compared something


def test_a_graph_that_differs_on_adversarial_texts_is_refused(trained_model: Path, data_folder: Path) -> None:
    """A graph blind to the attack's edits (it answers every text's true class, in order) is as
    accurate as torch on clean texts but not on HotFlip's: the parity check refuses it."""
    from robustkit_text.export import adversarial_parity
    from robustkit_text.model import as_classifier, encode_data

    from robustkit.errors import RobustkitError
    from robustkit.models.loading import load_model

    model = as_classifier(load_model(str(trained_model)), str(trained_model))
    text = load_text_data(str(data_folder), limit=SAMPLES)
    data = encode_data(model, text)
    truth = iter(data.y.tolist())

    class Session:  # onnxruntime's interface
        def run(self, _outputs: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
            logits = np.zeros((len(feed["input_ids"]), 2), dtype=np.float32)
            logits[np.arange(len(logits)), [next(truth) for _ in logits]] = 1.0
            return [logits]

    class Runtime:
        name, session = "blind.onnx", Session()

    with pytest.raises(RobustkitError, match=r"leave \d+\.\d% accuracy under torch but 100\.0% under the exported"):
        adversarial_parity(Runtime(), model.tokenizer, model, text.texts, data.y)  # type: ignore[arg-type]
