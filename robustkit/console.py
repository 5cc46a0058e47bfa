"""Where people-facing output goes: results to stdout, logs and progress to stderr."""
from __future__ import annotations

import os
from contextlib import AbstractContextManager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

stderr = Console(stderr=True)


def progress() -> AbstractContextManager[Progress]:
    """A progress display on stderr; silent when stderr is not a terminal (CI, pipes, tests)."""
    quiet = not stderr.is_terminal or os.environ.get("ROBUSTKIT_NO_PROGRESS") == "1"
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=stderr, transient=True, disable=quiet,
    )

#: Results; wide when piped so that tables are not wrapped into unreadable columns.
stdout = Console()
if not stdout.is_terminal:
    stdout = Console(width=200)
