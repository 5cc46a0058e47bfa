"""robustkit: audit and harden the adversarial robustness of PyTorch models.

The public API for users and plugin authors. Plugins should import only from here (and from
``robustkit.testing`` in their tests).

The three jobs, as the CLI runs them:
- ``run_audit(AuditConfig(model=...))``: the robustness report (a dict, as report.json);
- ``run_harden(HardenRequest(model=..., data=..., defence=...))``: adversarial training;
- ``run_export(ExportConfig(...))``: an ONNX (or other) file with its parity checks.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Names resolve on first use (PEP 562), so `robustkit --help` and plugin discovery do not
# import torch.
if TYPE_CHECKING:
    from robustkit.attacks.base import Attack, AttackResult
    from robustkit.audit.engine import Evaluation, NamedAttack, evaluate
    from robustkit.audit.run import AuditConfig, run_audit
    from robustkit.data import Dataset, load_dataset
    from robustkit.errors import RobustkitError
    from robustkit.export.run import ExportConfig, Exporter, ExportResult, run_export
    from robustkit.harden.api import HardenRequest, run_harden
    from robustkit.harden.base import OWN_LOOP, Defence, DefenceResult, LoopSupport
    from robustkit.harden.config import RunConfig, TrainingParams
    from robustkit.harden.defences import TrainingDefence
    from robustkit.harden.step import StepContext, adversarial_step
    from robustkit.models.base import LoadedModel, LoadOptions
    from robustkit.models.loading import load_model
    from robustkit.modules import Model, Normalized, eval_mode
    from robustkit.params import NoParams, param
    from robustkit.plugin.hookspecs import ReportSection, hookimpl
    from robustkit.plugin.host import Host, get_host
    from robustkit.plugin.registry import ProviderRegistry
    from robustkit.threat import Norm, ThreatModel

_EXPORTS = {
    "AuditConfig": "robustkit.audit.run",
    "ExportConfig": "robustkit.export.run",
    "HardenRequest": "robustkit.harden.api",
    "run_audit": "robustkit.audit.run",
    "run_export": "robustkit.export.run",
    "run_harden": "robustkit.harden.api",
    "Attack": "robustkit.attacks.base",
    "AttackResult": "robustkit.attacks.base",
    "Dataset": "robustkit.data",
    "Defence": "robustkit.harden.base",
    "LoopSupport": "robustkit.harden.base",
    "OWN_LOOP": "robustkit.harden.base",
    "RunConfig": "robustkit.harden.config",
    "DefenceResult": "robustkit.harden.base",
    "Evaluation": "robustkit.audit.engine",
    "ExportResult": "robustkit.export.run",
    "Exporter": "robustkit.export.run",
    "Host": "robustkit.plugin.host",
    "LoadOptions": "robustkit.models.base",
    "LoadedModel": "robustkit.models.base",
    "Model": "robustkit.modules",
    "NamedAttack": "robustkit.audit.engine",
    "NoParams": "robustkit.params",
    "Norm": "robustkit.threat",
    "Normalized": "robustkit.modules",
    "ProviderRegistry": "robustkit.plugin.registry",
    "ReportSection": "robustkit.plugin.hookspecs",
    "RobustkitError": "robustkit.errors",
    "StepContext": "robustkit.harden.step",
    "ThreatModel": "robustkit.threat",
    "TrainingDefence": "robustkit.harden.defences",
    "TrainingParams": "robustkit.harden.config",
    "adversarial_step": "robustkit.harden.step",
    "eval_mode": "robustkit.modules",
    "evaluate": "robustkit.audit.engine",
    "get_host": "robustkit.plugin.host",
    "hookimpl": "robustkit.plugin.hookspecs",
    "load_dataset": "robustkit.data",
    "load_model": "robustkit.models.loading",
    "param": "robustkit.params",
}

__all__ = [
    "OWN_LOOP",
    "Attack",
    "AttackResult",
    "AuditConfig",
    "Dataset",
    "Defence",
    "DefenceResult",
    "Evaluation",
    "ExportConfig",
    "ExportResult",
    "Exporter",
    "HardenRequest",
    "Host",
    "LoadOptions",
    "LoadedModel",
    "LoopSupport",
    "Model",
    "NamedAttack",
    "NoParams",
    "Norm",
    "Normalized",
    "ProviderRegistry",
    "ReportSection",
    "RobustkitError",
    "RunConfig",
    "StepContext",
    "ThreatModel",
    "TrainingDefence",
    "TrainingParams",
    "__version__",
    "adversarial_step",
    "eval_mode",
    "evaluate",
    "get_host",
    "hookimpl",
    "load_dataset",
    "load_model",
    "param",
    "run_audit",
    "run_export",
    "run_harden",
]


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'robustkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value
