"""Where people-facing output goes: results to stdout, logs and progress to stderr."""
from __future__ import annotations

import os
import time
from contextlib import AbstractContextManager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

stderr = Console(stderr=True)

#: Seconds between the plain progress lines written when stderr is not a terminal.
LOG_INTERVAL = float(os.environ.get("ROBUSTKIT_PROGRESS_INTERVAL", "30"))


class LineProgress(Progress):
    """Progress for a log file or a pipe (CI, nohup): no live bar, but a plain line per task at
    most every ``LOG_INTERVAL`` seconds, with the stage, done/total, rate and time left."""

    def __init__(self, console: Console, interval: float) -> None:
        super().__init__(console=console)  # not disabled: callers that print lines beside a bar print them
        self.interval = interval
        self._last: dict[TaskID, float] = {}

    def start(self) -> None:  # no live display to start, stop or redraw
        pass

    def stop(self) -> None:
        pass

    def refresh(self) -> None:
        pass

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._line(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._line(task_id)

    def _line(self, task_id: TaskID) -> None:
        now = time.monotonic()
        task = self._tasks.get(task_id)
        if task is None or now - self._last.setdefault(task_id, now) < self.interval:
            return
        self._last[task_id] = now
        total = f"/{task.total:g}" if task.total else ""
        share = f" ({task.completed / task.total:.0%})" if task.total else ""
        rate = task.completed / task.elapsed if task.elapsed else 0.0
        left = f", about {task.time_remaining:.0f} s left" if task.time_remaining is not None else ""
        self.console.print(f"{task.description}: {task.completed:g}{total}{share}, {rate:.3g}/s, "
                           f"{task.elapsed or 0:.0f} s{left}", highlight=False, soft_wrap=True)


def progress() -> AbstractContextManager[Progress]:
    """A progress bar with the time left on a terminal; plain lines at a steady interval when
    stderr is a file or a pipe; silent with ROBUSTKIT_NO_PROGRESS=1 (tests)."""
    if os.environ.get("ROBUSTKIT_NO_PROGRESS") == "1":
        return Progress(console=stderr, disable=True)
    if not stderr.is_terminal:
        return LineProgress(stderr, LOG_INTERVAL)
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=stderr, transient=True,
    )

#: Results; wide when piped so that tables are not wrapped into unreadable columns.
stdout = Console()
if not stdout.is_terminal:
    stdout = Console(width=200)
