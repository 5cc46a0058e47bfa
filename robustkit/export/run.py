"""Exporters, and the export engine: write a model for deployment and prove the copy is the
same model.

An ``Exporter`` only writes files (``export``) and runs them back as they will run where they
are deployed (``load``). What every export must guarantee is done once, here, for every format:

- the model is exported in eval mode, and whatever cannot survive that (random layers in
  train mode, defences outside the graph) becomes a warning in the result, never silence;
- the files are written into a private temporary folder beside the target and moved into
  place only after verification passed, so a failed export leaves no file behind;
- verification runs the written file on real data: outputs against torch at batch sizes 1
  and an odd size (max abs difference, argmax agreement must be 100%), then adversarial
  examples crafted on the torch model must give the same robust accuracy (within 0.5 points),
  a comparison said to be untested when the attack broke no sample;
- provenance and the robustness summary travel inside the file as JSON (``metadata``), with
  what weakens the figures beside them (``caveats``: a quick suite, a modified suite, failed
  checks). Failed checks mark the figures, as ``audit`` does, rather than stop the export: the
  quick summary without a report runs the audit's cheap gradient-masking checks for this.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from robustkit.audit.report import failed_checks_text, read_report
from robustkit.errors import RobustkitError
from robustkit.models.base import LoadOptions
from robustkit.modules import Model, eval_mode, model_device, predict_logits, seeded
from robustkit.params import Configurable, coerce
from robustkit.threat import TRAINING_EPS, Norm, ThreatModel, eps_text

if TYPE_CHECKING:
    from robustkit.audit.checks import Check
    from robustkit.audit.engine import Evaluation, NamedAttack
    from robustkit.harden.base import DefenceResult

#: Metadata key under which every exporter stores the JSON document.
METADATA_KEY = "robustkit"
#: Verification batch sizes: a single sample, and an odd size so the last batch is ragged.
VERIFY_BATCH_SIZES = (1, 37)
#: Largest robust-accuracy gap (a fraction) between torch and the exported runtime.
MAX_PARITY_GAP = 0.005
#: The attack of the adversarial parity check and of the quick robustness summary.
PARITY_ATTACK = "robustkit:pgd"
#: Layers whose train-mode behaviour is random; an export freezes them in eval mode.
RANDOM_LAYERS = (nn.modules.dropout._DropoutNd, nn.RReLU)


@dataclass
class ExportResult:
    path: Path
    format: str
    files: list[Path] = field(default_factory=list)  #: every file written, ``path`` first
    verified: bool = False
    details: dict[str, Any] = field(default_factory=dict)  #: how it was written (exporter path, opset)
    checks: dict[str, Any] = field(default_factory=dict)  #: verification: max abs diff, agreement, parity
    warnings: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)  #: the document embedded in the file

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "path": str(self.path), "files": [str(f) for f in self.files]}


class Exporter(Configurable, ABC):
    """A deployment format. Subclasses write ``export`` and ``load``; the engine does the rest."""

    suffix: ClassVar[str]

    @abstractmethod
    def export(self, model: nn.Module, example: Tensor, path: Path, *, metadata: dict[str, Any]) -> ExportResult:
        """Write ``model`` (already in eval mode, on the CPU) to ``path`` with ``metadata`` embedded.

        ``example`` is a real batch of two or more inputs. ``path`` lies in a private folder
        that the engine moves into place after verification, so write there directly.
        """

    def wrote(self, path: Path) -> bool:
        """Whether ``path`` is a file this exporter wrote (it carries robustkit's metadata), so
        that an export may replace it without ``--force``. Unsure means no."""
        return False

    @abstractmethod
    def load(self, path: Path, model: nn.Module) -> Model:
        """The written file as a batched predict function, run the way it will be deployed.

        ``model`` is the exported model, for formats that store weights only.
        """


def export_warnings(model: nn.Module, defence: DefenceResult | None = None) -> list[str]:
    """What the export will not carry over: said out loud instead of dropped silently."""
    found = []
    random_in_train = [name or type(m).__name__ for name, m in model.named_modules()
                       if isinstance(m, RANDOM_LAYERS) and m.training]
    if random_in_train:
        found.append(f"random layers in train mode ({', '.join(random_in_train[:4])}) are exported in eval "
                     "mode: randomness at inference does not survive export")
    elif any(m.training for m in model.modules()):
        found.append("the model was in train mode; it is exported in eval mode (BatchNorm uses running statistics)")
    marked = [name or type(m).__name__ for name, m in model.named_modules()
              if getattr(m, "survives_export", True) is False]
    if marked:
        found.append(f"{', '.join(marked[:4])} declare(s) that they do not survive export: the exported graph "
                     "may hold the undefended model only")
    if defence is not None and not defence.survives_export:
        reasons = "; ".join(defence.notes) or "it runs outside the torch graph or relies on randomness"
        found.append(f"the defence does not survive export ({reasons})")
    return found


def verify_export(runtime: Model, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel,
                  *, batch_sizes: Sequence[int] = VERIFY_BATCH_SIZES) -> dict[str, Any]:
    """Compare the exported ``runtime`` with ``model`` on real data; raise on any mismatch."""
    reference = predict_logits(model, x).cpu()
    checks: dict[str, Any] = {"samples": len(x), "batch_sizes": list(batch_sizes)}
    worst = 0.0
    for size in batch_sizes:
        with torch.no_grad():
            out = torch.cat([runtime(x[i : i + size]).float().cpu() for i in range(0, len(x), size)])
        if out.shape != reference.shape:
            raise RobustkitError(f"export verification failed: the exported model returns shape {tuple(out.shape)} "
                                 f"at batch size {size}, torch {tuple(reference.shape)}")
        if not bool(torch.isfinite(out).all()):
            raise RobustkitError(f"export verification failed: non-finite outputs at batch size {size}")
        disagree = int((out.argmax(1) != reference.argmax(1)).sum())
        if disagree:
            raise RobustkitError(f"export verification failed: the exported model and torch disagree on the class "
                                 f"of {disagree}/{len(x)} inputs at batch size {size}")
        worst = max(worst, float((out - reference).abs().max()))
    checks["max_abs_diff"] = worst
    checks["argmax_agreement"] = 1.0
    checks.update(adversarial_parity(runtime, model, x, y, threat))
    return checks


def adversarial_parity(runtime: Model, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel,
                       batch_size: int = 256) -> dict[str, Any]:
    """Robust accuracy of torch-crafted PGD examples under torch and under the runtime.

    ``parity_broken`` counts the samples the attack broke under torch: at 0 the two were
    compared on inputs that fool neither, and the parity says nothing (``print_result``).
    """
    from robustkit.plugin.host import get_host

    attack = get_host().attacks.resolve(PARITY_ATTACK).obj()
    device = model_device(model)
    x_adv = torch.cat([attack(model, x[i : i + batch_size].to(device), y[i : i + batch_size].to(device),
                              threat=threat).x_adv.cpu() for i in range(0, len(x), batch_size)])
    clean_right = predict_logits(model, x).argmax(1).cpu() == y
    torch_pred = predict_logits(model, x_adv).argmax(1).cpu()
    with torch.no_grad():
        runtime_pred = torch.cat([runtime(x_adv[i : i + batch_size]).cpu() for i in range(0, len(x), batch_size)])
    runtime_pred = runtime_pred.argmax(1)
    torch_acc, runtime_acc = float((torch_pred == y).float().mean()), float((runtime_pred == y).float().mean())
    gap = abs(torch_acc - runtime_acc)
    if gap > MAX_PARITY_GAP:
        raise RobustkitError(
            f"export verification failed: PGD examples crafted on torch leave {100 * torch_acc:.1f}% accuracy "
            f"under torch but {100 * runtime_acc:.1f}% under the exported model (more than "
            f"{100 * MAX_PARITY_GAP:.1f} points apart)"
        )
    return {"parity_attack": f"{PARITY_ATTACK} at {threat}", "robust_accuracy_torch": torch_acc,
            "robust_accuracy_exported": runtime_acc, "parity_gap": gap,
            "parity_broken": int((clean_right & (torch_pred != y)).sum()),
            "adversarial_argmax_agreement": float((torch_pred == runtime_pred).float().mean())}


def refuse_foreign(exporter: Exporter, paths: Sequence[Path], force: bool) -> None:
    """Refuse to replace a file that robustkit did not write (or a folder), unless ``force``."""
    for path in paths:
        if path.is_dir():
            example = f"{path / 'model'}{exporter.suffix}"
            raise RobustkitError(f"{path} is a folder; give --out a file name such as {example}")
        if path.exists() and not force and not exporter.wrote(path):
            raise RobustkitError(
                f"{path} exists and was not written by robustkit; choose another --out, or pass --force to replace it"
            )


def export_model(model: nn.Module, exporter: Exporter, path: Path, *, x: Tensor, y: Tensor, threat: ThreatModel,
                 metadata: dict[str, Any], defence: DefenceResult | None = None,
                 warnings: Sequence[str] = (), force: bool = False) -> ExportResult:
    """Export, verify, then move into place; on any failure nothing is left at ``path``, and a
    file robustkit did not write is never replaced unless ``force``.

    ``defence`` is the result of the defence that produced ``model``, if any: whether it
    survives export is part of the result's warnings.
    """
    refuse_foreign(exporter, [path], force)
    found = [*warnings, *export_warnings(model, defence)]
    cpu_model = model if model_device(model).type == "cpu" else copy.deepcopy(model).cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        with eval_mode(cpu_model):
            example = x[:2] if len(x) >= 2 else x.repeat(2, *([1] * (x.dim() - 1)))
            result = exporter.export(cpu_model, example.cpu(), staging / path.name, metadata=metadata)
            try:
                runtime = exporter.load(result.path, cpu_model)
                result.checks = verify_export(runtime, cpu_model, x.cpu(), y.cpu(), threat)
            except RobustkitError as err:
                hint = f" ({result.warnings[0]})" if result.warnings else ""
                raise RobustkitError(f"{err}{hint}; nothing was written") from None
        refuse_foreign(exporter, [path.parent / f.name for f in result.files], force)  # its side files too
        for written in sorted(result.files, key=lambda f: f == result.path):  # the main file last
            os.replace(written, path.parent / written.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result.files = [path.parent / f.name for f in result.files]
    result.path, result.verified = path, True
    result.warnings = [*found, *result.warnings]
    result.metadata = metadata
    return result


def _suite_changes(modified: Any) -> str:
    """A report's ``config.suite.modified`` as the audit's headline writes it (``apgd.steps 50 -> 1``)."""
    from robustkit.audit.suites import SuiteChange

    try:
        return ", ".join(SuiteChange(**change).text() for change in modified)
    except TypeError:  # a record of another shape (an older or newer report): as written
        return json.dumps(modified)


def robustness_caveats(suite: dict[str, Any], checks: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """What weakens the embedded figures, each with a level ("fail" or "warn"): the suite's
    caveat, a modified suite, failed and warning checks. They travel in the metadata next to
    the figures, so that no copy of the file shows the figures without them."""
    found = [{"level": "warn", "text": suite["caveat"]}] if suite.get("caveat") else []
    if suite.get("modified"):
        found.append({"level": "warn", "text": f"the {suite.get('name')} suite was modified "
                      f"({_suite_changes(suite['modified'])})"})
    named = {status: ", ".join(c["name"] for c in checks if c.get("status") == status) for status in ("fail", "warn")}
    if named["fail"]:
        found.append({"level": "fail", "text": failed_checks_text(named["fail"])})
    if named["warn"]:
        found.append({"level": "warn", "text": f"check warnings ({named['warn']}): read their details before "
                      "relying on the figures"})
    return found


def robustness_from_report(report: dict[str, Any], sha256: str) -> dict[str, Any]:
    """The robustness summary of an audit report (``report.json``) about this very model, with
    the suite's caveat and the checks that failed."""
    if report.get("model", {}).get("sha256") != sha256:
        raise RobustkitError(
            f"the report describes a model with sha256 {str(report.get('model', {}).get('sha256'))[:12]}..., "
            f"not this one ({sha256[:12]}...); audit this model and pass that report"
        )
    if not report.get("complete", False):
        raise RobustkitError("the report is from an interrupted audit; rerun the audit to completion")
    config = report.get("config", {})
    described = config.get("suite", {})
    suite = {key: described[key] for key in ("name", "caveat", "modified") if key in described}
    checks = report.get("checks", [])
    return {
        "source": "audit report", "created": report.get("created"), "n": report["n"],
        "data": report["data"].get("name"), "clean_accuracy": report["clean_accuracy"],
        "threat": report["threat"], "suite": suite, "attacks": config.get("attacks", []),
        "worst_case": [{"eps": r["eps"], "robust_accuracy": r["robust_accuracy"]} for r in report["worst_case"]],
        "checks_failed": [c["name"] for c in checks if c.get("status") == "fail"],
        "caveats": robustness_caveats(suite, checks),
    }


#: Two clean accuracies (the report's, this export's) differ beyond chance above this z-score
#: (two-proportion test; 3.3 is p < 0.001, so a different subset of the same data passes).
REPORT_MISMATCH_Z = 3.3


def check_report_matches(report: dict[str, Any], model: nn.Module, x: Tensor, y: Tensor) -> None:
    """Refuse a report whose clean accuracy this model, as loaded now, does not reproduce on the
    verification data: the same weights with other --mean/--std (or other data) would embed
    figures that are not this file's."""
    here = float((predict_logits(model, x).argmax(1).cpu() == y.cpu()).float().mean())
    theirs, n_theirs, n_here = float(report["clean_accuracy"]), int(report["n"]), len(y)
    pooled = (theirs * n_theirs + here * n_here) / (n_theirs + n_here)
    spread = math.sqrt(max(pooled * (1 - pooled), 1e-12) * (1 / n_theirs + 1 / n_here))
    if abs(here - theirs) / spread > REPORT_MISMATCH_Z:
        # --mean/--std normalise images: an audit of another threat (text's edits) had none to differ
        options = "--mean/--std and --data" if report["threat"]["norm"] in {n.value for n in Norm} else "--data"
        raise RobustkitError(
            f"this model scores {here:.1%} clean on the verification data, the report {theirs:.1%}: it does not "
            f"describe the model as loaded now (check {options} against the audit's)"
        )


#: Clean-correct samples the quick check's masking checks run on (the audit's --check-samples default).
QUICK_CHECK_SAMPLES = 128
#: What the quick check is, in every output that shows its figures.
QUICK_CAVEAT = ("quick check: one PGD attack at one eps, not a robustness claim (run robustkit audit and pass "
                "--report for a full audit)")


def quick_checks(model: nn.Module, x: Tensor, y: Tensor, evaluation: Evaluation, attack: NamedAttack,
                 threat: ThreatModel, num_classes: int) -> list[Check]:
    """The audit's cheap signs of gradient masking, on clean-correct samples the quick check
    attacked: PGD on a masked model breaks nothing and its figure looks like a robust model's.
    Zero input gradients and an attack that fails even at half the input range give it away;
    an attack that broke no sample at all is a warning."""
    from robustkit.audit import checks
    from robustkit.audit.checks import Check

    if not bool(evaluation.clean_correct.any()):
        return [Check("robust < clean", "untested", "the model classifies no sample correctly: nothing was attacked")]
    x_sub, y_sub = checks.clean_subset(model, x, y, QUICK_CHECK_SAMPLES, seed=0)
    inputs = checks.CheckInputs(model, x_sub, y_sub, threat, [threat.eps], fgsm=None, iterative=attack,
                                gradient_free=None, num_classes=num_classes, attacks=[attack])
    found = [checks.gradients(model, x_sub, y_sub, [attack]), checks.large_eps_probe(inputs)]
    if evaluation.worst_case(threat.eps) >= evaluation.clean_accuracy:
        attacked = int(evaluation.clean_correct.sum())
        found.append(Check("robust < clean", "warn", f"{attack.name} broke none of the {attacked} clean-correct "
                           f"samples at eps {eps_text(threat.eps)}, as it breaks none of a masked model's"))
    return found


def quick_robustness(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, data: str,
                     num_classes: int) -> dict[str, Any]:
    """Clean accuracy and PGD robust accuracy at one eps: one attack's upper bound, not an audit,
    with the checks that catch the gradient masking which would make it look robust."""
    from robustkit.audit.engine import NamedAttack, evaluate
    from robustkit.plugin.host import get_host

    attack = NamedAttack(PARITY_ATTACK, get_host().attacks.resolve(PARITY_ATTACK).obj())
    evaluation = evaluate(model, x, y, [attack], [threat], device=model_device(model))
    checks = [c.as_dict() for c in quick_checks(model, x, y, evaluation, attack, threat, num_classes)]
    return {
        "source": f"quick check by robustkit export ({PARITY_ATTACK}, default settings)",
        "n": len(x), "data": data, "clean_accuracy": evaluation.clean_accuracy,
        "threat": {"norm": threat.norm.value, "eps": [threat.eps], "bounds": list(threat.bounds), "targeted": False},
        "attacks": [PARITY_ATTACK],
        "worst_case": [{"eps": threat.eps, "robust_accuracy": evaluation.worst_case(threat.eps)}],
        "checks": checks, "checks_failed": [c["name"] for c in checks if c["status"] == "fail"],
        "caveats": robustness_caveats({"caveat": QUICK_CAVEAT}, checks),
    }


@dataclass(frozen=True)
class ExportConfig:
    model: str
    format: str = "onnx"
    out: Path | None = None  #: default: exports/<model name>.<suffix>
    options: tuple[tuple[str, str], ...] = ()  #: exporter parameters (-o KEY VALUE)
    load: LoadOptions = field(default_factory=LoadOptions)
    data: str = "builtin:digits"
    report: Path | None = None  #: an audit's report.json to take the robustness summary from
    norm: Norm | None = None  #: default: the report's, else linf
    eps: float | None = None  #: default: the report's middle eps, else the usual radius
    audit: bool = True  #: without a report, measure a quick summary (clean + PGD)
    samples: int = 512  #: evaluation samples used to verify and for the quick summary
    force: bool = False  #: replace an existing file that robustkit did not write


def default_out(model: str, suffix: str) -> Path:
    stem = model.split(":", 1)[1] if model.startswith("builtin:") else Path(model).stem
    return Path("exports") / f"{stem}{suffix}"


def _threat(config: ExportConfig, report: dict[str, Any] | None, bounds: tuple[float, float]) -> ThreatModel:
    norm = config.norm
    if report is not None:
        reported = Norm.parse(report["threat"]["norm"])
        if norm is not None and norm is not reported:
            raise RobustkitError(f"--threat {norm.value} contradicts the report's {reported.value}; drop --threat")
        norm = reported
    norm = norm or Norm.LINF
    eps = config.eps
    if eps is None and report is not None and report["worst_case"]:
        # the middle eps, as the audit's checks take: the largest often leaves nothing to compare
        reported_eps = sorted(row["eps"] for row in report["worst_case"])
        eps = reported_eps[len(reported_eps) // 2]
    if eps is None:
        if norm not in TRAINING_EPS:
            raise RobustkitError(f"give --eps for the {norm.value} norm")
        eps = TRAINING_EPS[norm] * (bounds[1] - bounds[0])
    return ThreatModel(norm, eps, bounds)


def export_versions(*packages: str) -> dict[str, Any]:
    """The versions that wrote an export (robustkit, torch, onnx, onnxruntime, python, ``packages``)."""
    from importlib import metadata

    from robustkit import __version__
    from robustkit.environment import environment

    return {"robustkit": __version__, **{k: v for k, v in environment("cpu").items()
                                         if k in ("torch", "onnx", "onnxruntime", "python")},
            **{package: metadata.version(package) for package in packages}}


def run_export(config: ExportConfig) -> ExportResult:
    """``robustkit export`` as a function: load, summarise, export, verify, write."""
    from robustkit.data import load_dataset
    from robustkit.models.loading import check_model_output, load_model
    from robustkit.plugin.host import get_host

    job: ExportResult | None = get_host().first_result("robustkit_export_job", config=config)
    if job is not None:  # a plugin's export (text, ...): written and verified by the plugin
        return job
    entry = get_host().exporters.resolve(config.format)
    exporter: Exporter = entry.obj(coerce(entry.obj.Params, dict(config.options), owner=entry.qualified_name))
    path = config.out or default_out(config.model, exporter.suffix)
    refuse_foreign(exporter, [path], config.force)  # before any work
    report = read_report(config.report) if config.report is not None else None
    with seeded(0, config.load.device):  # fresh built-in weights: the same as an audit's at its default --seed 0
        loaded = load_model(config.model, config.load)
    if not isinstance(loaded.model, nn.Module):
        raise RobustkitError(f"{config.model} is not a torch model ({loaded.format}); export needs a torch model")
    data = load_dataset(config.data)
    if config.samples < 1:
        raise RobustkitError(f"samples must be >= 1, got {config.samples}")
    x, y = data.x[: config.samples], data.y[: config.samples]
    num_classes = check_model_output(loaded.model, x, data.num_classes).num_classes
    data.validate(num_classes)
    threat = _threat(config, report, data.bounds)
    if report is not None:
        robustness: dict[str, Any] | None = robustness_from_report(report, loaded.sha256)
        check_report_matches(report, loaded.model, x, y)
    elif config.audit:
        robustness = quick_robustness(loaded.model, x, y, threat, config.data, num_classes)
    else:
        robustness = None
    warnings = []
    if report is not None and report["data"].get("name") != data.name:
        warnings.append(f"the report audited {report['data'].get('name')!r} but verification used {data.name!r}")
    metadata = {
        "format_version": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "exporter": entry.qualified_name,
        "source": {**loaded.describe(), "arch": config.load.arch},
        "input": {"shape": list(data.input_shape), "bounds": list(data.bounds),
                  "note": "inputs in the bounds; any normalisation is inside the model"},
        "robustness": robustness,
        "versions": export_versions(),
    }
    return export_model(loaded.model, exporter, path, x=x, y=y, threat=threat, metadata=metadata, warnings=warnings,
                        force=config.force)
