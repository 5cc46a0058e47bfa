"""``robustkit export`` of a text classifier (the ``robustkit_export_job`` hook).

The graph takes what a tokenizer returns, ``input_ids`` and ``attention_mask`` (int64, batch x
sequence, both axes dynamic), and returns ``logits``, for a Hugging Face folder and for a torch
module loaded with ``--arch`` alike (called by ``model.CONVENTION``); robustkit's ONNX exporter
writes it (torch's dynamo exporter first, the TorchScript exporter as the fallback, said in the
result).
Token ids mean nothing without their tokenizer, so it is saved beside the graph:
``NAME.onnx`` gets ``NAME.tokenizer/`` (``AutoTokenizer.from_pretrained`` reads it).

Verification runs the written files as they are deployed: the saved tokenizer must split the
data's texts as the model's own does, and onnxruntime, fed by it, must match torch at two
batch sizes and two sequence lengths (the full texts, and cut to half), within a stated
tolerance and on every predicted class, and classify the texts HotFlip crafts against torch
(one edit) as torch does, within the image export's parity gap. Only then are the files moved
into place, so a
failure leaves nothing behind. The ONNX metadata (key ``robustkit``) holds the labels, where
the tokenizer is, the maximum length, the threat model (k edits) and the robustness summary:
the audit report's (``--report``), else a quick check at one edit with the audit's default
attack set (``harden.robust_summary``), the exact search text:swap included.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from robustkit.audit.report import read_report
from robustkit.errors import RobustkitError
from robustkit.export.onnx import OUTPUT, Axes, OnnxExporter
from robustkit.export.run import (
    MAX_PARITY_GAP,
    ExportConfig,
    ExportResult,
    check_report_matches,
    default_out,
    export_versions,
    export_warnings,
    refuse_foreign,
    robustness_caveats,
    robustness_from_report,
)
from robustkit.models.loading import check_model_output
from robustkit.models.onnx import OnnxPredictor, runtime_reason
from robustkit.modules import eval_mode, model_device, predict_logits
from robustkit_text.attacks import HotFlip, text_attacks
from robustkit_text.data import SYNTHETIC, is_text_ref, load_text_data
from robustkit_text.harden import SUMMARY_ATTACK, robust_summary
from robustkit_text.model import TextClassifier, as_classifier, encode_data
from robustkit_text.quiet import load_quietly
from robustkit_text.threat import TextThreat

AXES: Axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
#: Verification batch sizes: one text, and five (more than the export example's two).
BATCH_SIZES = (1, 5)
#: Largest |logit difference| between onnxruntime and torch, times max(1, largest |logit|):
#: float32 reordering stays near 1e-6 of it; a graph that computes something else does not.
LOGIT_TOLERANCE = 1e-4
#: Texts per torch forward pass of the reference logits (attention is quadratic in length).
REFERENCE_BATCH = 32


class TokenGraph(nn.Module):
    """The classifier as the graph takes it: the tokenizer's two arrays in, fp32 logits out (both
    inputs even for a network that takes no mask: ``TextClassifier.call``).

    Made in eval mode: the TorchScript exporter restores the mode it found on the wrapper to
    every submodule, and a wrapper left in train mode would turn the network's dropout on.
    """

    def __init__(self, model: TextClassifier) -> None:
        super().__init__()
        self.model = model
        self.eval()

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model.call(input_ids, attention_mask)


def tokenizer_folder(path: Path) -> Path:
    """Where the tokenizer of the graph ``path`` goes: ``model.onnx`` -> ``model.tokenizer/``."""
    return path.with_suffix(".tokenizer")


def run_text_export(config: ExportConfig) -> ExportResult:
    """The export job: every refusal that needs no model comes first, then the summary, then
    the files; image-only settings are refused rather than ignored."""
    given = {"--threat": config.norm, "--eps": config.eps, "--mean/--std": config.load.mean or config.load.std}
    refused = [flag for flag, value in given.items() if value is not None]
    if refused:
        raise RobustkitError(f"{refused[0]} does not apply to text classifiers; their threat model (k edits) comes "
                             "from --report")
    if config.format != "onnx":
        raise RobustkitError(f"--format {config.format}: text classifiers export to onnx (their model folder is "
                             "already safetensors)")
    if not is_text_ref(config.data):
        raise RobustkitError(f"{config.model} is verified on text: give --data FILE.csv or FILE.jsonl (or "
                             f"{SYNTHETIC} for the built-in reviews), not {config.data}")
    if config.samples < 1:
        raise RobustkitError(f"samples must be >= 1, got {config.samples}")
    exporter = OnnxExporter.from_options(dict(config.options))
    path = config.out or default_out(config.model, exporter.suffix)
    side = tokenizer_folder(path)
    refuse_foreign(exporter, [path], config.force)
    if side.exists() and not config.force and not (side.is_dir() and exporter.wrote(path)):
        raise RobustkitError(f"{side} exists and was not written by robustkit; choose another --out, or pass --force "
                             "to replace it")
    report = read_report(config.report) if config.report is not None else None
    loaded, _ = load_quietly(config.model, config.load)  # transformers' warnings: logged in robustkit's words
    model = as_classifier(loaded, config.model)
    text = load_text_data(config.data, limit=config.samples)
    data = encode_data(model, text)
    output = check_model_output(model, data.x, text.num_classes)
    warnings = export_warnings(model)
    if report is not None:
        robustness: dict[str, Any] | None = robustness_from_report(report, loaded.sha256)
        check_report_matches(report, model, data.x, data.y)
        threat_model = report.get("config", {}).get("suite", {}).get("threat_model")
        if report["data"].get("name") != text.name:
            warnings.append(f"the report audited {report['data'].get('name')!r} but verification used {text.name!r}")
    elif config.audit:
        robustness, threat_model = _quick(model, data.x, data.y, config.data), TextThreat((1,), ()).describe()
    else:
        robustness = threat_model = None
    metadata = {
        "format_version": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "exporter": "text:onnx",
        "source": loaded.describe(),
        "input": {"names": list(AXES), "dtype": "int64", "axes": ["batch", "sequence"],
                  "max_length": model.max_length, "pad_token_id": model.pad_id, "tokenizer": side.name,
                  "note": f"tokenize with the tokenizer in {side.name}/ beside this file "
                          "(AutoTokenizer.from_pretrained), at most max_length tokens"},
        "labels": _labels(model, output.num_classes),
        "threat_model": threat_model,
        "robustness": robustness,
        "versions": export_versions("transformers", "tokenizers"),
    }
    cpu_model = model if model_device(model).type == "cpu" else copy.deepcopy(model).cpu()
    result = _write(cpu_model, exporter, path, metadata, text.texts, data.y, config)
    result.warnings = [*warnings, *result.warnings]
    return result


def _labels(model: TextClassifier, num_classes: int) -> list[str]:
    """The config's class names (Hugging Face), else the class indices: a torch module names none."""
    names = getattr(getattr(model.net, "config", None), "id2label", None) or {}
    return [str(names.get(i, i)) for i in range(num_classes)]


def _quick(model: TextClassifier, ids: Tensor, y: Tensor, data: str) -> dict[str, Any]:
    """The harden job's before/after summary in the shape of an export's robustness summary."""
    figures = robust_summary(model, ids, y)
    caveat = ("" if figures["exact"] else "; NOT exhaustive: some texts had more single substitutions than text:swap's "
              "pool, so the figure is an upper bound")
    return {
        "source": f"quick check by robustkit export ({SUMMARY_ATTACK}{caveat}); run robustkit audit and pass --report "
                  "for a full audit",
        "n": len(y), "data": data, "clean_accuracy": figures["clean_accuracy"],
        "threat": {"norm": "edits", "eps": [1.0]}, "attacks": [f"text:{name}" for name in text_attacks()],
        "exact": figures["exact"],
        "caveats": robustness_caveats({"caveat": "quick check at one edit, without the audit's checks" + caveat}, []),
        "worst_case": [{"eps": 1.0, "robust_accuracy": figures["robust_accuracy"]}],
    }


def _write(model: TextClassifier, exporter: OnnxExporter, path: Path, metadata: dict[str, Any],
           texts: Sequence[str], labels: Tensor, config: ExportConfig) -> ExportResult:
    """Export and save the tokenizer into a private folder beside ``path``, verify, then move
    into place (the graph last); on any failure nothing is left at ``path``."""
    side = tokenizer_folder(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        with eval_mode(model):
            pair = (list(texts) * 2)[:2]  # dynamo treats a batch of one as a constant
            example = model.tokenizer(pair, padding=True, truncation=True, max_length=model.max_length,
                                      return_tensors="pt")
            result = exporter.write(TokenGraph(model), tuple(example[name].long() for name in AXES),
                                    staging / path.name, metadata=metadata, axes=AXES)
            model.tokenizer.save_pretrained(staging / side.name)
            try:
                result.checks = verify(result.path, staging / side.name, model, texts, labels, config.load.trust_code)
            except RobustkitError as err:
                hint = f" ({result.warnings[0]})" if result.warnings else ""
                raise RobustkitError(f"{err}{hint}; nothing was written") from None
        refuse_foreign(exporter, [path.parent / f.name for f in result.files], config.force)  # NAME.onnx.data
        if side.is_dir():
            shutil.rmtree(side)
        elif side.exists():  # a file, replaced with --force
            side.unlink()
        os.replace(staging / side.name, side)
        for written in sorted(result.files, key=lambda f: f == result.path):
            os.replace(written, path.parent / written.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result.files = [path.parent / f.name for f in result.files] + sorted(side.iterdir())
    result.path, result.verified, result.metadata = path, True, metadata
    result.details["tokenizer"] = str(side)
    return result


def _run(runtime: OnnxPredictor, batch: Mapping[str, Any]) -> Tensor:
    """onnxruntime's logits for one tokenizer output."""
    feed = {name: np.asarray(batch[name], dtype=np.int64) for name in AXES}
    try:
        (out,) = runtime.session.run([OUTPUT], feed)
    except Exception as err:  # onnxruntime raises its own types
        raise RobustkitError(f"{runtime.name}: onnxruntime fails running the graph ({runtime_reason(err)})") from None
    return torch.from_numpy(np.asarray(out, dtype=np.float32))


def verify(graph: Path, tokenizer: Path, model: TextClassifier, texts: Sequence[str], labels: Tensor,
           trust_code: bool = False) -> dict[str, Any]:
    """Compare the written graph and tokenizer, as deployed, with the model in torch on ``texts``,
    then on HotFlip's adversarial versions of them (``adversarial_parity``); raise on any mismatch."""
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True, trust_remote_code=trust_code)
    texts = list(texts)
    cut = {"truncation": True, "max_length": model.max_length}
    original = model.tokenizer(texts, **cut)["input_ids"]
    if saved(texts, **cut)["input_ids"] != original:
        raise RobustkitError(f"export verification failed: the tokenizer saved in {tokenizer.name} splits the texts "
                             "differently from the model's")
    runtime = OnnxPredictor(graph)
    longest = max(len(ids) for ids in original)
    lengths = sorted({longest, max(2, longest // 2)})  # every text whole, and every text cut to half the longest
    worst, tolerance = 0.0, 0.0
    for length in lengths:
        def encoded(start: int, size: int, length: int = length) -> Any:
            return saved(texts[start : start + size], padding="max_length", max_length=length, truncation=True,
                         return_tensors="pt")

        with torch.no_grad():
            reference = torch.cat([
                TokenGraph(model)(*(encoded(start, REFERENCE_BATCH)[name] for name in AXES))
                for start in range(0, len(texts), REFERENCE_BATCH)])
        allowed = LOGIT_TOLERANCE * max(1.0, float(reference.abs().max()))
        tolerance = max(tolerance, allowed)
        for size in BATCH_SIZES:
            out = torch.cat([_run(runtime, encoded(start, size)) for start in range(0, len(texts), size)])
            diff = float((out - reference).abs().max())
            disagree = int((out.argmax(1) != reference.argmax(1)).sum())
            if disagree or not diff <= allowed:  # not <=: a NaN fails too
                raise RobustkitError(
                    f"export verification failed: onnxruntime and torch differ at batch size {size} and sequence "
                    f"length {length}: max abs diff {diff:.2g} (tolerance {allowed:.2g}), another class for "
                    f"{disagree}/{len(texts)} texts")
            worst = max(worst, diff)
    return {"samples": len(texts), "batch_sizes": list(BATCH_SIZES), "sequence_lengths": lengths,
            "max_abs_diff": worst, "tolerance": tolerance, "argmax_agreement": 1.0,
            **adversarial_parity(runtime, saved, model, texts, labels)}


def adversarial_parity(runtime: OnnxPredictor, tokenizer: Any, model: TextClassifier, texts: Sequence[str],
                       labels: Tensor) -> dict[str, Any]:
    """Accuracy on the texts HotFlip (one edit) crafts against torch, under torch and under the
    deployed graph fed by the saved tokenizer: the robustness summary in the metadata is about
    this file only if the two agree (the image export's check, in text)."""
    ids = model.encode(texts)
    right = predict_logits(model, ids).argmax(1).cpu() == labels
    crafted = HotFlip().run(model, ids, labels, right.long()).adversarial
    adversarial = [a if a is not None else t for a, t in zip(crafted, texts)]
    torch_pred = model.classify(adversarial).argmax(1)
    runtime_pred = torch.cat([
        _run(runtime, tokenizer(adversarial[i : i + REFERENCE_BATCH], padding=True, truncation=True,
                                max_length=model.max_length, return_tensors="np")).argmax(1)
        for i in range(0, len(adversarial), REFERENCE_BATCH)])
    torch_acc = float((torch_pred == labels).float().mean())
    runtime_acc = float((runtime_pred == labels).float().mean())
    gap = abs(torch_acc - runtime_acc)
    if gap > MAX_PARITY_GAP:
        raise RobustkitError(
            f"export verification failed: texts HotFlip crafted on torch leave {100 * torch_acc:.1f}% accuracy under "
            f"torch but {100 * runtime_acc:.1f}% under the exported graph (more than {100 * MAX_PARITY_GAP:.1f} "
            "points apart)")
    return {"parity_attack": "text:hotflip at k = 1 edit", "robust_accuracy_torch": torch_acc,
            "robust_accuracy_exported": runtime_acc, "parity_gap": gap,
            "parity_broken": int((right & (torch_pred != labels)).sum()),  # 0: nothing was compared
            "adversarial_argmax_agreement": float((torch_pred == runtime_pred).float().mean())}
