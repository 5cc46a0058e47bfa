"""Checkpoints that a resumed run can continue bit for bit.

A checkpoint holds everything that decides the rest of the run: weights, optimizer, schedule,
loss scaler, the batch reached inside the epoch, the running sums of that epoch, the history,
the best weights so far, each rank's random states (torch, CUDA, numpy, python and the
generator of random starts) and state a defence carries across batches (free training's
perturbation). Shuffling needs no state: the order is a function of the seed and the epoch.

It is written atomically (temporary file, fsync, ``os.replace``), so a run killed while
writing leaves the previous checkpoint intact, and read with ``weights_only=True``: every
value is a tensor or plain Python data, never a pickled object.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robustkit.errors import RobustkitError
from robustkit.io import atomic_write

FORMAT = 1
FILENAME = "checkpoint.pt"


def capture_rng(noise: torch.Generator) -> dict[str, Any]:
    """This process's random states, as tensors and plain data."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [
            name,
            torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            int(position),
            int(has_gauss),
            float(cached),
        ],
        "noise": noise.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any], noise: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    noise.set_state(state["noise"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuples(value: Any) -> Any:
    """``random.setstate`` wants the nested tuples that a round trip may have made lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def save(path: Path, checkpoint: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **checkpoint}, buffer)
    atomic_write(path, buffer.getvalue())


def load(path: Path) -> dict[str, Any]:
    """Read a checkpoint without unpickling objects; a one-line error if it is not one of ours."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RobustkitError(
            f"{path} is not a readable robustkit checkpoint ({first}); "
            "start afresh without --resume or with another --out"
        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise RobustkitError(
            f"{path} is not a robustkit checkpoint (format {FORMAT}); "
            "start afresh without --resume or with another --out"
        )
    return checkpoint
