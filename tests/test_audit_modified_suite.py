"""A report says exactly what ran: ``-o`` that changes a suite's attacks makes the suite
"modified" (and, when it lowers a budget, no robustness claim); ``compare`` refuses audits whose
attack parameters differ; an audit that fails says it failed, not that it was interrupted."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from torch import Tensor

import robustkit.audit.run as audit_run
from robustkit.attacks.native import PGD
from robustkit.audit.compare import AuditsDiffer, compare_reports, load_audit
from robustkit.audit.report import SCHEMA_PATH
from robustkit.audit.suites import get_suite
from robustkit.cli import cli
from robustkit.modules import Model
from robustkit.plugin.hookspecs import hookimpl
from robustkit.plugin.host import Host
from robustkit.threat import ThreatModel

QUICK_STEPS = "20"  #: the quick suite's APGD steps


def _schema_validator() -> Callable[[Any, Any], list[str]]:
    """tests/test_report_schema.py's ``validate`` (jsonschema is no dependency)."""
    spec = importlib.util.spec_from_file_location("report_schema_tests", Path(__file__).with_name(
        "test_report_schema.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.validate


def invoke_audit(weights: Path, out: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["audit", str(weights), "--arch", "builtin:digits-cnn", "--eps", "0.1",
                                    "--limit", "60", "--no-certify", "--out", str(out), *args])


@pytest.fixture(scope="module")
def audits(cnn_weights: Path, builtin_host: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small real audits: the default suite weakened by ``-o``; the quick suite with APGD's steps
    set to the suite's own value, and raised above it."""
    runs = {"weakened": ("-o", "steps", "1", "-o", "square.queries", "1"),
            "quick as is": ("--suite", "quick", "-o", "apgd.steps", QUICK_STEPS, "--no-checks"),
            "quick stronger": ("--suite", "quick", "-o", "apgd.steps", "40", "--no-checks")}
    folders = {}
    for name, args in runs.items():
        folders[name] = tmp_path_factory.mktemp("audit") / name.replace(" ", "-")
        result = invoke_audit(cnn_weights, folders[name], *args)
        assert result.exit_code in (0, 3), result.output  # 3: a check failed, which is not judged here
    return folders


def report_of(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "report.json").read_text())


def test_a_weakening_option_makes_a_modified_suite_that_is_no_claim(audits: dict[str, Path]) -> None:
    report = report_of(audits["weakened"])
    suite = report["config"]["suite"]
    changes = {(c["attack"], c["parameter"]): (c["suite"], c["used"]) for c in suite["modified"]}
    assert changes == {("robustkit:apgd", "steps"): (50, 1), ("robustkit:apgd-t", "steps"): (50, 1),
                       ("robustkit:fmn", "steps"): (100, 1), ("robustkit:square", "queries"): (1000, 1)}
    # the suite's own settings stay beside the changes; the rows say what ran
    assert {a["name"]: a["settings"] for a in suite["attacks"]} == {
        a.name: dict(a.settings) for a in get_suite("default").attacks}
    assert {r["attack"]: r["params"].get("steps", r["params"].get("queries")) for r in report["results"]
            if r["attack"] != "robustkit:fgsm"} == {"robustkit:apgd": 1, "robustkit:apgd-t": 1, "robustkit:fmn": 1,
                                                    "robustkit:square": 1}
    label = ("suite default, modified (apgd.steps 50 -> 1, apgd-t.steps 50 -> 1, fmn.steps 100 -> 1, "
             "square.queries 1000 -> 1)")
    summary = report["summary"]
    assert label in summary["headline"][1]
    assert "not a robustness claim" in suite["caveat"] and summary["verdict"].startswith(suite["caveat"])
    assert summary["trust"] != "pass" and "default modified" in summary["badge"]["value"]
    assert label in (audits["weakened"] / "report.md").read_text()
    assert "default, modified (apgd.steps 50 -&gt; 1" in (audits["weakened"] / "report.html").read_text()
    assert _schema_validator()(report, json.loads(SCHEMA_PATH.read_text())) == []


def test_an_option_at_the_suite_value_is_no_modification_and_a_stronger_one_no_caveat(
        audits: dict[str, Path]) -> None:
    quick = get_suite("quick")
    same, stronger = report_of(audits["quick as is"]), report_of(audits["quick stronger"])
    assert same["config"]["suite"]["modified"] == []
    assert "modified" not in same["summary"]["headline"][1] and "suite quick," in same["summary"]["headline"][1]
    assert stronger["config"]["suite"]["modified"] == [
        {"attack": "robustkit:apgd", "parameter": "steps", "suite": 20, "used": 40}]
    assert "suite quick, modified (apgd.steps 20 -> 40)" in stronger["summary"]["headline"][1]
    assert same["config"]["suite"]["caveat"] == stronger["config"]["suite"]["caveat"] == quick.caveat


def test_compare_refuses_other_attack_parameters_unless_forced(audits: dict[str, Path]) -> None:
    same, stronger = load_audit(audits["quick as is"]), load_audit(audits["quick stronger"])
    with pytest.raises(AuditsDiffer, match=r"differ in attack parameters \(robustkit:apgd steps 20 vs 40\)"):
        compare_reports(same, stronger)
    refused = CliRunner().invoke(cli, ["compare", str(audits["quick as is"]), str(audits["quick stronger"])])
    assert refused.exit_code == 2 and "robustkit:apgd steps 20 vs 40" in refused.stderr
    forced = CliRunner().invoke(cli, ["compare", str(audits["quick as is"]), str(audits["quick stronger"]),
                                      "--force"])
    assert forced.exit_code == 0, forced.output
    assert "WARNING: this comparison mixes attack budgets" in " ".join(forced.stdout.split())
    # another --seed is another run of one audit, not another budget
    reseeded = json.loads(json.dumps(same.report))
    for row in reseeded["results"]:
        row["params"]["seed"] = 7
    assert compare_reports(same, type(same)("B", reseeded)).differences == ()


@pytest.mark.parametrize(("error", "exit_code", "ended"), [
    (RuntimeError("boom\nmore lines of it"), 1, "failed (RuntimeError: boom)"),
    (KeyboardInterrupt(), 130, "was interrupted"),
])
def test_a_failure_says_failed_and_an_interruption_interrupted(
        cnn_weights: Path, builtin_host: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        error: BaseException, exit_code: int, ended: str) -> None:
    def raising(*args: Any, **kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(audit_run, "run_checks", raising)  # after the attacks: their results stand
    result = invoke_audit(cnn_weights, tmp_path, "--attack", "fgsm")
    assert result.exit_code == exit_code, result.output
    report = report_of(tmp_path)
    assert report["complete"] is False and [r["attack"] for r in report["results"]] == ["robustkit:fgsm"]
    assert report["summary"]["verdict"].startswith(f"INCOMPLETE: the audit {ended}")
    assert report["failure"] == ("RuntimeError: boom" if exit_code == 1 else None)
    assert ("interrupted" in report["summary"]["verdict"]) is (exit_code == 130)
    assert _schema_validator()(report, json.loads(SCHEMA_PATH.read_text())) == []


class _FragilePGD(PGD):
    """robustkit's PGD, raising beyond the steps the audit gave it: the convergence check's doubled
    steps (a plugin attack that breaks only in a check's settings)."""

    name = "fragile-pgd"

    def run(self, model: Model, x: Tensor, labels: Tensor, threat: ThreatModel) -> Tensor:
        if self.params.steps > PGD.Params().steps:
            raise RuntimeError("too many steps for this attack")
        return super().run(model, x, labels, threat)


class _FragilePlugin:
    @hookimpl
    def robustkit_register_attacks(self, registry: Any) -> None:
        registry.add(_FragilePGD)


def test_an_attack_raising_in_a_check_fails_that_check_not_the_audit(host: Host, cnn_weights: Path,
                                                                      tmp_path: Path) -> None:
    host.register(_FragilePlugin(), "fragile")
    result = invoke_audit(cnn_weights, tmp_path, "--attack", "fgsm", "--attack", "fragile-pgd")
    assert result.exit_code == 3, result.output  # the audit ran; a check failed
    report = report_of(tmp_path)
    assert report["complete"] is True and report.get("failure") is None
    convergence = next(c for c in report["checks"] if c["name"] == "convergence")
    assert convergence["status"] == "fail" and "too many steps for this attack" in convergence["detail"]
    assert {c["name"] for c in report["checks"]} >= {"iterative >= fgsm", "monotone in eps", "large-eps probe"}
