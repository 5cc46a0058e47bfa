"""Audit reports: a typed document, the JSON contract, and the files rendered from it.

The audit builds one ``AuditReport`` (a tree of frozen dataclasses), once, at the end:
engine -> checks -> report -> renderers. ``report.json`` is the contract
(``SCHEMA_VERSION``; its JSON Schema is ``report_schema.json`` beside this module, and
``AuditReport.to_json_dict`` writes it); the Markdown, HTML and plot are rendered from the same
object, so the files can never disagree. ``AuditReport.summary`` is the headline (the verdict on
trust and the worst case at each eps) that every output leads with, and ``badge.svg`` carries its
figure. Every file is written atomically (temporary file, then
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
from typing import TYPE_CHECKING, Any, Literal

from robustkit.audit.checks import Check
from robustkit.audit.suites import SuiteChange
from robustkit.errors import RobustkitError
from robustkit.io import write_set
from robustkit.threat import TRAINING_EPS, Norm, eps_text

if TYPE_CHECKING:
    from robustkit.audit.pictures import AttackPicture, RenderedPicture

SCHEMA_VERSION = "1.2"
#: Keys every report.json carries (what ``read_report`` checks; the
#: schema requires these and more).
REQUIRED_KEYS = ("schema_version", "complete", "clean_accuracy", "clean_ci95", "n", "threat", "mode",
                 "results", "worst_case", "certification", "checks", "model", "data", "environment")
#: The JSON Schema of report.json (package data).
SCHEMA_PATH = Path(__file__).with_name("report_schema.json")

#: A result row's figure: after the attacks up to and including it (cascade), or its own.
Scope = Literal["cumulative", "single attack"]
Interval = tuple[float, float]
#: How far the headline's figures can be trusted, worst first: an interrupted audit; a failed
#: check; a warning, a check that did not run, or a suite that is no robustness claim; all passed.
Trust = Literal["incomplete", "fail", "warn", "pass"]


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


#: Threat kinds a report may name: the core's lp balls, and budgets of k edits, which text
#: plugins report (robustkit-text: eps is the number of character or token edits)
REPORT_NORMS = (*(n.value for n in Norm), "edits")


@dataclass(frozen=True)
class Threat:
    norm: str  #: one of ``REPORT_NORMS``
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
    """The attack suite the audit ran (``Suite.describe()``, or "custom" for --attack): the suite's
    own settings, and apart from them what ``-o`` changed (``modified``), so that neither hides."""

    name: str
    summary: str
    caveat: str  #: shown as a warning banner when not empty
    attacks: tuple[SuiteAttackRecord, ...]
    #: the further keys of ``Suite.describe()``, written as given after ``attacks``
    more: Mapping[str, Any] = field(default_factory=dict)
    #: the suite attacks' parameters that this audit ran with other values than the suite's
    modified: tuple[SuiteChange, ...] = ()

    @classmethod
    def from_mapping(cls, described: Mapping[str, Any]) -> SuiteRecord:
        """From ``Suite.describe()``."""
        more = {k: v for k, v in described.items() if k not in ("name", "summary", "caveat", "attacks")}
        return cls(described["name"], described["summary"], described["caveat"],
                   tuple(SuiteAttackRecord(a["name"], a["settings"]) for a in described["attacks"]), more)

    @property
    def label(self) -> str:
        """The suite as the headline names it: "default", or "default, modified (apgd.steps 50 -> 1)"."""
        if not self.modified:
            return self.name
        return f"{self.name}, modified ({', '.join(c.text() for c in self.modified)})"

    def to_json_dict(self) -> dict[str, Any]:
        return {"name": self.name, "summary": self.summary, "caveat": self.caveat,
                "attacks": [a.to_json_dict() for a in self.attacks], **_plain(self.more),
                "modified": [c.to_json_dict() for c in self.modified]}


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
    #: why an incomplete audit stopped when an error stopped it (its type and first line); None
    #: when it ran through or was interrupted (Ctrl-C)
    failure: str | None = None

    @property
    def summary(self) -> Summary:
        """The headline, derived from the rest of the report (so it cannot disagree with it)."""
        return summarize(self)

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
            "failure": self.failure,
            "summary": self.summary.to_json_dict(),
        }


@dataclass(frozen=True)
class Badge:
    """The headline figure for a model card: "robust acc. @ 8/255: 45%"."""

    label: str
    value: str
    colour: str  #: grey when the figure is no claim (incomplete, failed checks, a first-look suite)

    def to_json_dict(self) -> dict[str, Any]:
        return {"label": self.label, "value": self.value, "colour": self.colour}


@dataclass(frozen=True)
class Summary:
    """What a reader came for, above everything else: how robust, at which eps, and whether to
    trust it. ``verdict`` says first what weakens the figures (an interruption, a suite that is no
    claim, failed checks), so the headline never reads better than the tables below it."""

    trust: Trust
    verdict: str  #: one line
    suite: str
    norm: str
    n: int
    clean_accuracy: float
    worst_case: tuple[WorstCaseRow, ...]
    badge: Badge

    def lines(self) -> list[str]:
        """The headline as plain lines: the verdict, the worst case, the certified figure if any."""
        lines = [f"verdict: {self.verdict}"]
        figures = "; ".join(f"{eps_text(r.eps)}: {_pct(r.robust_accuracy)} {_ci(r.ci95)}" for r in self.worst_case)
        lines.append(f"worst-case robust accuracy ({self.norm}, suite {self.suite}, n = {self.n}, clean "
                     f"{_pct(self.clean_accuracy)}): " + (figures or "no eps was completed by every attack"))
        proven = _certified_rows(self.worst_case)
        if proven:
            lines.append("certified (proven lower bound): " + "; ".join(
                f"{eps_text(r.eps)}: {_pct(r.accuracy)} {_ci(r.ci95)}" for r in proven))
        return lines

    def to_json_dict(self) -> dict[str, Any]:
        return {"trust": self.trust, "verdict": self.verdict, "suite": self.suite, "norm": self.norm, "n": self.n,
                "clean_accuracy": self.clean_accuracy, "worst_case": [r.to_json_dict() for r in self.worst_case],
                "badge": self.badge.to_json_dict(), "headline": self.lines()}


def summarize(report: AuditReport) -> Summary:
    """The report's headline (``AuditReport.summary``)."""
    trust, verdict = _verdict(report)
    rows = tuple(sorted(report.worst_case, key=lambda r: r.eps))
    return Summary(trust, verdict, report.config.suite.label, report.threat.norm, report.n, report.clean_accuracy,
                   rows, _badge(report, rows))


def _stopped(report: AuditReport) -> str:
    """How an incomplete audit ended: interrupted (Ctrl-C), or failed and why."""
    return "was interrupted" if report.failure is None else f"failed ({report.failure})"


def failed_checks_text(names: str) -> str:
    """What failed checks mean for the figures, wherever they are shown (verdict, export metadata)."""
    return (f"FAILED checks ({names}): the attacks may have been fooled (e.g. gradient masking) or the model or "
            "data is wrong, so the robust accuracy may be overstated; read it as an upper bound, not a claim")


def _verdict(report: AuditReport) -> tuple[Trust, str]:
    """How far to trust the figures, in one line that names what weakens them first."""
    parts = []
    if not report.complete:
        parts.append(f"INCOMPLETE: the audit {_stopped(report)}, so the figures cover only what was computed")
    if report.config.suite.caveat:
        parts.append(report.config.suite.caveat)
    named = {status: ", ".join(c.name for c in report.checks if c.status == status)
             for status in ("fail", "warn", "untested")}
    if named["fail"]:
        parts.append(failed_checks_text(named["fail"]))
    parts += [f"not tested: {c.name} ({c.detail})" for c in report.checks if c.status == "untested"]
    if named["warn"]:
        parts.append(f"warnings ({named['warn']}): the figures stand with the caveats under Checks")
    if report.complete and not report.checks:
        parts.append("no sanity check ran, so gradient masking was not looked for")
    if not parts:
        parts.append("every sanity check passed")
    doubtful = named["warn"] or named["untested"] or report.config.suite.caveat or not report.checks
    trust: Trust = "incomplete" if not report.complete else "fail" if named["fail"] else "warn" if doubtful else "pass"
    return trust, "; ".join(parts)


#: Badge colours by robust accuracy (at least the share), best first; grey for no claim.
BADGE_COLOURS = ((0.6, "#4c1"), (0.3, "#dfb317"), (0.1, "#fe7d37"), (0.0, "#e05d44"))
BADGE_GREY = "#9f9f9f"


def _badge(report: AuditReport, rows: tuple[WorstCaseRow, ...]) -> Badge:
    """At the usual training eps of the norm (8/255 for linf on [0, 1]) when it was audited, else
    at the largest eps: the lowest figure, never a flattering one."""
    if not rows:
        return Badge("robust acc.", "n/a", BADGE_GREY)
    low, high = report.threat.bounds
    usual = TRAINING_EPS.get(report.threat.norm)  # type: ignore[call-overload]  # None for a norm such as 'edits'
    row = next((r for r in rows if usual is not None and math.isclose(r.eps, usual * (high - low), rel_tol=1e-5)),
               rows[-1])
    suite = report.config.suite
    marks = [mark for mark, on in (("incomplete", not report.complete),
                                   (f"{suite.name} modified" if suite.modified else suite.name, bool(suite.caveat)),
                                   ("checks failed", any(c.status == "fail" for c in report.checks))) if on]
    value = f"{math.floor(100 * row.robust_accuracy + 1e-9)}%" + (f" ({', '.join(marks)})" if marks else "")
    colour = BADGE_GREY if marks else next(c for share, c in BADGE_COLOURS if row.robust_accuracy >= share)
    return Badge(f"robust acc. @ {eps_text(row.eps)}", value, colour)


def badge_svg(badge: Mapping[str, str]) -> str:
    """A flat two-part badge (``Badge.to_json_dict()``, as report.json's summary has it), hand-written
    SVG: no dependency, no web font (widths are estimated for Verdana 11px)."""
    def width(text: str) -> int:
        return 10 + round(6.5 * len(text))

    label, value, colour = html.escape(badge["label"]), html.escape(badge["value"]), badge["colour"]
    left, right = width(badge["label"]), width(badge["value"])
    total = left + right
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{total}" height="20" role="img" '
            f'aria-label="{label}: {value}"><title>{label}: {value}</title>'
            f'<linearGradient id="s" x2="0" y2="100%"><stop offset="0" stop-color="#bbb" stop-opacity=".1"/>'
            f'<stop offset="1" stop-opacity=".1"/></linearGradient>'
            f'<clipPath id="r"><rect width="{total}" height="20" rx="3" fill="#fff"/></clipPath>'
            f'<g clip-path="url(#r)"><rect width="{left}" height="20" fill="#555"/>'
            f'<rect x="{left}" width="{right}" height="20" fill="{colour}"/>'
            f'<rect width="{total}" height="20" fill="url(#s)"/></g>'
            f'<g fill="#fff" text-anchor="middle" font-family="Verdana,Geneva,DejaVu Sans,sans-serif" '
            f'font-size="11"><text x="{left / 2}" y="14">{label}</text>'
            f'<text x="{left + right / 2}" y="14">{value}</text></g></svg>\n')


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
        proven = _certified_rows(report.worst_case)
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
    ended = "failed" if report.failure else "interrupted"
    ax.set_title((f"INCOMPLETE ({ended}): " if not report.complete else "") + "robust accuracy against eps"
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


def _certified_rows(worst_case: Sequence[WorstCaseRow]) -> list[_Proven]:
    """Worst-case rows that carry a certified accuracy (a proof-backed lower bound)."""
    rows = [_Proven(r.eps, r.certified_accuracy, r.certified_ci95) for r in worst_case
            if r.certified_accuracy is not None and r.certified_ci95 is not None]
    return sorted(rows, key=lambda r: r.eps)


def _certification_line(report: AuditReport) -> str:
    certification = report.certification
    return f"certification: {certification.method} ({certification.seconds:.2f} s)"


def _banners(report: AuditReport) -> list[tuple[str, str]]:
    banners = []
    if not report.complete:
        banners.append(("fail", f"This audit {_stopped(report)}: the numbers cover only what was computed."))
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


def render_markdown(report: AuditReport, pictures: Sequence[RenderedPicture] = ()) -> str:
    model = report.model
    verdict, *figures = report.summary.lines()
    lines = [f"# robustkit audit: {model['source']}", "", f"**{verdict}**", "", *[f"**{f}**" for f in figures], ""]
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
    for proven in _certified_rows(report.worst_case):
        lines.append(f"| certified (proven) | {eps_text(proven.eps)} | {_pct(proven.accuracy)} "
                     f"| {_ci(proven.ci95)} | |")
    lines += ["", "## Checks", "", "| check | status | detail |", "|---|---|---|"]
    lines += [f"| {c.name} | {c.status} | {c.detail} |" for c in report.checks]
    if pictures:
        from robustkit.audit.pictures import describe_selection

        lines += ["", "## Pictures of the attacks", "", describe_selection(), ""]
        lines += [f"![{p.caption}]({p.file})" for p in pictures]
    for section in report.sections:
        lines += ["", f"## {section.title}", "", section.markdown]
    return "\n".join(lines) + "\n"


def _headline_html(summary: Summary) -> str:
    """The verdict and a tile per eps: the worst case, its interval and the certified figure."""
    esc = html.escape
    tiles = "".join(
        f'<div class="tile"><div class="eps">eps {esc(eps_text(r.eps))}</div>'
        f'<div class="big">{_pct(r.robust_accuracy)}</div><div class="ci">95% CI {_ci(r.ci95)}</div>'
        + (f'<div class="ci">certified &ge; {_pct(r.certified_accuracy)}</div>'
           if r.certified_accuracy is not None else "") + "</div>"
        for r in summary.worst_case
    ) or "<p>no eps was completed by every attack</p>"
    return (f'<div class="headline {summary.trust}"><div class="verdict">{esc(summary.verdict)}</div>'
            f"<p>worst-case robust accuracy over the suite <b>{esc(summary.suite)}</b> ({esc(summary.norm)}, "
            f"n = {summary.n}, clean accuracy {_pct(summary.clean_accuracy)})</p>"
            f'<div class="tiles">{tiles}</div></div>')


def _pictures_html(pictures: Sequence[RenderedPicture]) -> str:
    if not pictures:
        return ""
    from robustkit.audit.pictures import describe_selection

    figures = "".join(
        f'<figure><img alt="{html.escape(p.caption)}" src="data:image/png;base64,{base64.b64encode(p.png).decode()}">'
        "</figure>" for p in pictures)
    return f"<h2>Pictures of the attacks</h2><p>{html.escape(describe_selection())}</p>" \
           f'<div class="pictures">{figures}</div>'


def render_html(report: AuditReport, png: bytes, pictures: Sequence[RenderedPicture] = ()) -> str:
    """One self-contained page: the headline, banners, the plot and pictures (embedded), the tables."""
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
        f"<td>{_ci(p.ci95)}</td><td></td></tr>" for p in _certified_rows(report.worst_case)
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
.headline{{border:2px solid;border-radius:8px;padding:.8rem 1rem;margin:1rem 0}}
.headline.pass{{border-color:#1b7f3b;background:#dafbe1}}.headline.warn{{border-color:#9a6700}}
.headline.fail,.headline.incomplete{{border-color:#b42318;background:#ffebe9}}
.verdict{{font-weight:bold;font-size:1.05rem}}.pass .verdict{{color:#1b7f3b}}.warn .verdict{{color:#9a6700}}
.fail .verdict,.incomplete .verdict{{color:#b42318}}
.tiles{{display:flex;flex-wrap:wrap;gap:.6rem}}.tile{{border:1px solid #d0d7de;border-radius:6px;padding:.4rem .8rem}}
.tile .big{{font-size:1.6rem;font-weight:bold}}.tile .eps,.tile .ci{{font-size:.85rem;color:#57606a}}
.pictures{{display:flex;flex-wrap:wrap;gap:.5rem}}figure{{margin:0}}
.pictures img{{image-rendering:pixelated;max-width:100%}}
</style></head><body>
<h1>robustkit audit</h1>
{_headline_html(report.summary)}
{banners}
<p>model <code>{esc(model['source'])}</code> ({esc(model['format'])}, sha256
<code>{esc(model['sha256'][:16])}...</code>, attacked {esc(report.attack_access)}) on
<code>{esc(str(_data_source(report)))}</code>, n = {report.n},
threat {esc(report.threat.norm)}, mode {esc(report.mode)}.</p>
<p>clean accuracy <b>{_pct(report.clean_accuracy)}</b> {_ci(report.clean_ci95)};
{esc(_certification_line(report))}</p>
<img alt="robust accuracy against eps" src="data:image/png;base64,{image}">
{_pictures_html(pictures)}
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
                 *, render: bool = True, pictures: Sequence[AttackPicture] = ()) -> None:
    """Write report.json (always), per_sample.csv, and the rendered files unless ``render`` is
    False (the badge, and the pictures of the attacks under ``attacks/``), as one set
    (``io.write_set``): a failure leaves the previous set whole."""
    document = report.to_json_dict()
    files: dict[str, bytes | str] = {"report.json": json.dumps(document, indent=2, default=str)}
    if per_sample is not None:
        files["per_sample.csv"] = per_sample_csv(per_sample)
    if render:
        from robustkit.audit.pictures import render_pictures

        png = plot_png(report)
        rendered, picture_files = render_pictures(pictures, report.threat.bounds)
        files.update({"robustness.png": png, "report.md": render_markdown(report, rendered),
                      "report.html": render_html(report, png, rendered),
                      "badge.svg": badge_svg(document["summary"]["badge"]), **picture_files})
    write_set(out, files)


def read_report(path: Path) -> dict[str, Any]:
    """An audit's ``report.json`` (export and compare read it), checked for the schema's required keys."""
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RobustkitError(f"cannot read the report {path}: {err}") from None
    missing = [key for key in REQUIRED_KEYS if not isinstance(report, dict) or key not in report]
    if missing:
        raise RobustkitError(f"{path} is not an audit report.json (missing {', '.join(missing)}); "
                             "pass the report.json that robustkit audit --out wrote")
    return report
