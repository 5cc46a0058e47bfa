"""Hostile or careless command lines (issue 15): bad option values are usage errors (exit 2,
click's form), an interrupted harden exits 130 with its checkpoint whole, and --resume refuses
a run that is not the one it would continue."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from robustkit.cli import cli


def invoke(*args: str | Path) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["audit", "builtin:digits-cnn", "--eps", "abc"], "not a number"),
        (["audit", "builtin:digits-cnn", "--eps", "-1"], ">= 0"),
        (["audit", "builtin:digits-cnn", "--limit", "0"], "--limit"),
        (["audit", "builtin:digits-cnn", "--threat", "l7"], "is not one of"),
        (["harden", "builtin:digits-cnn", "--defence", "fgsm-rs", "--eps", "1/0"], "not a number"),
        (["--plugins-dir", "/no/such/folder", "plugins"], "does not exist"),
        (["audit", "builtin:digits-cnn", "--eps", "2"], "exceeds the input range"),
        (["audit", "builtin:digits-cnn", "--eps", "0.1", "-o", "steps", "0"], "steps"),
        (["audit", "builtin:digits-cnn", "--eps", "0.1", "-o", "no_such_key", "1"], "no_such_key"),
        (["audit", "builtin:digits-cnn", "--eps", "0.1", "-o", "apgd.loss", "banana"], "banana"),
        (["audit", "builtin:digits-cnn", "--mean", "0.5", "--std", "0"], "positive std"),
        (["audit", "builtin:digits-cnn", "--mean", "0.5,0.5", "--std", "0.2"], "one finite value per channel"),
        (["audit", "builtin:digits-cnn", "--device", "banana"], "is not a device"),
        (["harden", "builtin:digits-cnn", "--defence", "fgsm-rs", "--device", "banana"], "is not a device"),
        (["audit", "builtin:digits-cnn", "--device", "meta"], "no meta device is available"),
    ],
)
def test_bad_option_values_are_usage_errors(args: list[str], message: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, [*args, *(["--out", str(tmp_path / "o")] if args[0] != "--plugins-dir" else [])])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error:") or "Usage:" in result.stderr, result.stderr  # click's forms
    assert message in result.stderr
    assert "Traceback" not in result.output


def _train_until_epoch(out: Path, epochs: int, *extra: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "robustkit", "harden", "builtin:digits-cnn", "--defence", "fgsm-rs",
         "-o", "epochs", "40", "-o", "patience", "0", "--out", str(out), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "ROBUSTKIT_NO_PROGRESS": "1"},
    )
    log = out / "train_log.jsonl"
    deadline = time.monotonic() + 240
    while not (log.is_file() and len(log.read_text().splitlines()) >= epochs):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no epoch finished in time"
        time.sleep(0.2)
    return process


def test_ctrl_c_during_harden_exits_130_with_a_whole_checkpoint_and_resume_checks_the_run(
    tmp_path: Path, run_robustkit: object
) -> None:
    out = tmp_path / "run"
    process = _train_until_epoch(out, 1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    assert (out / "checkpoint.pt").is_file()
    assert not list(out.glob(".*.tmp")), list(out.iterdir())
    # everything that defines the run is checked on resume, before any training
    for extra, message in (
        (["--precision", "bf16"], "--precision was fp32, now bf16"),
        (["--mean", "0.5", "--std", "0.5"], "starting weights"),
        (["--eps", "0.2"], "threat model"),
    ):
        result = run_robustkit("harden", "builtin:digits-cnn", "--defence", "fgsm-rs", "-o", "epochs", "40",
                               "-o", "patience", "0", "--out", out, "--resume", *extra)  # type: ignore[operator]
        assert result.returncode == 1 and message in result.stderr, (extra, result.stderr)
    # a checkpoint left half-written by a killed process is cleared away on the next start
    stale = out / ".checkpoint.pt.abc123.tmp"
    stale.write_bytes(b"half")
    process = _train_until_epoch(out, 3, "--resume")
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=240)
    assert process.returncode == 130
    assert not stale.exists()


def test_export_never_replaces_a_file_robustkit_did_not_write(tmp_path: Path) -> None:
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("my notes")
    args = ["export", "builtin:digits-cnn", "--format", "safetensors", "--no-audit", "--samples", "32"]
    result = CliRunner().invoke(cli, [*args, "--out", str(unrelated)])
    assert result.exit_code == 1 and "--force" in result.stderr, result.output
    assert unrelated.read_text() == "my notes"
    # an export replaces its own earlier file; the model card beside it is checked too
    ours = tmp_path / "model.safetensors"
    for _ in range(2):
        result = CliRunner().invoke(cli, [*args, "--out", str(ours)])
        assert result.exit_code == 0, result.output
    card = ours.with_suffix(".json")
    card.write_text('{"mine": true}')
    result = CliRunner().invoke(cli, [*args, "--out", str(ours)])
    assert result.exit_code == 1 and str(card) in result.stderr, result.output
    assert card.read_text() == '{"mine": true}'
    result = CliRunner().invoke(cli, [*args, "--out", str(unrelated), "--force"])
    assert result.exit_code == 0, result.output


def test_unwritable_output_is_one_line_naming_the_path(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = CliRunner().invoke(cli, ["export", "builtin:digits-cnn", "--format", "safetensors", "--no-audit",
                                      "--samples", "32", "--out", str(blocker / "sub" / "model.safetensors")])
    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1 and str(blocker) in result.stderr and "internal error" not in result.stderr


@pytest.mark.parametrize("command", [["audit"], ["export"], ["harden", "--defence", "fgsm-rs"]])
def test_data_is_required_for_a_model_that_is_not_built_in(command: list[str], tmp_path: Path) -> None:
    weights = tmp_path / "mine.safetensors"
    weights.write_bytes(b"")  # never read: the missing --data is found first
    result = CliRunner().invoke(cli, [command[0], str(weights), "--arch", "mynets.py:net", *command[1:],
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--data is required" in result.stderr, result.output
