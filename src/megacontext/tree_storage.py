"""Binary storage behind a :class:`megacontext.tree.MegaContextTree`: RAM and disk backends.

``docs/storage-format.md`` specifies the disk format and its commit protocol; this module
implements it (the format's constants, metadata and headers: :mod:`megacontext.tree_format`). A disk tree is a folder of level files (``LOD0.ctx`` token ids, ``LOD{k}.ctx``
gists, each behind a ``HEADER_SIZE``-byte header) and ``metadata.json``, the commit record
(committed length and CRC-32 of every level, its own checksum). Data is written past the
committed end and fsynced first; replacing ``metadata.json`` atomically is the commit point.
Levels are added as the history grows (:meth:`DiskStore.add_level`). A store open for
writing holds the tree's ``writer.lock`` (:mod:`megacontext.lock`).
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
import torch

from megacontext.durable import checksum_ok, fsync_dir, replace_file, uninterrupted, with_checksum
from megacontext.errors import TreeError
from megacontext.lock import LOCK_FILE, WriterLock
from megacontext.tree_format import HEADER_SIZE, METADATA_FILE, NUMPY_DTYPES, Header, Meta, level_file

_CRC_BLOCK = 1 << 24  # bytes per read when checking a level file's CRC-32
_MAX_TOKEN = 2**32 - 1
_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# ----------------------------------------------------------------------------- values
def _encode(g: torch.Tensor, dtype: str) -> np.ndarray:
    """float32 [n, d] -> numpy array in the storage dtype (bfloat16 as raw uint16 bits)."""
    t = g.to(_TORCH_DTYPES[dtype]).contiguous()
    if dtype == "bfloat16":
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _decode(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored array [n, d] -> float32 tensor (owns its memory)."""
    a = np.array(a, copy=True)
    if dtype == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(a).float()


def quantize(g: torch.Tensor, dtype: str) -> torch.Tensor:
    """Round float32 gists through the storage dtype (what a reader will get back)."""
    return g if dtype == "float32" else g.to(_TORCH_DTYPES[dtype]).float()


def as_token_array(tokens: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    """Any 1-D integer sequence -> uint32 [n]; TreeError on anything else."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise TreeError(f"tokens must be a 1-D sequence of token ids, got shape {tuple(arr.shape)}")
    if arr.size == 0:
        return np.empty(0, dtype=np.uint32)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TreeError(f"token ids must be integers, got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi > _MAX_TOKEN:
        raise TreeError(f"token ids must be in [0, {_MAX_TOKEN}], got values in [{lo}, {hi}]")
    return arr.astype(np.uint32)


def as_index_array(indices: Sequence[int] | np.ndarray | torch.Tensor, count: int, level: int) -> np.ndarray:
    """Node indices -> int64 [n], each in [0, count)."""
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    arr = np.asarray(indices)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise TreeError(f"gist indices must be a 1-D integer sequence, got {arr.dtype} of shape {tuple(arr.shape)}")
    arr = arr.astype(np.int64)
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= count):
        raise TreeError(
            f"gist index out of range at level {level}: indices span [{int(arr.min())}, {int(arr.max())}] "
            f"but the level has {count} complete nodes"
        )
    return arr


# --------------------------------------------------------------------------- backends
class Store(Protocol):
    """Storage behind a tree. `meta.committed` = items per level; reads stay inside it."""

    meta: Meta
    path: Path | None

    def read_tokens(self, start: int, end: int) -> np.ndarray: ...

    def read_gists(self, level: int, index: np.ndarray | slice) -> torch.Tensor: ...

    def commit(self, tokens: np.ndarray, gists: Sequence[torch.Tensor]) -> None: ...

    def rewrite(self, version: str, chunks: Iterable[Sequence[torch.Tensor]]) -> None: ...

    def add_level(self, gists: Iterable[torch.Tensor]) -> None: ...

    def bytes_on_disk(self) -> int: ...

    def close(self) -> None: ...


class _Growable:
    """Append-only numpy array with amortised O(1) appends; rows of shape `row`."""

    def __init__(self, dtype: type, row: tuple[int, ...]) -> None:
        self._data = np.empty((0, *row), dtype=dtype)
        self.size = 0

    def append(self, items: np.ndarray) -> None:
        need = self.size + len(items)
        if need > len(self._data):
            grown = np.empty((max(need, 2 * len(self._data), 1024), *self._data.shape[1:]), self._data.dtype)
            grown[: self.size] = self._data[: self.size]
            self._data = grown
        self._data[self.size : need] = items
        self.size = need

    def view(self) -> np.ndarray:
        return self._data[: self.size]


def _filled(levels: list[_Growable], chunks: Iterable[Sequence[torch.Tensor]]) -> list[_Growable]:
    """``levels``, each chunk's gists (``chunk[j]``: [n, d]) appended to ``levels[j]``."""
    for gists in chunks:
        for store, g in zip(levels, gists):
            store.append(g.numpy())
    return levels


class RamStore:
    """Everything in process memory (float32 gists); nothing is durable."""

    path = None

    def __init__(self, meta: Meta) -> None:
        self.meta = meta
        self._tokens = _Growable(np.uint32, ())
        self._gists = self._empty_gists()

    def _empty_gists(self) -> list[_Growable]:
        return [_Growable(np.float32, (self.meta.dim,)) for _ in range(self.meta.levels)]

    def read_tokens(self, start: int, end: int) -> np.ndarray:
        return self._tokens.view()[start:end].copy()

    def read_gists(self, level: int, index: np.ndarray | slice) -> torch.Tensor:
        return torch.from_numpy(np.array(self._gists[level - 1].view()[index], copy=True))

    def commit(self, tokens: np.ndarray, gists: Sequence[torch.Tensor]) -> None:
        self._tokens.append(tokens)
        for store, g in zip(self._gists, gists):
            store.append(g.numpy())
        self.meta = replace(self.meta, committed=(self._tokens.size, *(g.size for g in self._gists)))

    def rewrite(self, version: str, chunks: Iterable[Sequence[torch.Tensor]]) -> None:
        self._gists = _filled(self._empty_gists(), chunks)
        self.meta = replace(self.meta, gist_version=version)

    def add_level(self, gists: Iterable[torch.Tensor]) -> None:
        """Level L+1, its gists [n, d] given in order."""
        self._gists += _filled([_Growable(np.float32, (self.meta.dim,))], ((g,) for g in gists))
        self.meta = replace(self.meta, levels=self.meta.levels + 1, committed=(*self.meta.committed, self._gists[-1].size))

    def bytes_on_disk(self) -> int:
        return 0

    def close(self) -> None:
        self._tokens = _Growable(np.uint32, ())
        self._gists = self._empty_gists()


def _write_metadata(folder: Path, meta: Meta, crc: Sequence[int], replaced: Callable[[], None] | None = None) -> None:
    """Atomically replace metadata.json (with the levels' CRC-32s and its checksum): write tmp,
    fsync, rename (then ``replaced()``), fsync the folder."""
    record = {**meta.to_json(), "crc32": {f"LOD{k}": c for k, c in enumerate(crc)}}
    replace_file(folder / METADATA_FILE, json.dumps(with_checksum(record), indent=1), replaced)


def _read_metadata(meta_file: Path) -> tuple[Meta, tuple[int, ...] | None]:
    """Parse and check metadata.json -> (meta, CRC-32 per level, None in trees written before
    them); TreeError naming the file when it is unreadable or damaged."""
    try:
        data = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TreeError(f"cannot read {meta_file}: {e} (the tree's commit record is damaged; nothing was changed)") from None
    if not checksum_ok(data):
        raise TreeError(
            f"{meta_file} is damaged: it fails its checksum, so the committed lengths cannot be trusted "
            "(nothing was changed; restore the file from a backup or ingest into a new tree)"
        )
    meta = Meta.from_json(data, meta_file)
    if "crc32" not in data:
        return meta, None
    stored = data["crc32"]
    crc = tuple(stored.get(f"LOD{k}") for k in range(meta.levels + 1)) if isinstance(stored, dict) else ()
    if len(crc) != meta.levels + 1 or not all(isinstance(c, int) and 0 <= c < 2**32 for c in crc):
        raise TreeError(f"{meta_file}: field 'crc32' must map LOD0..LOD{meta.levels} to CRC-32 values, got {stored!r}")
    return meta, crc


def _crc32(file: Path, nbytes: int) -> int:
    """CRC-32 of the first `nbytes` data bytes of a level file (after its header), read in blocks."""
    crc = 0
    with open(file, "rb") as f:
        f.seek(HEADER_SIZE)
        while nbytes > 0:
            block = f.read(min(nbytes, _CRC_BLOCK))
            if not block:
                break
            crc = zlib.crc32(block, crc)
            nbytes -= len(block)
    return crc


def _stream(files: Sequence[BinaryIO], chunks: Iterable[Sequence[torch.Tensor]], dtype: str) -> list[int]:
    """Append each chunk's gists (``chunk[j]``: [n, d]) to ``files[j]``, then fsync them all;
    -> the CRC-32 of what each file got."""
    crc = [0] * len(files)
    for gists in chunks:
        for j, (f, g) in enumerate(zip(files, gists)):
            data = _encode(g, dtype).tobytes()
            f.write(data)
            crc[j] = zlib.crc32(data, crc[j])
    for f in files:
        f.flush()
        os.fsync(f.fileno())
    return crc


class DiskStore:
    """One flat file per level behind a fixed header, plus metadata.json (the commit record).

    Reads are memory-mapped (re-mapped when the committed length outgrows the map);
    appends are written at the committed end, fsynced, and only then committed. A store
    opened for writing (:meth:`attach`) holds the tree's writer lock until :meth:`close`.
    """

    def __init__(self, path: Path, meta: Meta, crc: tuple[int, ...] | None) -> None:
        self.path = path
        self.meta = meta
        self.crc = crc  # CRC-32 of the committed data per level; None only when loaded without verify (read-only)
        self._files: list[BinaryIO] = []
        self._maps: list[np.ndarray | None] = [None] * (meta.levels + 1)
        self._lock: WriterLock | None = None

    # -- opening
    @classmethod
    def create(cls, path: Path, meta: Meta) -> WriterLock:
        """Write an empty tree and return its writer lock, still held (for the caller to attach).

        metadata.json appears last, so a half-made tree is never valid; the lock is taken
        before anything is written, so two creators never write the same folder.
        """
        if path.exists() and not path.is_dir():
            raise TreeError(f"cannot create a tree at {path}: it is a file; choose a folder (a missing one is created)")
        if (path / METADATA_FILE).exists():
            raise TreeError(f"a MegaContext tree already exists at {path}; open it instead, or choose a new folder")
        # what a crashed create leaves: header-only level files, a temp commit, the lock
        ours = {level_file(path, k).name for k in range(meta.levels + 1)} | {METADATA_FILE + ".tmp", LOCK_FILE}
        if path.is_dir() and any(p.name not in ours or (p.suffix == ".ctx" and p.stat().st_size > HEADER_SIZE)
                                 for p in path.iterdir()):
            raise TreeError(f"cannot create a tree at {path}: the folder exists and is not empty")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TreeError(f"cannot create a tree at {path}: {e.strerror or e}") from None
        lock = WriterLock(path, "tree")
        try:
            if (path / METADATA_FILE).exists():  # another creator finished first
                raise TreeError(f"a MegaContext tree already exists at {path}; open it instead, or choose a new folder")
            for level in range(meta.levels + 1):
                with open(level_file(path, level), "wb") as f:
                    f.write(Header.for_level(meta, level, meta.gist_version).pack())
                    f.flush()
                    os.fsync(f.fileno())
            fsync_dir(path)
            _write_metadata(path, meta, (0,) * (meta.levels + 1))
        except BaseException:
            lock.release()
            raise
        return lock

    @classmethod
    def load(cls, path: Path, verify: bool = True) -> DiskStore:
        """Validate a tree folder without changing anything (TreeError when it is not sound).

        `meta.gist_version` of the result is the version the gist files hold: their headers'
        when they agree, "" when not (an interrupted refresh: recompute before use). With
        `verify`, every level's committed data is checked against its CRC-32, except a gist
        file swapped in by a refresh that crashed before its commit (its header version is
        not metadata.json's) and the levels of trees written before CRC-32s were recorded.
        Without `verify`, `crc` is left unknown.
        """
        if not path.exists():
            raise TreeError(f"no MegaContext tree at {path}: the folder does not exist")
        if not path.is_dir():
            raise TreeError(f"{path} is a file, not a MegaContext tree folder")
        meta_file = path / METADATA_FILE
        if not meta_file.is_file():
            raise TreeError(f"{path} is not a MegaContext tree (no {METADATA_FILE})")
        meta, stored = _read_metadata(meta_file)
        versions, crc = set(), []
        for level in range(meta.levels + 1):
            file = level_file(path, level)
            header = Header.read(file)
            header.check(Header.for_level(meta, level, header.gist_version), file)
            have = (file.stat().st_size - HEADER_SIZE) // meta.item_bytes(level)
            if have < meta.committed[level]:
                raise TreeError(
                    f"{file} holds {have} items but metadata.json commits {meta.committed[level]}: the tree is damaged"
                )
            if level:
                versions.add(header.gist_version)
            if verify:
                crc.append(_crc32(file, meta.committed[level] * meta.item_bytes(level)))
                swapped = level > 0 and header.gist_version != meta.gist_version
                if stored is not None and not swapped and crc[level] != stored[level]:
                    raise TreeError(
                        f"{file} is damaged: its committed data fails the CRC-32 recorded in metadata.json "
                        "(a flipped or overwritten byte; nothing was changed: restore the tree from a backup, "
                        "or ingest its text into a new tree)"
                    )
        gist_version = versions.pop() if len(versions) == 1 else ""
        return cls(path, replace(meta, gist_version=gist_version), tuple(crc) if verify else stored)

    def attach(self, lock: WriterLock) -> None:
        """Open for writing under ``lock`` (the tree's writer lock, held; released by :meth:`close`).

        Drops whatever lies past the committed lengths (an interrupted append) and the
        transient files. ``self.meta`` must have been read under the lock.
        """
        assert self.crc is not None, "a store is opened for writing only after load(verify=True)"
        self._lock = lock
        grown = level_file(self.path, self.meta.levels + 1)  # a level added by a growth that crashed before its commit
        for leftover in [self.path / (METADATA_FILE + ".tmp"), *self._refresh_files(), grown]:
            leftover.unlink(missing_ok=True)
        try:
            for level in range(self.meta.levels + 1):
                f = open(level_file(self.path, level), "r+b")
                self._files.append(f)
                end = HEADER_SIZE + self.meta.committed[level] * self.meta.item_bytes(level)
                if os.fstat(f.fileno()).st_size > end:
                    f.truncate(end)
                    os.fsync(f.fileno())
        except OSError as e:
            self.close()
            raise TreeError(f"cannot open the tree at {self.path} for writing: {e}") from None

    def _refresh_files(self) -> list[Path]:
        return [self.path / (level_file(self.path, k).name + ".refresh") for k in range(1, self.meta.levels + 1)]

    # -- reads
    def _array(self, level: int) -> np.ndarray:
        """The committed items of `level` as a read-only memory map ([n] or [n, d])."""
        n = self.meta.committed[level]
        mapped = self._maps[level]
        if mapped is None or len(mapped) < n:
            dtype = NUMPY_DTYPES[self.meta.level_dtype(level)]
            shape = (n, *self.meta.row_shape(level))
            mapped = (np.memmap(level_file(self.path, level), dtype=dtype, mode="r", offset=HEADER_SIZE, shape=shape)
                      if n else np.empty(shape, dtype))
            self._maps[level] = mapped
        return mapped

    def read_tokens(self, start: int, end: int) -> np.ndarray:
        return np.array(self._array(0)[start:end], copy=True)

    def read_gists(self, level: int, index: np.ndarray | slice) -> torch.Tensor:
        return _decode(self._array(level)[index], self.meta.gist_dtype)

    # -- writes
    def commit(self, tokens: np.ndarray, gists: Sequence[torch.Tensor]) -> None:
        """Write at the committed ends, fsync, then advance metadata.json (the durability point)."""
        items = [tokens, *(_encode(g, self.meta.gist_dtype) for g in gists)]
        crc = list(self.crc)
        for level, arr in enumerate(items):
            if len(arr):
                data = np.ascontiguousarray(arr).tobytes()
                f = self._files[level]
                f.seek(HEADER_SIZE + self.meta.committed[level] * self.meta.item_bytes(level))
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                crc[level] = zlib.crc32(data, crc[level])
        self._record(replace(self.meta, committed=tuple(c + len(a) for c, a in zip(self.meta.committed, items))), crc)

    def rewrite(self, version: str, chunks: Iterable[Sequence[torch.Tensor]]) -> None:
        """Stream new gists into LODk.ctx.refresh files, then swap them in and commit the version.

        A failure before the swap leaves the old gists in place; a crash during the swap
        leaves gist files whose header versions disagree, which open() reports as stale.
        """
        tmp_paths = self._refresh_files()
        files = [open(p, "wb") for p in tmp_paths]
        try:
            for k, f in enumerate(files, start=1):
                f.write(Header.for_level(self.meta, k, version).pack())
            crc = [self.crc[0], *_stream(files, chunks, self.meta.gist_dtype)]
        except BaseException:
            for f, p in zip(files, tmp_paths):
                f.close()
                p.unlink(missing_ok=True)
            raise
        for f in files:
            f.close()
        for k in range(1, self.meta.levels + 1):
            self._files[k].close()
            self._maps[k] = None
        for k, p in enumerate(tmp_paths, start=1):
            os.replace(p, level_file(self.path, k))
        fsync_dir(self.path)
        for k in range(1, self.meta.levels + 1):
            self._files[k] = open(level_file(self.path, k), "r+b")
        self._record(replace(self.meta, gist_version=version), crc)

    def add_level(self, gists: Iterable[torch.Tensor]) -> None:
        """Write LOD{L+1}.ctx (header, then the gists [n, d] given in order), fsync it and the
        folder, then commit metadata.json with one more level. Before that commit the file is
        not part of the tree (the next writer deletes it)."""
        level = self.meta.levels + 1
        meta = replace(self.meta, levels=level)
        f = open(level_file(self.path, level), "w+b")
        try:
            f.write(Header.for_level(meta, level, meta.gist_version).pack())
            crc = (*self.crc, *_stream([f], ((g,) for g in gists), meta.gist_dtype))
            fsync_dir(self.path)
            self._record(replace(meta, committed=(*meta.committed, (f.tell() - HEADER_SIZE) // meta.item_bytes(level))), crc)
        finally:
            if self.meta.levels == level:  # committed (also when the folder's fsync after the rename failed)
                self._files.append(f)
                self._maps.append(None)
            else:
                f.close()

    def _record(self, meta: Meta, crc: Sequence[int]) -> None:
        """Commit ``meta`` and ``crc`` (replace metadata.json). ``self.meta`` and ``self.crc``
        follow the file from its rename on, even when the folder's fsync after it fails, and
        no signal handler (KeyboardInterrupt) runs between the rename and them."""
        def renamed() -> None:
            self.meta, self.crc = meta, tuple(crc)

        with uninterrupted():
            _write_metadata(self.path, meta, crc, renamed)

    def bytes_on_disk(self) -> int:
        files = [level_file(self.path, k) for k in range(self.meta.levels + 1)] + [self.path / METADATA_FILE]
        return sum(f.stat().st_size for f in files if f.exists())

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []
        self._maps = [None] * (self.meta.levels + 1)
        if self._lock is not None:
            self._lock.release()
            self._lock = None
