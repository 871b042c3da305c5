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

The levels grow with the history: :meth:`MegaContextTree.grow` adds level ``L+1`` and gists
it from the stored level ``L`` (the same vectors streaming would have made), so a
runtime session can add levels whenever its budget needs them. ``append(..., defer=True)``
holds back an append that completes no block (it stays readable) and commits it with the
next block, :meth:`~MegaContextTree.flush`, ``close``, at interpreter exit or when the tree is
dropped unclosed: a decoding loop commits once per block, not once per token.

Every tree records the version of the gister that made its gists. When the gister
changes (another version), the gists are recomputed from LOD0 before they are used
again: on :meth:`MegaContextTree.open`, and on the next ``append``/``gists`` call.

Backends: RAM (:meth:`MegaContextTree.create_ram`) and a crash-safe folder on disk
(:meth:`MegaContextTree.create_disk` / :meth:`MegaContextTree.open`), both implemented in
:mod:`megacontext.tree_storage`; the disk layout and commit protocol are documented in
``docs/storage-format.md``.
"""

from __future__ import annotations

import atexit
import contextlib
import operator
import os
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from megacontext.durable import uninterrupted
from megacontext.errors import TreeError
from megacontext.lock import WriterLock
from megacontext.tree_format import GIST_DTYPES, VERSION_BYTES, Meta, check_shape_args
from megacontext.tree_storage import DiskStore, RamStore, Store, as_index_array, as_token_array, quantize

CHUNK_TOKENS = 8192  # tokens per gister batch and per disk commit inside one append
_WRITERS: weakref.WeakSet[MegaContextTree] = weakref.WeakSet()  # open for writing: flushed at exit
_SCAN_TOKENS = 1 << 20  # tokens per read when scanning the whole history


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


def _check_gister(gister: Gister, dim: int) -> None:
    version = gister.version
    if not isinstance(version, str) or not version or len(version) > VERSION_BYTES or not version.isascii():
        raise TreeError(f"gister.version must be a non-empty ASCII string of at most {VERSION_BYTES} characters, got {version!r}")
    if gister.dim != dim:
        raise TreeError(f"the gister makes {gister.dim}-dim vectors but the tree stores {dim}-dim gists")


def _check_chunk(chunk_tokens: int) -> None:
    if not isinstance(chunk_tokens, int) or isinstance(chunk_tokens, bool) or chunk_tokens < 1:
        raise TreeError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")


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
            cur = quantize(out.detach().to("cpu", torch.float32), gist_dtype)
        new = [cur]
        rest = []
        for level, pending in enumerate(tails.gists, start=2):
            children = torch.cat([pending, cur])
            parents = len(children) // K
            rest.append(children[parents * K :].clone())
            cur = empty
            if parents:
                out = _checked(gister.gist(level, children[: parents * K].reshape(parents, K, d)), parents, d, "gist")
                cur = quantize(out.detach().to("cpu", torch.float32), gist_dtype)
            new.append(cur)
    return new, _Tails(ids[blocks * K :].copy(), tuple(rest))


# ------------------------------------------------------------------------------ tree
class MegaContextTree:
    """Append-only history: LOD0 token ids + gists at levels 1..L (see module docstring).

    Make one with :meth:`create_ram`, :meth:`create_disk` or :meth:`open`; close it (or
    use it as a context manager) when done.
    """

    def __init__(self, store: Store, gister: Gister | None, chunk_tokens: int) -> None:
        """Private: use create_ram / create_disk / open."""
        self._store = store
        self._gister = gister
        self._chunk = chunk_tokens
        self._closed = False
        self._pid = os.getpid()  # the process that opened it (a forked child's copy never commits)
        self._pending = np.empty(0, np.uint32)  # deferred appends (< K tokens, no block completed)
        self._tails = self._load_tails()
        if gister is not None:
            _WRITERS.add(self)
        if gister is not None and gister.version != store.meta.gist_version:
            self.refresh(gister)

    # -------------------------------------------------------------- construction
    @classmethod
    def create_ram(
        cls, block_size: int, levels: int, dim: int, gister: Gister, *, chunk_tokens: int = CHUNK_TOKENS
    ) -> MegaContextTree:
        """An empty in-memory tree (float32 gists)."""
        check_shape_args(block_size, levels, dim)
        _check_chunk(chunk_tokens)
        _check_gister(gister, dim)
        meta = Meta(block_size, levels, dim, "float32", "", "", gister.version, (0,) * (levels + 1))
        return cls(RamStore(meta), gister, chunk_tokens)

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
        check_shape_args(block_size, levels, dim)
        _check_chunk(chunk_tokens)
        _check_gister(gister, dim)
        if gist_dtype not in GIST_DTYPES:
            raise TreeError(f"gist_dtype must be one of {', '.join(GIST_DTYPES)}, got {gist_dtype!r}")
        if not isinstance(model_name, str) or not isinstance(tokenizer_hash, str):
            raise TreeError("model_name and tokenizer_hash must be strings")
        meta = Meta(block_size, levels, dim, gist_dtype, model_name, tokenizer_hash, gister.version,
                     (0,) * (levels + 1))
        lock = DiskStore.create(Path(path), meta)
        return cls._open_disk(Path(path), gister, None, None, chunk_tokens, lock)

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
        the gists are recomputed (or the tree refused). With a gister the tree is open
        for writing and holds its writer lock until closed (a second writer gets
        :class:`~megacontext.lock.LockedError`); without one it can be read, concurrently
        with a writer, but not appended to.
        """
        _check_chunk(chunk_tokens)
        return cls._open_disk(Path(path), gister, expect_model, expect_tokenizer, chunk_tokens, None)

    @classmethod
    def _open_disk(
        cls,
        path: Path,
        gister: Gister | None,
        expect_model: str | None,
        expect_tokenizer: str | None,
        chunk_tokens: int,
        lock: WriterLock | None,
    ) -> MegaContextTree:
        """:meth:`open`; `lock`: the writer lock when the caller already holds it (a new tree)."""
        try:
            store = DiskStore.load(path, verify=gister is None)  # a writer verifies under its lock, below
            meta = store.meta
            if expect_model is not None and expect_model != meta.model_name:
                raise TreeError(f"the tree at {path} was built for model {meta.model_name!r}, not {expect_model!r}")
            if expect_tokenizer is not None and expect_tokenizer != meta.tokenizer_hash:
                raise TreeError(
                    f"the tree at {path} was built with tokenizer {meta.tokenizer_hash!r}, but this one is "
                    f"{expect_tokenizer!r}: its token ids would mean other text"
                )
            if gister is None:
                return cls(store, None, chunk_tokens)  # read-only: no lock, nothing changes on disk
            _check_gister(gister, meta.dim)
            lock = lock or WriterLock(path, "tree")
            store = DiskStore.load(path)  # again, under the lock: another writer may have committed since
            store.attach(lock)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
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
        """Tokens in the history, deferred ones included (the committed ones: ``committed_tokens``)."""
        return self._store.meta.committed[0] + len(self._pending)

    @property
    def committed_tokens(self) -> int:
        """Tokens a crash would keep (all of them but the deferred ones)."""
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
        level = self._check_level(level, lowest=0)
        return self.num_tokens if level == 0 else self._store.meta.committed[level]

    # ------------------------------------------------------------------- writes
    def append(self, tokens: Sequence[int] | np.ndarray | torch.Tensor, *, defer: bool = False) -> None:
        """Append token ids (1-D, each in [0, 2**32)) and the gists of every node they complete.

        Committed (durable, for a disk tree) every `chunk_tokens` tokens and at the end;
        with `defer`, an append that completes no block is held back instead (readable,
        not durable) until the next commit. What is committed is always a prefix of what
        was appended. Invalid input raises TreeError before anything is written.
        """
        self._check_open()
        ids = as_token_array(tokens)
        if not len(ids):
            return
        gister = self._require_gister("append to it")
        self._ensure_fresh()
        for start in range(0, len(ids), self._chunk):
            part = ids[start : start + self._chunk]
            gists, tails = _gist_step(gister, self._tails, part, self.block_size, self.gist_dtype)
            part = np.concatenate([self._pending, part])
            if defer and len(gists[0]) == 0:
                self._pending, self._tails = part, tails
            else:
                self._commit(part, gists, tails)

    def flush(self) -> None:
        """Commit the deferred appends (nothing to do when there are none)."""
        self._check_open()
        if len(self._pending):
            self._commit(self._pending, [torch.empty(0, self.dim)] * self.levels, self._tails)

    def _commit(self, tokens: np.ndarray, gists: Sequence[torch.Tensor], tails: _Tails) -> None:
        """Commit `tokens` (the deferred ones first) and `gists`, after which the children without
        a parent are `tails`. The tree's state follows the store's: it moves on iff the commit
        happened (also when it then fails, e.g. the folder's fsync after the rename), and no
        KeyboardInterrupt or SIGTERM handler lands between the two, so nothing is committed twice."""
        committed = self.committed_tokens
        with uninterrupted():
            try:
                self._store.commit(tokens, gists)
            finally:
                if self.committed_tokens != committed:
                    self._pending, self._tails = tokens[:0], tails

    def grow(self, levels: int) -> None:
        """Add gist levels until the tree has `levels` (nothing when it has them already).

        Level ``L+1`` is gisted from the stored level ``L``, ``chunk_tokens`` children per
        gister call, and committed on its own (a disk tree: ``docs/storage-format.md``).
        """
        self._check_open()
        gister = self._require_gister("grow it")
        self._ensure_fresh()
        try:
            while self.levels < levels:
                self._store.add_level(self._parents(gister, self.levels))
        finally:
            self._tails = self._load_tails()  # the levels committed, even when the last one failed

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

        try:
            self._store.rewrite(gister.version, chunks())
        finally:
            if self.gist_version == gister.version:  # committed (also when it failed after its commit point)
                self._gister = gister
                self._tails = self._load_tails()

    def _parents(self, gister: Gister, level: int) -> Iterator[torch.Tensor]:
        """The gists of every complete level-(`level`+1) node, from the stored level `level`:
        float32 [m, d] per gister call, rounded to the gist dtype."""
        K, d = self.block_size, self.dim
        n = (self.num_nodes(level) // K) * K
        step = max(K, (self._chunk // K) * K)
        with torch.no_grad():
            for start in range(0, n, step):
                children = self._store.read_gists(level, slice(start, min(start + step, n)))
                out = _checked(gister.gist(level + 1, children.reshape(-1, K, d)), len(children) // K, d, "gist")
                yield quantize(out.detach().to("cpu", torch.float32), self.gist_dtype)

    # -------------------------------------------------------------------- reads
    def tokens(self, start: int = 0, end: int | None = None) -> np.ndarray:
        """Token ids [start, end) as uint32 [end - start] (a copy)."""
        self._check_open()
        end = self.num_tokens if end is None else end
        if not (0 <= start <= end <= self.num_tokens):
            raise TreeError(f"token range [{start}, {end}) is outside the history [0, {self.num_tokens})")
        c = self.committed_tokens
        out = self._store.read_tokens(min(start, c), min(end, c))
        return out if end <= c else np.concatenate([out, self._pending[max(start - c, 0) : end - c]])

    def max_token(self) -> int:
        """The largest token id in the history (-1 when it is empty); streams LOD0 in chunks."""
        return max((int(part.max()) for _, part in self._token_chunks()), default=-1)

    def first_token_outside(self, vocab_size: int) -> int | None:
        """Offset of the first token id >= `vocab_size` (None when every id is below it)."""
        for start, part in self._token_chunks():
            bad = np.flatnonzero(part >= vocab_size)
            if bad.size:
                return start + int(bad[0])
        return None

    def _token_chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(start, uint32 ids [<= _SCAN_TOKENS]) covering the history in order."""
        self._check_open()
        for start in range(0, self.num_tokens, _SCAN_TOKENS):
            yield start, self.tokens(start, min(start + _SCAN_TOKENS, self.num_tokens))

    def gists(self, level: int, indices: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Gists of nodes (level, i) for i in `indices` [n] -> float32 [n, d] on the CPU."""
        self._check_open()
        level = self._check_level(level, lowest=1)
        idx = as_index_array(indices, self.num_nodes(level), level)
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
        """Commit the deferred appends, then release files and memory maps. Idempotent."""
        if not self._closed:
            try:
                self.flush()
            finally:
                self._store.close()
                self._closed = True
                _WRITERS.discard(self)

    def __del__(self) -> None:
        """A tree dropped without close() still commits its deferred appends and releases its lock
        (not a forked child's copy: the parent's tree is the parent's to commit)."""
        if getattr(self, "_pid", None) == os.getpid():
            with contextlib.suppress(OSError, TreeError):
                self.close()

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
        """The children without a complete parent, read back from storage (and the deferred tokens)."""
        K, counts, n = self.block_size, self._store.meta.committed, self.num_tokens
        tokens = self.tokens((n // K) * K, n)
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


@atexit.register
def _close_at_exit() -> None:
    """Commit what open trees hold back when the interpreter exits (a full disk: they keep their last commit)."""
    for tree in list(_WRITERS):
        with contextlib.suppress(OSError, TreeError):
            tree.close()


os.register_at_fork(after_in_child=_WRITERS.clear)  # a forked child never commits (or unlocks) its parent's trees
