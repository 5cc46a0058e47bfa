"""Repository-wide pytest setup (applies to tests/ and to the plugins' own tests)."""
from __future__ import annotations

import os

# Progress bars on stderr would interleave with CliRunner output.
os.environ.setdefault("ROBUSTKIT_NO_PROGRESS", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One intra-op thread per xdist worker: with `-n 2` on a 2-core machine, torch's default of
    # one thread per core would run 4 spinning threads on 2 cores and slow every test down.
    import torch

    torch.set_num_threads(1)
