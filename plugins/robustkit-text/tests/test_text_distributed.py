"""Text hardening under torchrun: two gloo processes on the CPU train as one process does, rank 0
alone writes, and ``--resume`` under torchrun continues a run that was stopped mid-epoch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from robustkit_text.data import load_text_data
from robustkit_text.model import TextClassifier, encode_data

from robustkit import LoadOptions, load_model
from robustkit.cli import cli
from robustkit.harden import checkpoint
from robustkit.harden.loop import LOG_FILENAME
from robustkit.modules import predict_logits

ROOT = Path(__file__).resolve().parents[1]
#: FGM from a trained start: two epochs of 17 global batches (540 training reviews, 16 per rank).
FGM = ["--defence", "text:fgm", "--epochs", "2", "-o", "batch_size", "32", "-o", "lr", "1e-3", "--json"]
#: Each rank sends itself SIGINT at this training step (epoch 2, batch 2); the ranks agree to stop
#: at the next multiple of STOP_SYNC_EVERY (batch 8), where the checkpoint is written.
INTERRUPT_AT = 19
#: Runs itself under torchrun: robustkit's CLI with FGM's step sending SIGINT at one step,
#: as a user's Ctrl-C would arrive mid-epoch on every rank.
INTERRUPTING = f"""
import os, signal, sys
from robustkit_text.defences import FGM
from robustkit.cli import main

make_step = FGM.make_step

def interrupted(self, ctx):
    inner, steps = make_step(self, ctx), [0]
    def step(x, y):
        steps[0] += 1
        if steps[0] == {INTERRUPT_AT}:
            os.kill(os.getpid(), signal.SIGINT)
        return inner(x, y)
    return step

FGM.make_step = interrupted
sys.argv[0] = "robustkit"
main()
"""


def torchrun(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Two processes on gloo, one torch thread each (so both fit on the cores); this checkout's plugin."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ROBUSTKIT_NO_PROGRESS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.run([*launcher, *map(str, args)], capture_output=True, text=True, env=env, timeout=400,
                          check=False)


@pytest.fixture(scope="module")
def start(tmp_path_factory: pytest.TempPathFactory, fresh_model: Path, data_folder: Path) -> Path:
    """The tiny BERT without dropout, fine-tuned plainly for 3 epochs: the runs compared differ
    in no random draw, and FGM starts past the plateau where a fresh model's training is chaotic."""
    fresh = tmp_path_factory.mktemp("nodropout") / "model"
    fresh.mkdir()
    for file in fresh_model.iterdir():
        (fresh / file.name).write_bytes(file.read_bytes())
    config = json.loads((fresh / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (fresh / "config.json").write_text(json.dumps(config))
    out = tmp_path_factory.mktemp("start")
    result = CliRunner().invoke(cli, ["harden", str(fresh), "--data", str(data_folder), "--defence", "text:plain",
                                      "--epochs", "3", "-o", "batch_size", "32", "-o", "lr", "5e-3",
                                      # unclipped: clipped, 3 epochs leave it nearer the plateau (the epoch-1
                                      # losses of 1 and 2 processes then differed by 1.6e-3, not 3e-5)
                                      "-o", "max_grad_norm", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out / "model"


def log_records(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / LOG_FILENAME).read_text().splitlines()]


def test_two_processes_train_as_one_and_resume(start: Path, data_folder: Path, tmp_path: Path) -> None:
    args = [str(start), "--data", str(data_folder), *FGM]
    single = CliRunner().invoke(cli, ["harden", *args, "--out", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    one = json.loads(single.output)

    two_dir, script = tmp_path / "two", tmp_path / "interrupting.py"
    script.write_text(INTERRUPTING)
    stopped = torchrun(script, "harden", *args, "--out", two_dir)
    assert stopped.returncode != 0 and "interrupted in epoch 2 after batch 8/17" in stopped.stderr, \
        stopped.stderr[-3000:]
    saved = checkpoint.load(two_dir / checkpoint.FILENAME)
    assert (saved["world_size"], saved["epoch"], saved["batch"]) == (2, 1, 8)
    first_epoch = (two_dir / LOG_FILENAME).read_text()
    assert len(first_epoch.splitlines()) == 1 and not (two_dir / "model").exists()

    resumed = torchrun("-m", "robustkit", "harden", *args, "--out", two_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "terminate called" not in resumed.stderr  # every rank ended its process group cleanly
    two = json.loads(resumed.stdout)  # one document: only rank 0 printed
    assert all(Path(path).exists() for path in two["outputs"].values()), two["outputs"]
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert json.loads((two_dir / "config.json").read_text())["environment"]["world_size"] == 2
    # continued, not restarted: epoch 1's record is the interrupted run's, and no line is doubled
    assert (two_dir / LOG_FILENAME).read_text().startswith(first_epoch)
    records, reference = log_records(two_dir), log_records(tmp_path / "one")
    assert [r["epoch"] for r in records] == [1, 2] == [r["epoch"] for r in reference]

    # The same global batches and the same radii: one process and two differ only in the order
    # of float sums (measured: losses agree to ~3e-5 relatively, accuracies exactly). A radius
    # measured on each rank's half batch drifts 4% apart by epoch 2, hence 1e-3. Accuracies may
    # differ by 2 of the 100 reviews, where a borderline one tips under HotFlip.
    for mine, theirs in zip(records, reference):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-3), (mine, theirs)
    assert two["before"] == one["before"]  # the sharded HotFlip summary sums to the single one
    for key in ("clean_accuracy", "robust_accuracy"):
        assert abs(two["after"][key] - one["after"][key]) <= 0.02, (two["after"], one["after"])
    assert two["after"]["clean_accuracy"] >= 0.8

    model = load_model(two["outputs"]["model"], LoadOptions()).model
    assert isinstance(model, TextClassifier)
    data = encode_data(model, load_text_data(str(data_folder)))
    clean = float((predict_logits(model, data.x).argmax(1) == data.y).float().mean())
    assert clean == pytest.approx(two["after"]["clean_accuracy"])


def test_awp_gamma_given_as_an_option_is_refused(fresh_model: Path, data_folder: Path, tmp_path: Path) -> None:
    """-o awp_gamma slips past --awp's refusal; text steps never perturb weights, so it must not pass silently."""
    result = CliRunner().invoke(cli, ["harden", str(fresh_model), "--data", str(data_folder), "--defence",
                                      "text:fgm", "-o", "awp_gamma", "0.01", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "drop -o awp_gamma" in result.output, result.output
