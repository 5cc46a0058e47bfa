"""The machine a job runs on: ``--device`` parsed into one-line errors, and the note for a CPU
job on a busy machine (torch's threads stall each other when another process holds a core,
so the user is told to lower OMP_NUM_THREADS)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from robustkit.cli import cli
from robustkit.environment import busy_cpu_note, parse_device
from robustkit.errors import OptionError
from robustkit.plugin.host import Host


@pytest.fixture
def two_cores(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    return monkeypatch


@pytest.mark.parametrize(("load", "busy"), [(0.1, False), (0.4, False), (0.8, True), (3.0, True)])
def test_busy_when_the_load_and_the_threads_exceed_the_cores(two_cores: pytest.MonkeyPatch, load: float,
                                                             busy: bool) -> None:
    two_cores.setattr(os, "getloadavg", lambda: (load, load, load))
    note = busy_cpu_note("cpu")
    assert (note is not None) == busy
    if note:
        assert f"load {load:.1f} on 2 cores" in note and "OMP_NUM_THREADS=1" in note


def test_no_note_for_one_thread_or_a_gpu(two_cores: pytest.MonkeyPatch) -> None:
    two_cores.setattr(os, "getloadavg", lambda: (3.0, 3.0, 3.0))
    assert busy_cpu_note("cuda:0") is None
    two_cores.setattr(torch, "get_num_threads", lambda: 1)
    assert busy_cpu_note("cpu") is None


@pytest.mark.parametrize("command", ["audit", "harden"])
def test_the_cli_says_it_before_the_job(host: Host, two_cores: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                        command: str, tmp_path: Path) -> None:
    two_cores.setattr(os, "getloadavg", lambda: (3.0, 3.0, 3.0))
    args = [command, "missing.safetensors", "--arch", "builtin:digits-cnn", "--data", "builtin:digits",
            "--device", "cpu", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(cli, args + (["--defence", "fgsm-rs"] if command == "harden" else []))
    assert result.exit_code == 1 and "does not exist" in result.output  # said before the job starts
    assert "the CPU is busy" in caplog.text and "OMP_NUM_THREADS=1" in caplog.text


def test_a_gpu_the_machine_lacks_is_an_option_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(OptionError, match="no cuda device is available here; use --device cpu"):
        parse_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(OptionError, match="has 1 CUDA device"):
        parse_device("cuda:3")
    assert parse_device("cuda:0") == torch.device("cuda", 0)
    assert parse_device("cpu") == torch.device("cpu")
