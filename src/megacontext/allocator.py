"""The focus allocator (spec §3.6): LensNet scores -> a few legal, budgeted edits.

One :meth:`FocusAllocator.refocus` pass:

1. Expand candidates: gist entries with score > ``tau_expand``. Collapse candidates:
   legal sibling groups (outside the raw tail) whose MEAN score < ``-tau_collapse``.
   Nodes in cooldown are excluded (an action on parent node P at step s blocks the
   opposite action on P while ``step - s <= cooldown``). Forced collapses (budget
   overflow in ``WorkingContext.extend``) ignore cooldown; one that undoes a recent
   expand starts one (the allocator will not re-expand that parent within ``cooldown``
   refocuses), one that only folds newly arrived text does not.
2. Greedy: expands by score descending, collapses by mean score ascending (ties: older
   first). Stochastic: among the ``top_k`` of each list, an order sampled without
   replacement with probabilities ``softmax(|score| / temperature)`` (Gumbel top-k).
3. Up to ``n_diff`` actions, alternating expand / collapse, never growing the cost past
   ``budget - headroom``: an expand that does not fit first triggers pending collapses
   (skipping groups that contain the node to expand). With ``pay_for_expands``, when
   those run out it is paid for by collapsing further legal groups, lowest mean score
   first (ties: older first), as long as a group's mean is below the expand's score by
   more than ``pay_margin`` (a strong expand displaces what matters least; a weak one
   displaces nothing). If it still does not fit it is skipped. Every candidate
   is re-located by node identity before it is applied.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from megacontext.config import FocusConfig
from megacontext.working_context import Action, Entry, WorkingContext, collapsible_groups

__all__ = ["Action", "FocusAllocator"]

Candidate = tuple[Entry, float]  # (node to expand | parent to collapse into, score)


class _Queue:
    """Candidates consumed lazily in priority order; held items can be put back in front."""

    def __init__(self, items: Iterable[Candidate]) -> None:
        self._items = iter(items)
        self._front: list[Candidate] = []
        self._ended = False

    @property
    def exhausted(self) -> bool:
        return self._ended and not self._front

    def pop(self) -> Candidate | None:
        if self._front:
            return self._front.pop()
        item = next(self._items, None)
        self._ended = item is None
        return item

    def push_front(self, items: list[Candidate]) -> None:
        self._front.extend(reversed(items))


class FocusAllocator:
    """Greedy (or stochastic) discrete focus edits; see the module docstring.

    ``block_size``, when given, must match every WorkingContext refocused (a sanity
    check); the headroom is the WorkingContext's own. ``rng`` drives the stochastic
    variant (default: seed 0, so runs are reproducible).
    """

    def __init__(
        self,
        cfg: FocusConfig,
        block_size: int | None = None,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.cfg = cfg
        self.block_size = block_size
        self.rng = rng if rng is not None else np.random.default_rng(0)

    # ------------------------------------------------------------------ public
    def refocus(self, wc: WorkingContext, scores: Any) -> list[Action]:
        """One pass on ``scores`` (float [W], one per entry); increments ``wc.step``."""
        if self.block_size is not None and self.block_size != wc.block_size:
            raise ValueError(f"allocator block_size {self.block_size} != working context's {wc.block_size}")
        s = _as_scores(scores, wc.cost)
        wc.next_step(self.cfg.cooldown)
        arr = wc.as_array()  # [W, 2] snapshot: candidates are nodes, re-located when applied
        expands = self._expand_candidates(wc, arr, s)
        groups, means = self._legal_groups(wc, arr, s)
        collapses = self._collapse_candidates(wc, arr, groups, means, threshold=-self.cfg.tau_collapse)
        payments = self._collapse_candidates(wc, arr, groups, means, None) if self.cfg.pay_for_expands else iter(())
        return self._apply(wc, expands, _Queue(collapses), _Queue(payments))

    def refocus_passes(
        self,
        wc: WorkingContext,
        score_fn: Callable[[WorkingContext], Any],
        passes: int | None = None,
    ) -> list[Action]:
        """Up to ``passes`` (default ``cfg.passes``) refocus passes, re-scoring before each;
        stops early after a pass that takes no action."""
        done: list[Action] = []
        for _ in range(self.cfg.passes if passes is None else passes):
            acts = self.refocus(wc, score_fn(wc))
            done.extend(acts)
            if not acts:
                break
        return done

    # -------------------------------------------------------------- candidates
    def _blocked_positions(self, wc: WorkingContext, kind: str) -> list[int]:
        """Positions blocked by cooldown: after a collapse into P, expanding P (entry P);
        after expanding P, collapsing back into P (group starting at P's first child)."""
        K, out = wc.block_size, []
        for (level, index), (last, _) in wc.recent_actions().items():
            if last == "collapse" and kind == "expand":
                pos = wc.position_of((level, index))
            elif last == "expand" and kind == "collapse":
                pos = wc.position_of((level - 1, index * K))
            else:
                continue
            if pos is not None:
                out.append(pos)
        return out

    def _expand_candidates(self, wc: WorkingContext, arr: np.ndarray, scores: np.ndarray) -> Iterator[Candidate]:
        ok = (arr[:, 0] >= 1) & (scores > self.cfg.tau_expand)
        ok[self._blocked_positions(wc, "expand")] = False
        pos = np.flatnonzero(ok)
        pos = self._order(pos, scores[pos], descending=True)
        return (((int(arr[p, 0]), int(arr[p, 1])), float(scores[p])) for p in pos)

    def _legal_groups(self, wc: WorkingContext, arr: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start positions [G], mean scores [G]) of the legal sibling groups not in cooldown."""
        K = wc.block_size
        groups = collapsible_groups(arr, K, wc.levels, wc.tail_start)
        means = sliding_window_view(scores, K)[groups].mean(axis=1) if len(groups) else np.zeros(0)
        ok = ~np.isin(groups, self._blocked_positions(wc, "collapse"))
        return groups[ok], means[ok]

    def _collapse_candidates(
        self, wc: WorkingContext, arr: np.ndarray, groups: np.ndarray, means: np.ndarray, threshold: float | None
    ) -> Iterator[Candidate]:
        """The groups with mean score < ``threshold`` in allocator order; ``threshold=None``:
        every group, lowest mean first (the payments, always greedy)."""
        K = wc.block_size
        if threshold is None:
            order = np.argsort(means, kind="stable")
        else:
            ok = means < threshold
            groups, means = groups[ok], means[ok]
            order = self._order(np.arange(len(groups)), means, descending=False)
        return (((int(arr[groups[g], 0]) + 1, int(arr[groups[g], 1]) // K), float(means[g])) for g in order)

    def _order(self, items: np.ndarray, keys: np.ndarray, descending: bool) -> np.ndarray:
        """Greedy: items sorted by key (stable). Stochastic: a sampled order of the top_k."""
        order = np.argsort(-keys if descending else keys, kind="stable")
        if not self.cfg.stochastic:
            return items[order]
        top = order[: self.cfg.top_k]
        gumbel = self.rng.gumbel(size=len(top))
        sampled = np.argsort(-(np.abs(keys[top]) / self.cfg.temperature + gumbel), kind="stable")
        return items[top[sampled]]

    # ------------------------------------------------------------------ apply
    def _apply(
        self, wc: WorkingContext, expands: Iterator[Candidate], collapses: _Queue, payments: _Queue
    ) -> list[Action]:
        n_diff = self.cfg.n_diff
        actions: list[Action] = []
        expand_turn, expands_left, collapses_left = True, True, True
        while len(actions) < n_diff and (expands_left or collapses_left):
            if expand_turn and expands_left:
                cand = next(expands, None)
                if cand is None:
                    expands_left = False
                elif wc.position_of(cand[0]) is not None:
                    expands_left = self._expand_with_room(wc, cand, collapses, payments, actions)
                    expand_turn = False
            elif not expand_turn and collapses_left:
                act = self._next_collapse(wc, collapses, keep=None)
                if act is None:
                    collapses_left = False
                else:
                    actions.append(act)
                expand_turn = True
            else:
                expand_turn = not expand_turn
        return actions

    def _expand_with_room(
        self, wc: WorkingContext, cand: Candidate, collapses: _Queue, payments: _Queue, actions: list[Action]
    ) -> bool:
        """Apply pending collapses (then payments) until ``cand`` fits, then expand it.

        Returns whether a later expand may still fit (every expand costs K - 1: only
        collapses held back because they contain ``cand`` could still make room).
        """
        cap, grow = wc.budget - wc.headroom, wc.block_size - 1
        while wc.cost + grow > cap and len(actions) < self.cfg.n_diff - 1:
            act = self._next_collapse(wc, collapses, keep=cand[0])
            if act is None:
                break
            actions.append(act)
        if wc.cost + grow > cap and self.cfg.pay_for_expands:
            need = -(-(wc.cost + grow - cap) // grow)
            actions += self._pay(wc, payments, cand, need, self.cfg.n_diff - 1 - len(actions))
        if wc.cost + grow > cap:
            return len(actions) < self.cfg.n_diff - 1 and not (collapses.exhausted and payments.exhausted)
        pos = wc.position_of(cand[0])  # still there: no collapse above contains it
        assert pos is not None
        actions.append(wc.expand(pos, cand[1]))
        return True

    def _pay(self, wc: WorkingContext, payments: _Queue, cand: Candidate, need: int, room: int) -> list[Action]:
        """Collapse the ``need`` lowest-scored legal groups outside ``cand`` whose mean score
        is below ``cand``'s by more than ``pay_margin`` — all of them or none
        (a payment that does not buy the expand would be a collapse nobody asked for).
        Legal groups of one snapshot are disjoint, so collapsing one keeps the others legal."""
        below = cand[1] - self.cfg.pay_margin
        popped: list[Candidate] = []
        picked: list[Candidate] = []
        while len(picked) < min(need, room):
            item = payments.pop()
            if item is None:
                break
            popped.append(item)
            (level, index), score = item
            if score >= below:
                break  # ascending: no later group is low enough either
            pos = wc.position_of((level - 1, index * wc.block_size))
            if pos is None or not wc.can_collapse(pos):
                popped.pop()  # gone for good
            elif not _contains(wc, (level, index), cand[0]):
                picked.append(item)
        if len(picked) < need:
            payments.push_front(popped)
            return []
        payments.push_front([item for item in popped if item not in picked])
        out = []
        for (level, index), score in picked:
            pos = wc.position_of((level - 1, index * wc.block_size))
            assert pos is not None
            out.append(wc.collapse(pos, score))
        return out

    def _next_collapse(self, wc: WorkingContext, collapses: _Queue, keep: Entry | None) -> Action | None:
        """Apply the best still-legal collapse whose parent does not contain ``keep``."""
        held: list[Candidate] = []
        act = None
        while act is None:
            cand = collapses.pop()
            if cand is None:
                break
            (level, index), score = cand
            if keep is not None and _contains(wc, (level, index), keep):
                held.append(cand)
                continue
            pos = wc.position_of((level - 1, index * wc.block_size))
            if pos is not None and wc.can_collapse(pos):
                act = wc.collapse(pos, score)
        collapses.push_front(held)
        return act


def _contains(wc: WorkingContext, parent: Entry, node: Entry) -> bool:
    start, end = wc.span(parent)
    return node[0] < parent[0] and start <= wc.span(node)[0] < end


def _as_scores(scores: Any, window: int) -> np.ndarray:
    """float64 [W] from a numpy array, list or (CPU/GPU, grad or not) torch tensor."""
    if hasattr(scores, "detach"):
        scores = scores.detach().float().cpu().numpy()
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.shape != (window,):
        raise ValueError(f"expected {window} scores (one per entry), got shape {np.shape(scores)}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinity")
    return s
