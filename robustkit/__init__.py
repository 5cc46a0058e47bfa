"""robustkit: audit and harden the adversarial robustness of PyTorch models.

The public API for users and plugin authors. Plugins should import only from here (and from
``robustkit.testing`` in their tests).
"""
from __future__ import annotations

__version__ = "0.1.0"

from robustkit.attacks.base import Attack, AttackResult, NoParams  # noqa: E402
from robustkit.data import Dataset, load_dataset  # noqa: E402
from robustkit.defences import Defence, DefenceResult  # noqa: E402
from robustkit.errors import RobustkitError  # noqa: E402
from robustkit.evaluate import Evaluation, NamedAttack, evaluate  # noqa: E402
from robustkit.exporters import Exporter, ExportResult  # noqa: E402
from robustkit.hookspecs import hookimpl  # noqa: E402
from robustkit.host import Host, get_host  # noqa: E402
from robustkit.loading import LoadedModel, LoadOptions, load_model  # noqa: E402
from robustkit.modules import Model, Normalized, eval_mode  # noqa: E402
from robustkit.params import param  # noqa: E402
from robustkit.registry import ProviderRegistry  # noqa: E402
from robustkit.report import ReportSection  # noqa: E402
from robustkit.threat import Norm, ThreatModel  # noqa: E402

__all__ = [
    "Attack", "AttackResult", "Dataset", "Defence", "DefenceResult", "Evaluation", "ExportResult",
    "Exporter", "Host", "LoadOptions", "LoadedModel", "Model", "NamedAttack", "NoParams", "Norm",
    "Normalized", "ProviderRegistry", "ReportSection", "RobustkitError", "ThreatModel", "__version__",
    "eval_mode", "evaluate", "get_host", "hookimpl", "load_dataset", "load_model", "param",
]
