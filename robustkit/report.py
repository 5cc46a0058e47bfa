"""Report building blocks shared by the audit and by plugins."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReportSection:
    """A titled block of Markdown that a plugin adds to reports (``robustkit_report_sections``)."""

    title: str
    markdown: str
