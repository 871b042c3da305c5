"""The runtime loop (spec §3.7): ingest -> LensNet scores -> allocator edits -> decode.

A :class:`Session` owns one history (a :class:`MegaContextTree`, in RAM or on disk), the
working context over it, and the frozen modules that read it. Per block of ``K`` tokens:

    ingest (tree + gists) -> refocus (LensNet + allocator, 1-3 passes) -> decode with
    the base on the working context (one KV cache, kept after a refocus up to the first
    entry the refocus changed)

and every block leaves a telemetry record (latency split, swap rate, budget use).
When the cheapest window over the history no longer fits the budget, the tree grows
the next gist level (:meth:`MegaContextTree.grow`), so any history fits a budget above
a small minimum (``docs/architecture.md``, "Levels that grow"). Appends are committed
per completed block; the unfinished block's tokens wait for the next block, :meth:`Session.save`
or the tree's close.
A disk session is saved beside its tree (``session.json``, with a checksum) and reopens
with its whole history and focus state; a damaged ``session.json`` is reported
(:class:`SessionWarning`) and the session starts over from a fresh initial window over
the intact history.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from megacontext.allocator import FocusAllocator
from megacontext.base_model import BaseModel, crop_cache
from megacontext.config import Config, FocusConfig
from megacontext.data.tokenizer import tokenizer_hash
from megacontext.durable import checksum_ok, replace_file, with_checksum
from megacontext.errors import MegaContextError, MegaContextWarning, TreeError
from megacontext.focus.policies import refocus
from megacontext.focus.source import TreeSource
from megacontext.focus.trace import FocusTrace
from megacontext.modules import Modules
from megacontext.tree import CHUNK_TOKENS, MegaContextTree
from megacontext.tree_storage import METADATA_FILE
from megacontext.working_context import (
    Action,
    Assembled,
    Entry,
    WorkingContext,
    assemble,
    fitting_levels,
    minimum_cost,
)

SESSION_FILE = "session.json"


class SessionWarning(MegaContextWarning):
    """A saved session state was damaged and is not used (the history itself is intact)."""


def check_budget(budget: int, base: BaseModel) -> None:
    """MegaContextError when a working context of ``budget`` entries would not fit the base's context."""
    if budget > base.max_context:
        raise MegaContextError(
            f"a budget of {budget} is more than the base's context length ({base.max_context} tokens, "
            f"base.max_context): its window would hold positions the base never saw; use a budget of "
            f"at most {base.max_context}"
        )


def check_sampling(max_new_tokens: int, temperature: float) -> None:
    """MegaContextError unless max_new_tokens >= 0 and temperature is a finite number >= 0."""
    if max_new_tokens < 0:
        raise MegaContextError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise MegaContextError(f"--temperature must be a finite number >= 0 (0 = greedy), got {temperature}")


@dataclass
class BlockTelemetry:
    """One record per refocus (spec §5)."""

    block: int
    history_tokens: int
    cost: int
    budget: int
    actions: int
    expands: int
    collapses: int
    swap_rate: float
    ms_lensnet: float
    ms_allocator: float
    ms_assemble: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Cache:
    """The base's KV cache over ``entries``, the window entries (in order) it was built on.

    A later window can keep it up to its first entry that differs: an entry's vector is a
    function of the entry, its position id one of the entry and its index (compact: the
    index; absolute: its span), so an unchanged prefix of entries is an unchanged prefix of
    (embedding, position) pairs, and causal attention makes its keys and values unchanged.
    """

    past: object = None
    entries: list[Entry] = field(default_factory=list)


def first_change(old: Sequence[Entry], new: Sequence[Entry]) -> int:
    """Index of the first entry where ``old`` and ``new`` differ (the shorter length when one
    is a prefix of the other)."""
    n = min(len(old), len(new))
    if old[:n] == new[:n]:
        return n
    return next(i for i in range(n) if old[i] != new[i])


@dataclass
class Session:
    """One MegaContext session: history tree + working context + frozen modules."""

    modules: Modules
    tree: MegaContextTree
    focus: FocusConfig
    seed: int = 0
    wc: WorkingContext | None = None
    telemetry: list[BlockTelemetry] = field(default_factory=list)
    trace: FocusTrace = field(default_factory=FocusTrace)  # every refocus
    forced: list[Action] = field(default_factory=list)  # budget-overflow collapses of WorkingContext.extend
    base_forward_ms: list[float] = field(default_factory=list)
    base_forward_entries: list[int] = field(default_factory=list)  # entries fed to the base per decode step
    on_block: Callable[[BlockTelemetry], None] | None = None

    def __post_init__(self) -> None:
        self.base = self.modules.base
        self.vocab_size = self.base.vocab_size
        self.block_size = self.tree.block_size
        self.source = TreeSource(self.tree, self.base)
        self.allocator = FocusAllocator(self.focus, self.block_size, np.random.default_rng(self.seed))
        self._cache = _Cache()
        if self.wc is None and self.tree.num_tokens > 0:
            self.wc = self._initial_wc(self.tree.num_tokens)

    # ------------------------------------------------------------------ state
    @property
    def num_tokens(self) -> int:
        return self.tree.num_tokens

    @property
    def levels(self) -> int:
        """The tree's gist levels (they grow with the history)."""
        return self.tree.levels

    def _initial_wc(self, n: int) -> WorkingContext:
        self._fit_levels(n)
        return WorkingContext.initial(n, self.block_size, self.levels, self.focus.budget, self.focus.tail_blocks)

    def _fit_levels(self, n: int) -> None:
        """Grow the tree (and the window) to the fewest levels whose cheapest tiling of ``n``
        tokens fits the budget (none when the current ones do)."""
        levels = fitting_levels(n, self.block_size, self.levels, self.focus.tail_blocks, self.focus.budget)
        if levels > self.levels:
            self.tree.grow(levels)
        if self.wc is not None:
            self.wc.grow(self.levels)

    # ----------------------------------------------------------------- ingest
    def ingest(self, ids: Sequence[int] | np.ndarray, progress: Callable[[int], None] | None = None) -> None:
        """Append tokens (chunked at block borders); refocus once at the end if a block
        completed. While decoding (one token per call) that is once per block; a long prompt
        is refocused once, when it is all in — the windows in between are never read, and a
        refocus without the prompt's question in view only spends the budget on guesses.
        Ids outside the base's vocabulary, or a history that would outgrow the budget, raise
        MegaContextError before anything is appended."""
        ids = self._checked_ids(ids)
        self.check_room(len(ids))
        self._append(ids, progress)

    def _checked_ids(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """``ids`` as int64 [N]; MegaContextError when one is outside the base's vocabulary."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            bad = int(np.flatnonzero((ids < 0) | (ids >= self.vocab_size))[0])
            raise MegaContextError(
                f"token id {int(ids[bad])} at position {bad} of the input is outside the base's vocabulary "
                f"[0, {self.vocab_size}); nothing was appended"
            )
        return ids

    def _append(self, ids: np.ndarray, progress: Callable[[int], None] | None = None) -> None:
        """:meth:`ingest` of checked ``ids`` int64 [N]: one tree append per block, committed
        when it completes its block (``defer``: a decoding loop commits once per block)."""
        pos, completed = 0, False
        while pos < len(ids):
            room = self.block_size - (self.num_tokens % self.block_size)
            chunk = ids[pos : pos + room]
            self.tree.append(chunk, defer=True)
            pos += len(chunk)
            self._extend_window()
            completed |= self.num_tokens % self.block_size == 0
            if progress is not None:
                progress(len(chunk))
        if completed:
            self.refocus()

    def ingest_bulk(
        self, ids: Sequence[int] | np.ndarray, progress: Callable[[int], None] | None = None, chunk: int = CHUNK_TOKENS
    ) -> None:
        """:meth:`ingest` for long inputs: ``chunk`` tokens per tree append (one disk commit
        each, not one per block), the window extended once at the end (over whatever was
        committed, even when an append fails), then one refocus if a block completed.
        ``progress(n)`` after each chunk. The same checks as :meth:`ingest`, before anything
        is appended."""
        ids = self._checked_ids(ids)
        self.check_room(len(ids))
        before = self.num_tokens
        try:
            for i in range(0, len(ids), chunk):
                self.tree.append(ids[i : i + chunk])
                if progress is not None:
                    progress(min(chunk, len(ids) - i))
        finally:
            self._extend_window()
        if self.num_tokens // self.block_size > before // self.block_size:
            self.refocus()

    def _extend_window(self) -> None:
        """Bring the window up to the tree's history (levels grown when the budget needs them,
        forced collapses recorded; the next decode step keeps the KV cache up to the first
        entry they changed)."""
        n = self.num_tokens
        if self.wc is None:
            if n > 0:
                self.wc = self._initial_wc(n)
                self._cache = _Cache()
        elif n > self.wc.num_tokens:
            self._fit_levels(n)
            self.forced.extend(self.wc.extend(n))

    def check_room(self, extra: int) -> None:
        """MegaContextError, before anything is appended, when the history grown by ``extra``
        tokens would at some point need a larger working context than the budget, even with
        the levels the tree grows by then (the cheapest tiling peaks just before each block
        completes)."""
        K, n, tail, budget = self.block_size, self.num_tokens, self.focus.tail_blocks, self.focus.budget
        points = [n + extra, *range((n // K + 1) * K - 1, n + extra, K)]
        levels = max(fitting_levels(t, K, self.levels, tail, budget) for t in points)
        need = max(minimum_cost(t, K, levels, tail) for t in points)
        if need > budget:
            raise MegaContextError(
                f"{extra} more tokens would grow the history to {n + extra}, which needs a working-context budget "
                f"of at least {need} even with {levels} gist levels (block size {K}, tail_blocks {tail}), got "
                f"{budget}: raise --budget (focus.budget); nothing was appended"
            )

    # ---------------------------------------------------------------- refocus
    def assemble(self) -> Assembled:
        if self.wc is None:
            raise MegaContextError("the session is empty: ingest some text first")
        return assemble(self.wc, self.source, self.focus.position_mode)

    def refocus(self) -> list[Action]:
        """LensNet + allocator (the focus room's :func:`refocus`); the next decode step keeps
        the KV cache up to the first entry it changed."""
        if self.wc is None:
            return []
        timer: dict[str, float] = {}
        entries = self.wc.cost
        t0 = time.perf_counter()
        done = refocus(self.wc, self.source, self.modules.lensnet, self.allocator, self.focus.position_mode, timer)
        total = time.perf_counter() - t0
        self.trace.record(done, entries)
        rec = BlockTelemetry(
            block=self.num_tokens // self.block_size,
            history_tokens=self.num_tokens,
            cost=self.wc.cost,
            budget=self.focus.budget,
            actions=len(done),
            expands=sum(a.kind == "expand" for a in done),
            collapses=sum(a.kind == "collapse" for a in done),
            swap_rate=self.trace.last_swap_rate,
            ms_lensnet=1e3 * timer.get("lensnet", 0.0),
            ms_allocator=1e3 * (total - timer.get("lensnet", 0.0) - timer.get("assemble", 0.0)),
            ms_assemble=1e3 * timer.get("assemble", 0.0),
        )
        self.telemetry.append(rec)
        if self.on_block is not None:
            self.on_block(rec)
        return done

    # ----------------------------------------------------------------- decode
    @torch.no_grad()
    def next_logits(self) -> torch.Tensor:
        """Logits [V] for the token after the history.

        The KV cache is kept up to the first entry that differs from the window it was built
        on (a refocus edit, a forced collapse; none for tokens appended since), and only the
        entries from there on (at least the last) go through the base.
        """
        if self.wc is None:
            raise MegaContextError("the session is empty: ingest some text first")
        entries = self.wc.entries
        t0 = time.perf_counter()
        keep = self._reuse_cache(entries)
        embeds, position_ids = self._window_from(keep)
        cache, self._cache = self._cache, _Cache()  # a forward that fails leaves no half-updated cache
        out = self.base.forward(
            embeds[None], position_ids[None], past_key_values=cache.past, use_cache=True, last_only=True
        )
        cache.past = out.cache
        cache.entries[keep:] = entries[keep:]
        self._cache = cache
        self.base_forward_ms.append(1e3 * (time.perf_counter() - t0))
        self.base_forward_entries.append(len(entries) - keep)
        self._last_logits = out.logits[0, -1].float()
        return self._last_logits

    def _reuse_cache(self, entries: list[Entry]) -> int:
        """How many leading ``entries`` [W] the KV cache still holds (at most W - 1: the last
        entry's logits are needed); the cache is cut back to them. 0: build a new one."""
        cache = self._cache
        keep = min(first_change(cache.entries, entries), len(entries) - 1)
        if cache.past is None or keep <= 0 or (keep < len(cache.entries) and not crop_cache(cache.past, keep)):
            self._cache = _Cache()
            return 0
        del cache.entries[keep:]
        return keep

    def _window_from(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds [n, d], position_ids [n]) of the window's entries ``start..W-1``.

        Raw tokens (every decode step between refocuses) are embedded alone, at position
        ``start + i`` (compact) or their token index (absolute); with a gist among them the
        window is assembled and sliced.
        """
        rest = self.wc.entries[start:]
        dev = self.base.device
        if all(level == 0 for level, _ in rest):
            tokens = torch.tensor([index for _, index in rest], dtype=torch.long)
            if self.focus.position_mode == "absolute":
                return self.source.token_embeddings(tokens), tokens.to(dev)
            return self.source.token_embeddings(tokens), torch.arange(start, start + len(rest), device=dev)
        window = self.assemble()
        return window.embeds[start:], window.position_ids[start:].to(dev)

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        stop_ids: Iterable[int] = (),
    ) -> list[int]:
        """Ingest the prompt, then decode greedily (temperature 0) or by sampling."""
        return list(self.stream(prompt_ids, max_new_tokens, temperature, stop_ids))

    def stream(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        stop_ids: Iterable[int] = (),
    ) -> Iterator[int]:
        """:meth:`generate` one token at a time. The checks and the prompt's ingest happen
        at the call (MegaContextError before any change); each token is decoded, and
        appended to the history, when the iterator is advanced. A stop id ends it after
        that token."""
        check_sampling(max_new_tokens, temperature)
        prompt = self._checked_ids(prompt_ids)
        self.check_room(len(prompt) + max_new_tokens)  # covers every token appended below
        with torch.no_grad():
            self._append(prompt)
        return self._decode(max_new_tokens, temperature, frozenset(stop_ids))

    @torch.no_grad()
    def _decode(self, max_new_tokens: int, temperature: float, stop: frozenset[int]) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed)
        for _ in range(max_new_tokens):
            logits = self.next_logits()
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1).cpu()
                tok = int(torch.multinomial(probs, 1, generator=gen))
            else:
                tok = int(torch.argmax(logits))
            self._append(np.array([tok], dtype=np.int64))  # the base's own token: in its vocabulary
            yield tok
            if tok in stop:
                return

    # ---------------------------------------------------------------- summary
    def window_summary(self) -> dict:
        """cost, budget, entries_per_level, covered_tokens, history_tokens, refocuses, actions."""
        if self.wc is None:
            levels = {str(k): 0 for k in range(self.levels + 1)}
            return {"cost": 0, "budget": self.focus.budget, "entries_per_level": levels,
                    "covered_tokens": 0, "history_tokens": 0, "refocuses": 0, "actions": 0}
        s = self.wc.summary()
        return {
            "cost": s["cost"],
            "budget": s["budget"],
            "entries_per_level": s["entries_per_level"],
            "covered_tokens": s["covered_tokens"],
            "history_tokens": s["history_tokens"],
            "refocuses": len(self.telemetry),
            "actions": sum(len(a) for a in self.trace.actions) + len(self.forced),
        }

    # ------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike | None = None) -> None:
        """Commit the tree's deferred tokens, then write the focus state next to it.

        Atomic and checksummed: a crash leaves the previous ``session.json``, which never
        describes more history than is committed.
        """
        folder = Path(path) if path is not None else self.tree.path
        if folder is None:
            raise MegaContextError("a RAM session has no folder: pass a path to save()")
        self.tree.flush()
        state = {
            "budget": self.focus.budget,
            "wc": self.wc.to_dict() if self.wc is not None else None,
            "refocuses": len(self.telemetry),
        }
        replace_file(Path(folder) / SESSION_FILE, json.dumps(with_checksum(state)))

    def restore_focus(self) -> None:
        """Reload a saved working context when it matches the tree and budget.

        A state saved before the history's last tokens (a ``generate`` killed after it
        appended some, before it saved) is extended over them, as ingesting them would have.
        A damaged file (unreadable, failing its checksum, or inconsistent) is reported with
        a :class:`SessionWarning` and left for the next :meth:`save` to replace; the session
        keeps its fresh initial window over the history.
        """
        folder = self.tree.path
        f = Path(folder) / SESSION_FILE if folder is not None else None
        if f is None or not f.exists():
            return
        try:
            state = json.loads(f.read_text(encoding="utf-8"))
            if not checksum_ok(state):
                raise ValueError("it fails its checksum")
            wc_state = state.get("wc")
            wc = WorkingContext.from_dict(wc_state) if wc_state and state.get("budget") == self.focus.budget else None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, MegaContextError) as e:
            warnings.warn(
                f"{f} is damaged ({e}); starting from a fresh window over the {self.num_tokens} tokens "
                "of history (the history itself is intact)",
                SessionWarning,
                stacklevel=2,
            )
            return
        if wc is not None and wc.num_tokens <= self.num_tokens and wc.levels <= self.levels:
            wc.grow(self.levels)  # levels the tree grew after the last save
            self.forced.extend(wc.extend(self.num_tokens))  # tokens committed after the last save
            self.wc = wc
            self._cache = _Cache()


def open_or_create_tree(cfg: Config, modules: Modules, path: Path, create: bool) -> MegaContextTree:
    """Open a disk tree for writing, checked against this base (model, tokenizer, dim,
    vocabulary) before anything is written; create it if asked. The tree holds its
    writer lock until closed."""
    base, gister = modules.base, modules.gister()
    tok_hash = tokenizer_hash(base.tokenizer)[:16]  # the short form trees store
    if not create or (path / METADATA_FILE).exists():  # (what a killed create leaves is created over)
        with MegaContextTree.open(path, expect_model=base.name, expect_tokenizer=tok_hash) as reader:
            _check_tree(cfg, reader, base.vocab_size)  # read-only, before a new gister's refresh reads every id
        return MegaContextTree.open(path, gister, expect_model=base.name, expect_tokenizer=tok_hash)
    return MegaContextTree.create_disk(
        path,
        cfg.tree.block_size,
        cfg.tree.levels,
        base.dim,
        gister,
        model_name=base.name,
        tokenizer_hash=tok_hash,
        gist_dtype=cfg.tree.gist_dtype,
    )


def _check_tree(cfg: Config, tree: MegaContextTree, vocab: int) -> None:
    """MegaContextError when the tree's block size differs from the config or a stored token id
    is out of range (its levels may be any: ``tree.levels`` is what a new tree starts with)."""
    if tree.block_size != cfg.tree.block_size:
        raise MegaContextError(
            f"tree {tree.path} has block size {tree.block_size} but the config says "
            f"tree.block_size={cfg.tree.block_size}: use the config it was made with"
        )
    bad = tree.first_token_outside(vocab)
    if bad is not None:
        raise TreeError(
            f"tree {tree.path} is damaged: the token id at offset {bad} of LOD0.ctx is "
            f"{int(tree.tokens(bad, bad + 1)[0])}, outside the base's vocabulary [0, {vocab}) (nothing was changed)"
        )
