"""Entry point of the ``text`` provider.

Imports only robustkit (which imports no torch until used), so discovering the plugin
(``robustkit --help``) costs neither torch nor transformers; each hook imports what it needs.
The audit and harden jobs take a request only when its data is text (a ``.csv``/``.jsonl``
file or folder, ``text:sentiment``), the export job also when the model is a folder with a
tokenizer; every other request is left to robustkit. ``text:sentiment`` is in robustkit's
data-set registry (kind text) so that ``robustkit datasets list`` shows it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import robustkit

if TYPE_CHECKING:
    from robustkit import LoadedModel, LoadOptions, ProviderRegistry
    from robustkit.audit.report import AuditReport
    from robustkit.audit.run import AuditConfig
    from robustkit.export.run import ExportConfig, ExportResult
    from robustkit.harden.api import HardenRequest


@robustkit.hookimpl
def robustkit_load_model(ref: str, options: LoadOptions) -> LoadedModel | None:
    from robustkit_text.model import is_model_folder, load_folder

    return load_folder(ref, options) if is_model_folder(ref) else None


@robustkit.hookimpl
def robustkit_register_defences(registry: ProviderRegistry[Any]) -> None:
    from robustkit_text.defences import DEFENCES

    for defence in DEFENCES:
        registry.add(defence)


@robustkit.hookimpl
def robustkit_register_datasets(registry: ProviderRegistry[Any]) -> None:
    from robustkit_text.data import SyntheticEntry

    registry.add(SyntheticEntry())


@robustkit.hookimpl
def robustkit_audit_job(config: AuditConfig) -> tuple[AuditReport, list[dict[str, Any]]] | None:
    from robustkit_text.data import is_text_ref

    if not is_text_ref(config.data):
        return None
    from robustkit_text.audit import run_text_audit

    return run_text_audit(config)


@robustkit.hookimpl
def robustkit_harden_job(request: HardenRequest) -> dict[str, Any] | None:
    from robustkit_text.data import is_text_ref

    if not is_text_ref(request.data):
        return None
    from robustkit_text.harden import run_text_harden

    return run_text_harden(request)


@robustkit.hookimpl
def robustkit_export_job(config: ExportConfig) -> ExportResult | None:
    from robustkit_text.data import is_text_ref
    from robustkit_text.model import is_text_folder

    if not (is_text_ref(config.data) or is_text_folder(config.model)):
        return None
    from robustkit_text.export import run_text_export

    return run_text_export(config)
