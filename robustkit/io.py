"""Writing files so that a reader never sees half of one: a temporary file, fsync, rename; a set
of files written whole or not at all; and a lock so two runs never write one folder."""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from robustkit.errors import RobustkitError

LOCK_NAME = ".robustkit.lock"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, data: bytes | str) -> None:
    payload = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make reports owner-only
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_set(folder: Path, files: Mapping[str, bytes | str]) -> None:
    """Write ``files`` (name -> content) into ``folder`` as one set: each is written in full into a
    staging folder inside ``folder`` first, then all are renamed into place. A failure while
    writing (a full disk) leaves the previous set whole; renames need no space."""
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".staging-"))
    try:
        for name, data in files.items():
            atomic_write(staging / name, data)
        for name in files:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)  # names may hold a sub-folder
            os.replace(staging / name, folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def folder_lock(folder: Path, job: str) -> Iterator[None]:
    """Hold ``folder`` for one robustkit run: a second run into it is refused, naming the
    process that holds it. The lock (``flock``) ends with the process, even on kill -9. A
    folder made for a run that wrote nothing (a typo in its options) is removed again."""
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    handle = path.open("a+")
    held = False
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RobustkitError(
                f"{folder} is in use by another robustkit run ({holder}); wait for it to finish or choose another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{job}, pid {os.getpid()}")
        handle.flush()
        yield
    finally:
        if held and created and all(p.name == LOCK_NAME for p in folder.iterdir()):
            path.unlink(missing_ok=True)  # while still held: no other run holds this lock file
            folder.rmdir()
        handle.close()  # releases the lock
