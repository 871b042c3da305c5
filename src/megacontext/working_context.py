"""The working context (spec §3.4): a fixed-budget tiling of the history by tree nodes.

An entry ``(level, index)`` is one node of the MegaContext tree: it covers tokens
``[index * K**level, (index + 1) * K**level)``. A working context is a list of entries
that TILES the history ``[0, num_tokens)`` exactly (contiguous, non-overlapping, in
time order); every gist entry is a complete node; every token at or after
:attr:`WorkingContext.tail_start` is a raw (LOD0) entry; and the cost (one unit per
entry, whatever its level) never exceeds the budget.

The only edits are :meth:`WorkingContext.expand` (a gist -> all K of its children) and
:meth:`WorkingContext.collapse` (K sibling entries -> their parent). Both are checked by
``can_expand`` / ``can_collapse`` first, so an illegal edit raises instead of happening.
Forced collapses (oldest first) keep the budget when new tokens arrive
(:meth:`WorkingContext.extend`).

Refocus bookkeeping lives here too, so a saved session resumes exactly:
``step`` (refocuses so far), ``born[p]`` (the step at which entry ``p`` took its current
form; residency = step - born) and the last action taken on each recently edited node
(for the allocator's cooldown). An action is recorded against the PARENT node of the
edit: expanding node P and collapsing children back into P are opposite actions on P.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from itertools import chain
from typing import Any, Literal, Protocol

import numpy as np
import torch

from megacontext.errors import MegaContextError

Entry = tuple[int, int]  # (level, index)
ActionKind = Literal["expand", "collapse", "forced_collapse"]
PositionMode = Literal["compact", "absolute"]


@dataclass(frozen=True)
class Action:
    """One edit of a working context (allocator trace record, spec §5).

    ``level, index``: the node expanded, or the parent node created by a collapse.
    ``score``: the LensNet score behind it (a collapse: the mean over its K children);
    nan for a forced collapse. ``cost_before/after``: window cost around the edit.
    ``residency``: refocuses the replaced entries had held their level — for a collapse
    the MEAN over the K children.
    """

    step: int
    kind: ActionKind
    level: int
    index: int
    score: float
    cost_before: int
    cost_after: int
    residency: float

    @property
    def node(self) -> Entry:
        return (self.level, self.index)


def minimum_cost(num_tokens: int, block_size: int, levels: int, tail_blocks: int) -> int:
    """Cost of the cheapest legal tiling: coarsest complete nodes, then the raw tail."""
    tail = tail_start_of(num_tokens, block_size, tail_blocks)
    cost, rest = num_tokens - tail, tail
    for level in range(levels, 0, -1):
        cost += rest // block_size**level
        rest %= block_size**level
    return cost


def fitting_levels(num_tokens: int, block_size: int, levels: int, tail_blocks: int, budget: int) -> int:
    """The fewest levels >= ``levels`` whose cheapest tiling fits ``budget`` (none: the most that help)."""
    tail = tail_start_of(num_tokens, block_size, tail_blocks)
    while minimum_cost(num_tokens, block_size, levels, tail_blocks) > budget and block_size ** (levels + 1) <= tail:
        levels += 1
    return levels


def tail_start_of(num_tokens: int, block_size: int, tail_blocks: int) -> int:
    """First token of the raw tail: the unfinished block plus ``tail_blocks`` full blocks."""
    return max(0, num_tokens // block_size - tail_blocks) * block_size


def coarse_tiling(end: int, block_size: int, levels: int) -> list[Entry]:
    """Coarsest tiling of ``[0, end)`` by gist nodes (``end`` a multiple of ``block_size``)."""
    out: list[Entry] = []
    start = 0
    for level in range(levels, 0, -1):
        width = block_size**level
        n = (end - start) // width
        first = start // width
        out.extend((level, first + j) for j in range(n))
        start += n * width
    return out


def collapsible_groups(arr: np.ndarray, block_size: int, levels: int, tail_start: int) -> np.ndarray:
    """int64 [G]: start positions of legal collapse groups in a valid tiling ``arr`` [W, 2].

    In a valid tiling, K entries whose first is ``(k, i)`` with ``i % K == 0`` and whose
    last is ``(k, i + K - 1)`` span exactly the parent, hence are its K children.
    """
    K = block_size
    if len(arr) < K:
        return np.zeros(0, dtype=np.int64)
    first, last = arr[: len(arr) - K + 1], arr[K - 1 :]
    level, index = first[:, 0], first[:, 1]
    parent_end = (index // K + 1) * K ** (level + 1)
    ok = (
        (level < levels)
        & (index % K == 0)
        & (last[:, 0] == level)
        & (last[:, 1] == index + K - 1)
        & (parent_end <= tail_start)
    )
    return np.flatnonzero(ok).astype(np.int64)


class WorkingContext:
    """Entries tiling the history within a budget; see the module docstring.

    ``headroom`` (default: one block) is the cost the allocator and the initial assembly
    leave free below ``budget`` so that a block of new tokens fits before the next refocus.
    """

    def __init__(
        self,
        block_size: int,
        levels: int,
        budget: int,
        tail_blocks: int,
        headroom: int | None = None,
    ) -> None:
        headroom = block_size if headroom is None else headroom
        if block_size < 2 or levels < 1 or tail_blocks < 0:
            raise MegaContextError(
                f"working context needs block_size >= 2, levels >= 1, tail_blocks >= 0; "
                f"got {block_size}, {levels}, {tail_blocks}"
            )
        if budget < 1 or not 0 <= headroom < budget:
            raise MegaContextError(f"working context needs 0 <= headroom ({headroom}) < budget ({budget})")
        self.block_size = block_size
        self.levels = levels
        self.budget = budget
        self.tail_blocks = tail_blocks
        self.headroom = headroom
        self.num_tokens = 0
        self.step = 0
        self.entries: list[Entry] = []
        self.born: list[int] = []  # born[p]: step at which entries[p] took its current form
        self._last: dict[Entry, tuple[str, int]] = {}  # parent node -> ("expand"|"collapse", step)

    # ------------------------------------------------------------------ basics
    @property
    def cost(self) -> int:
        return len(self.entries)

    @property
    def tail_start(self) -> int:
        return tail_start_of(self.num_tokens, self.block_size, self.tail_blocks)

    def span(self, entry: Entry) -> tuple[int, int]:
        """Token span ``[start, end)`` of a node."""
        width = self.block_size ** entry[0]
        return entry[1] * width, (entry[1] + 1) * width

    def position_of(self, node: Entry) -> int | None:
        """Position of ``node`` in the entries, or None if it is not an entry (O(log W))."""
        start = self.span(node)[0]
        pos = bisect.bisect_left(self.entries, start, key=lambda e: e[1] * self.block_size ** e[0])
        if pos < len(self.entries) and self.entries[pos] == node:
            return pos
        return None

    def last_action(self, node: Entry) -> tuple[str, int] | None:
        """("expand" | "collapse", step) of the latest edit on parent node ``node``, if recent."""
        return self._last.get(node)

    def recent_actions(self) -> dict[Entry, tuple[str, int]]:
        return dict(self._last)

    def next_step(self, cooldown: int) -> int:
        """Start a refocus: advance ``step``; forget actions that can no longer block one.

        An action taken at step s blocks the opposite action while ``step - s <= cooldown``.
        """
        self.step += 1
        self._last = {n: a for n, a in self._last.items() if self.step - a[1] <= cooldown}
        return self.step

    def grow(self, levels: int) -> None:
        """The tree grew: entries may now be (and collapse up to) ``levels`` levels; none changes."""
        self.levels = max(self.levels, levels)

    def copy(self) -> WorkingContext:
        """Independent copy (e.g. to try counterfactual edits)."""
        out = WorkingContext(self.block_size, self.levels, self.budget, self.tail_blocks, self.headroom)
        out.num_tokens, out.step = self.num_tokens, self.step
        out.entries, out.born, out._last = list(self.entries), list(self.born), dict(self._last)
        return out

    # ------------------------------------------------------------- construction
    @classmethod
    def initial(
        cls,
        num_tokens: int,
        block_size: int,
        levels: int,
        budget: int,
        tail_blocks: int,
        headroom: int | None = None,
    ) -> WorkingContext:
        """Initial assembly: coarse for old spans, finest for recent ones.

        Starts from the cheapest legal tiling, then repeatedly expands the newest gist
        entry while the cost after expanding stays ``<= budget - headroom``.
        Raises MegaContextError when even the cheapest tiling exceeds the budget.
        """
        wc = cls(block_size, levels, budget, tail_blocks, headroom)
        if num_tokens < 0:
            raise MegaContextError(f"num_tokens must be >= 0, got {num_tokens}")
        need = minimum_cost(num_tokens, block_size, levels, tail_blocks)
        if need > budget:
            raise MegaContextError(_too_long(num_tokens, block_size, levels, tail_blocks, need, budget))
        wc.num_tokens = num_tokens
        tail = wc.tail_start
        wc.entries = coarse_tiling(tail, block_size, levels) + [(0, t) for t in range(tail, num_tokens)]
        wc._refine_newest_first()
        wc.born = [0] * len(wc.entries)
        return wc

    def _refine_newest_first(self) -> None:
        """Expand the newest gist entry while it fits in ``budget - headroom``."""
        K, cap = self.block_size, self.budget - self.headroom
        entries = self.entries
        pos = len(entries) - 1
        while pos >= 0 and entries[pos][0] == 0:
            pos -= 1
        # Invariant: every entry after `pos` is LOD0 and every entry before it is a gist.
        while pos >= 0 and len(entries) + K - 1 <= cap:
            level, index = entries[pos]
            entries[pos : pos + 1] = [(level - 1, index * K + j) for j in range(K)]
            pos = pos + K - 1 if level > 1 else pos - 1

    # ------------------------------------------------------------------- growth
    def extend(self, num_tokens: int) -> list[Action]:
        """The history grew to ``num_tokens`` (the new TOTAL): append raw entries.

        If the cost then exceeds the budget, the oldest collapsible sibling groups (any
        level, oldest first, cascading) are collapsed until it fits: "forced_collapse"
        actions at the current step. O(W + new tokens). Raises MegaContextError (state
        unchanged) when no legal tiling fits the budget.
        """
        old = self.num_tokens
        if num_tokens < old:
            raise MegaContextError(f"extend: history cannot shrink ({old} -> {num_tokens} tokens)")
        new = num_tokens - old
        if len(self.entries) + new <= self.budget:
            self.entries.extend((0, t) for t in range(old, num_tokens))
            self.born.extend([self.step] * new)
            self.num_tokens = num_tokens
            return []
        K, L, tail_blocks = self.block_size, self.levels, self.tail_blocks
        need = minimum_cost(num_tokens, K, L, tail_blocks)
        if need > self.budget:
            raise MegaContextError(_too_long(num_tokens, K, L, tail_blocks, need, self.budget))
        entries = self.entries + [(0, t) for t in range(old, num_tokens)]
        born = self.born + [self.step] * new
        self.entries, self.born, actions = self._collapse_oldest(
            entries, born, tail_start_of(num_tokens, K, tail_blocks)
        )
        self.num_tokens = num_tokens
        for a in actions:  # undoing a recent expand starts a cooldown (no thrash); plain growth does not
            if self._last.get(a.node, ("",))[0] == "expand":
                self._last[a.node] = ("collapse", a.step)
            else:
                self._last.pop(a.node, None)
        return actions

    def _collapse_oldest(
        self, entries: list[Entry], born: list[int], tail: int
    ) -> tuple[list[Entry], list[int], list[Action]]:
        """Stack scan: collapse each group as soon as its last member is pushed.

        Any group completed at the top of the stack is the oldest collapsible group of the
        whole list (groups are disjoint, and no complete group is left inside the stack),
        so this equals "repeatedly collapse the oldest group" in one O(W) pass.
        """
        K, L, step = self.block_size, self.levels, self.step
        out_e: list[Entry] = []
        out_b: list[int] = []
        actions: list[Action] = []
        cost = len(entries)
        for j, (entry, b) in enumerate(zip(entries, born)):
            out_e.append(entry)
            out_b.append(b)
            while cost > self.budget and len(out_e) >= K:
                level, last = out_e[-1]
                if level >= L or last % K != K - 1 or out_e[-K] != (level, last - K + 1):
                    break
                parent = (level + 1, last // K)
                # The scan never reaches the tail while over budget: the pre-tail part would
                # then be maximally coarse, i.e. cost == minimum_cost <= budget.
                assert self.span(parent)[1] <= tail, "forced collapse reached the raw tail"
                residency = step - sum(out_b[-K:]) / K
                del out_e[-K:], out_b[-K:]
                out_e.append(parent)
                out_b.append(step)
                actions.append(
                    Action(step, "forced_collapse", parent[0], parent[1], math.nan, cost, cost - K + 1, residency)
                )
                cost -= K - 1
            if cost <= self.budget:
                out_e.extend(entries[j + 1 :])
                out_b.extend(born[j + 1 :])
                break
        assert cost <= self.budget, "minimum_cost promised a fitting tiling"
        return out_e, out_b, actions

    # -------------------------------------------------------------------- edits
    def can_expand(self, pos: int) -> bool:
        """Entry ``pos`` is a gist and its K children fit in the budget."""
        return 0 <= pos < len(self.entries) and self.entries[pos][0] >= 1 and (
            len(self.entries) + self.block_size - 1 <= self.budget
        )

    def can_collapse(self, pos: int) -> bool:
        """Entries ``pos .. pos+K-1`` are the K children of one complete parent before the tail."""
        K = self.block_size
        if pos < 0 or pos + K > len(self.entries):
            return False
        level, first = self.entries[pos]
        if level >= self.levels or first % K != 0:
            return False
        if any(self.entries[pos + j] != (level, first + j) for j in range(1, K)):
            return False
        return self.span((level + 1, first // K))[1] <= self.tail_start

    def expand(self, pos: int, score: float = math.nan) -> Action:
        """Replace gist entry ``pos`` by all K of its children (cost + K - 1)."""
        if not self.can_expand(pos):
            raise ValueError(f"illegal expand at position {pos}: {self._describe(pos)}")
        K = self.block_size
        level, index = self.entries[pos]
        before = len(self.entries)
        residency = float(self.step - self.born[pos])
        self.entries[pos : pos + 1] = [(level - 1, index * K + j) for j in range(K)]
        self.born[pos : pos + 1] = [self.step] * K
        self._last[(level, index)] = ("expand", self.step)
        return Action(self.step, "expand", level, index, float(score), before, before + K - 1, residency)

    def collapse(self, pos: int, score: float = math.nan) -> Action:
        """Replace the K sibling entries starting at ``pos`` by their parent (cost - (K - 1))."""
        if not self.can_collapse(pos):
            raise ValueError(f"illegal collapse at position {pos}: {self._describe(pos)}")
        K = self.block_size
        level, first = self.entries[pos]
        parent = (level + 1, first // K)
        before = len(self.entries)
        residency = self.step - sum(self.born[pos : pos + K]) / K
        self.entries[pos : pos + K] = [parent]
        self.born[pos : pos + K] = [self.step]
        self._last[parent] = ("collapse", self.step)
        return Action(self.step, "collapse", parent[0], parent[1], float(score), before, before - K + 1, residency)

    def _describe(self, pos: int) -> str:
        if not 0 <= pos < len(self.entries):
            return f"out of range (W={len(self.entries)})"
        group = self.entries[pos : pos + self.block_size]
        return (
            f"entries {group[:3]}{'...' if len(group) > 3 else ''} (levels={self.levels}, "
            f"tail_start={self.tail_start}, cost={self.cost}, budget={self.budget})"
        )

    # ------------------------------------------------------------------- arrays
    def as_array(self) -> np.ndarray:
        """int64 [W, 2]: (level, index) per entry."""
        W = len(self.entries)
        flat = np.fromiter(chain.from_iterable(self.entries), dtype=np.int64, count=2 * W)
        return flat.reshape(W, 2)

    def levels_array(self) -> np.ndarray:
        """int64 [W]."""
        return self.as_array()[:, 0].copy()

    def spans(self) -> tuple[np.ndarray, np.ndarray]:
        """(starts int64 [W], ends int64 [W]): token span of each entry."""
        arr = self.as_array()
        width = self.block_size ** arr[:, 0]
        starts = arr[:, 1] * width
        return starts, starts + width

    def collapsible_positions(self) -> np.ndarray:
        """int64 [G]: every ``pos`` with ``can_collapse(pos)``, vectorised (O(W))."""
        return collapsible_groups(self.as_array(), self.block_size, self.levels, self.tail_start)

    # --------------------------------------------------------------- inspection
    def check_invariants(self) -> None:
        """Raise AssertionError naming the first broken invariant."""
        L = self.levels
        W, tail = len(self.entries), self.tail_start
        assert len(self.born) == W, f"born has {len(self.born)} items for {W} entries"
        assert W <= self.budget, f"cost {W} exceeds budget {self.budget}"
        cursor = 0
        for pos, (level, index) in enumerate(self.entries):
            assert 0 <= level <= L and index >= 0, f"entry {pos} = {(level, index)} is not a node"
            start, end = self.span((level, index))
            assert start == cursor, f"entry {pos} = {(level, index)} starts at {start}, expected {cursor}"
            assert end <= self.num_tokens, f"entry {pos} = {(level, index)} is incomplete ({end} > {self.num_tokens})"
            assert level == 0 or end <= tail, f"gist entry {pos} = {(level, index)} reaches the raw tail ({tail})"
            assert 0 <= self.born[pos] <= self.step, f"born[{pos}] = {self.born[pos]} not in [0, {self.step}]"
            cursor = end
        assert cursor == self.num_tokens, f"entries cover [0, {cursor}), history has {self.num_tokens} tokens"

    def summary(self) -> dict[str, Any]:
        counts = np.bincount(self.levels_array(), minlength=self.levels + 1)
        starts, ends = self.spans()
        return {
            "cost": self.cost,
            "budget": self.budget,
            "entries_per_level": {str(k): int(counts[k]) for k in range(self.levels + 1)},
            "covered_tokens": int((ends - starts).sum()),
            "history_tokens": self.num_tokens,
            "tail_start": self.tail_start,
        }

    # -------------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (entries, bookkeeping, settings)."""
        return {
            "block_size": self.block_size,
            "levels": self.levels,
            "budget": self.budget,
            "tail_blocks": self.tail_blocks,
            "headroom": self.headroom,
            "num_tokens": self.num_tokens,
            "step": self.step,
            "entries": [list(e) for e in self.entries],
            "born": list(self.born),
            "last_actions": [[n[0], n[1], kind, s] for n, (kind, s) in self._last.items()],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkingContext:
        """Inverse of :meth:`to_dict`; raises MegaContextError if the state is inconsistent."""
        wc = cls(d["block_size"], d["levels"], d["budget"], d["tail_blocks"], d["headroom"])
        wc.num_tokens = int(d["num_tokens"])
        wc.step = int(d["step"])
        wc.entries = [(int(k), int(i)) for k, i in d["entries"]]
        wc.born = [int(b) for b in d["born"]]
        wc._last = {(int(k), int(i)): (str(kind), int(s)) for k, i, kind, s in d["last_actions"]}
        try:
            wc.check_invariants()
        except AssertionError as e:
            raise MegaContextError(f"saved working context is inconsistent: {e}") from None
        return wc


def _too_long(num_tokens: int, block_size: int, levels: int, tail_blocks: int, need: int, budget: int) -> str:
    more = fitting_levels(num_tokens, block_size, levels, tail_blocks, budget)  # what a session grows to itself
    fits = f" or tree.levels to {more}" if minimum_cost(num_tokens, block_size, more, tail_blocks) <= budget else ""
    return (f"a history of {num_tokens} tokens with {levels} gist level(s) (block size {block_size}, tail_blocks "
            f"{tail_blocks}) needs a working-context budget of at least {need}, got {budget}: raise focus.budget{fits}")


# ---------------------------------------------------------------------- assembly
class EntrySource(Protocol):
    """Where entry vectors come from (the tree + base embeddings, or a training batch)."""

    def token_embeddings(self, positions: torch.Tensor) -> torch.Tensor:
        """positions LongTensor [n] (token indices in the history) -> [n, d]."""
        ...

    def gist_vectors(self, level: int, indices: torch.Tensor) -> torch.Tensor:
        """indices LongTensor [n] of nodes at ``level`` >= 1 -> [n, d]."""
        ...


@dataclass
class Assembled:
    """A working context ready for the base model and LensNet (all tensors on embeds' device)."""

    embeds: torch.Tensor  # [W, d]
    position_ids: torch.Tensor  # long [W]
    levels: torch.Tensor  # long [W]
    starts: torch.Tensor  # long [W], first token of each entry's span
    ends: torch.Tensor  # long [W], one past the last token
    distance: torch.Tensor  # long [W], num_tokens - end
    next_position: int  # position id of the token after the window


def assemble(wc: WorkingContext, source: EntrySource, position_mode: PositionMode = "compact") -> Assembled:
    """Gather entry vectors (one source call per level present, order preserved).

    ``compact``: position ids 0..W-1, next W. ``absolute``: LOD0 at its token index, a gist
    at the centre of its span ``(start + end - 1) // 2``, next ``num_tokens``.
    Differentiable w.r.t. whatever ``source`` returns.
    """
    if position_mode not in ("compact", "absolute"):
        raise MegaContextError(f"position_mode must be 'compact' or 'absolute', got {position_mode!r}")
    arr = wc.as_array()
    W = len(arr)
    level, index = arr[:, 0], arr[:, 1]
    parts: list[torch.Tensor] = []
    order: list[np.ndarray] = []
    for k in np.unique(level).tolist():
        sel = np.flatnonzero(level == k)
        ids = torch.from_numpy(index[sel])
        vec = source.token_embeddings(ids) if k == 0 else source.gist_vectors(k, ids)
        if vec.ndim != 2 or vec.shape[0] != len(sel):
            raise ValueError(f"source returned {tuple(vec.shape)} for {len(sel)} level-{k} entries")
        parts.append(vec)
        order.append(sel)
    if W == 0:
        embeds = source.token_embeddings(torch.zeros(0, dtype=torch.long))
    elif len(parts) == 1:
        embeds = parts[0]
    else:  # one scatter per level into the window (a single W x d copy; autograd-safe)
        dtype = parts[0].dtype
        for vec in parts[1:]:
            dtype = torch.promote_types(dtype, vec.dtype)
        embeds = parts[0].new_empty((W, parts[0].shape[1]), dtype=dtype)
        for sel, vec in zip(order, parts):
            embeds[torch.from_numpy(sel).to(embeds.device)] = vec.to(dtype)
    starts, ends = wc.spans()
    if position_mode == "compact":
        pos, nxt = np.arange(W, dtype=np.int64), W
    else:
        pos, nxt = (starts + ends - 1) // 2, wc.num_tokens
    dev = embeds.device

    def t(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64)).to(dev)

    return Assembled(
        embeds=embeds,
        position_ids=t(pos),
        levels=t(level),
        starts=t(starts),
        ends=t(ends),
        distance=t(wc.num_tokens - ends),
        next_position=nxt,
    )
