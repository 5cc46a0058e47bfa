"""``robustkit harden`` on a text classifier (the ``robustkit_harden_job`` hook).

Trains with a text defence (``text:plain|fgm|pgd|freelb``) in robustkit's shared loop, which
writes ``checkpoint.pt`` and ``train_log.jsonl`` and continues with ``--resume``; before and
after, the evaluation split is attacked at one edit with the audit's default attack set
(``text_attacks``: HotFlip, the character attack and the exact search text:swap, in cascade). The output folder holds
``model/`` (``save_pretrained``: config.json, model.safetensors, tokenizer files; for a torch
module loaded with ``--arch``, its state dict as model.safetensors and the tokenizer files; what
``robustkit audit`` and ``export`` load), ``config.json``, ``summary.json`` and ``curves.png``.
Under torchrun every rank trains and attacks its share of the summary; rank 0 alone writes.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from robustkit import __version__
from robustkit.distributed import DistContext, init_distributed, sum_over_ranks
from robustkit.errors import RobustkitError
from robustkit.harden import checkpoint
from robustkit.harden.api import HardenRequest, params_dict, plot_curves, resolve_defence
from robustkit.harden.loop import LOG_FILENAME, resolve_device
from robustkit.io import atomic_write
from robustkit.models.base import LoadOptions
from robustkit.modules import predict_logits, seeded
from robustkit.threat import parse_number
from robustkit_text.attacks import cascade, text_attacks
from robustkit_text.data import load_text_data
from robustkit_text.defences import TextDefence, default_threat, describe_threat
from robustkit_text.model import WEIGHTS_FILE, TextClassifier, as_classifier, encode_data
from robustkit_text.quiet import load_quietly

log = logging.getLogger(__name__)

SUMMARY_ATTACK = ("worst case of the audit's default text attacks (text:hotflip, text:charbug, text:swap) at k = 1 "
                  "edit; text:swap scores every single substitution up to -o pool 20000 per text (exact at k = 1 "
                  "when it does: 'exact' says)")
#: Share of an evaluation-only text file held out for the before/after summary.
SPLIT_FRACTION = 0.2


def robust_summary(model: TextClassifier, ids: torch.Tensor, y: torch.Tensor,
                   world: DistContext | None = None) -> dict[str, Any]:
    """Clean accuracy and accuracy under the audit's default attacks with one edit, on the
    evaluation split, and ``exact``: whether text:swap's search was exhaustive (the robust
    figure is then the exact one over token substitutions, or lower through character edits). Under
    torchrun (``world``) each rank attacks every world_size-th sample and the counts are summed,
    so the attack's time is shared and every rank returns the same figures."""
    world = world or DistContext()
    mine = torch.arange(world.rank, len(y), world.world_size)
    ids, labels = ids[mine], y[mine]
    right = predict_logits(model, ids).argmax(1).cpu() == labels if len(mine) else torch.zeros(0, dtype=torch.bool)
    worst, notes = cascade(text_attacks(), model, ids, labels, 1) if len(mine) else (torch.zeros(0), [])
    capped = int(any("NOT exhaustive" in note for note in notes))
    clean, robust, capping = sum_over_ranks([int(right.sum()), int((right & (worst > 1)).sum()), capped], world)
    return {"clean_accuracy": clean / len(y), "robust_accuracy": robust / len(y), "exact": capping == 0}


def _refuse_image_settings(request: HardenRequest) -> None:
    given = {"--recipe": request.recipe, "--mean/--std": request.mean or request.std,
             "--awp": request.awp, "--val-data": request.val_data,
             "--threat NORM:EPS": ":" in request.threat or request.threat not in ("linf", "l2")}
    refused = [flag for flag, value in given.items() if value]
    if refused:
        raise RobustkitError(f"{refused[0]} does not apply to text classifiers; text defences train in an l2 ball of "
                             "the embedding output of radius --eps (in mean token norms)")


def run_text_harden(request: HardenRequest) -> dict[str, Any]:
    started = time.perf_counter()
    _refuse_image_settings(request)
    if request.defence is None:
        raise RobustkitError("give --defence: text:plain, text:fgm, text:pgd or text:freelb")
    name, defence = resolve_defence(request)
    if not isinstance(defence, TextDefence):
        raise RobustkitError(f"{name} is an image defence; text classifiers train with text:plain, text:fgm, "
                             "text:pgd or text:freelb")
    if defence.params.awp_gamma:  # -o awp_gamma passes resolve_defence's --awp check; the steps would ignore it
        raise RobustkitError("awp_gamma does not apply to text defences (their steps take no weight "
                             "perturbation); drop -o awp_gamma")
    threat = default_threat(None if request.eps is None else parse_number(request.eps))
    run = request.run
    world = init_distributed(run.device)  # the group run_harden's distributed_session started
    refused = defence.loop.refusals(run, world.world_size)
    if refused:
        raise RobustkitError(f"text defences cannot honour {', '.join(refused)} yet; drop them")
    text = load_text_data(request.data)
    notes: list[str] = []
    if text.train_texts is None:
        from robustkit_text.data import TextDataset

        order = torch.randperm(len(text.texts), generator=torch.Generator().manual_seed(0)).tolist()
        held = max(1, round(SPLIT_FRACTION * len(order)))
        pick = lambda rows, values: [values[i] for i in rows]  # noqa: E731
        text = TextDataset(text.name, pick(order[:held], text.texts), pick(order[:held], text.labels),
                           text.num_classes, pick(order[held:], text.texts), pick(order[held:], text.labels),
                           text.source, text.columns)
        notes.append(f"{request.data} has no training split: trained on a seeded {1 - SPLIT_FRACTION:.0%} of it, "
                     f"{SPLIT_FRACTION:.0%} held out for the before/after summary")
        if world.is_main:
            log.warning("%s", notes[-1])
    device = resolve_device(run.device, world)
    loaded, heard = load_quietly(request.model, LoadOptions(request.arch, request.trust_code, None, None, str(device)))
    notes += heard
    model = as_classifier(loaded, request.model)
    data = encode_data(model, text)
    out = Path(run.out_dir or ".")
    config = {"model": request.model, "arch": request.arch, "data": request.data, "defence": name,
              "threat": describe_threat(threat), "eps": threat.eps, "params": params_dict(defence),
              "precision": run.precision, "device": run.device, "out": str(out),
              "environment": {"robustkit": __version__, "torch": torch.__version__,
                              "world_size": world.world_size, "trust_code": request.trust_code}}
    if world.is_main and not run.resume:  # a resumed run keeps the original until it succeeds
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "config.json", json.dumps(config, indent=2) + "\n")
    with seeded(getattr(defence.params, "seed", 0), device):
        before = robust_summary(model, data.x, data.y, world)
        result = defence.apply(model, data, threat=threat, run=run)
        after = robust_summary(model, data.x, data.y, world)
    history = result.history
    best = [r["epoch"] for r in history if r.get("best")]
    summary = {
        "model": request.model, "arch": request.arch, "data": {**data.describe(), **text.describe()}, "recipe": None,
        "defence": name, "params": params_dict(defence),
        "threat": f"embedding l2 (Frobenius), eps {threat.eps:g} x mean token norm",
        "summary_attack": SUMMARY_ATTACK, "before": before, "after": after, "epochs_run": len(history),
        "best_epoch": best[-1] if best else None, "stop_reason": history[-1].get("stop") if history else None,
        "overfit_epochs": [r["epoch"] for r in history if r.get("overfit")],
        "notes": notes + result.notes + audit_note(model, request, out),
        "precision": run.precision, "world_size": world.world_size, "seconds": round(time.perf_counter() - started, 2),
        "outputs": {"model": str(out / "model"), "config": str(out / "config.json"),
                    "summary": str(out / "summary.json"), "log": str(out / LOG_FILENAME),
                    "checkpoint": str(out / checkpoint.FILENAME), "plot": str(out / "curves.png")},
    }
    if not world.is_main:  # rank 0 writes; run_harden's session holds every rank until it has
        return summary
    if run.resume:
        atomic_write(out / "config.json", json.dumps(config, indent=2) + "\n")
    save_folder(model, out / "model")
    if history:
        atomic_write(out / "curves.png", plot_curves(history, f"{name} on {request.data}, {summary['threat']}"))
    atomic_write(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def save_folder(model: TextClassifier, folder: Path) -> None:
    """The network and tokenizer into ``folder``, replaced as a whole: written beside it first, so a
    failure leaves the previous folder. A Hugging Face network with ``save_pretrained``; a torch
    module as its state dict in ``model.safetensors`` (``--arch`` rebuilds it, and reading it runs
    no code), the tokenizer's ``save_pretrained`` files beside it, where the loader looks."""
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        if model.hf_folder:
            model.net.save_pretrained(staging, safe_serialization=True)  # type: ignore[operator]
        else:
            from safetensors.torch import save_file

            # cloned: safetensors refuses tensors that share memory (tied weights); strict loading wants every key
            save_file({k: v.detach().cpu().clone().contiguous() for k, v in model.net.state_dict().items()},
                      str(staging / WEIGHTS_FILE))
        model.tokenizer.save_pretrained(staging)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def audit_note(model: TextClassifier, request: HardenRequest, out: Path) -> list[str]:
    """The command that audits a hardened torch module (its weights file and ``--arch``), printed
    with the summary's notes; a Hugging Face folder is audited as the folder ``outputs`` names."""
    if model.hf_folder:
        return []
    return [f"audit it with: robustkit audit {out / 'model' / WEIGHTS_FILE} --arch {request.arch or 'MODULE:FACTORY'} "
            f"--data {request.data}"]
