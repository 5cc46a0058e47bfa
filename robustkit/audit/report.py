"""Audit reports: a typed document, the JSON contract, and the files rendered from it.

The audit builds one ``AuditReport`` (a tree of frozen dataclasses), once, at the end:
engine -> checks -> report -> renderers. ``report.json`` is the contract
(``SCHEMA_VERSION``; its JSON Schema is ``report_schema.json`` beside this module, and
``AuditReport.to_json_dict`` writes it); the Markdown, HTML and plot are rendered from the same
object, so the files can never disagree. Every file is written atomically (temporary file, then
``os.replace``), so an interrupted audit leaves either the old or the new file, never half of one.
"""
from __future__ import annotations

import base64
import copy
import csv
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from robustkit.audit.checks import Check
from robustkit.io import write_set
from robustkit.threat import eps_text

SCHEMA_VERSION = "1.1"
#: Keys every report.json carries (what readers such as export's ``read_report`` check; the
#: schema requires these and more).
REQUIRED_KEYS = ("schema_version", "complete", "clean_accuracy", "clean_ci95", "n", "threat", "mode",
                 "results", "worst_case", "certification", "checks", "model", "data", "environment")
#: The JSON Schema of report.json (package data).
SCHEMA_PATH = Path(__file__).with_name("report_schema.json")

#: A result row's figure: after the attacks up to and including it (cascade), or its own.
Scope = Literal["cumulative", "single attack"]
Interval = tuple[float, float]


def _plain(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """A dict copy of ``mapping`` that shares nothing with it (plugins may change what they get)."""
    return copy.deepcopy(dict(mapping))


@dataclass(frozen=True)
class ResultRow:
    """One (attack, eps) figure of ``results``."""

    attack: str
    norm: str
    eps: float
    robust_accuracy: float
    ci95: Interval
    seconds: float
    attacked: int  #: samples the attack was run on at this eps
    gradients: bool  #: whether the attack used gradients
    scope: Scope
    params: Mapping[str, Any]
    #: standing samples not attacked at this eps by the nested-search shortcut (``notes`` says why)
    skipped: int = 0

    def to_json_dict(self) -> dict[str, Any]:
        return {"attack": self.attack, "norm": self.norm, "eps": self.eps, "eps_text": eps_text(self.eps),
                "robust_accuracy": self.robust_accuracy,
                "ci95": list(self.ci95), "seconds": self.seconds, "attacked": self.attacked,
                "skipped": self.skipped, "gradients": self.gradients, "scope": self.scope,
                "params": _plain(self.params)}


@dataclass(frozen=True)
class WorstCaseRow:
    """The worst case over every attack at one eps (only eps that every attack completed), with
    the certified accuracy (a proven lower bound) when certification ran."""

    norm: str
    eps: float
    robust_accuracy: float
    ci95: Interval
    certified_accuracy: float | None = None
    certified_ci95: Interval | None = None

    def to_json_dict(self) -> dict[str, Any]:
        return {"norm": self.norm, "eps": self.eps, "eps_text": eps_text(self.eps),
                "robust_accuracy": self.robust_accuracy, "ci95": list(self.ci95),
                "certified_accuracy": self.certified_accuracy,
                "certified_ci95": None if self.certified_ci95 is None else list(self.certified_ci95)}


@dataclass(frozen=True)
class Threat:
    norm: str
    eps: tuple[float, ...]
    bounds: Interval
    targeted: bool = False

    def to_json_dict(self) -> dict[str, Any]:
        return {"norm": self.norm, "eps": list(self.eps), "bounds": list(self.bounds), "targeted": self.targeted}


@dataclass(frozen=True)
class Certification:
    method: str  #: how certificates were made, or why not ("off")
    seconds: float

    def to_json_dict(self) -> dict[str, Any]:
        return {"method": self.method, "seconds": self.seconds}


@dataclass(frozen=True)
class SuiteAttackRecord:
    name: str
    settings: Mapping[str, Any]

    def to_json_dict(self) -> dict[str, Any]:
        return {"name": self.name, "settings": _plain(self.settings)}


@dataclass(frozen=True)
class SuiteRecord:
    """The attack suite the audit ran (``Suite.describe()``, or "custom" for --attack)."""

    name: str
    summary: str
    caveat: str  #: shown as a warning banner when not empty
    attacks: tuple[SuiteAttackRecord, ...]
    #: the further keys of ``Suite.describe()``, written as given after ``attacks``
    more: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, described: Mapping[str, Any]) -> SuiteRecord:
        """From ``Suite.describe()``."""
        more = {k: v for k, v in described.items() if k not in ("name", "summary", "caveat", "attacks")}
        return cls(described["name"], described["summary"], described["caveat"],
                   tuple(SuiteAttackRecord(a["name"], a["settings"]) for a in described["attacks"]), more)

    def to_json_dict(self) -> dict[str, Any]:
        return {"name": self.name, "summary": self.summary, "caveat": self.caveat,
                "attacks": [a.to_json_dict() for a in self.attacks], **_plain(self.more)}


@dataclass(frozen=True)
class ReportConfig:
    """The audit's settings that are not in ``threat``, ``mode`` or ``data``."""

    suite: SuiteRecord
    attacks: tuple[str, ...]  #: qualified names, in the order they ran
    batch_size: int
    seed: int
    precision: str
    check_samples: int

    def to_json_dict(self) -> dict[str, Any]:
        return {"suite": self.suite.to_json_dict(), "attacks": list(self.attacks), "batch_size": self.batch_size,
                "seed": self.seed, "precision": self.precision, "check_samples": self.check_samples}


@dataclass(frozen=True)
class Section:
    """A titled block of Markdown that a plugin added (``robustkit_report_sections``)."""

    title: str
    markdown: str
    plugin: str

    def to_json_dict(self) -> dict[str, Any]:
        return {"title": self.title, "markdown": self.markdown, "plugin": self.plugin}


@dataclass(frozen=True, kw_only=True)
class AuditReport:
    """An audit's result: the document that ``report.json`` serialises and the renderers draw.

    ``model``, ``data`` and ``environment`` are the documents of ``LoadedModel.describe()``,
    ``Dataset.describe()`` (plus ``limit``) and ``robustkit.environment.environment()``.
    """

    schema_version: str = SCHEMA_VERSION
    complete: bool  #: False for a partial report (interrupted, or written while the audit runs)
    created: str  #: ISO 8601, UTC, to the second
    seconds: float
    n: int
    clean_accuracy: float
    clean_ci95: Interval
    threat: Threat
    mode: str  #: "cascade" or "per-attack"
    attack_access: str
    results: tuple[ResultRow, ...]
    worst_case: tuple[WorstCaseRow, ...]
    certification: Certification
    checks: tuple[Check, ...]
    model: Mapping[str, Any]
    data: Mapping[str, Any]
    environment: Mapping[str, Any]
    config: ReportConfig
    sections: tuple[Section, ...] = ()
    #: what ran differently from "every attack on every standing sample at every eps" (shortcuts)
    notes: tuple[str, ...] = ()

    def to_json_dict(self) -> dict[str, Any]:
        """The ``report.json`` document (schema ``SCHEMA_VERSION``); a fresh copy each call."""
        return {
            "schema_version": self.schema_version,
            "complete": self.complete,
            "created": self.created,
            "seconds": self.seconds,
            "n": self.n,
            "clean_accuracy": self.clean_accuracy,
            "clean_ci95": list(self.clean_ci95),
            "threat": self.threat.to_json_dict(),
            "mode": self.mode,
            "attack_access": self.attack_access,
            "results": [r.to_json_dict() for r in self.results],
            "worst_case": [r.to_json_dict() for r in self.worst_case],
            "certification": self.certification.to_json_dict(),
            "checks": [c.as_dict() for c in self.checks],
            "model": _plain(self.model),
            "data": _plain(self.data),
            "environment": _plain(self.environment),
            "config": self.config.to_json_dict(),
            "sections": [s.to_json_dict() for s in self.sections],
            "notes": list(self.notes),
        }


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion: sound near 0 and 1, unlike the normal one."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def accuracy_ci(accuracy: float, n: int) -> Interval:
    """The 95% Wilson interval of an accuracy measured on ``n`` samples."""
    return wilson_interval(round(accuracy * n), n)


def _pct(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


def _ci(ci: Sequence[float]) -> str:
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_DASHES = ("-", "--", "-.", ":")


def plot_png(report: AuditReport) -> bytes:
    """Robust accuracy against eps for each attack and the worst case, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.4, 4.2), dpi=110)  # no pyplot: its global backend and figure list stay untouched
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    clean = report.clean_accuracy
    by_attack: dict[str, list[tuple[float, float]]] = {}
    for row in report.results:
        by_attack.setdefault(row.attack, []).append((row.eps, row.robust_accuracy))
    for number, (name, points) in enumerate(by_attack.items()):
        ordered = sorted([(0.0, clean), *points])
        # a marker and a dash pattern of its own: lines that coincide stay visible
        ax.plot([e for e, _ in ordered], [100 * a for _, a in ordered], marker=_MARKERS[number % len(_MARKERS)],
                linestyle=_DASHES[number % len(_DASHES)], linewidth=1.2, markersize=5, zorder=3, label=name)
    if report.worst_case:
        rows = sorted(report.worst_case, key=lambda r: r.eps)
        eps = [0.0] + [r.eps for r in rows]
        worst = [100 * clean] + [100 * r.robust_accuracy for r in rows]
        low = [100 * clean] + [100 * r.ci95[0] for r in rows]
        high = [100 * clean] + [100 * r.ci95[1] for r in rows]
        ax.plot(eps, worst, color="black", linewidth=2.4, alpha=0.55, zorder=1, label="worst case")  # under the attacks
        ax.fill_between(eps, low, high, color="black", alpha=0.12, label="worst case 95% CI")
        proven = _certified_rows(report)
        if proven:
            ax.plot([0.0] + [r.eps for r in proven], [100 * clean] + [100 * r.accuracy for r in proven],
                    color="black", linestyle="--", linewidth=1.6, label="certified (proven lower bound)")
    ax.set_xlabel(f"eps ({report.threat.norm}, input units)")
    ax.set_xticks(list(report.threat.eps), [eps_text(e) for e in report.threat.eps], fontsize=8)
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing to label when no attack ran; beside the plot, off the points
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    scope = "\ncascade: each line includes the attacks before it" if report.mode == "cascade" else ""
    ax.set_title(("INCOMPLETE (interrupted): " if not report.complete else "") + "robust accuracy against eps"
                 + scope, fontsize=9, color="black" if report.complete else "#b42318")
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


@dataclass(frozen=True)
class _Proven:
    eps: float
    accuracy: float
    ci95: Interval


def _certified_rows(report: AuditReport) -> list[_Proven]:
    """Worst-case rows that carry a certified accuracy (a proof-backed lower bound)."""
    rows = [_Proven(r.eps, r.certified_accuracy, r.certified_ci95) for r in report.worst_case
            if r.certified_accuracy is not None and r.certified_ci95 is not None]
    return sorted(rows, key=lambda r: r.eps)


def _certification_line(report: AuditReport) -> str:
    certification = report.certification
    return f"certification: {certification.method} ({certification.seconds:.2f} s)"


def _banners(report: AuditReport) -> list[tuple[str, str]]:
    banners = []
    if not report.complete:
        banners.append(("fail", "This audit was interrupted: the numbers cover only what was computed."))
    caveat = report.config.suite.caveat
    if caveat:
        banners.append(("warn", caveat))
    banners += [("warn", note) for note in report.notes]
    for check in report.checks:
        if check.status in ("warn", "fail"):
            banners.append((check.status, f"{check.name}: {check.detail}"))
        elif check.status == "untested":
            banners.append(("warn", f"{check.name} (not tested): {check.detail}"))
    return banners


def _data_source(report: AuditReport) -> Any:
    return report.data.get("source", report.data.get("name"))


def render_markdown(report: AuditReport) -> str:
    model = report.model
    lines = [f"# robustkit audit: {model['source']}", ""]
    for status, text in _banners(report):
        lines.append(f"> **{status.upper()}** {text}")
    lines += [
        "",
        f"- data: {_data_source(report)}, n = {report.n}",
        f"- threat: {report.threat.norm}, bounds {list(report.threat.bounds)}, mode {report.mode}",
        f"- model: {model['format']}, sha256 `{model['sha256'][:16]}...`, attacked {report.attack_access}",
        f"- clean accuracy: {_pct(report.clean_accuracy)} {_ci(report.clean_ci95)}",
        f"- {_certification_line(report)}",
        "",
        "| attack | eps | robust accuracy | 95% CI | seconds |",
        "|---|---|---|---|---|",
    ]
    for row in report.results:
        lines.append(f"| {row.attack} | {eps_text(row.eps)} | {_pct(row.robust_accuracy)} | {_ci(row.ci95)} "
                     f"| {row.seconds:.2f} |")
    for worst in report.worst_case:
        lines.append(f"| **worst case** | {eps_text(worst.eps)} | **{_pct(worst.robust_accuracy)}** "
                     f"| {_ci(worst.ci95)} | |")
    for proven in _certified_rows(report):
        lines.append(f"| certified (proven) | {eps_text(proven.eps)} | {_pct(proven.accuracy)} "
                     f"| {_ci(proven.ci95)} | |")
    lines += ["", "## Checks", "", "| check | status | detail |", "|---|---|---|"]
    lines += [f"| {c.name} | {c.status} | {c.detail} |" for c in report.checks]
    for section in report.sections:
        lines += ["", f"## {section.title}", "", section.markdown]
    return "\n".join(lines) + "\n"


def render_html(report: AuditReport, png: bytes) -> str:
    """One self-contained page: banners, the plot (embedded), the tables."""
    esc = html.escape
    colours = {"pass": "#1b7f3b", "warn": "#9a6700", "fail": "#b42318"}
    model = report.model
    banners = "".join(
        f'<div class="banner {s}">{esc(s.upper())}: {esc(t)}</div>' for s, t in _banners(report)
    )
    result_rows = "".join(
        f"<tr><td>{esc(r.attack)}</td><td>{eps_text(r.eps)}</td><td>{_pct(r.robust_accuracy)}</td>"
        f"<td>{_ci(r.ci95)}</td><td>{r.seconds:.2f}</td></tr>" for r in report.results
    ) + "".join(
        f"<tr class=worst><td>worst case</td><td>{eps_text(w.eps)}</td><td>{_pct(w.robust_accuracy)}</td>"
        f"<td>{_ci(w.ci95)}</td><td></td></tr>" for w in report.worst_case
    ) + "".join(
        f"<tr><td>certified (proven)</td><td>{eps_text(p.eps)}</td><td>{_pct(p.accuracy)}</td>"
        f"<td>{_ci(p.ci95)}</td><td></td></tr>" for p in _certified_rows(report)
    )
    check_rows = "".join(
        f'<tr><td>{esc(c.name)}</td><td style="color:{colours.get(c.status, "#000")}">{esc(c.status)}'
        f"</td><td>{esc(c.detail)}</td></tr>" for c in report.checks
    )
    sections = "".join(f"<h2>{esc(s.title)}</h2><pre>{esc(s.markdown)}</pre>" for s in report.sections)
    image = base64.b64encode(png).decode()
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>robustkit audit: {esc(model['source'])}</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#1f2328}}
table{{border-collapse:collapse;margin:1rem 0}}td,th{{border:1px solid #d0d7de;padding:.3rem .6rem;text-align:left}}
.banner{{padding:.6rem 1rem;margin:.4rem 0;border-radius:6px}}.fail{{background:#ffebe9}}.warn{{background:#fff8c5}}
tr.worst{{font-weight:bold}}code{{font-size:.9em}}
</style></head><body>
<h1>robustkit audit</h1>
{banners}
<p>model <code>{esc(model['source'])}</code> ({esc(model['format'])}, sha256
<code>{esc(model['sha256'][:16])}...</code>, attacked {esc(report.attack_access)}) on
<code>{esc(str(_data_source(report)))}</code>, n = {report.n},
threat {esc(report.threat.norm)}, mode {esc(report.mode)}.</p>
<p>clean accuracy <b>{_pct(report.clean_accuracy)}</b> {_ci(report.clean_ci95)};
{esc(_certification_line(report))}</p>
<img alt="robust accuracy against eps" src="data:image/png;base64,{image}">
<h2>Robust accuracy</h2>
<table><tr><th>attack</th><th>eps</th><th>robust accuracy</th><th>95% CI</th><th>seconds</th></tr>{result_rows}</table>
<h2>Checks</h2>
<table><tr><th>check</th><th>status</th><th>detail</th></tr>{check_rows}</table>
{sections}
<p><small>robustkit {esc(report.environment.get('robustkit', ''))},
schema {esc(report.schema_version)}</small></p>
</body></html>
"""


def per_sample_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["index", "label", "clean_correct", "broken_at_eps", "broken_by",
                                                  "proven_robust_to_eps"])
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_report(report: AuditReport, out: Path, per_sample: list[dict[str, Any]] | None = None,
                 *, render: bool = True) -> None:
    """Write report.json (always), per_sample.csv, and the rendered files unless ``render`` is
    False, as one set (``io.write_set``): a failure leaves the previous set whole."""
    files: dict[str, bytes | str] = {"report.json": json.dumps(report.to_json_dict(), indent=2, default=str)}
    if per_sample is not None:
        files["per_sample.csv"] = per_sample_csv(per_sample)
    if render:
        png = plot_png(report)
        files.update({"robustness.png": png, "report.md": render_markdown(report),
                      "report.html": render_html(report, png)})
    write_set(out, files)
