"""The normalisation travels with the weights: a model hardened with --mean/--std is saved
without its wrapper but with the mean/std in the safetensors metadata, and audit and export
read them back (no flags needed; contradicting flags are an error)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors import safe_open

from robustkit.cli import cli
from robustkit.models.base import INPUT_METADATA_KEY

NORMALISATION = ["--mean", "0.3", "--std", "0.4"]


def run(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def hardened(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("hardened")
    code, stdout, stderr = run("harden", "builtin:digits-cnn", *NORMALISATION, "--defence", "fgsm-rs",
                               "-o", "epochs", "3", "--out", out, "--json")
    assert code == 0, stderr
    return out / "model.safetensors", json.loads(stdout)


def audit(path: Path, *extra: str) -> tuple[int, str, str]:
    return run("audit", path, "--arch", "builtin:digits-cnn", "--attack", "fgsm", "--eps", "0.1", "--no-checks",
               "--no-certify", "--json", *extra)


def test_hardened_weights_carry_their_normalisation(hardened: tuple[Path, dict]) -> None:
    path, summary = hardened
    with safe_open(str(path), "pt") as handle:
        declared = json.loads(handle.metadata()[INPUT_METADATA_KEY])
        assert not any(key.startswith("net.") or key in ("mean", "std") for key in handle.keys())  # noqa: SIM118 (safe_open is not iterable)
    assert declared["mean"] == [0.3] and declared["std"] == [0.4]
    assert declared["bounds"] == [0.0, 1.0] and declared["input_shape"] == [1, 8, 8] and declared["num_classes"] == 10
    code, stdout, stderr = audit(path)
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["clean_accuracy"] == pytest.approx(summary["after"]["clean_accuracy"])
    assert any("file's metadata" in note for note in report["model"]["notes"])
    # the same statistics given again are fine; others are refused, not silently used
    assert audit(path, *NORMALISATION)[0] == 0
    code, _, stderr = audit(path, "--mean", "0.5", "--std", "0.5")
    assert code == 1 and "contradict" in stderr and stderr.count("\n") == 1


def test_an_export_keeps_the_normalisation(hardened: tuple[Path, dict], tmp_path: Path) -> None:
    path, summary = hardened
    exported = tmp_path / "copy.safetensors"
    code, _, stderr = run("export", path, "--arch", "builtin:digits-cnn", "--format", "safetensors", "--no-audit",
                          "--out", exported)
    assert code == 0, stderr
    code, stdout, stderr = audit(exported)
    assert code == 0, stderr
    assert json.loads(stdout)["clean_accuracy"] == pytest.approx(summary["after"]["clean_accuracy"])
