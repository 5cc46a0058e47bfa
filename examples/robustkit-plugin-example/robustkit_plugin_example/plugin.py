"""The entry point of the ``example`` provider: three hook implementations.

Imports only robustkit's hook marker at module level, so discovering the plugin
(``robustkit --help``, ``robustkit plugins``) costs no torch import; the attack and the data
set are imported inside the register hooks, which robustkit calls only when a command needs
its registries.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import robustkit

if TYPE_CHECKING:
    from robustkit import ProviderRegistry, ReportSection


@robustkit.hookimpl
def robustkit_register_attacks(registry: ProviderRegistry[Any]) -> None:
    from robustkit_plugin_example.attacks import Momentum

    registry.add(Momentum)  # name, aliases and summary come from the class


@robustkit.hookimpl
def robustkit_register_datasets(registry: ProviderRegistry[Any]) -> None:
    from robustkit_plugin_example.shapes import CLASSES, load_shapes

    registry.add(load_shapes, name="shapes",
                 summary=f"procedural 8x8 shapes ({', '.join(CLASSES)}), generated from a seed, no download")


@robustkit.hookimpl
def robustkit_report_sections(report: dict[str, Any]) -> list[ReportSection] | None:
    """Say in the report what its numbers mean when they come from this plugin's pieces."""
    from robustkit_plugin_example.report import sections

    return sections(report) or None
