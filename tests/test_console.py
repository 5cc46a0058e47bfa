"""Progress where no terminal is: plain lines at a steady interval (CI logs, nohup, pipes)."""
from __future__ import annotations

import io

from rich.console import Console

from robustkit.console import LineProgress


def test_line_progress_writes_stage_done_total_rate_and_time_left() -> None:
    sink = io.StringIO()
    with LineProgress(Console(file=sink, width=200), interval=0.0) as bar:
        task = bar.add_task("attacking robustkit:apgd linf:8/255", total=4)
        for _ in range(4):
            bar.advance(task)
        bar.console.print("epoch 1/2 loss 0.5")  # lines printed beside the bar still appear
    lines = sink.getvalue().splitlines()
    assert any(line.startswith("attacking robustkit:apgd linf:8/255: 2/4 (50%), ") and "/s" in line for line in lines)
    assert "epoch 1/2 loss 0.5" in lines
    assert "\x1b" not in sink.getvalue()  # no terminal control codes in a log


def test_line_progress_keeps_quiet_between_intervals() -> None:
    sink = io.StringIO()
    with LineProgress(Console(file=sink, width=200), interval=3600.0) as bar:
        task = bar.add_task("stage", total=100)
        for _ in range(100):
            bar.advance(task)
    assert sink.getvalue() == ""
