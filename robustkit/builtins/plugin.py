"""robustkit's built-in plugin: native attacks, exporters, the digits data set and the model formats.

Registered from code under the provider name ``robustkit``, through the same hooks as any
third-party plugin. Imports happen inside the hooks so that ``robustkit --help`` does not pay
for torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from robustkit.plugin.hookspecs import hookimpl

if TYPE_CHECKING:
    from robustkit.models.base import LoadedModel, LoadOptions
    from robustkit.plugin.registry import ProviderRegistry


@hookimpl
def robustkit_register_attacks(registry: ProviderRegistry[Any]) -> None:
    from robustkit.attacks.apgd import APGD, APGDT
    from robustkit.attacks.fmn import FMN
    from robustkit.attacks.native import FGSM, PGD
    from robustkit.attacks.square import Square

    for attack in (FGSM, PGD, APGD, APGDT, FMN, Square):
        registry.add(attack)


@hookimpl
def robustkit_register_defences(registry: ProviderRegistry[Any]) -> None:
    from robustkit.harden.defences import DEFENCES

    for defence in DEFENCES:
        registry.add(defence)


@hookimpl
def robustkit_register_exporters(registry: ProviderRegistry[Any]) -> None:
    from robustkit.export.onnx import OnnxExporter
    from robustkit.export.safetensors import SafetensorsExporter

    registry.add(OnnxExporter)
    registry.add(SafetensorsExporter)


@hookimpl
def robustkit_register_datasets(registry: ProviderRegistry[Any]) -> None:
    from robustkit.data import load_digits

    registry.add(load_digits, name="digits",
                 summary="scikit-learn's bundled 1,797 real 8x8 digits, 10 classes, fixed 80/20 split")


@hookimpl
def robustkit_load_model(ref: str, options: LoadOptions) -> LoadedModel | None:
    from robustkit.models.files import load_model_file

    return load_model_file(ref, options)
