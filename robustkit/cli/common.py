"""Options shared by the commands that load a model, so each is declared once."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from robustkit.errors import OptionError


def parse_floats(text: str | None, option: str) -> tuple[float, ...] | None:
    """``"0.5,0.5,0.5"`` -> a tuple of floats, for ``--mean``/``--std``."""
    if not text:
        return None
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise OptionError(f"{option} takes comma-separated numbers, e.g. 0.485,0.456,0.406; got {text!r}") from None


#: The data set of robustkit's built-in architectures (builtin:digits-cnn, ...).
BUILTIN_DATA = "builtin:digits"


def data_for(data: str | None, model: str, arch: str | None) -> str:
    """``--data``, or the built-in digits for a built-in model or architecture; for anyone
    else's model there is no sensible default (a wrong one would be measured silently)."""
    if data:
        return data
    if model.startswith("builtin:") or (arch or "").startswith("builtin:"):
        return BUILTIN_DATA
    raise click.UsageError(
        f"--data is required for {model}: give its evaluation data (a .npz with x and y, an image folder, a .csv or "
        ".jsonl of texts for a text classifier, or a name from `robustkit datasets list`); the built-in digits are "
        "the default only for built-in models"
    )


def model_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--arch --trust-code --mean --std --device``: how MODEL is loaded."""
    for decorator in reversed([
        click.option("--arch", help="Architecture for weight files: module:factory, file.py:factory or builtin:NAME."),
        click.option("--trust-code", is_flag=True,
                     help="Allow formats that run code when loaded (TorchScript, torch.export, pickles)."),
        click.option("--mean", help="Per-channel mean; wraps the model so it takes inputs in [0, 1]."),
        click.option("--std", help="Per-channel std (with --mean)."),
        click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda or cuda:1."),
    ]):
        command = decorator(command)
    return command


def load_options(arch: str | None, trust_code: bool, mean: str | None, std: str | None, device: str) -> Any:
    from robustkit.environment import parse_device
    from robustkit.models.base import LoadOptions

    parse_device(device)  # a misspelt device or a missing GPU: one line, before anything loads
    return LoadOptions(arch=arch, trust_code=trust_code, mean=parse_floats(mean, "--mean"),
                       std=parse_floats(std, "--std"), device=device)


option_pairs = click.option(
    "-o", "--option", "options", type=(str, str), multiple=True, metavar="KEY VALUE",
    help="A parameter, e.g. -o steps 50 (every attack that has it) or -o pgd.steps 50 (one attack).",
)
