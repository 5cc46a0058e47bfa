"""The headline: report.json's summary, the top of report.md and report.html and the last lines
on the terminal say the worst case of the tables, and say first what weakens it; the badge."""

from __future__ import annotations

import dataclasses
import json
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import save_file

from robustkit.audit.checks import Check
from robustkit.audit.report import BADGE_GREY, SuiteRecord
from robustkit.audit.run import AuditConfig, run_audit_report
from robustkit.cli import cli
from robustkit.models.base import LoadOptions
from robustkit.testing import trained_digits_model
from robustkit.threat import eps_text

pytestmark = pytest.mark.usefixtures("host")


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "cnn.safetensors"
    save_file(trained_digits_model("cnn").state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def audited(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A small real audit through the command line: its folder and its terminal output."""
    out = tmp_path_factory.mktemp("audit")
    with pytest.MonkeyPatch.context() as patch:  # the module's host: built-ins only
        from robustkit.plugin import host as host_module
        from robustkit.plugin.host import Host

        patch.setattr(host_module, "_host", Host(entry_points=False))
        patch.setattr(host_module, "_plugins_dirs", ())
        result = CliRunner().invoke(cli, ["audit", str(weights), "--arch", "builtin:digits-cnn", "--eps", "0.05,0.2",
                                          "--limit", "40", "--attack", "fgsm", "--attack", "pgd", "-o", "steps", "5",
                                          "--check-samples", "16", "--out", str(out)])
    assert result.exit_code in (0, 3), result.output
    return out, result.stdout


def test_the_headline_is_the_worst_case_of_the_tables(audited: tuple[Path, str]) -> None:
    out, terminal = audited
    report = json.loads((out / "report.json").read_text())
    summary = report["summary"]
    assert summary["worst_case"] == report["worst_case"]
    verdict, figures, proven = summary["headline"]
    for row in report["worst_case"]:
        assert f"{eps_text(row['eps'])}: {100 * row['robust_accuracy']:.1f}% [{100 * row['ci95'][0]:.1f}, " \
               f"{100 * row['ci95'][1]:.1f}]" in figures
        assert f"{eps_text(row['eps'])}: {100 * row['certified_accuracy']:.1f}%" in proven
    assert "suite custom" in figures and f"n = {report['n']}" in figures
    assert summary["verdict"] in verdict
    failed = [c["name"] for c in report["checks"] if c["status"] == "fail"]
    assert summary["trust"] == ("fail" if failed else "warn" if any(c["status"] != "pass" for c in report["checks"])
                                else "pass")
    # the same lines lead report.md, lead report.html and end the terminal output
    markdown = (out / "report.md").read_text().splitlines()
    assert markdown[2:7] == [f"**{verdict}**", "", f"**{figures}**", f"**{proven}**", ""]
    page = (out / "report.html").read_text()
    assert page.index('class="headline') < page.index("<table")
    for row in report["worst_case"]:
        assert f'<div class="big">{100 * row["robust_accuracy"]:.1f}%</div>' in page
    printed = [line.strip() for line in terminal.strip().splitlines()]
    assert " ".join(printed[-3:]).split() == " ".join(summary["headline"]).split()  # rich may wrap long lines


def test_what_weakens_the_figures_is_said_first(weights: Path, tmp_path: Path) -> None:
    report = run_audit_report(AuditConfig(str(weights), load=LoadOptions(arch="builtin:digits-cnn"), eps=(0.1,),
                                          limit=30, attacks=("fgsm",), run_checks=False, certify=False))
    assert report.summary.trust == "warn"
    assert report.summary.verdict == "not tested: sanity checks (skipped (--no-checks): gradient masking was not " \
                                     "looked for)"
    passing = dataclasses.replace(report, checks=(Check("gradients", "pass", "ok"),))
    assert passing.summary.trust == "pass" and passing.summary.verdict == "every sanity check passed"
    assert passing.summary.badge.colour != BADGE_GREY and passing.summary.badge.value.endswith("%")

    failing = dataclasses.replace(passing, checks=(Check("gradients", "fail", "masked"),
                                                   Check("convergence", "warn", "slow")))
    assert failing.summary.trust == "fail"
    assert failing.summary.verdict.startswith("FAILED checks (gradients)")
    assert "overstated" in failing.summary.verdict and "warnings (convergence)" in failing.summary.verdict
    assert failing.summary.badge.value.endswith("(checks failed)") and failing.summary.badge.colour == BADGE_GREY

    quick = SuiteRecord("quick", "a first look", "quick suite: a first look, not a robustness claim", ())
    partial = dataclasses.replace(failing, complete=False, config=dataclasses.replace(report.config, suite=quick))
    summary = partial.summary
    assert summary.trust == "incomplete"
    first, second, third = summary.verdict.split("; ")[:3]
    assert first.startswith("INCOMPLETE") and second.startswith("quick suite") and third.startswith("FAILED")
    assert summary.lines()[0] == f"verdict: {summary.verdict}"
    assert summary.badge.value.endswith("(incomplete, quick, checks failed)")
    # the badge never rounds up
    low = dataclasses.replace(passing, worst_case=(dataclasses.replace(passing.worst_case[0], robust_accuracy=0.459),))
    assert low.summary.badge.value == "45%"


def test_the_badge_is_written_with_the_report_and_by_the_command(audited: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = audited
    report = json.loads((out / "report.json").read_text())
    svg = ElementTree.fromstring((out / "badge.svg").read_text())
    texts = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")]
    badge = report["summary"]["badge"]
    assert texts == [badge["label"], badge["value"]]
    largest = max(report["worst_case"], key=lambda r: r["eps"])  # 8/255 was not audited: the largest eps
    assert badge["label"] == f"robust acc. @ {eps_text(largest['eps'])}"
    assert badge["value"].startswith(f"{int(100 * largest['robust_accuracy'])}%")
    result = CliRunner().invoke(cli, ["badge", str(out / "report.json"), "-o", str(tmp_path / "b.svg")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "b.svg").read_text() == (out / "badge.svg").read_text()
