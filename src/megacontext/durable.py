"""Durability helpers shared by the disk tree, the session state and the checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
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


def replace_file(path: Path, text: str) -> None:
    """Atomically replace ``path`` with ``text``: write ``<name>.tmp``, fsync, rename, fsync the folder.

    A failure (or a kill) at any point leaves the previous file intact; a failed write (a
    full disk) also removes the temp file, giving its space back.
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
    fsync_dir(path.parent)


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
