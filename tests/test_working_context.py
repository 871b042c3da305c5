"""WorkingContext: tiling invariants, initial assembly, edits, growth, persistence, assembly."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext.errors import MegaContextError
from megacontext.working_context import (
    Assembled,
    WorkingContext,
    assemble,
    minimum_cost,
)

SETTINGS = settings(derandomize=True, deadline=None, max_examples=60)


def greedy_min_cost(num_tokens: int, K: int, L: int, tail_blocks: int) -> int:
    """Independent reference: walk the history, taking the coarsest aligned node that fits."""
    tail = max(0, num_tokens // K - tail_blocks) * K
    p, cost = 0, num_tokens - tail
    while p < tail:
        k = max(k for k in range(1, L + 1) if p % K**k == 0 and p + K**k <= tail)
        p += K**k
        cost += 1
    return cost


# ------------------------------------------------------------------ initial
@SETTINGS
@given(
    K=st.sampled_from([2, 3, 4, 8, 32]),
    L=st.integers(1, 3),
    tail_blocks=st.integers(0, 3),
    num_tokens=st.integers(0, 5000),
    budget=st.integers(8, 400),
    headroom_blocks=st.integers(0, 2),
)
def test_initial_monotone_fills_budget_or_raises(K, L, tail_blocks, num_tokens, budget, headroom_blocks):
    headroom = min(headroom_blocks * K, budget - 1)
    need = greedy_min_cost(num_tokens, K, L, tail_blocks)
    assert minimum_cost(num_tokens, K, L, tail_blocks) == need
    if need > budget:
        with pytest.raises(MegaContextError, match=f"{num_tokens} tokens.*at least {need}"):
            WorkingContext.initial(num_tokens, K, L, budget, tail_blocks, headroom)
        return
    wc = WorkingContext.initial(num_tokens, K, L, budget, tail_blocks, headroom)
    wc.check_invariants()
    levels = wc.levels_array()
    assert (np.diff(levels) <= 0).all(), "older spans must be at least as coarse as newer ones"
    cap = budget - headroom
    assert wc.cost <= max(cap, need)
    # Full: no gist left, or one more expansion (always +K-1) would pass budget - headroom.
    assert (levels == 0).all() or wc.cost + K - 1 > cap
    assert wc.born == [0] * wc.cost and wc.step == 0


def test_initial_raises_a_clear_error():
    with pytest.raises(MegaContextError) as e:
        WorkingContext.initial(9600, 32, 1, 256, 2)
    msg = str(e.value)
    assert "9600 tokens" in msg and "1 gist level" in msg and "at least 362" in msg and "got 256" in msg


def test_initial_is_finest_for_recent_spans():
    wc = WorkingContext.initial(4096, 32, 2, 256, 2)
    starts, ends = wc.spans()
    assert ends[-1] == 4096 and wc.cost <= 256 - 32
    assert wc.entries[-64:] == [(0, t) for t in range(4032, 4096)]
    assert wc.levels_array()[0] == 2 and wc.levels_array()[-1] == 0
    s = wc.summary()
    assert s["covered_tokens"] == s["history_tokens"] == 4096 and s["tail_start"] == 4032
    assert sum(s["entries_per_level"].values()) == s["cost"] and set(s["entries_per_level"]) == {"0", "1", "2"}


def test_empty_and_tiny_histories():
    for n in (0, 1, 31, 32, 95):
        wc = WorkingContext.initial(n, 32, 2, 128, 1)
        wc.check_invariants()
        assert wc.entries == [(0, t) for t in range(n)]


def test_invalid_settings_rejected():
    with pytest.raises(MegaContextError):
        WorkingContext(1, 2, 100, 1)
    with pytest.raises(MegaContextError):
        WorkingContext(4, 2, 10, 1, headroom=10)


# -------------------------------------------------------------------- edits
def test_expand_collapse_round_trip():
    wc = WorkingContext.initial(3000, 4, 3, 90, 1)
    original = list(wc.entries)
    gists = [p for p, (lv, _) in enumerate(original) if lv >= 1]
    assert gists
    for pos in gists:
        w = wc.copy()
        node = w.entries[pos]
        if not w.can_expand(pos):
            continue
        a = w.expand(pos, 0.7)
        w.check_invariants()
        assert (a.kind, a.node, a.score) == ("expand", node, 0.7)
        assert a.cost_after == a.cost_before + 3 == w.cost
        assert w.entries[pos : pos + 4] == [(node[0] - 1, node[1] * 4 + j) for j in range(4)]
        assert w.can_collapse(pos)
        b = w.collapse(pos, -0.5)
        w.check_invariants()
        assert (b.kind, b.node) == ("collapse", node) and b.cost_after == b.cost_before - 3
        assert w.entries == original
    assert wc.entries == original and wc.step == 0  # copies are independent


def test_illegal_edits_are_rejected_without_change():
    # K=2, L=2, tail_blocks=1, 13 tokens: tail_start = 10
    wc = WorkingContext(2, 2, 40, 1)
    wc.extend(13)
    wc.collapse(0)  # (1,0)
    wc.collapse(1)  # (1,1)
    wc.collapse(0)  # (2,0): tokens 0..3
    wc.collapse(1)  # (1,2): tokens 4..5
    # entries: (2,0) (1,2) (0,6) (0,7) (0,8) (0,9) | tail (0,10) (0,11) (0,12)
    assert wc.entries == [(2, 0), (1, 2), (0, 6), (0, 7), (0, 8), (0, 9), (0, 10), (0, 11), (0, 12)]
    wc.check_invariants()
    before = wc.to_dict()
    illegal = {
        "expand LOD0": ("expand", 2),
        "expand out of range": ("expand", 9),
        "expand negative": ("expand", -1),
        "collapse mixed levels": ("collapse", 0),  # (2,0),(1,2)
        "collapse mixed levels 2": ("collapse", 1),  # (1,2),(0,6)
        "collapse misaligned": ("collapse", 3),  # (0,7),(0,8)
        "collapse touching tail": ("collapse", 6),  # (0,10),(0,11): block 5 is in the tail
        "collapse incomplete group": ("collapse", 8),  # (0,12) alone
        "collapse out of range": ("collapse", 20),
    }
    for what, (op, pos) in illegal.items():
        assert not getattr(wc, f"can_{op}")(pos), what
        with pytest.raises(ValueError, match=f"illegal {op}"):
            getattr(wc, op)(pos)
        assert wc.to_dict() == before, what
    assert wc.can_collapse(2) and wc.can_collapse(4)  # (0,6),(0,7) and (0,8),(0,9)
    # Top level: two level-2 siblings never collapse when L=2.
    top = WorkingContext(2, 2, 40, 0)
    top.extend(8)
    for pos in (0, 1, 2, 3, 0, 1):
        top.collapse(pos)
    assert top.entries == [(2, 0), (2, 1)] and not top.can_collapse(0)
    with pytest.raises(ValueError, match="illegal collapse"):
        top.collapse(0)


def test_expand_respects_hard_budget():
    wc = WorkingContext(4, 1, 8, 0, headroom=0)
    wc.extend(8)  # 8 tokens -> cost 8 = budget
    wc.collapse(0)  # cost 5
    assert wc.can_expand(0)
    wc.collapse(1)  # cost 2
    wc.expand(0)  # cost 5
    assert wc.cost == 5 and wc.can_expand(4)
    wc.extend(9)  # cost 6 -> expanding (+3) would give 9 > 8
    assert not wc.can_expand(4)
    with pytest.raises(ValueError):
        wc.expand(4)


def test_collapsible_positions_match_can_collapse():
    rng = np.random.default_rng(0)
    for _trial in range(30):
        K = int(rng.integers(2, 5))
        wc = WorkingContext.initial(int(rng.integers(0, 400)), K, 3, 120, int(rng.integers(0, 3)), headroom=0)
        for _ in range(20):
            expected = [p for p in range(wc.cost) if wc.can_collapse(p)]
            assert wc.collapsible_positions().tolist() == expected
            gists = [p for p in range(wc.cost) if wc.can_expand(p)]
            if expected and (rng.random() < 0.5 or not gists):
                wc.collapse(int(rng.choice(expected)))
            elif gists:
                wc.expand(int(rng.choice(gists)))
            wc.check_invariants()


def test_position_of_finds_nodes_by_identity():
    wc = WorkingContext.initial(3000, 4, 3, 90, 1)
    for pos, node in enumerate(wc.entries):
        assert wc.position_of(node) == pos
    level, index = wc.entries[0]
    assert wc.position_of((level - 1, index * 4)) is None  # a child of an entry
    assert wc.position_of((0, 10**9)) is None


# ------------------------------------------------------------------- growth
@SETTINGS
@given(
    K=st.sampled_from([2, 3, 4]),
    L=st.integers(1, 3),
    tail_blocks=st.integers(0, 2),
    start=st.integers(0, 300),
    budget=st.integers(12, 60),
    chunks=st.lists(st.integers(0, 40), min_size=1, max_size=8),
)
def test_extend_collapses_oldest_first(K, L, tail_blocks, start, budget, chunks):
    try:
        wc = WorkingContext.initial(start, K, L, budget, tail_blocks, headroom=0)
    except MegaContextError:
        wc = WorkingContext(K, L, budget, tail_blocks, headroom=0)
    for chunk in chunks:
        wc.step += 1  # as if a refocus happened in between
        n = wc.num_tokens + chunk
        before = wc.to_dict()
        expanded = {node for node, (kind, _) in wc.recent_actions().items() if kind == "expand"}
        # Oracle: the same window with an unlimited budget, collapsed one oldest group at a time.
        loose = WorkingContext.from_dict({**before, "budget": 10**9})
        loose.extend(n)
        if minimum_cost(n, K, L, tail_blocks) > budget:
            with pytest.raises(MegaContextError, match="at least"):
                wc.extend(n)
            assert wc.to_dict() == before
            return
        actions = wc.extend(n)
        wc.check_invariants()
        cost = loose.cost
        for a in actions:
            oldest = next(p for p in range(loose.cost) if loose.can_collapse(p))
            replay = loose.collapse(oldest)
            assert (a.kind, a.node, a.step) == ("forced_collapse", replay.node, wc.step)
            assert math.isnan(a.score) and a.residency == replay.residency
            assert (a.cost_before, a.cost_after) == (cost, cost - (K - 1))
            cost = a.cost_after
        assert loose.entries == wc.entries and loose.born == wc.born
        assert wc.cost <= budget and (not actions or wc.cost > budget - (K - 1))
        for a in actions:  # undoing a recent expand starts a cooldown; folding new text does not
            assert wc.last_action(a.node) == (("collapse", a.step) if a.node in expanded else None)


def test_extend_appends_raw_tokens_and_validates():
    wc = WorkingContext.initial(100, 32, 2, 256, 2)
    wc.step = 3
    assert wc.extend(100) == []
    assert wc.extend(140) == []
    assert wc.entries[-40:] == [(0, t) for t in range(100, 140)] and wc.born[-40:] == [3] * 40
    with pytest.raises(MegaContextError, match="cannot shrink"):
        wc.extend(120)


def test_extend_cost_does_not_depend_on_history_length():
    """A 10**12-token history (8 levels of K=32) extends instantly: nothing is O(history)."""
    wc = WorkingContext.initial(10**12, 32, 8, 256, 2)
    wc.check_invariants()
    n = 10**12
    for _ in range(20):
        n += 37
        wc.extend(n)
        assert wc.cost <= 256
    wc.check_invariants()


# -------------------------------------------------------------- persistence
def test_to_dict_from_dict_round_trip():
    wc = WorkingContext.initial(3000, 4, 3, 90, 1)
    wc.step = 5
    wc.expand(0)
    wc.step = 6
    wc.collapse(0)
    wc.extend(3050)
    d = json.loads(json.dumps(wc.to_dict()))
    back = WorkingContext.from_dict(d)
    assert back.entries == wc.entries and back.born == wc.born and back.step == wc.step
    assert back.recent_actions() == wc.recent_actions() and back.summary() == wc.summary()
    assert back.headroom == wc.headroom and back.to_dict() == wc.to_dict()
    broken = {**d, "entries": d["entries"][1:], "born": d["born"][1:]}
    with pytest.raises(MegaContextError, match="inconsistent"):
        WorkingContext.from_dict(broken)


# ----------------------------------------------------------------- assembly
class FakeSource:
    """Vectors encode (level, index, marker); gist rows come from a trainable table."""

    def __init__(self, levels: int, dim: int = 4) -> None:
        self.calls: list[tuple[int, list[int]]] = []
        self.table = torch.nn.Parameter(torch.zeros(levels + 1, 10_000))

    def token_embeddings(self, positions: torch.Tensor) -> torch.Tensor:
        assert positions.dtype == torch.long
        self.calls.append((0, positions.tolist()))
        p = positions.float()
        return torch.stack([torch.zeros_like(p), p, torch.zeros_like(p), self.table[0, positions]], 1)

    def gist_vectors(self, level: int, indices: torch.Tensor) -> torch.Tensor:
        self.calls.append((level, indices.tolist()))
        i = indices.float()
        return torch.stack([torch.full_like(i, level), i, torch.ones_like(i), self.table[level, indices]], 1)


@pytest.mark.parametrize("mode", ["compact", "absolute"])
def test_assemble_gathers_in_order(mode):
    wc = WorkingContext.initial(3000, 4, 3, 90, 1)
    wc.expand(wc.position_of(wc.entries[0]))
    src = FakeSource(3)
    out = assemble(wc, src, mode)
    assert isinstance(out, Assembled)
    W = wc.cost
    assert out.embeds.shape == (W, 4)
    got = [(int(r[0]), int(r[1])) for r in out.embeds.detach()]
    assert got == wc.entries
    assert sorted(c[0] for c in src.calls) == sorted(set(wc.levels_array().tolist()))  # one call per level
    starts, ends = wc.spans()
    assert out.levels.tolist() == wc.levels_array().tolist()
    assert out.starts.tolist() == starts.tolist() and out.ends.tolist() == ends.tolist()
    assert out.distance.tolist() == (3000 - ends).tolist()
    if mode == "compact":
        assert out.position_ids.tolist() == list(range(W)) and out.next_position == W
    else:
        expect = [s if lv == 0 else (s + e - 1) // 2 for lv, s, e in zip(out.levels.tolist(), starts, ends)]
        assert out.position_ids.tolist() == expect and out.next_position == 3000
        assert (np.diff(expect) > 0).all()
    # Differentiable: gradients land on exactly the rows the window used.
    weights = torch.arange(1, W + 1, dtype=torch.float32)
    (out.embeds[:, 3] * weights).sum().backward()
    grad = src.table.grad
    for w, (lv, idx) in zip(weights.tolist(), wc.entries):
        assert grad[lv, idx] == w
    assert grad.count_nonzero() == W


def test_assemble_empty_window_and_bad_mode():
    wc = WorkingContext(4, 2, 32, 1)
    out = assemble(wc, FakeSource(2), "compact")
    assert out.embeds.shape == (0, 4) and out.next_position == 0
    with pytest.raises(MegaContextError, match="position_mode"):
        assemble(wc, FakeSource(2), "rope")  # type: ignore[arg-type]


def test_assemble_promotes_mixed_dtypes():
    class HalfTokens(FakeSource):
        def token_embeddings(self, positions: torch.Tensor) -> torch.Tensor:
            return super().token_embeddings(positions).to(torch.float16)

    wc = WorkingContext.initial(300, 4, 2, 40, 1)
    out = assemble(wc, HalfTokens(2), "compact")
    assert out.embeds.dtype == torch.float32
    assert [(int(r[0]), int(r[1])) for r in out.embeds.detach()] == wc.entries


def test_a_forced_collapse_that_undoes_an_expand_starts_a_cooldown():
    wc = WorkingContext.initial(400, 4, 2, 40, 1, headroom=0)
    gist = next(p for p, e in enumerate(wc.entries) if e[0] >= 1)
    node = wc.entries[gist]
    while wc.cost + 3 > wc.budget:  # make room, then expand the oldest gist
        wc.collapse(int(wc.collapsible_positions()[-1]))
    wc.step += 1
    wc.expand(wc.position_of(node))
    assert wc.last_action(node) == ("expand", wc.step)
    grown = wc.num_tokens
    while wc.position_of(node) is None:  # grow until the budget folds the expanded node back
        grown += 4
        forced = wc.extend(grown)
        others = [a.node for a in forced if a.node != node]
        assert all(wc.last_action(n) is None or wc.last_action(n)[0] == "expand" for n in others)
    assert wc.last_action(node) == ("collapse", wc.step)
