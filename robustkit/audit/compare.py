"""Two audits side by side: robust accuracy per eps, the difference and whether it is
significant, the checks that changed status, and a plot of both curves.

A difference is only meaningful between audits of the same data, threat and attacks, run with
the same parameters (``results[].params``: ``-o`` may weaken a suite), so ``compare_reports``
refuses others (``AuditsDiffer``) unless forced; forced, it says loudly when the attack budgets
differ. The test is McNemar's exact test where both audits' per-sample results exist
(``per_sample.csv`` beside ``report.json``, or ``Evaluation.worst_broken_at()``) and agree with
their reports: the samples are the same, so the test is paired and counts only the samples on
which the two models disagree. Otherwise it is the
two-proportion z-test on the two accuracies, which ignores the pairing and so is conservative.
Each row says which test it used.
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from robustkit.audit.report import Interval, accuracy_ci, read_report
from robustkit.errors import RobustkitError
from robustkit.io import write_set
from robustkit.threat import eps_text

#: Significance level of every test.
ALPHA = 0.05
#: Relative slack when matching eps across reports and per-sample files: they store eps as
#: float32 or to 6 digits; audited eps lie much further apart.
EPS_TOLERANCE = 1e-4
#: Attack parameters that differ between runs of one audit (``--seed``), not in what it measures.
RUN_PARAMETERS = frozenset({"seed"})
MCNEMAR = "McNemar exact (paired)"
TWO_PROPORTION = "two-proportion z (unpaired)"


class AuditsDiffer(RobustkitError):
    """Audits of different data, threat, attacks or attack parameters: their figures measure
    different things."""

    exit_code = 2


@dataclass(frozen=True)
class Audit:
    """One side: a ``report.json`` document and, where known, each sample's worst-case
    ``broken_at`` (the smallest eps that broke it; 0 for a clean mistake; inf for never)."""

    label: str
    report: Mapping[str, Any]
    broken_at: tuple[float, ...] | None = None


def load_audit(path: Path) -> Audit:
    """``report.json`` (or a folder holding it) and the ``per_sample.csv`` beside it, if any."""
    path = path / "report.json" if path.is_dir() else path
    report = read_report(path)
    table = path.with_name("per_sample.csv")
    broken_at = None
    if table.is_file():
        with table.open(newline="") as handle:
            broken_at = tuple(float(row["broken_at_eps"]) if row["broken_at_eps"] else math.inf
                              for row in csv.DictReader(handle))
    return Audit(str(path), report, broken_at)


@dataclass(frozen=True)
class Row:
    """One figure of both audits: clean accuracy (``eps`` None) or the worst case at one eps."""

    eps: float | None
    a: float | None  #: None where that audit has no figure at this eps
    a_ci95: Interval | None
    b: float | None
    b_ci95: Interval | None
    test: str = ""  #: "" when one side has no figure
    p_value: float | None = None

    @property
    def difference(self) -> float | None:
        """b - a, in accuracy (not points)."""
        return None if self.a is None or self.b is None else self.b - self.a

    @property
    def significant(self) -> bool:
        return self.p_value is not None and self.p_value < ALPHA

    @property
    def name(self) -> str:
        return "clean" if self.eps is None else eps_text(self.eps)

    def to_json_dict(self) -> dict[str, Any]:
        return {"eps": self.eps, "eps_text": self.name, "a": self.a, "a_ci95": _list(self.a_ci95), "b": self.b,
                "b_ci95": _list(self.b_ci95), "difference": self.difference, "test": self.test,
                "p_value": self.p_value, "significant": self.significant}


@dataclass(frozen=True)
class CheckChange:
    name: str
    a: str  #: status in A, or "absent"
    b: str

    def to_json_dict(self) -> dict[str, Any]:
        return {"name": self.name, "a": self.a, "b": self.b}


@dataclass(frozen=True)
class Side:
    """What the comparison says of each audit beside its figures."""

    label: str
    model: str
    trust: str  #: the report's summary trust ("" for reports older than schema 1.2)
    verdict: str

    def to_json_dict(self) -> dict[str, Any]:
        return {"label": self.label, "model": self.model, "trust": self.trust, "verdict": self.verdict}


@dataclass(frozen=True)
class Difference:
    """One way the two audits measure different things: its kind decides what it undoes (other
    data: no pairing of samples; other attacks: a difference may be the attacks', not the
    models') and its text says it."""

    kind: Literal["data", "threat", "attacks"]
    text: str


@dataclass(frozen=True)
class Comparison:
    a: Side
    b: Side
    norm: str
    n: tuple[int, int]
    rows: tuple[Row, ...]  #: clean first, then each eps of either audit, ascending
    checks: tuple[CheckChange, ...]  #: checks whose status changed
    differences: tuple[Difference, ...]  #: what differs in data, threat or attacks (only when forced)
    pairing: str  #: whether the per-sample results paired the samples (McNemar), or why not

    @property
    def mixed_budgets(self) -> str | None:
        """The warning that leads the conclusion when the two audits ran other attacks or other
        attack parameters (forced): a difference may be the attacks', not the models'."""
        mixed = [d.text for d in self.differences if d.kind == "attacks"]
        if not mixed:
            return None
        return (f"WARNING: this comparison mixes attack budgets ({'; '.join(mixed)}): a difference, significant "
                "or not, may come from the attacks rather than the models")

    def lines(self) -> list[str]:
        """The conclusion in words: what is significant, what differs, what weakens the figures."""
        better = [f"{r.name} ({_points(r.difference)})" for r in self.rows if r.significant]
        lines = [self.mixed_budgets] if self.mixed_budgets else []
        lines.append(f"significant differences (B - A, alpha {ALPHA}): {', '.join(better)}" if better
                     else f"no significant difference at any eps (alpha {ALPHA})")
        lines.append(f"per-sample results: {self.pairing}")
        lines += [f"compared although they differ: {d.text}" for d in self.differences
                  if d.kind != "attacks"]  # those lead, in mixed_budgets
        lines += [f"{side.label}: {side.verdict}" for side in (self.a, self.b) if side.trust not in ("pass", "")]
        return lines

    def to_json_dict(self) -> dict[str, Any]:
        return {"a": self.a.to_json_dict(), "b": self.b.to_json_dict(), "norm": self.norm, "n": list(self.n),
                "alpha": ALPHA, "rows": [r.to_json_dict() for r in self.rows],
                "checks_changed": [c.to_json_dict() for c in self.checks],
                "differences": [d.text for d in self.differences],
                "pairing": self.pairing, "conclusion": self.lines()}


def compare_reports(a: Audit, b: Audit, *, force: bool = False) -> Comparison:
    """Compare audit ``b`` with audit ``a`` (differences are b - a).

    Raises ``AuditsDiffer``, one line naming what differs, for audits of different data, threat,
    attacks or attack parameters, unless ``force``: the rows then cover the eps of either audit.
    """
    differences = tuple(_differences(a.report, b.report))
    if differences and not force:
        raise AuditsDiffer(f"the audits differ in {'; '.join(d.text for d in differences)}: their figures are not "
                           "comparable "
                           "(--force compares them anyway)")
    same_samples = not any(d.kind == "data" for d in differences)
    paired_a, why_a = _paired(a, same_samples)
    paired_b, why_b = _paired(b, same_samples)
    both = (paired_a, paired_b) if paired_a is not None and paired_b is not None else None
    pairing = f"used, samples paired ({MCNEMAR})" if both else \
        "not used (" + "; ".join(f"{side}: {why}" for side, why in (("A", why_a), ("B", why_b)) if why) + \
        f"), so {TWO_PROPORTION}"
    rows = [_row(None, a.report["clean_accuracy"], a.report["n"], b.report["clean_accuracy"], b.report["n"], both)]
    worst_a = _by_eps(a.report, {})
    worst_b = _by_eps(b.report, worst_a)
    for eps in sorted(set(worst_a) | set(worst_b)):
        row_a, row_b = worst_a.get(eps), worst_b.get(eps)
        rows.append(_row(eps, None if row_a is None else row_a["robust_accuracy"], a.report["n"],
                         None if row_b is None else row_b["robust_accuracy"], b.report["n"], both))
    return Comparison(_side(a), _side(b), a.report["threat"]["norm"], (a.report["n"], b.report["n"]), tuple(rows),
                      tuple(_check_changes(a.report, b.report)), differences, pairing)


def _side(audit: Audit) -> Side:
    summary = audit.report.get("summary", {})
    return Side(audit.label, str(audit.report["model"].get("source", "")), summary.get("trust", ""),
                summary.get("verdict", ""))


def _differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[Difference]:
    """What makes the two audits measure different things, one phrase each."""
    found = []
    if a["data"].get("sha256") != b["data"].get("sha256") or a["n"] != b["n"]:
        found.append(Difference("data", f"data ({a['data'].get('source')} sha256 {str(a['data'].get('sha256'))[:12]}, "
                                        f"n = {a['n']} vs {b['data'].get('source')} sha256 "
                                        f"{str(b['data'].get('sha256'))[:12]}, n = {b['n']})"))
    threat_a, threat_b = a["threat"], b["threat"]
    for key in ("norm", "bounds", "targeted"):
        if threat_a.get(key) != threat_b.get(key):
            found.append(Difference("threat", f"threat {key} ({threat_a.get(key)} vs {threat_b.get(key)})"))
    eps_a, eps_b = _eps_list(threat_a), _eps_list(threat_b)
    if len(eps_a) != len(eps_b) or not all(_same_eps(x, y) for x, y in zip(eps_a, eps_b)):
        found.append(Difference("threat", f"threat eps ({','.join(map(eps_text, eps_a))} vs "
                                          f"{','.join(map(eps_text, eps_b))})"))
    suite_a, suite_b = a["config"]["suite"]["name"], b["config"]["suite"]["name"]
    attacks_a, attacks_b = a["config"].get("attacks"), b["config"].get("attacks")
    if suite_a != suite_b or attacks_a != attacks_b:
        found.append(Difference("attacks", f"suite ({suite_a}: {', '.join(attacks_a or [])} vs {suite_b}: "
                                           f"{', '.join(attacks_b or [])})"))
    params_a, params_b = _attack_params(a), _attack_params(b)
    changed = [f"{attack} {key} {params_a[attack].get(key)} vs {params_b[attack].get(key)}"
               for attack in params_a if attack in params_b
               for key in sorted((set(params_a[attack]) | set(params_b[attack])) - RUN_PARAMETERS)
               if params_a[attack].get(key) != params_b[attack].get(key)]
    if changed:
        found.append(Difference("attacks", f"attack parameters ({'; '.join(changed)})"))
    return found


def _attack_params(report: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The parameters each attack ran with, as its result rows record them."""
    return {row["attack"]: row.get("params", {}) for row in report["results"]}


def _eps_list(threat: Mapping[str, Any]) -> list[float]:
    return sorted(float(e) for e in threat["eps"])


def _same_eps(x: float, y: float) -> bool:
    return math.isclose(x, y, rel_tol=EPS_TOLERANCE, abs_tol=1e-12)


def _by_eps(report: Mapping[str, Any], known: Mapping[float, Any]) -> dict[float, Mapping[str, Any]]:
    """The worst-case rows by eps; an eps close to one of ``known`` (the other report's) takes its value."""
    rows = {}
    for row in report["worst_case"]:
        eps = float(row["eps"])
        rows[next((k for k in known if _same_eps(k, eps)), eps)] = row
    return rows


def _paired(audit: Audit, same_samples: bool) -> tuple[tuple[float, ...] | None, str]:
    """The audit's per-sample results if they can pair samples, else None and why not."""
    if audit.broken_at is None:
        return None, "no per-sample results (per_sample.csv)"
    if not same_samples:
        return None, "the audits are of different data"
    report = audit.report
    n = report["n"]
    if len(audit.broken_at) != n:
        return None, f"per-sample results for {len(audit.broken_at)} samples, the report has {n}"
    figures = [(0.0, report["clean_accuracy"])]
    figures += [(float(r["eps"]), r["robust_accuracy"]) for r in report["worst_case"]]
    for eps, accuracy in figures:
        if sum(_robust(audit.broken_at, eps)) != round(accuracy * n):
            return None, f"per-sample results disagree with the report at eps {eps_text(eps)}"
    return audit.broken_at, ""


def _robust(broken_at: Sequence[float], eps: float) -> list[bool]:
    """Per sample, whether it stands at ``eps`` (clean: ``eps`` 0 stands where it is correct)."""
    return [value > eps * (1 + EPS_TOLERANCE) if eps > 0 else value > 0 for value in broken_at]


def _row(eps: float | None, a: float | None, n_a: int, b: float | None, n_b: int,
         paired: tuple[Sequence[float], Sequence[float]] | None) -> Row:
    """One row; ``paired``: both audits' per-sample ``broken_at``, for the paired test."""
    if a is None or b is None:
        return Row(eps, a, None if a is None else accuracy_ci(a, n_a), b, None if b is None else accuracy_ci(b, n_b))
    if paired is not None:
        test, p_value = MCNEMAR, mcnemar_exact(_robust(paired[0], eps or 0.0), _robust(paired[1], eps or 0.0))
    else:
        test, p_value = TWO_PROPORTION, two_proportion(round(a * n_a), n_a, round(b * n_b), n_b)
    return Row(eps, a, accuracy_ci(a, n_a), b, accuracy_ci(b, n_b), test, p_value)


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Two-sided exact McNemar p-value: under "no difference" each discordant sample (right in
    one, wrong in the other) goes either way with probability 1/2."""
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    discordant = only_a + only_b
    if discordant == 0:
        return 1.0
    tail = sum(math.comb(discordant, k) for k in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2**discordant)


def two_proportion(hits_a: int, n_a: int, hits_b: int, n_b: int) -> float:
    """Two-sided p-value of the pooled two-proportion z-test."""
    pooled = (hits_a + hits_b) / (n_a + n_b)
    spread = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if spread == 0:
        return 1.0
    z = (hits_b / n_b - hits_a / n_a) / spread
    return math.erfc(abs(z) / math.sqrt(2))


def _check_changes(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[CheckChange]:
    status_a = {c["name"]: c["status"] for c in a["checks"]}
    status_b = {c["name"]: c["status"] for c in b["checks"]}
    names = list(status_a) + [name for name in status_b if name not in status_a]
    return [CheckChange(name, status_a.get(name, "absent"), status_b.get(name, "absent")) for name in names
            if status_a.get(name) != status_b.get(name)]


def _list(interval: Interval | None) -> list[float] | None:
    return None if interval is None else list(interval)


def _points(difference: float | None) -> str:
    return "n/a" if difference is None else f"{100 * difference:+.1f} points"


def comparison_png(comparison: Comparison) -> bytes:
    """Both audits' worst-case robust accuracy against eps, with their 95% intervals; a star
    marks each eps where the difference is significant."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.4, 4.2), dpi=110)  # no pyplot: its global state stays untouched
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    curves = [row for row in comparison.rows if row.eps is not None]
    for first, side, style in ((True, comparison.a, "-"), (False, comparison.b, "--")):
        points = [(row.eps or 0.0, row.a if first else row.b, row.a_ci95 if first else row.b_ci95)
                  for row in comparison.rows]  # the clean row is eps 0
        known = [(eps, value, ci) for eps, value, ci in points if value is not None and ci is not None]
        xs = [eps for eps, _, _ in known]
        line, = ax.plot(xs, [100 * value for _, value, _ in known], style, marker="o", markersize=5,
                        label=f"{side.label} ({side.model})")
        ax.fill_between(xs, [100 * ci[0] for _, _, ci in known], [100 * ci[1] for _, _, ci in known],
                        color=line.get_color(), alpha=0.12)
    for row in curves:
        if row.significant and row.eps is not None:
            ax.annotate("*", (row.eps, 100 * max(row.a or 0.0, row.b or 0.0)), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=14)
    ticks = [r.eps for r in curves if r.eps is not None]
    ax.set_xticks(ticks, [eps_text(e) for e in ticks], fontsize=8)
    ax.set_xlabel(f"eps ({comparison.norm}, input units)")
    ax.set_ylabel("worst-case robust accuracy (%)")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(f"A vs B, 95% intervals; * significant at alpha {ALPHA}", fontsize=9)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def write_comparison(comparison: Comparison, out: Path) -> None:
    """``comparison.json`` (``Comparison.to_json_dict()``) and ``comparison.png``, as one set."""
    write_set(out, {"comparison.json": json.dumps(comparison.to_json_dict(), indent=2),
                    "comparison.png": comparison_png(comparison)})
