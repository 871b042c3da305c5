"""Writer locks: one process at a time may change a tree or a training run folder.

A lock is an exclusive :func:`fcntl.flock` on ``<folder>/writer.lock``, taken without
waiting: a second writer is refused at once with the holder's process id, which the
holder writes into the file after locking. The kernel drops a flock when its process
ends, however it ends, so a lock left by a killed process is stale by construction: the
next writer takes it and overwrites the old id. The file itself is never deleted
(deleting it would let two writers lock two different files); a clean release empties it.

Readers (``inspect``, a tree opened without a gister) take no lock: they only read what
``metadata.json`` commits, which a writer replaces atomically.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import BinaryIO

from megacontext.errors import MegaContextError

LOCK_FILE = "writer.lock"


class LockedError(MegaContextError):
    """Another process (or another handle in this one) is writing the folder."""


def _holder(f: BinaryIO) -> int | None:
    f.seek(0)
    text = f.read(32).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


class WriterLock:
    """An exclusive writer lock on ``folder`` (which must exist); release it, or use ``with``.

    ``what`` names the folder in the refusal: "tree /x is in use by process 123".
    """

    def __init__(self, folder: Path, what: str) -> None:
        self.path = Path(folder) / LOCK_FILE
        try:
            f = open(self.path, "a+b")  # create if missing, never truncate another holder's id
        except OSError as e:
            raise MegaContextError(f"cannot create the lock file {self.path}: {e.strerror or e}") from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(f)
            f.close()
            if pid == os.getpid():
                raise LockedError(f"{what} {folder} is already open for writing in this process: close it first") from None
            by = f"process {pid}" if pid else "another process"
            raise LockedError(f"{what} {folder} is in use by {by}: wait for it to finish (or stop it) and try again") from None
        except OSError as e:
            f.close()
            raise MegaContextError(f"cannot lock {self.path}: {e.strerror or e}") from None
        f.truncate(0)  # a stale id (a killed holder) is replaced by ours
        f.write(f"{os.getpid()}\n".encode())
        f.flush()
        self._file: BinaryIO | None = f

    def release(self) -> None:
        """Empty the file and drop the lock. Idempotent."""
        if self._file is not None:
            self._file.truncate(0)
            self._file.close()  # closing the descriptor drops the flock
            self._file = None

    def __enter__(self) -> WriterLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
