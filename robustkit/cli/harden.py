"""``robustkit harden MODEL --data DATA --defence NAME``: adversarial training.

Settings come from, in rising precedence: the defence's defaults, ``--config FILE`` (JSON or
TOML; the ``config.json`` a run writes is one), ``-o KEY VALUE``, and the explicit flags.
Under ``torchrun --nproc_per_node=N -m robustkit harden ...`` the run uses DDP; only rank 0
writes files and prints.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from robustkit.cli.common import data_for, model_options, parse_floats
from robustkit.errors import RobustkitError

#: Keys a --config file may hold; "environment" (written for the record) is ignored. Not
#: trust_code: only the person at the command line can vouch for a file that runs code.
CONFIG_KEYS = (
    "model",
    "data",
    "val_data",
    "recipe",
    "defence",
    "arch",
    "mean",
    "std",
    "threat",
    "eps",
    "epochs",
    "batch_size",
    "params",
    "attack",
    "precision",
    "device",
    "channels_last",
    "compile",
    "placement",
    "workers",
    "out",
)


def read_config(path: Path) -> dict[str, Any]:
    """A JSON or TOML file of CONFIG_KEYS; unknown keys are an error, never ignored."""
    text = path.read_text()
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            document = tomllib.loads(text)
        else:
            document = json.loads(text)
    except ValueError as err:
        raise RobustkitError(f"--config {path}: not valid {path.suffix.lstrip('.') or 'JSON'} ({err})") from None
    if not isinstance(document, dict):
        raise RobustkitError(f"--config {path}: expected a table of settings")
    document.pop("environment", None)
    unknown = sorted(set(document) - set(CONFIG_KEYS))
    if unknown:
        raise RobustkitError(f"--config {path}: unknown key {unknown[0]!r}; valid keys: {', '.join(CONFIG_KEYS)}")
    return document


def _floats(value: Any, option: str) -> tuple[float, ...] | None:
    if isinstance(value, (list, tuple)):
        return tuple(float(v) for v in value)
    return parse_floats(value, option)


@click.command()
@click.argument("model", required=False)
@click.option(
    "--data",
    help="Training data: builtin:NAME, a .npz with x_train, y_train (and x, y for the audit), or an image "
    "folder with train/ and val/ [required, except for built-in models: builtin:digits].",
)
@click.option(
    "--val-data",
    help="A separate validation set (.npz with x, y, or an image folder) for the per-epoch canary, instead of "
    "a split of the training data; its input shape and classes must match the training data's.",
)
@click.option(
    "--defence",
    "--defense",
    "defence",
    help="Training defence, e.g. pgd-at, fgsm-rs, atta, free, trades [required unless --recipe names one].",
)
@click.option("--recipe", help="A published configuration (defence, optimizer, schedule, eps, ...); "
              "flags override it. See `robustkit recipes list`.")
@model_options
@click.option("--threat", default="linf", show_default=True, help="linf or l2 (or NORM:EPS).")
@click.option("--eps", help="Radius in input units, e.g. 8/255 (default: 8/255 for linf, 0.5 for l2).")
@click.option("--epochs", type=int, help="Passes over the training data [default: the defence's or recipe's; 15].")
@click.option("--batch-size", type=int,
              help="Global batch size, split over torchrun processes [default: the defence's or recipe's; 64].")
@click.option(
    "-o",
    "--option",
    "options",
    type=(str, str),
    multiple=True,
    metavar="KEY VALUE",
    help="A parameter of the defence, e.g. -o beta 3 (see `robustkit defences show NAME`).",
)
@click.option(
    "--augment",
    help="Augmentation on the device before the attack: crop,flip | crop | flip | none | auto "
    "(default auto: crop and flip for images of 16x16 or more).",
)
@click.option(
    "--awp",
    type=float,
    metavar="GAMMA",
    help="Adversarial weight perturbation (Wu et al., 2020) of this size relative to each layer's norm; the "
    "authors' code uses 1e-2 for pgd-at, 5e-3 for trades. It starts after -o awp_warmup epochs (default 0; "
    "trades: 10, as in the paper's code).",
)
@click.option("--attack", help="Inner maximiser for pgd-at: any registered attack (default robustkit:pgd).")
@click.option(
    "--precision",
    type=click.Choice(["fp32", "bf16", "fp16"]),
    default="fp32",
    show_default=True,
    help="Autocast dtype for training and crafting (fp16 adds a GradScaler).",
)
@click.option(
    "--channels-last",
    is_flag=True,
    help="Channels-last memory format (faster convolutions on GPUs).",
)
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile the model.")
@click.option(
    "--placement",
    type=click.Choice(["auto", "device", "loader"]),
    default="auto",
    show_default=True,
    help="Data on the device, or in pinned memory fed by DataLoader workers; auto: device if it fits.",
)
@click.option("--workers", default=2, show_default=True, help="DataLoader workers (placement 'loader').")
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSON or TOML settings (a run's config.json repeats it); flags override it.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("robustkit-out/harden"),
    show_default=True,
    help="Output folder: weights, config, log, plot, summary, checkpoint.",
)
@click.option("--resume", is_flag=True, help="Continue the run whose checkpoint is in --out.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON document.")
@click.pass_context
def harden(ctx: click.Context, **values: Any) -> None:
    """Adversarially train MODEL (a built-in architecture or your weights) to resist attacks."""
    from robustkit import HardenRequest, RunConfig, run_harden
    from robustkit.environment import warn_if_cpu_busy

    config = read_config(values["config_file"]) if values["config_file"] else {}

    def pick(key: str, option: str | None = None) -> Any:
        """The flag if given on the command line, else the config file's value, else the default."""
        option = option or key
        given = ctx.get_parameter_source(option) is click.core.ParameterSource.COMMANDLINE
        return values[option] if given or key not in config else config[key]

    model, defence, recipe = pick("model"), pick("defence"), pick("recipe")
    if not model:
        raise click.UsageError("give MODEL (e.g. builtin:digits-cnn or weights.safetensors with --arch)")
    if not defence and not recipe:
        raise click.UsageError("give --defence NAME (see `robustkit defences list`) or --recipe NAME "
                               "(see `robustkit recipes list`)")
    options: dict[str, Any] = dict(config.get("params") or {})
    for key in ("epochs", "batch_size"):
        if config.get(key) is not None:
            options[key] = config[key]
    options.update(dict(values["options"]))
    for key in ("epochs", "batch_size", "augment"):
        if values[key] is not None:
            options[key] = values[key]
    attack = pick("attack")
    if attack is not None and attack == options.get("attack"):
        attack = None  # the config's params already hold it; only a new --attack needs checking
    run = RunConfig(
        device=pick("device"),
        precision=pick("precision"),
        channels_last=pick("channels_last"),
        compile=pick("compile", "compile_model"),
        placement=pick("placement"),
        workers=pick("workers"),
        out_dir=Path(pick("out")),
        resume=values["resume"],
    )
    eps = pick("eps")
    request = HardenRequest(
        model=model,
        data=data_for(pick("data"), model, pick("arch")),
        defence=defence,
        arch=pick("arch"),
        trust_code=values["trust_code"],
        mean=_floats(pick("mean"), "--mean"),
        std=_floats(pick("std"), "--std"),
        threat=pick("threat"),
        eps=None if eps is None else str(eps),
        options=options,
        attack=attack,
        run=run,
        recipe=recipe,
        awp=values["awp"],
        val_data=pick("val_data"),
    )
    warn_if_cpu_busy(run.device)
    summary = run_harden(request)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if values["as_json"]:
        click.echo(json.dumps(summary, indent=2, default=str))
    else:
        print_summary(summary)


def print_summary(summary: dict[str, Any]) -> None:
    from rich.table import Table

    from robustkit.console import stdout

    before, after = summary["before"], summary["after"]
    table = Table(
        "",
        "before",
        "after",
        title=f"{summary['defence']} on {summary['data']['name']}, {summary['threat']}",
        caption=f"evaluation split, {summary['summary_attack']}",
        min_width=72,
    )
    for key, label in (
        ("clean_accuracy", "clean accuracy"),
        ("robust_accuracy", "robust accuracy"),
    ):
        table.add_row(label, f"{100 * before[key]:.1f}%", f"[bold]{100 * after[key]:.1f}%")
    stdout.print(table)
    stop = f", stopped: {summary['stop_reason']}" if summary["stop_reason"] else ""
    stdout.print(
        f"{summary['epochs_run']} epochs, best epoch {summary['best_epoch']}{stop}; "
        f"{summary['seconds']:.1f} s on {summary['world_size']} process(es), {summary['precision']}"
    )
    for note in summary["notes"]:
        stdout.print(f"[yellow]note[/] {note}")
    stdout.print(f"written to {Path(summary['outputs']['model']).parent}/")
