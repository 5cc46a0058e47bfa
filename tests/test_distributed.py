"""How a torchrun job ends: no rank leaves while another still works, and the group is destroyed.

A rank that reached interpreter exit while rank 0 was still writing the outputs could abort in
gloo's teardown (about one 2-process harden in five), and torchrun then killed rank 0 mid-write.
These tests run ``distributed_session`` under a real ``torchrun`` with 2 gloo processes.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    import torch.distributed as dist
    from robustkit.distributed import distributed_session

    out, fail_rank = sys.argv[1], int(sys.argv[2])
    rank = int(os.environ["RANK"])
    record = {}
    try:
        with distributed_session("cpu") as world:
            record["world_size"] = world.world_size
            if rank == fail_rank:
                raise RuntimeError("boom")
            if world.is_main:
                time.sleep(1.5)  # rank 0 writing the outputs, slowly
            record["body_done"] = time.time()
    finally:
        record["left"] = time.time()
        record["group_alive"] = dist.is_initialized()
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(record, f)
    """
)


def _torchrun(tmp_path: Path, fail_rank: int) -> tuple[subprocess.CompletedProcess[str], dict[int, dict]]:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(tmp_path), str(fail_rank)],
        capture_output=True, text=True, timeout=180, check=False, env=_env(),
    )
    records = {r: json.loads((tmp_path / f"rank{r}.json").read_text())
               for r in (0, 1) if (tmp_path / f"rank{r}.json").exists()}
    return run, records


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_no_rank_leaves_before_rank_0_is_done(tmp_path: Path) -> None:
    run, records = _torchrun(tmp_path, fail_rank=-1)
    assert run.returncode == 0, run.stderr[-2000:]
    assert set(records) == {0, 1}
    assert records[0]["world_size"] == records[1]["world_size"] == 2
    # rank 1 finished its own work long before rank 0, but left only after rank 0 was done
    assert records[1]["body_done"] < records[0]["body_done"] - 1.0
    assert records[1]["left"] >= records[0]["body_done"]
    assert not records[0]["group_alive"] and not records[1]["group_alive"]
    assert "terminate called" not in run.stderr


def test_an_error_on_one_rank_ends_every_rank(tmp_path: Path) -> None:
    """No barrier after an error: rank 1 raises, leaves with its group destroyed, and torchrun
    ends rank 0 (waiting at the barrier) instead of the job hanging."""
    run, records = _torchrun(tmp_path, fail_rank=1)
    assert run.returncode != 0
    assert "boom" in run.stderr
    assert not records[1]["group_alive"]
