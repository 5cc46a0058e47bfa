"""``robustkit harden`` on the command line: outputs, config files, errors, and torchrun."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import save_file
from torch import Tensor

from robustkit.attacks.base import Attack
from robustkit.cli import cli
from robustkit.harden import checkpoint
from robustkit.models.base import LoadOptions
from robustkit.models.loading import load_model
from robustkit.models.zoo import digits_cnn
from robustkit.modules import Model, predict_logits
from robustkit.params import param
from robustkit.plugin.hookspecs import hookimpl
from robustkit.threat import Norm, ThreatModel

FAST = ["--eps", "0.2", "-o", "canary_size", "128"]


def harden(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, ["harden", *map(str, args)])


def one_line_error(result: Result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_harden_writes_every_output_and_resumes_from_its_config(host: Any, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = harden(
        "builtin:digits-cnn",
        "--data",
        "builtin:digits",
        "--defence",
        "fgsm-rs",
        "--epochs",
        "2",
        "--out",
        out,
        "--json",
        *FAST,
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["after"]["robust_accuracy"] > summary["before"]["robust_accuracy"] + 0.1
    assert summary["epochs_run"] == 2 and summary["defence"] == "robustkit:fgsm-rs"
    assert set(summary["outputs"]) == {"model", "config", "summary", "log", "checkpoint", "plot", "comparison",
                                       "comparison_plot"}
    for path in summary["outputs"].values():
        assert Path(path).parent == out and Path(path).stat().st_size > 0, path
    assert (out / "curves.png").read_bytes().startswith(b"\x89PNG")
    # before/after in robustkit compare's form: the same figures, paired per sample
    comparison = json.loads((out / "comparison.json").read_text())
    clean_row, robust_row = comparison["rows"]
    assert (robust_row["a"], robust_row["b"]) == pytest.approx(
        (summary["before"]["robust_accuracy"], summary["after"]["robust_accuracy"]))
    assert clean_row["b"] == pytest.approx(summary["after"]["clean_accuracy"])
    assert robust_row["test"] == "McNemar exact (paired)" and robust_row["significant"]
    assert comparison["differences"] == []
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert {"loss", "val_clean", "val_robust", "lr", "seconds"} <= set(log[0])
    assert json.loads((out / "summary.json").read_text())["after"] == summary["after"]

    # the weights reload as the architecture they came from and score what the summary says
    loaded = load_model(str(out / "model.safetensors"), LoadOptions(arch="builtin:digits-cnn"))
    from robustkit.data import load_digits

    data = load_digits()
    clean = float((predict_logits(loaded.model, data.x).argmax(1) == data.y).float().mean())
    assert clean == pytest.approx(summary["after"]["clean_accuracy"])

    # config.json repeats the run; with --resume on a finished run nothing more is trained
    config = json.loads((out / "config.json").read_text())
    assert config["params"]["epochs"] == 2 and config["params"]["canary_size"] == 128
    again = CliRunner().invoke(cli, ["harden", "--config", str(out / "config.json"), "--resume", "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.output)["after"] == summary["after"]


def test_existing_run_is_not_overwritten_without_resume(host: Any, tmp_path: Path) -> None:
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    line = one_line_error(harden("builtin:digits-cnn", "--defence", "free", "--out", tmp_path))
    assert "--resume" in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--defence", "pgd-att"], "unknown defence 'pgd-att'; did you mean"),
        (["--defence", "fgsm-rs", "--attack", "pgd"], "crafts its own examples"),
        (["--defence", "pgd-at", "--attack", "nope"], "unknown attack 'nope'"),
        (["--defence", "trades", "--threat", "l1"], "linf or l2"),
    ],
)
def test_bad_input_is_one_line(host: Any, tmp_path: Path, args: list[str], message: str) -> None:
    assert message in one_line_error(harden("builtin:digits-cnn", *args, "--out", tmp_path / "o"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--defence", "fgsm-rs", "--eps", "2"], "Error: linf eps 2 exceeds the input range"),
        (["--defence", "trades", "-o", "betta", "1"], "Error: unknown parameter 'betta'"),
    ],
)
def test_bad_option_values_are_usage_errors(host: Any, tmp_path: Path, args: list[str], message: str) -> None:
    result = harden("builtin:digits-cnn", *args, "--out", tmp_path / "o")
    assert result.exit_code == 2 and message in result.output, result.output


def test_architecture_mismatch_is_one_line(host: Any, tmp_path: Path) -> None:
    weights = tmp_path / "cnn.safetensors"
    save_file(digits_cnn().state_dict(), str(weights))
    line = one_line_error(
        harden(
            weights,
            "--arch",
            "builtin:digits-resnet",
            "--defence",
            "fgsm-rs",
            "--out",
            tmp_path / "o",
        )
    )
    assert "do not fit --arch builtin:digits-resnet" in line


@dataclass(frozen=True)
class SignNoiseParams:
    seed: int = param(0, "seed of the signs")


class SignNoise(Attack):
    """A plugin's attack: a random corner of the linf ball (it has no 'steps' setting)."""

    name = "sign-noise"
    norms = frozenset({Norm.LINF})
    Params = SignNoiseParams

    def run(self, model: Model, x: Tensor, labels: Tensor, threat: ThreatModel) -> Tensor:
        generator = torch.Generator().manual_seed(self.params.seed)
        signs = torch.randint(0, 2, x.shape, generator=generator).to(x) * 2 - 1
        return x + threat.eps * signs


class NoisePlugin:
    @hookimpl
    def robustkit_register_attacks(self, registry: Any) -> None:
        registry.add(SignNoise)


def test_pgd_at_takes_a_plugin_attack_as_inner_maximiser(register_plugin: Any, tmp_path: Path) -> None:
    register_plugin(NoisePlugin(), "noise")
    result = harden(
        "builtin:digits-cnn",
        "--defence",
        "pgd-at",
        "--attack",
        "noise:sign-noise",
        "--epochs",
        "1",
        "--out",
        tmp_path,
        "--json",
        *FAST,
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["params"]["attack"] == "noise:sign-noise"


def test_torchrun_two_processes_match_one_in_quality(host: Any, tmp_path: Path, run_robustkit: Any) -> None:
    """DDP on gloo with 2 CPU processes: rank 0 writes, and the result is as robust as one
    process's (the global batches are the same; only random starts differ). atta, because its
    per-sample perturbations must follow the samples from one process to the other."""
    args = ["builtin:digits-cnn", "--defence", "atta", "--epochs", "4", "--json", *FAST]
    single = harden(*args, "--out", tmp_path / "one")
    assert single.exit_code == 0, single.output
    run = run_robustkit("harden", *args, "--out", tmp_path / "two", processes=2, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "terminate called" not in run.stderr  # every rank ended its process group cleanly
    two, one = json.loads(run.stdout), json.loads(single.output)  # only rank 0 printed
    assert all(Path(path).is_file() for path in two["outputs"].values()), two["outputs"]
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert abs(two["after"]["robust_accuracy"] - one["after"]["robust_accuracy"]) <= 0.05
    assert abs(two["after"]["clean_accuracy"] - one["after"]["clean_accuracy"]) <= 0.05
    log = (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()
    assert len(log) == two["epochs_run"] == 4  # one writer, no duplicated lines
    # both processes hold every training sample's perturbation, the same ones
    ranks = checkpoint.load(tmp_path / "two" / checkpoint.FILENAME)["ranks"]
    carried = [r["carry"]["perturbation"] for r in ranks]
    assert not carried[0].isnan().any() and torch.equal(carried[0], carried[1])
