"""``robustkit harden`` as a function: resolve and validate everything, audit the model before,
train, audit after, and write the output folder.

The folder holds ``model.safetensors`` (the best weights by robust validation accuracy),
``config.json`` (the resolved settings: pass it back with ``--config`` to repeat the run),
``train_log.jsonl`` (one record per epoch), ``curves.png``, ``summary.json`` (before/after
robustness under PGD at the training eps), ``comparison.json`` and ``comparison.png`` (the same
before/after in ``robustkit compare``'s form: per-sample McNemar test, both curves) and
``checkpoint.pt`` (what ``--resume`` continues).
Under torchrun every rank trains and evaluates its share; rank 0 alone writes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustkit import __version__
from robustkit.audit.compare import Audit, compare_reports, write_comparison
from robustkit.audit.engine import NamedAttack, evaluate
from robustkit.audit.run import AuditConfig, build_report
from robustkit.data import TRAIN_FOLDER, Dataset, float_inputs, load_dataset
from robustkit.distributed import DistContext, distributed_session
from robustkit.errors import RobustkitError
from robustkit.harden import checkpoint
from robustkit.harden.base import Defence, DefenceResult
from robustkit.harden.config import RunConfig
from robustkit.harden.loop import LOG_FILENAME, resolve_device
from robustkit.harden.recipes import SCALED, get_recipe
from robustkit.io import atomic_write, folder_lock
from robustkit.models.base import INPUT_METADATA_KEY, LoadedModel, LoadOptions, input_metadata, state_sha256
from robustkit.models.loading import check_model_output, load_model
from robustkit.modules import Normalized, seeded
from robustkit.params import coerce
from robustkit.plugin.host import get_host
from robustkit.threat import TRAINING_EPS, Norm, ThreatModel, parse_number

log = logging.getLogger(__name__)

#: Share of an image folder without train/ and val/ held out for evaluation (seeded split).
SPLIT_FRACTION = 0.2
#: The attack of the before/after summary (default settings, at the training eps).
SUMMARY_ATTACK = "robustkit:pgd"


@dataclass(frozen=True)
class HardenRequest:
    """Everything ``robustkit harden`` was asked for, before validation."""

    model: str
    data: str
    defence: str | None  #: None: the recipe's
    arch: str | None = None
    trust_code: bool = False
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    threat: str = "linf"  #: a norm (eps from ``eps``) or NORM:EPS
    eps: str | float | None = None
    options: Mapping[str, Any] = field(default_factory=dict)  #: the defence's parameters
    attack: str | None = None  #: inner maximiser of defences that take one (pgd-at)
    run: RunConfig = field(default_factory=RunConfig)
    recipe: str | None = None  #: a published configuration (robustkit.harden.recipes); the rest overrides it
    awp: float | None = None  #: adversarial weight perturbation's gamma (``awp_gamma``), for robustkit's loop
    val_data: str | None = None  #: a separate validation set for the canary, instead of a split of the training data


def apply_recipe(request: HardenRequest, bounds: tuple[float, float]) -> HardenRequest:
    """The request with its recipe's defence, eps and settings filled in where it gives none;
    eps and step sizes scale with the data's range (recipes are written for [0, 1])."""
    if request.recipe is None:
        if request.defence is None:
            raise RobustkitError("give --defence NAME or --recipe NAME (see `robustkit recipes list`)")
        return request
    recipe = get_recipe(request.recipe)
    defence = request.defence or recipe.defence
    defences = get_host().defences
    if defences.resolve(defence).qualified_name != defences.resolve(recipe.defence).qualified_name:
        raise RobustkitError(f"recipe {recipe.name!r} trains with {recipe.defence}; drop --defence {request.defence} "
                             "or the recipe")
    if ":" in request.threat or Norm.parse(request.threat) is not Norm.LINF:
        raise RobustkitError(f"recipe {recipe.name!r} is a linf recipe; drop --threat or the recipe")
    span = bounds[1] - bounds[0]
    settings = {k: v * span if k in SCALED else v for k, v in recipe.params.items()}
    eps = request.eps if request.eps is not None else recipe.eps * span
    return dataclasses.replace(request, defence=defence, eps=eps, options={**settings, **request.options})


def params_dict(defence: Defence) -> dict[str, Any]:
    params = defence.params
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        return dataclasses.asdict(params)
    return {}


def resolve_threat(text: str, eps: str | float | None, bounds: tuple[float, float]) -> ThreatModel:
    if ":" in text:
        if eps is not None:
            raise RobustkitError(
                f"--threat {text} already gives eps; drop --eps or write --threat {text.split(':')[0]}"
            )
        return ThreatModel.parse(text, bounds=bounds)
    norm = Norm.parse(text)
    if norm not in TRAINING_EPS:
        raise RobustkitError(f"harden trains against linf or l2 threat models, not {norm.value}")
    return ThreatModel(norm, TRAINING_EPS[norm] if eps is None else parse_number(eps), bounds)


def resolve_defence(request: HardenRequest) -> tuple[str, Defence]:
    """The registered training defence with its parameters; one-line errors for the rest."""
    assert request.defence is not None, "apply_recipe names the defence"
    entry = get_host().defences.resolve(request.defence)
    cls = entry.obj
    if getattr(cls, "kind", None) != "training":
        raise RobustkitError(
            f"defence {entry.qualified_name!r} is a {getattr(cls, 'kind', '?')} defence; harden "
            "trains models: pick a training defence (see `robustkit defences list`)"
        )
    options = dict(request.options)
    if request.attack is not None:
        if "attack" not in {f.name for f in dataclasses.fields(cls.Params)}:
            raise RobustkitError(
                f"defence {entry.qualified_name!r} crafts its own examples; --attack applies to "
                "defences with an inner attack, such as pgd-at"
            )
        options["attack"] = request.attack
    if request.awp is not None:
        if not cls.loop.awp:
            raise RobustkitError(_own_loop_refusal(entry.qualified_name, ["--awp"]))
        options["awp_gamma"] = request.awp
    return entry.qualified_name, cls(coerce(cls.Params, options, owner=entry.qualified_name))


def _own_loop_refusal(name: str, refused: list[str]) -> str:
    return (f"defence {name!r} trains in its own loop, which cannot honour {', '.join(refused)}; "
            "drop them, or pick one of robustkit's defences (see `robustkit defences list`)")


def _check_loop(name: str, defence: Defence, run: RunConfig, world: DistContext) -> None:
    """Refuse what the defence's training loop cannot do, and say what it goes without, before
    any work starts (a library's own loop, such as ART's trainers)."""
    refused = defence.loop.refusals(run, world.world_size)
    if refused:
        raise RobustkitError(_own_loop_refusal(name, refused))
    missing = defence.loop.missing()
    if missing and world.is_main:
        log.warning("defence %s trains in its own loop: %s", name, "; ".join(missing))


@dataclass(frozen=True)
class SummaryAudit:
    """One side of the before/after: its figures for ``summary.json``, and the audit in
    ``robustkit compare``'s form (report document and per-sample results)."""

    figures: dict[str, float]
    audit: Audit


def audit(label: str, loaded: LoadedModel, request: HardenRequest, data: Dataset, threat: ThreatModel,
          world: DistContext, device: torch.device) -> SummaryAudit:
    """Clean and PGD robust accuracy on the evaluation split (the before/after summary)."""
    entry = get_host().attacks.resolve(SUMMARY_ATTACK)
    suite = [NamedAttack(entry.qualified_name, entry.obj())]
    started = time.perf_counter()
    result = evaluate(loaded.model, data.x, data.y, suite, [threat], device=device, dist_ctx=world)
    config = AuditConfig(model=loaded.source, data=request.data, attacks=(entry.qualified_name,), norm=threat.norm,
                         eps=(threat.eps,), run_checks=False, certify=False)
    report = build_report(config, loaded, data, result, [], suite, started)
    figures = {"clean_accuracy": result.clean_accuracy,
               "robust_accuracy": result.robust_accuracy(result.outcomes[0], threat.eps)}
    return SummaryAudit(figures, Audit(label, report.to_json_dict(), tuple(result.worst_broken_at().tolist())))


def _weights(model: nn.Module, loaded: LoadedModel) -> dict[str, torch.Tensor]:
    """What ``--arch`` rebuilds: the inner network when loading added the normalisation wrapper
    (its mean/std go into the file's metadata instead)."""
    net = model.net if isinstance(model, Normalized) and loaded.normalisation is not None else model
    assert isinstance(net, nn.Module)
    return {k: v.detach().cpu().clone().contiguous() for k, v in net.state_dict().items()}


def plot_curves(history: list[dict[str, Any]], title: str) -> bytes:
    """Loss, and clean/robust validation accuracy per epoch, with the best epoch and any
    catastrophic overfitting marked; a PNG drawn with the Agg backend (no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11.0, 3.8), dpi=110)
    FigureCanvasAgg(fig)
    loss_ax, acc_ax = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in history]
    loss_ax.plot(epochs, [r["loss"] for r in history], marker="o", linewidth=1.2)
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="loss")
    for key, label, marker, dashes in (
        ("val_clean", "clean (validation)", "o", "-"),
        ("val_robust", "robust (validation canary)", "s", "--"),
        ("train_adv_accuracy", "training examples", "^", ":"),
    ):
        acc_ax.plot(epochs, [100 * r[key] for r in history], marker=marker, linestyle=dashes, linewidth=1.2,
                    markersize=4, label=label)
    for record in history:
        if record.get("overfit"):
            acc_ax.axvline(record["epoch"], color="red", linestyle=":", linewidth=1.2)
    best = [r["epoch"] for r in history if r.get("best")]
    if best:
        acc_ax.axvline(best[-1], color="black", linestyle="--", linewidth=1.0, label=f"best (epoch {best[-1]})")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", ylim=(0, 100), title="accuracy")
    acc_ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def resolved_config(
    request: HardenRequest,
    defence_name: str,
    defence: Defence,
    threat: ThreatModel,
    world: DistContext,
) -> dict[str, Any]:
    """The settings as run; its keys are the ones ``--config`` reads ("environment" is ignored)."""
    run = request.run
    return {
        "model": request.model,
        "data": request.data,
        "val_data": request.val_data,
        "recipe": request.recipe,
        "defence": defence_name,
        "arch": request.arch,
        "mean": list(request.mean) if request.mean else None,
        "std": list(request.std) if request.std else None,
        "threat": threat.norm.value,
        "eps": threat.eps,
        "params": params_dict(defence),
        "precision": run.precision,
        "device": run.device,
        "channels_last": run.channels_last,
        "compile": run.compile,
        "placement": run.placement,
        "workers": run.workers,
        "out": str(run.out_dir) if run.out_dir else None,
        "environment": {
            "robustkit": __version__,
            "torch": torch.__version__,
            "world_size": world.world_size,
            "trust_code": request.trust_code,
        },
    }


def run_harden(request: HardenRequest) -> dict[str, Any]:
    """Run ``robustkit harden``; returns the summary document (also written as summary.json).

    Under torchrun every rank returns only after rank 0 has written the outputs, with the
    process group ended (``distributed_session``).
    """
    with distributed_session(request.run.device) as world:
        if request.run.out_dir is None or not world.is_main:
            return _harden(request, world)
        with folder_lock(Path(request.run.out_dir), "robustkit harden"):
            return _harden(request, world)


def _harden(request: HardenRequest, world: DistContext) -> dict[str, Any]:
    started = time.perf_counter()
    run = request.run
    if run.out_dir is None:
        raise RobustkitError("harden needs an output folder (--out DIR)")
    out = Path(run.out_dir)
    if not run.resume and (out / checkpoint.FILENAME).exists():
        raise RobustkitError(
            f"{out} holds the checkpoint of an earlier run; pass --resume to continue it, or choose another --out"
        )
    job: dict[str, Any] | None = get_host().first_result("robustkit_harden_job", request=request)
    if job is not None:  # a plugin's job (text, ...) that trains and writes its own outputs
        return job
    data = load_dataset(request.data, stored=True)  # uint8 images stay uint8 until the training device
    notes: list[str] = []
    if data.x_train is None and Path(request.data).is_dir():  # a folder of class folders: split it, loudly
        data = data.split(SPLIT_FRACTION, seed=0)
        notes.append(f"{request.data} has no {TRAIN_FOLDER}/ and val/ folders: trained on a seeded split "
                     f"({1 - SPLIT_FRACTION:.0%} training, {SPLIT_FRACTION:.0%} held out for the before/after audit)")
        log.warning("%s", notes[-1])
    data.x = float_inputs(data.x)  # the evaluation split: the before/after audits attack floats
    data.training_split()  # before the model loads and the "before" audit runs
    if request.val_data is not None:  # the canary converts its batches on the device
        data = data.with_validation(load_dataset(request.val_data, stored=True), request.val_data)
    request = apply_recipe(request, data.bounds)
    defence_name, defence = resolve_defence(request)
    threat = resolve_threat(request.threat, request.eps, data.bounds)
    defence.check(threat)
    _check_loop(defence_name, defence, run, world)
    device = resolve_device(run.device, world)
    with seeded(getattr(defence.params, "seed", 0), device):  # fresh built-in weights are seeded
        loaded = load_model(
            request.model,
            LoadOptions(request.arch, request.trust_code, request.mean, request.std, str(device)),
        )
    model = loaded.model
    if not isinstance(model, nn.Module):
        raise RobustkitError(
            f"{request.model} loads as a {loaded.format} predict function without trainable "
            "weights; harden the PyTorch weights instead (a state dict or safetensors with --arch)"
        )
    for warning in check_model_output(model, data.x, data.num_classes).warnings:
        log.warning("%s", warning)
    config = json.dumps(resolved_config(request, defence_name, defence, threat, world), indent=2) + "\n"
    if world.is_main and not run.resume:  # a resumed run keeps the original until it succeeds
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "config.json", config)

    before = audit("before", loaded, request, data, threat, world, device)
    result = defence.apply(model, data, threat=threat, run=run)
    result.notes = notes + result.notes
    hardened = dataclasses.replace(loaded, model=result.model, source=f"{request.model} hardened with {defence_name}",
                                   format="hardened", sha256=state_sha256(result.model), notes=[])
    after = audit("after", hardened, request, data, threat, world, device)
    summary = _summary(request, defence_name, defence, threat, data, result, before.figures, after.figures, world)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    if world.is_main:
        if run.resume:
            atomic_write(out / "config.json", config)
        _write_outputs(out, request, result, summary, defence_name, threat, loaded, data)
        write_comparison(compare_reports(before.audit, after.audit), out)
    return summary


def _summary(
    request: HardenRequest,
    defence_name: str,
    defence: Defence,
    threat: ThreatModel,
    data: Dataset,
    result: DefenceResult,
    before: dict[str, float],
    after: dict[str, float],
    world: DistContext,
) -> dict[str, Any]:
    history = result.history
    best = [r["epoch"] for r in history if r.get("best")]
    out = Path(request.run.out_dir or ".")
    return {
        "model": request.model,
        "data": data.describe(),
        "recipe": request.recipe,
        "defence": defence_name,
        "params": params_dict(defence),
        "threat": str(threat),
        "summary_attack": f"{SUMMARY_ATTACK} (default settings) at the training eps",
        "before": before,
        "after": after,
        "epochs_run": len(history),
        "best_epoch": best[-1] if best else None,
        "stop_reason": history[-1].get("stop") if history else None,
        "overfit_epochs": [r["epoch"] for r in history if r.get("overfit")],
        "notes": [f"trained in its own loop: {gap}" for gap in defence.loop.missing()] + result.notes,
        "precision": request.run.precision,
        "world_size": world.world_size,
        "outputs": {name: str(out / file) for name, file in _output_files(defence, history)},
    }


def _output_files(defence: Defence, history: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The files a run leaves: the log and checkpoint only from a loop that writes them."""
    files = [("model", "model.safetensors"), ("config", "config.json"), ("summary", "summary.json"),
             ("comparison", "comparison.json"), ("comparison_plot", "comparison.png")]
    if defence.loop.checkpoints:
        files += [("log", LOG_FILENAME), ("checkpoint", checkpoint.FILENAME)]
    if history:
        files.append(("plot", "curves.png"))
    return files


def _write_outputs(
    out: Path,
    request: HardenRequest,
    result: DefenceResult,
    summary: dict[str, Any],
    defence_name: str,
    threat: ThreatModel,
    loaded: LoadedModel,
    data: Dataset,
) -> None:
    from safetensors.torch import save

    metadata = {
        "robustkit": json.dumps(summary["after"]),
        INPUT_METADATA_KEY: input_metadata(loaded.normalisation, data.bounds, data.input_shape, data.num_classes),
    }
    atomic_write(out / "model.safetensors", save(_weights(result.model, loaded), metadata=metadata))
    if result.history:
        atomic_write(
            out / "curves.png",
            plot_curves(result.history, f"{defence_name} on {request.data}, {threat}"),
        )
    atomic_write(out / "summary.json", json.dumps(summary, indent=2) + "\n")
