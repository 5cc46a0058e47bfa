"""``robustkit compare``: a hardened model differs significantly from the plain one, two runs of
one model do not, mismatched audits are refused, and the tests themselves are right."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from robustkit.audit.compare import (
    MCNEMAR,
    TWO_PROPORTION,
    Audit,
    AuditsDiffer,
    compare_reports,
    load_audit,
    mcnemar_exact,
    two_proportion,
)
from robustkit.audit.run import AuditConfig, run_audit
from robustkit.cli import cli
from robustkit.data import load_digits
from robustkit.harden.config import RunConfig
from robustkit.harden.defences import FGSMRS
from robustkit.models.base import LoadOptions
from robustkit.testing import trained_digits_model
from robustkit.threat import ThreatModel

EPS = (0.1, 0.2)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Audits (report.json and per_sample.csv) of the plain digits CNN, run twice with other
    seeds, and of that CNN fine-tuned adversarially (FGSM-RS, 2 short epochs at eps 0.2)."""
    root = tmp_path_factory.mktemp("compare")
    plain = trained_digits_model("cnn")
    digits = load_digits()
    assert digits.x_train is not None and digits.y_train is not None
    few = dataclasses.replace(digits, x_train=digits.x_train[:800], y_train=digits.y_train[:800])
    torch.manual_seed(0)
    hardened = FGSMRS(epochs=2).apply(copy.deepcopy(plain), few, threat=ThreatModel("linf", 0.2),
                                      run=RunConfig(progress=False)).model
    runs = {"plain": (plain, 0), "plain again": (plain, 1), "hardened": (hardened, 0)}
    with pytest.MonkeyPatch.context() as patch:  # built-in plugins only, for this module
        from robustkit.plugin import host as host_module
        from robustkit.plugin.host import Host

        patch.setattr(host_module, "_host", Host(entry_points=False))
        patch.setattr(host_module, "_plugins_dirs", ())
        for name, (model, seed) in runs.items():
            weights = root / f"{name}.safetensors"
            save_file(model.state_dict(), str(weights))
            run_audit(AuditConfig(str(weights), load=LoadOptions(arch="builtin:digits-cnn"), eps=EPS, limit=100,
                                  attacks=("fgsm", "pgd"), options=(("pgd.steps", "5"),), seed=seed,
                                  run_checks=False, certify=False, out=root / name))
    return {name: root / name for name in runs}


def test_a_hardened_model_is_significantly_more_robust(folders: dict[str, Path], tmp_path: Path) -> None:
    comparison = compare_reports(load_audit(folders["plain"]), load_audit(folders["hardened"]))
    assert comparison.pairing.startswith("used") and {r.test for r in comparison.rows} == {MCNEMAR}
    at = {row.eps: row for row in comparison.rows}
    assert at[0.2].significant and at[0.2].difference is not None and at[0.2].difference > 0
    assert at[0.2].p_value is not None and at[0.2].p_value < 0.01
    # the same figures without the per-sample results: the unpaired test, said
    (folders["hardened"] / "per_sample.csv").rename(tmp_path / "kept.csv")
    try:
        unpaired = compare_reports(load_audit(folders["plain"]), load_audit(folders["hardened"]))
    finally:
        (tmp_path / "kept.csv").rename(folders["hardened"] / "per_sample.csv")
    assert {r.test for r in unpaired.rows} == {TWO_PROPORTION}
    assert "B: no per-sample results" in unpaired.pairing
    assert [r.difference for r in unpaired.rows] == [r.difference for r in comparison.rows]


def test_two_runs_of_one_model_do_not_differ_significantly(folders: dict[str, Path], tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["compare", str(folders["plain"] / "report.json"), str(folders["plain again"]),
                                      "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document == json.loads((tmp_path / "comparison.json").read_text())
    assert [row["eps_text"] for row in document["rows"]] == ["clean", "0.1", "0.2"]
    assert all(row["test"] == MCNEMAR and not row["significant"] for row in document["rows"])
    assert document["conclusion"][0].startswith("no significant difference")
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    table = CliRunner().invoke(cli, ["compare", str(folders["plain"]), str(folders["hardened"])])
    assert table.exit_code == 0 and "McNemar" in table.stdout and "significant differences" in table.stdout


def test_mismatched_audits_are_refused_unless_forced(folders: dict[str, Path], tmp_path: Path) -> None:
    plain = load_audit(folders["plain"])
    report = json.loads((folders["plain"] / "report.json").read_text())
    changes = {
        "data": lambda r: r["data"].update(sha256="0" * 64),
        "threat eps": lambda r: r["threat"].update(eps=[0.1, 0.3]),
        "threat norm": lambda r: r["threat"].update(norm="l2"),
        "suite": lambda r: r["config"].update(attacks=["robustkit:fgsm"]),
    }
    for what, change in changes.items():
        other = copy.deepcopy(report)
        change(other)
        with pytest.raises(AuditsDiffer, match=f"differ in {what}"):
            compare_reports(plain, Audit("B", other))
    other = copy.deepcopy(report)
    other["data"]["sha256"] = "0" * 64
    forced = compare_reports(plain, Audit("B", other, plain.broken_at), force=True)
    assert forced.differences and "different data" in forced.pairing  # never paired across data
    (tmp_path / "report.json").write_text(json.dumps(other))
    result = CliRunner().invoke(cli, ["compare", str(folders["plain"]), str(tmp_path / "report.json")])
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "differ in data" in result.stderr
    assert CliRunner().invoke(cli, ["compare", str(folders["plain"]), str(tmp_path), "--force"]).exit_code == 0


def test_per_sample_results_that_disagree_with_their_report_are_not_paired(folders: dict[str, Path]) -> None:
    plain = load_audit(folders["plain"])
    assert plain.broken_at is not None
    stale = Audit("B", plain.report, tuple(math.inf for _ in plain.broken_at))  # e.g. another run's file
    comparison = compare_reports(plain, stale)
    assert "B: per-sample results disagree with the report" in comparison.pairing


def test_changed_checks_are_listed(folders: dict[str, Path]) -> None:
    plain = load_audit(folders["plain"])
    report = copy.deepcopy(dict(plain.report))
    report["checks"] = [*report["checks"], {"name": "gradients", "status": "fail", "detail": "masked"}]
    changes = compare_reports(plain, Audit("B", report)).checks
    assert [(c.name, c.a, c.b) for c in changes] == [("gradients", "absent", "fail")]


def test_the_tests() -> None:
    # McNemar: 6 discordant samples, all one way: p = 2 / 2**6
    assert mcnemar_exact([True] * 6 + [False] * 4, [False] * 6 + [False] * 4) == pytest.approx(2 / 64)
    assert mcnemar_exact([True, False], [True, False]) == 1.0
    # two proportions: 50/100 against 65/100 gives z = 2.14, p = 0.032
    assert two_proportion(50, 100, 65, 100) == pytest.approx(0.0319, abs=1e-4)
    assert two_proportion(0, 10, 0, 10) == 1.0
