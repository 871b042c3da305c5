"""The MegaContext tree (spec §3.2): append-only history with streaming gists.

Level 0 holds the raw token ids (uint32); level ``k = 1..L`` holds one gist vector per
complete node, where node ``(k, i)`` covers tokens ``[i*K**k, (i+1)*K**k)``. A node exists
iff it is complete, so ``num_nodes(k) == num_tokens // K**k`` at all times.

Ingest is streaming: every ``append`` embeds the blocks it completes and gists them
(one batched gister call per level per chunk of at most ``chunk_tokens`` tokens); the
newest unfinished block is kept aside and never padded into the gister. Children that
do not yet form a complete parent (the unfinished block's tokens, and at each level the
< K newest gists) are the only history held in memory, so memory does not grow with the
length of the history. A LOD(k+1) gist is always computed from its children *as stored*
(rounded to the storage dtype), so a tree built in one call, in many calls, across
reopens, or by :meth:`MegaContextTree.refresh` holds the same vectors.

Every tree records the version of the gister that made its gists. When the gister
changes (another version), the gists are recomputed from LOD0 before they are used
again: on :meth:`MegaContextTree.open`, and on the next ``append``/``gists`` call.

Backends: RAM (:meth:`MegaContextTree.create_ram`) and a crash-safe folder on disk
(:meth:`MegaContextTree.create_disk` / :meth:`MegaContextTree.open`), whose exact layout
and commit protocol are documented in ``docs/storage-format.md``.
"""

from __future__ import annotations

import json
import operator
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch

from megacontext.errors import TreeError
from megacontext.durable import fsync_dir

MAGIC = b"MEGACTX\x00"
FORMAT_VERSION = 1
HEADER_SIZE = 512  # bytes before the first item of every level file
METADATA_FILE = "metadata.json"
FORMAT_NAME = "megacontext-tree"
CHUNK_TOKENS = 8192  # tokens per gister batch and per disk commit inside one append
GIST_DTYPES = ("float16", "bfloat16", "float32")
MODEL_NAME_BYTES = 256
VERSION_BYTES = 64
_MAX_TOKEN = 2**32 - 1

# magic | format version | level | levels | block size | dim | reserved | dtype | model | gist version
_HEADER = struct.Struct("<8sIIIIII8s256s64s")
_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_NUMPY_DTYPES = {"uint32": np.uint32, "float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}


class Gister(Protocol):
    """What the tree calls to make gists (the real one is ``gistnet.TreeGister``).

    ``version`` identifies the weights (a hash); ``dim`` is the vector width ``d``.
    ``embed_tokens(ids LongTensor[N]) -> Tensor[N, d]`` (ids are given on the CPU).
    ``gist(level, children Tensor[N, K, d]) -> Tensor[N, d]`` makes the level-``level``
    gists (1 = gists of token blocks) and is always called under ``torch.no_grad()``.
    """

    version: str
    dim: int

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor: ...

    def gist(self, level: int, children: torch.Tensor) -> torch.Tensor: ...


# ----------------------------------------------------------------------------- values
def _as_token_array(tokens: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
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


def _as_index_array(indices: Sequence[int] | np.ndarray | torch.Tensor, count: int, level: int) -> np.ndarray:
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


def _quantize(g: torch.Tensor, dtype: str) -> torch.Tensor:
    """Round float32 gists through the storage dtype (what a reader will get back)."""
    return g if dtype == "float32" else g.to(_TORCH_DTYPES[dtype]).float()


def _check_gister(gister: Gister, dim: int) -> None:
    version = gister.version
    if not isinstance(version, str) or not version or len(version) > VERSION_BYTES or not version.isascii():
        raise TreeError(f"gister.version must be a non-empty ASCII string of at most {VERSION_BYTES} characters, got {version!r}")
    if gister.dim != dim:
        raise TreeError(f"the gister makes {gister.dim}-dim vectors but the tree stores {dim}-dim gists")


def _check_chunk(chunk_tokens: int) -> None:
    if not isinstance(chunk_tokens, int) or isinstance(chunk_tokens, bool) or chunk_tokens < 1:
        raise TreeError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")


def _check_shape_args(block_size: int, levels: int, dim: int) -> None:
    for name, value, least in (("block_size", block_size, 2), ("levels", levels, 1), ("dim", dim, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise TreeError(f"{name} must be an integer >= {least}, got {value!r}")


# ------------------------------------------------------------------- streaming gists
@dataclass(frozen=True)
class _Tails:
    """Children that do not form a complete parent yet.

    tokens: uint32 [< K], the unfinished block. gists[k-1]: float32 [< K, d], the
    newest level-k gists without a parent, for k = 1..L-1.
    """

    tokens: np.ndarray
    gists: tuple[torch.Tensor, ...]


def _checked(out: torch.Tensor, rows: int, dim: int, what: str) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (rows, dim):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TreeError(f"gister.{what} returned {shape}, expected a tensor of shape ({rows}, {dim})")
    return out


def _gist_step(
    gister: Gister, tails: _Tails, tokens: np.ndarray, block_size: int, gist_dtype: str
) -> tuple[list[torch.Tensor], _Tails]:
    """Gists completed by appending `tokens` (uint32 [n]) after `tails`.

    Returns (new gists per level 1..L, each float32 [m_k, d] rounded to `gist_dtype`,
    the tails after them). One gister call per level at most; pure (no state changes).
    """
    K, d = block_size, gister.dim
    ids = np.concatenate([tails.tokens, tokens])
    blocks = len(ids) // K
    empty = torch.empty(0, d)
    with torch.no_grad():
        cur = empty
        if blocks:
            emb = _checked(gister.embed_tokens(torch.from_numpy(ids[: blocks * K].astype(np.int64))), blocks * K, d, "embed_tokens")
            out = _checked(gister.gist(1, emb.reshape(blocks, K, d)), blocks, d, "gist")
            cur = _quantize(out.detach().to("cpu", torch.float32), gist_dtype)
        new = [cur]
        rest = []
        for level, pending in enumerate(tails.gists, start=2):
            children = torch.cat([pending, cur])
            parents = len(children) // K
            rest.append(children[parents * K :].clone())
            cur = empty
            if parents:
                out = _checked(gister.gist(level, children[: parents * K].reshape(parents, K, d)), parents, d, "gist")
                cur = _quantize(out.detach().to("cpu", torch.float32), gist_dtype)
            new.append(cur)
    return new, _Tails(ids[blocks * K :].copy(), tuple(rest))


# -------------------------------------------------------------------------- metadata
@dataclass(frozen=True)
class _Meta:
    """Everything metadata.json records; `committed[k]` = items at level k (0 = tokens)."""

    block_size: int
    levels: int
    dim: int
    gist_dtype: str
    model_name: str
    tokenizer_hash: str
    gist_version: str
    committed: tuple[int, ...]

    def to_json(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "block_size": self.block_size,
            "levels": self.levels,
            "dim": self.dim,
            "gist_dtype": self.gist_dtype,
            "model_name": self.model_name,
            "tokenizer_hash": self.tokenizer_hash,
            "gist_version": self.gist_version,
            "committed": {f"LOD{k}": n for k, n in enumerate(self.committed)},
        }

    @classmethod
    def from_json(cls, data: object, where: Path) -> _Meta:
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise TreeError(f"{where} is not MegaContext tree metadata")
        if data.get("format_version") != FORMAT_VERSION:
            raise TreeError(
                f"{where} has format version {data.get('format_version')!r}; this megacontext reads version {FORMAT_VERSION}"
            )
        fields = {"block_size": int, "levels": int, "dim": int, "gist_dtype": str, "model_name": str,
                  "tokenizer_hash": str, "gist_version": str, "committed": dict}
        for key, tp in fields.items():
            if not isinstance(data.get(key), tp) or isinstance(data.get(key), bool):
                raise TreeError(f"{where}: field {key!r} is missing or not a {tp.__name__}")
        if data["gist_dtype"] not in GIST_DTYPES:
            raise TreeError(f"{where}: unknown gist_dtype {data['gist_dtype']!r}")
        try:
            _check_shape_args(data["block_size"], data["levels"], data["dim"])
        except TreeError as e:
            raise TreeError(f"{where}: {e}") from None
        committed = tuple(data["committed"].get(f"LOD{k}") for k in range(data["levels"] + 1))
        K, n = data["block_size"], committed[0]
        if not all(isinstance(c, int) and c >= 0 for c in committed) or any(
            c != n // K**k for k, c in enumerate(committed)
        ):
            raise TreeError(f"{where}: committed lengths {data['committed']} do not follow num_nodes(k) = tokens // {K}**k")
        return cls(K, data["levels"], data["dim"], data["gist_dtype"], data["model_name"],
                   data["tokenizer_hash"], data["gist_version"], committed)

    def level_dtype(self, level: int) -> str:
        return "uint32" if level == 0 else self.gist_dtype

    def item_bytes(self, level: int) -> int:
        return 4 if level == 0 else self.dim * np.dtype(_NUMPY_DTYPES[self.gist_dtype]).itemsize

    def row_shape(self, level: int) -> tuple[int, ...]:
        return () if level == 0 else (self.dim,)


def _fixed(text: str, width: int) -> bytes:
    """UTF-8, cut to `width` bytes, NUL-padded (what a fixed-width header field holds)."""
    return text.encode("utf-8")[:width].ljust(width, b"\0")


@dataclass(frozen=True)
class _Header:
    """The fixed 512-byte header of one level file (layout: docs/storage-format.md)."""

    level: int
    levels: int
    block_size: int
    dim: int
    dtype: str
    model_name: bytes  # fixed width, NUL-padded
    gist_version: str  # "" for LOD0

    @classmethod
    def for_level(cls, meta: _Meta, level: int, gist_version: str) -> _Header:
        return cls(level, meta.levels, meta.block_size, meta.dim, meta.level_dtype(level),
                   _fixed(meta.model_name, MODEL_NAME_BYTES), "" if level == 0 else gist_version)

    def pack(self) -> bytes:
        raw = _HEADER.pack(MAGIC, FORMAT_VERSION, self.level, self.levels, self.block_size, self.dim, 0,
                           _fixed(self.dtype, 8), self.model_name, _fixed(self.gist_version, VERSION_BYTES))
        return raw.ljust(HEADER_SIZE, b"\0")

    @classmethod
    def read(cls, file: Path) -> _Header:
        if not file.is_file():
            raise TreeError(f"{file} is missing: the tree is damaged")
        with open(file, "rb") as f:
            raw = f.read(HEADER_SIZE)
        if len(raw) < HEADER_SIZE:
            raise TreeError(f"{file} is too short to hold a {HEADER_SIZE}-byte header: the tree is damaged")
        magic, version, level, levels, block, dim, _, dtype, model, gist_version = _HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise TreeError(f"{file} has a bad magic number: not a MegaContext level file")
        if version != FORMAT_VERSION:
            raise TreeError(f"{file} has format version {version}; this megacontext reads version {FORMAT_VERSION}")
        return cls(level, levels, block, dim, dtype.rstrip(b"\0").decode("ascii", "replace"), model,
                   gist_version.rstrip(b"\0").decode("ascii", "replace"))

    def check(self, expected: _Header, file: Path) -> None:
        """TreeError naming the first field where this header disagrees with metadata.json."""
        for name in ("level", "levels", "block_size", "dim", "dtype", "model_name"):
            got, want = getattr(self, name), getattr(expected, name)
            if got != want:
                if isinstance(got, bytes):
                    got, want = (v.rstrip(b"\0").decode("utf-8", "replace") for v in (got, want))
                raise TreeError(f"{file} header says {name}={got!r} but metadata.json says {want!r}")


# --------------------------------------------------------------------------- backends
class _Store(Protocol):
    """Storage behind a tree. `meta.committed` = items per level; reads stay inside it."""

    meta: _Meta
    path: Path | None

    def read_tokens(self, start: int, end: int) -> np.ndarray: ...

    def read_gists(self, level: int, index: np.ndarray | slice) -> torch.Tensor: ...

    def commit(self, tokens: np.ndarray, gists: Sequence[torch.Tensor]) -> None: ...

    def rewrite(self, version: str, chunks: Iterable[Sequence[torch.Tensor]]) -> None: ...

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


class _RamStore:
    """Everything in process memory (float32 gists); nothing is durable."""

    path = None

    def __init__(self, meta: _Meta) -> None:
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
        fresh = self._empty_gists()
        for gists in chunks:
            for store, g in zip(fresh, gists):
                store.append(g.numpy())
        self._gists = fresh
        self.meta = replace(self.meta, gist_version=version)

    def bytes_on_disk(self) -> int:
        return 0

    def close(self) -> None:
        self._tokens = _Growable(np.uint32, ())
        self._gists = self._empty_gists()


def _write_metadata(folder: Path, meta: _Meta) -> None:
    """Atomically replace metadata.json: write tmp, fsync, rename, fsync the folder."""
    tmp = folder / (METADATA_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta.to_json(), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / METADATA_FILE)
    fsync_dir(folder)


def level_file(folder: Path, level: int) -> Path:
    return folder / f"LOD{level}.ctx"


class _DiskStore:
    """One flat file per level behind a fixed header, plus metadata.json (the commit record).

    Reads are memory-mapped (re-mapped when the committed length outgrows the map);
    appends are written at the committed end, fsynced, and only then committed.
    """

    def __init__(self, path: Path, meta: _Meta) -> None:
        self.path = path
        self.meta = meta
        self._files: list[BinaryIO] = []
        self._maps: list[np.ndarray | None] = [None] * (meta.levels + 1)

    # -- opening
    @classmethod
    def create(cls, path: Path, meta: _Meta) -> None:
        """Write an empty tree; metadata.json appears last, so a half-made tree is never valid."""
        if path.exists() and not path.is_dir():
            raise TreeError(f"cannot create a tree at {path}: it is a file")
        if (path / METADATA_FILE).exists():
            raise TreeError(f"a MegaContext tree already exists at {path}; open it instead, or choose a new folder")
        ours = {level_file(path, k).name for k in range(meta.levels + 1)} | {METADATA_FILE + ".tmp"}
        if path.is_dir() and any(p.name not in ours for p in path.iterdir()):
            raise TreeError(f"cannot create a tree at {path}: the folder exists and is not empty")
        path.mkdir(parents=True, exist_ok=True)
        for level in range(meta.levels + 1):
            with open(level_file(path, level), "wb") as f:
                f.write(_Header.for_level(meta, level, meta.gist_version).pack())
                f.flush()
                os.fsync(f.fileno())
        fsync_dir(path)
        _write_metadata(path, meta)

    @classmethod
    def load(cls, path: Path) -> _DiskStore:
        """Validate a tree folder without changing anything (TreeError when it is not sound).

        `meta.gist_version` of the result is the version the gist files actually hold:
        that of their headers when they agree, "" when they disagree (an interrupted
        refresh; the gists must be recomputed before use).
        """
        if not path.exists():
            raise TreeError(f"no MegaContext tree at {path}: the folder does not exist")
        if not path.is_dir():
            raise TreeError(f"{path} is a file, not a MegaContext tree folder")
        meta_file = path / METADATA_FILE
        if not meta_file.is_file():
            raise TreeError(f"{path} is not a MegaContext tree (no {METADATA_FILE})")
        try:
            data = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TreeError(f"cannot read {meta_file}: {e}") from None
        meta = _Meta.from_json(data, meta_file)
        versions = set()
        for level in range(meta.levels + 1):
            file = level_file(path, level)
            header = _Header.read(file)
            header.check(_Header.for_level(meta, level, header.gist_version), file)
            have = (file.stat().st_size - HEADER_SIZE) // meta.item_bytes(level)
            if have < meta.committed[level]:
                raise TreeError(
                    f"{file} holds {have} items but metadata.json commits {meta.committed[level]}: the tree is damaged"
                )
            if level:
                versions.add(header.gist_version)
        return cls(path, replace(meta, gist_version=versions.pop() if len(versions) == 1 else ""))

    def attach(self) -> None:
        """Drop whatever lies past the committed lengths (an interrupted append) and open for writing."""
        for leftover in [self.path / (METADATA_FILE + ".tmp"), *self._refresh_files()]:
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
            dtype = _NUMPY_DTYPES[self.meta.level_dtype(level)]
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
        for level, arr in enumerate(items):
            if len(arr):
                f = self._files[level]
                f.seek(HEADER_SIZE + self.meta.committed[level] * self.meta.item_bytes(level))
                f.write(np.ascontiguousarray(arr).tobytes())
                f.flush()
                os.fsync(f.fileno())
        meta = replace(self.meta, committed=tuple(c + len(a) for c, a in zip(self.meta.committed, items)))
        _write_metadata(self.path, meta)
        self.meta = meta

    def rewrite(self, version: str, chunks: Iterable[Sequence[torch.Tensor]]) -> None:
        """Stream new gists into LODk.ctx.refresh files, then swap them in and commit the version.

        A failure before the swap leaves the old gists in place; a crash during the swap
        leaves gist files whose header versions disagree, which open() reports as stale.
        """
        tmp_paths = self._refresh_files()
        files = [open(p, "wb") for p in tmp_paths]
        try:
            for k, f in enumerate(files, start=1):
                f.write(_Header.for_level(self.meta, k, version).pack())
            for gists in chunks:
                for f, g in zip(files, gists):
                    f.write(_encode(g, self.meta.gist_dtype).tobytes())
            for f in files:
                f.flush()
                os.fsync(f.fileno())
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
        meta = replace(self.meta, gist_version=version)
        _write_metadata(self.path, meta)
        self.meta = meta

    def bytes_on_disk(self) -> int:
        files = [level_file(self.path, k) for k in range(self.meta.levels + 1)] + [self.path / METADATA_FILE]
        return sum(f.stat().st_size for f in files if f.exists())

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []
        self._maps = [None] * (self.meta.levels + 1)


# ------------------------------------------------------------------------------ tree
class MegaContextTree:
    """Append-only history: LOD0 token ids + gists at levels 1..L (see module docstring).

    Make one with :meth:`create_ram`, :meth:`create_disk` or :meth:`open`; close it (or
    use it as a context manager) when done.
    """

    def __init__(self, store: _Store, gister: Gister | None, chunk_tokens: int) -> None:
        """Private: use create_ram / create_disk / open."""
        self._store = store
        self._gister = gister
        self._chunk = chunk_tokens
        self._closed = False
        self._tails = self._load_tails()
        if gister is not None and gister.version != store.meta.gist_version:
            self.refresh(gister)

    # -------------------------------------------------------------- construction
    @classmethod
    def create_ram(
        cls, block_size: int, levels: int, dim: int, gister: Gister, *, chunk_tokens: int = CHUNK_TOKENS
    ) -> MegaContextTree:
        """An empty in-memory tree (float32 gists)."""
        _check_shape_args(block_size, levels, dim)
        _check_chunk(chunk_tokens)
        _check_gister(gister, dim)
        meta = _Meta(block_size, levels, dim, "float32", "", "", gister.version, (0,) * (levels + 1))
        return cls(_RamStore(meta), gister, chunk_tokens)

    @classmethod
    def create_disk(
        cls,
        path: str | os.PathLike,
        block_size: int,
        levels: int,
        dim: int,
        gister: Gister,
        model_name: str,
        tokenizer_hash: str,
        gist_dtype: str = "float16",
        *,
        chunk_tokens: int = CHUNK_TOKENS,
    ) -> MegaContextTree:
        """An empty tree in a new (or empty) folder. TreeError if a tree or other files are there."""
        _check_shape_args(block_size, levels, dim)
        _check_chunk(chunk_tokens)
        _check_gister(gister, dim)
        if gist_dtype not in GIST_DTYPES:
            raise TreeError(f"gist_dtype must be one of {', '.join(GIST_DTYPES)}, got {gist_dtype!r}")
        if not isinstance(model_name, str) or not isinstance(tokenizer_hash, str):
            raise TreeError("model_name and tokenizer_hash must be strings")
        meta = _Meta(block_size, levels, dim, gist_dtype, model_name, tokenizer_hash, gister.version,
                     (0,) * (levels + 1))
        _DiskStore.create(Path(path), meta)
        return cls.open(path, gister, chunk_tokens=chunk_tokens)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        gister: Gister | None = None,
        *,
        expect_model: str | None = None,
        expect_tokenizer: str | None = None,
        chunk_tokens: int = CHUNK_TOKENS,
    ) -> MegaContextTree:
        """Open a disk tree after validating it; nothing is changed when it is refused.

        With `expect_model` / `expect_tokenizer`, a tree made for another model or
        tokenizer is refused. With a `gister` of another version (or another width),
        the gists are recomputed (or the tree refused). Without a gister the tree can be
        read but not appended to.
        """
        _check_chunk(chunk_tokens)
        store = _DiskStore.load(Path(path))
        meta = store.meta
        if expect_model is not None and expect_model != meta.model_name:
            raise TreeError(f"the tree at {path} was built for model {meta.model_name!r}, not {expect_model!r}")
        if expect_tokenizer is not None and expect_tokenizer != meta.tokenizer_hash:
            raise TreeError(
                f"the tree at {path} was built with tokenizer {meta.tokenizer_hash!r}, but this one is "
                f"{expect_tokenizer!r}: its token ids would mean other text"
            )
        if gister is not None:
            _check_gister(gister, meta.dim)
        store.attach()
        try:
            return cls(store, gister, chunk_tokens)
        except BaseException:
            store.close()
            raise

    # ------------------------------------------------------------------- state
    @property
    def block_size(self) -> int:
        return self._store.meta.block_size

    @property
    def levels(self) -> int:
        return self._store.meta.levels

    @property
    def dim(self) -> int:
        return self._store.meta.dim

    @property
    def gist_dtype(self) -> str:
        return self._store.meta.gist_dtype

    @property
    def model_name(self) -> str:
        return self._store.meta.model_name

    @property
    def tokenizer_hash(self) -> str:
        return self._store.meta.tokenizer_hash

    @property
    def path(self) -> Path | None:
        """The tree's folder (None for a RAM tree)."""
        return self._store.path

    @property
    def num_tokens(self) -> int:
        return self._store.meta.committed[0]

    @property
    def gist_version(self) -> str:
        """Version of the gister that made the stored gists ("" = stale after an interrupted refresh)."""
        return self._store.meta.gist_version

    @property
    def bytes_on_disk(self) -> int:
        return self._store.bytes_on_disk()

    def num_nodes(self, level: int) -> int:
        """Complete nodes at `level` (0 = tokens): num_tokens // K**level."""
        return self._store.meta.committed[self._check_level(level, lowest=0)]

    # ------------------------------------------------------------------- writes
    def append(self, tokens: Sequence[int] | np.ndarray | torch.Tensor) -> None:
        """Append token ids (1-D, each in [0, 2**32)) and the gists of every node they complete.

        Committed (durable, for a disk tree) every `chunk_tokens` tokens and at the end;
        invalid input raises TreeError before anything is written.
        """
        self._check_open()
        ids = _as_token_array(tokens)
        if not len(ids):
            return
        gister = self._require_gister("append to it")
        self._ensure_fresh()
        for start in range(0, len(ids), self._chunk):
            part = ids[start : start + self._chunk]
            gists, tails = _gist_step(gister, self._tails, part, self.block_size, self.gist_dtype)
            self._store.commit(part, gists)
            self._tails = tails

    def refresh(self, gister: Gister | None = None) -> None:
        """Recompute every gist from LOD0 with `gister` (default: the tree's own) and record its version.

        Streams the history in chunks of `chunk_tokens`, so memory stays bounded.
        """
        self._check_open()
        gister = gister if gister is not None else self._require_gister("refresh it")
        _check_gister(gister, self.dim)
        K = self.block_size
        complete = (self.num_tokens // K) * K
        step = max(K, (self._chunk // K) * K)

        def chunks() -> Iterator[list[torch.Tensor]]:
            tails = _Tails(np.empty(0, np.uint32), tuple(torch.empty(0, self.dim) for _ in range(self.levels - 1)))
            for start in range(0, complete, step):
                tokens = self._store.read_tokens(start, min(start + step, complete))
                gists, tails = _gist_step(gister, tails, tokens, K, self.gist_dtype)
                yield gists

        self._store.rewrite(gister.version, chunks())
        self._gister = gister
        self._tails = self._load_tails()

    # -------------------------------------------------------------------- reads
    def tokens(self, start: int = 0, end: int | None = None) -> np.ndarray:
        """Token ids [start, end) as uint32 [end - start] (a copy)."""
        self._check_open()
        end = self.num_tokens if end is None else end
        if not (0 <= start <= end <= self.num_tokens):
            raise TreeError(f"token range [{start}, {end}) is outside the history [0, {self.num_tokens})")
        return self._store.read_tokens(start, end)

    def gists(self, level: int, indices: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Gists of nodes (level, i) for i in `indices` [n] -> float32 [n, d] on the CPU."""
        self._check_open()
        level = self._check_level(level, lowest=1)
        idx = _as_index_array(indices, self.num_nodes(level), level)
        self._ensure_fresh()
        return self._store.read_gists(level, idx)

    def gist_range(self, level: int, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Gists of nodes (level, start..end-1) -> float32 [end - start, d]."""
        self._check_open()
        level = self._check_level(level, lowest=1)
        count = self.num_nodes(level)
        end = count if end is None else end
        if not (0 <= start <= end <= count):
            raise TreeError(f"gist range [{start}, {end}) is outside level {level}'s {count} complete nodes")
        self._ensure_fresh()
        return self._store.read_gists(level, slice(start, end))

    # ---------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Release files and memory maps (a disk tree is already durable). Idempotent."""
        if not self._closed:
            self._store.close()
            self._closed = True

    def __enter__(self) -> MegaContextTree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self.path if self.path is not None else "RAM"
        return (f"MegaContextTree({where}, tokens={self.num_tokens}, K={self.block_size}, "
                f"levels={self.levels}, dim={self.dim}, gist_version={self.gist_version!r})")

    # ------------------------------------------------------------------ helpers
    def _load_tails(self) -> _Tails:
        """The children without a complete parent, read back from storage."""
        K, counts = self.block_size, self._store.meta.committed
        tokens = self._store.read_tokens((counts[0] // K) * K, counts[0])
        gists = tuple(self._store.read_gists(k, slice((counts[k] // K) * K, counts[k])) for k in range(1, self.levels))
        return _Tails(tokens, gists)

    def _ensure_fresh(self) -> None:
        """Recompute stale gists (another gister version) before they are used."""
        if self._gister is not None and self._gister.version != self.gist_version:
            self.refresh()
        if not self.gist_version:
            raise TreeError(
                "the stored gists are inconsistent (a refresh was interrupted); open the tree with a gister to recompute them"
            )

    def _require_gister(self, action: str) -> Gister:
        if self._gister is None:
            raise TreeError(f"this tree was opened without a gister: pass gister=... to open() to {action}")
        return self._gister

    def _check_open(self) -> None:
        if self._closed:
            raise TreeError("this tree is closed")

    def _check_level(self, level: int, lowest: int) -> int:
        """`level` as an int in lowest..L, or TreeError."""
        try:
            value = operator.index(level)
        except TypeError:
            value = None
        if value is None or not lowest <= value <= self.levels:
            raise TreeError(f"level must be an integer in {lowest}..{self.levels}, got {level!r}")
        return value
