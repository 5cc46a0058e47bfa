"""Faults while an audit writes (issue 15): a full disk leaves the previous report set whole,
two runs never share an output folder, and Ctrl-C during the sanity checks still writes every
report file for what was done (exit 130)."""
from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import robustkit.io
from robustkit.cli import cli
from robustkit.io import LOCK_NAME, folder_lock

FAST = ["--attack", "fgsm", "--attack", "pgd", "--eps", "0.1", "--limit", "64", "--check-samples", "16"]
REPORT_SET = ("report.json", "per_sample.csv", "robustness.png", "report.md", "report.html")


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from safetensors.torch import save_file

    from robustkit.testing import trained_digits_model

    path = tmp_path_factory.mktemp("model") / "cnn.safetensors"
    save_file(trained_digits_model("cnn").state_dict(), str(path))
    return path


@pytest.fixture
def audit(weights: Path) -> Any:
    def run(out: Path, *extra: str) -> Any:
        return CliRunner().invoke(cli, ["audit", str(weights), "--arch", "builtin:digits-cnn", *FAST,
                                        "--out", str(out), *extra])

    return run


def test_a_full_disk_leaves_the_previous_report_set_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, audit: Any
) -> None:
    out = tmp_path / "audit"
    assert audit(out).exit_code == 0
    before = {name: (out / name).read_bytes() for name in REPORT_SET}
    real, written = robustkit.io.atomic_write, []

    def disk_fills_up(path: Path, data: bytes | str) -> None:
        written.append(path.name)
        if path.name == "report.md" and ".staging-" in str(path):  # the final set, third file or so
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(robustkit.io, "atomic_write", disk_fills_up)
    result = audit(out, "--eps", "0.2")
    assert result.exit_code == 1 and "No space left on device" in result.stderr, result.output
    assert result.stderr.count("\n") == 1 and "internal error" not in result.stderr
    assert "report.md" in written
    after = {name: (out / name).read_bytes() for name in REPORT_SET}
    # report.json was rewritten by the partial saves (marked incomplete); the rendered set is the old one
    assert {k: v for k, v in after.items() if k != "report.json"} == {
        k: v for k, v in before.items() if k != "report.json"}
    assert json.loads(after["report.json"])["complete"] is False
    assert not [p for p in out.iterdir() if p.name.startswith(".staging-")]


def test_two_runs_never_share_an_output_folder(tmp_path: Path, audit: Any) -> None:
    out = tmp_path / "audit"
    with folder_lock(out, "robustkit audit"):
        result = audit(out)
        assert result.exit_code == 1, result.output
        assert "in use by another robustkit run (robustkit audit, pid" in result.stderr
        harden = CliRunner().invoke(cli, ["harden", "builtin:digits-cnn", "--defence", "fgsm-rs", "--out", str(out)])
        assert harden.exit_code == 1 and "in use by another robustkit run" in harden.stderr
    assert not (out / "report.json").exists()
    assert audit(out).exit_code == 0  # free again once the holder is gone
    assert (out / LOCK_NAME).exists()


def test_a_run_that_writes_nothing_leaves_no_folder(tmp_path: Path) -> None:
    out = tmp_path / "typo"
    result = CliRunner().invoke(cli, ["harden", str(tmp_path / "missing.safetensors"), "--arch", "builtin:digits-cnn",
                                      "--data", "builtin:digits", "--defence", "fgsm-rs", "--out", str(out)])
    assert result.exit_code == 1 and "does not exist" in result.stderr, result.output
    assert not out.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    with folder_lock(kept, "robustkit audit"):
        pass
    assert kept.is_dir()  # a folder the user made stays, lock file and all


def test_ctrl_c_during_the_checks_writes_the_whole_set_and_exits_130(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, audit: Any
) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr("robustkit.audit.run.run_checks", interrupted)
    out = tmp_path / "audit"
    result = audit(out)
    assert result.exit_code == 130, result.output
    assert all((out / name).is_file() for name in REPORT_SET)
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] is False and report["results"]
    assert any(c["name"] == "sanity checks" and c["status"] == "untested" for c in report["checks"])
    assert "INCOMPLETE" in (out / "report.md").read_text().upper() or "interrupted" in (out / "report.md").read_text()


def test_ctrl_c_before_any_result_says_so_and_exits_130(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, audit: Any
) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr("robustkit.audit.run.load_model", interrupted)
    result = audit(tmp_path / "audit")
    assert result.exit_code == 130 and "interrupted before any result was written" in result.stderr


def test_export_refuses_a_report_the_model_as_loaded_does_not_reproduce(
    tmp_path: Path, weights: Path, audit: Any
) -> None:
    out = tmp_path / "audit"
    assert audit(out).exit_code == 0
    common = ["export", str(weights), "--arch", "builtin:digits-cnn", "--format", "safetensors", "--report",
              str(out / "report.json"), "--samples", "128"]
    # the same file with other --mean/--std is another model: its figures would be wrong
    result = CliRunner().invoke(cli, [*common, "--mean", "0.9", "--std", "0.05", "--out", str(tmp_path / "a.st")])
    assert result.exit_code == 1 and "does not describe the model as loaded now" in result.stderr, result.output
    assert not (tmp_path / "a.st").exists()
    result = CliRunner().invoke(cli, [*common, "--out", str(tmp_path / "b.safetensors")])
    assert result.exit_code == 0, result.output
