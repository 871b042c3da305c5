"""Durability helpers shared by the disk tree, the session state and the checkpoints."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

CHECKSUM_KEY = "checksum"


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (new, renamed or replaced files) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in ``chunk``-byte pieces."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def replace_file(path: Path, text: str, replaced: Callable[[], None] | None = None) -> None:
    """Atomically replace ``path`` with ``text``: write ``<name>.tmp``, fsync, rename, fsync the folder.

    A failure (or a kill) before the rename leaves the previous file intact; a failed write (a
    full disk) also removes the temp file, giving its space back. ``replaced()`` is called right
    after the rename, before the folder's fsync (which can still fail): from then on the new
    file is the one every reader sees.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    if replaced is not None:
        replaced()
    fsync_dir(path.parent)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver them to their handlers.

    For a commit and the in-memory state that follows it: a Ctrl-C (KeyboardInterrupt) or a
    SIGTERM handler never runs between the two. Python runs signal handlers in the main thread
    only (wherever the signal lands), so the handlers are swapped there, and elsewhere nothing
    can interrupt the block; a signal mask would not do, other threads would still take the signal.
    A handler installed outside Python (``getsignal`` gives None) cannot be restored and is left as is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    saved = [(s, h) for s in (signal.SIGINT, signal.SIGTERM) if (h := signal.getsignal(s)) is not None]
    try:
        for s, _ in saved:
            signal.signal(s, lambda signum, frame: held.append(signum))
        yield
    finally:
        for s, h in saved:
            signal.signal(s, h)
        for s in dict.fromkeys(held):
            signal.raise_signal(s)


def _digest(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != CHECKSUM_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def with_checksum(record: dict) -> dict:
    """``record`` plus a ``checksum`` field: the sha256 of its canonical JSON (that field excluded)."""
    return {**record, CHECKSUM_KEY: _digest(record)}


def checksum_ok(record: object) -> bool:
    """False when ``record`` is a dict whose ``checksum`` does not match it; True otherwise
    (files written before checksums existed have none and are accepted)."""
    return not isinstance(record, dict) or CHECKSUM_KEY not in record or record[CHECKSUM_KEY] == _digest(record)
