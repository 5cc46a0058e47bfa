"""The hooks a robustkit plugin can implement (pluggy project name ``robustkit``).

A plugin is a module or object with functions marked ``@robustkit.hookimpl`` and named after
these specs. Register hooks receive a ``ProviderRegistry`` bound to the plugin's provider name;
each implementation is called on its own, so a failure is charged to that plugin alone.
See ``docs/plugin-hooks.md`` for one section per hook.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click

    from robustkit.models.base import LoadedModel, LoadOptions
    from robustkit.plugin.registry import ProviderRegistry

@dataclass(frozen=True)
class ReportSection:
    """A titled block of Markdown that a plugin adds to reports (``robustkit_report_sections``)."""

    title: str
    markdown: str


PROJECT = "robustkit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def robustkit_register_attacks(registry: ProviderRegistry[Any]) -> None:
    """Add ``Attack`` subclasses: ``registry.add(MyAttack)``."""


@hookspec
def robustkit_register_defences(registry: ProviderRegistry[Any]) -> None:
    """Add ``Defence`` subclasses: ``registry.add(MyDefence)``."""


@hookspec
def robustkit_register_exporters(registry: ProviderRegistry[Any]) -> None:
    """Add ``Exporter`` subclasses: ``registry.add(MyExporter)``."""


@hookspec
def robustkit_register_datasets(registry: ProviderRegistry[Any]) -> None:
    """Add data-set factories, callables returning a ``Dataset``: ``registry.add(f, name=...)``."""


@hookspec(firstresult=True)
def robustkit_load_model(ref: str, options: LoadOptions) -> LoadedModel | None:
    """Load the model that ``ref`` names, or return None to let other loaders try.

    The first non-None result wins; plugins registered later are asked first, so a plugin can
    take over a format. Raise ``RobustkitError`` to refuse a file with a reason.
    """


@hookspec(firstresult=True)
def robustkit_audit_job(config: Any) -> tuple[Any, list[dict[str, Any]]] | None:
    """Run an audit that robustkit's image engine cannot (text, ...), or return None.

    ``config`` is the ``AuditConfig``; returns the ``AuditReport`` and its per-sample rows, and
    robustkit adds the other plugins' sections and writes the files, as for its own audits.
    (Typed ``Any``: the audit and harden layers sit above the plugin layer.)
    """


@hookspec(firstresult=True)
def robustkit_harden_job(request: Any) -> dict[str, Any] | None:
    """Run a hardening job (``request``: a ``HardenRequest``) that robustkit's own cannot,
    writing its outputs and returning the summary; or None."""


@hookspec(firstresult=True)
def robustkit_export_job(config: Any) -> Any | None:
    """Export a model that robustkit's exporters cannot (a text classifier, ...), or return None.

    ``config`` is the ``ExportConfig``; returns the ``ExportResult`` after verifying the files
    and moving them into place, as ``robustkit export`` does for its own formats.
    """


@hookspec
def robustkit_report_sections(report: dict[str, Any]) -> list[ReportSection] | None:
    """Extra sections for a report, given the report document (the JSON contract)."""


@hookspec
def robustkit_register_commands(cli: click.Group) -> None:
    """Add click commands to the ``robustkit`` command group."""
