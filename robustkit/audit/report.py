"""Audit reports: the JSON contract, and the Markdown, HTML, CSV and plot written beside it.

``report.json`` is the contract (``SCHEMA_VERSION``); everything else is rendered from that
document, so the files can never disagree. Every file is written atomically (temporary file,
then ``os.replace``), so an interrupted audit leaves either the old or the new file, never half
of one.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from robustkit.io import atomic_write

SCHEMA_VERSION = "1.1"
#: Keys every report.json carries (tests check the schema against this).
REQUIRED_KEYS = ("schema_version", "complete", "clean_accuracy", "clean_ci95", "n", "threat", "mode",
                 "results", "worst_case", "certification", "checks", "model", "data", "environment")


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion: sound near 0 and 1, unlike the normal one."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def accuracy_with_ci(accuracy: float, n: int) -> dict[str, Any]:
    low, high = wilson_interval(round(accuracy * n), n)
    return {"robust_accuracy": accuracy, "ci95": [low, high]}


def _pct(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


def _ci(ci: Sequence[float]) -> str:
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def plot_png(report: dict[str, Any]) -> bytes:
    """Robust accuracy against eps for each attack and the worst case, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=110)  # no pyplot: its global backend and figure list stay untouched
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    clean = report["clean_accuracy"]
    by_attack: dict[str, list[tuple[float, float]]] = {}
    for row in report["results"]:
        by_attack.setdefault(row["attack"], []).append((row["eps"], row["robust_accuracy"]))
    for name, points in by_attack.items():
        ordered = sorted([(0.0, clean), *points])
        ax.plot([e for e, _ in ordered], [100 * a for _, a in ordered], marker="o", linewidth=1.2, label=name)
    if report["worst_case"]:
        rows = sorted(report["worst_case"], key=lambda r: r["eps"])
        eps = [0.0] + [r["eps"] for r in rows]
        worst = [100 * clean] + [100 * r["robust_accuracy"] for r in rows]
        low = [100 * clean] + [100 * r["ci95"][0] for r in rows]
        high = [100 * clean] + [100 * r["ci95"][1] for r in rows]
        ax.plot(eps, worst, color="black", linewidth=2.4, label="worst case")
        ax.fill_between(eps, low, high, color="black", alpha=0.12, label="worst case 95% CI")
        proven = _certified_rows(report)
        if proven:
            ax.plot([0.0] + [r["eps"] for r in proven], [100 * clean] + [100 * r["certified_accuracy"] for r in proven],
                    color="black", linestyle="--", linewidth=1.6, label="certified (proven lower bound)")
    ax.set_xlabel(f"eps ({report['threat']['norm']}, input units)")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing to label when no attack ran
        ax.legend(fontsize=8)
    scope = " (cascade: each line includes the attacks before it)" if report["mode"] == "cascade" else ""
    ax.set_title("robust accuracy against eps" + scope + ("" if report["complete"] else " INCOMPLETE"), fontsize=9)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _certified_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Worst-case rows that carry a certified accuracy (a proof-backed lower bound)."""
    rows = [r for r in report["worst_case"] if r.get("certified_accuracy") is not None]
    return sorted(rows, key=lambda r: r["eps"])


def _certification_line(report: dict[str, Any]) -> str:
    certification = report.get("certification", {})
    return f"certification: {certification.get('method', 'off')} ({certification.get('seconds', 0):.2f} s)"


def _banners(report: dict[str, Any]) -> list[tuple[str, str]]:
    banners = []
    if not report["complete"]:
        banners.append(("fail", "This audit was interrupted: the numbers cover only what was computed."))
    caveat = report.get("config", {}).get("suite", {}).get("caveat")
    if caveat:
        banners.append(("warn", caveat))
    for check in report["checks"]:
        if check["status"] in ("warn", "fail"):
            banners.append((check["status"], f"{check['name']}: {check['detail']}"))
        elif check["status"] == "untested":
            banners.append(("warn", f"{check['name']} (not tested): {check['detail']}"))
    return banners


def render_markdown(report: dict[str, Any]) -> str:
    lines = [f"# robustkit audit: {report['model']['source']}", ""]
    for status, text in _banners(report):
        lines.append(f"> **{status.upper()}** {text}")
    lines += [
        "",
        f"- data: {report['data'].get('source', report['data'].get('name'))}, n = {report['n']}",
        f"- threat: {report['threat']['norm']}, bounds {report['threat']['bounds']}, mode {report['mode']}",
        f"- model: {report['model']['format']}, sha256 `{report['model']['sha256'][:16]}...`, "
        f"attacked {report['attack_access']}",
        f"- clean accuracy: {_pct(report['clean_accuracy'])} {_ci(report['clean_ci95'])}",
        f"- {_certification_line(report)}",
        "",
        "| attack | eps | robust accuracy | 95% CI | seconds |",
        "|---|---|---|---|---|",
    ]
    for row in report["results"]:
        lines.append(f"| {row['attack']} | {row['eps']:g} | {_pct(row['robust_accuracy'])} | {_ci(row['ci95'])} "
                     f"| {row['seconds']:.2f} |")
    for row in report["worst_case"]:
        lines.append(f"| **worst case** | {row['eps']:g} | **{_pct(row['robust_accuracy'])}** | {_ci(row['ci95'])} | |")
    for row in _certified_rows(report):
        lines.append(f"| certified (proven) | {row['eps']:g} | {_pct(row['certified_accuracy'])} "
                     f"| {_ci(row['certified_ci95'])} | |")
    lines += ["", "## Checks", "", "| check | status | detail |", "|---|---|---|"]
    lines += [f"| {c['name']} | {c['status']} | {c['detail']} |" for c in report["checks"]]
    for section in report.get("sections", []):
        lines += ["", f"## {section['title']}", "", section["markdown"]]
    return "\n".join(lines) + "\n"


def render_html(report: dict[str, Any], png: bytes) -> str:
    """One self-contained page: banners, the plot (embedded), the tables."""
    esc = html.escape
    colours = {"pass": "#1b7f3b", "warn": "#9a6700", "fail": "#b42318"}
    banners = "".join(
        f'<div class="banner {s}">{esc(s.upper())}: {esc(t)}</div>' for s, t in _banners(report)
    )
    result_rows = "".join(
        f"<tr><td>{esc(r['attack'])}</td><td>{r['eps']:g}</td><td>{_pct(r['robust_accuracy'])}</td>"
        f"<td>{_ci(r['ci95'])}</td><td>{r['seconds']:.2f}</td></tr>" for r in report["results"]
    ) + "".join(
        f"<tr class=worst><td>worst case</td><td>{r['eps']:g}</td><td>{_pct(r['robust_accuracy'])}</td>"
        f"<td>{_ci(r['ci95'])}</td><td></td></tr>" for r in report["worst_case"]
    ) + "".join(
        f"<tr><td>certified (proven)</td><td>{r['eps']:g}</td><td>{_pct(r['certified_accuracy'])}</td>"
        f"<td>{_ci(r['certified_ci95'])}</td><td></td></tr>" for r in _certified_rows(report)
    )
    check_rows = "".join(
        f'<tr><td>{esc(c["name"])}</td><td style="color:{colours.get(c["status"], "#000")}">{esc(c["status"])}'
        f"</td><td>{esc(c['detail'])}</td></tr>" for c in report["checks"]
    )
    sections = "".join(
        f"<h2>{esc(s['title'])}</h2><pre>{esc(s['markdown'])}</pre>" for s in report.get("sections", [])
    )
    image = base64.b64encode(png).decode()
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>robustkit audit: {esc(report['model']['source'])}</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#1f2328}}
table{{border-collapse:collapse;margin:1rem 0}}td,th{{border:1px solid #d0d7de;padding:.3rem .6rem;text-align:left}}
.banner{{padding:.6rem 1rem;margin:.4rem 0;border-radius:6px}}.fail{{background:#ffebe9}}.warn{{background:#fff8c5}}
tr.worst{{font-weight:bold}}code{{font-size:.9em}}
</style></head><body>
<h1>robustkit audit</h1>
{banners}
<p>model <code>{esc(report['model']['source'])}</code> ({esc(report['model']['format'])}, sha256
<code>{esc(report['model']['sha256'][:16])}...</code>, attacked {esc(report['attack_access'])}) on
<code>{esc(str(report['data'].get('source', report['data'].get('name'))))}</code>, n = {report['n']},
threat {esc(report['threat']['norm'])}, mode {esc(report['mode'])}.</p>
<p>clean accuracy <b>{_pct(report['clean_accuracy'])}</b> {_ci(report['clean_ci95'])};
{esc(_certification_line(report))}</p>
<img alt="robust accuracy against eps" src="data:image/png;base64,{image}">
<h2>Robust accuracy</h2>
<table><tr><th>attack</th><th>eps</th><th>robust accuracy</th><th>95% CI</th><th>seconds</th></tr>{result_rows}</table>
<h2>Checks</h2>
<table><tr><th>check</th><th>status</th><th>detail</th></tr>{check_rows}</table>
{sections}
<p><small>robustkit {esc(report['environment'].get('robustkit', ''))},
schema {esc(report['schema_version'])}</small></p>
</body></html>
"""


def write_per_sample(path: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["index", "label", "clean_correct", "broken_at_eps", "broken_by",
                                                  "proven_robust_to_eps"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buffer.getvalue())


def write_report(report: dict[str, Any], out: Path, per_sample: list[dict[str, Any]] | None = None,
                 *, render: bool = True) -> None:
    """Write report.json (always), and the rendered files unless ``render`` is False."""
    atomic_write(out / "report.json", json.dumps(report, indent=2, default=str))
    if per_sample is not None:
        write_per_sample(out / "per_sample.csv", per_sample)
    if render:
        png = plot_png(report)
        atomic_write(out / "robustness.png", png)
        atomic_write(out / "report.md", render_markdown(report))
        atomic_write(out / "report.html", render_html(report, png))
