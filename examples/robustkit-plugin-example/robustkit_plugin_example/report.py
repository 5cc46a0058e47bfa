"""Report sections: caveats that belong next to numbers measured with this plugin."""
from __future__ import annotations

from typing import Any

from robustkit import ReportSection


def sections(report: dict[str, Any]) -> list[ReportSection]:
    """A section for the shapes data set and one for the momentum attack, when the audit used them."""
    found = []
    if str(report.get("data", {}).get("source", "")).startswith("example:shapes"):
        found.append(ReportSection(
            "About example:shapes",
            "The data are procedurally generated 8x8 shapes, not natural images: robust accuracy "
            "on them says how an architecture and a defence behave, not how a deployed model will.",
        ))
    attacks = report.get("config", {}).get("attacks", [])
    if "example:momentum" in attacks:
        found.append(ReportSection(
            "About example:momentum",
            "Momentum iterative attack (MI-FGSM) without random starts: as strong as PGD of the "
            "same step count on undefended models, but deterministic, so it is no substitute for "
            "PGD with restarts or a gradient-free attack when gradients may be masked.",
        ))
    return found
