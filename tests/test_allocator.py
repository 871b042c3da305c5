"""FocusAllocator: random growth + score streams keep every invariant after every edit."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext.allocator import Action, FocusAllocator
from megacontext.config import FocusConfig
from megacontext.errors import MegaContextError
from megacontext.focus.trace import FocusTrace
from megacontext.working_context import Entry, WorkingContext, minimum_cost

REFOCUSES = {"n": 0}
EPS = 1e-9  # float slack for group means at the threshold


class CheckedWC(WorkingContext):
    """Checks the tiling after every single edit and logs the edits."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.edits: list[Action] = []

    def expand(self, pos: int, score: float = math.nan) -> Action:
        a = super().expand(pos, score)
        self.check_invariants()
        self.edits.append(a)
        return a

    def collapse(self, pos: int, score: float = math.nan) -> Action:
        a = super().collapse(pos, score)
        self.check_invariants()
        self.edits.append(a)
        return a


class Judge:
    """Independent checks of one refocus against a snapshot taken before it."""

    def __init__(self, cfg: FocusConfig) -> None:
        self.cfg = cfg
        self.history: dict[Entry, tuple[str, int]] = {}  # node -> (expand|collapse, step), never pruned

    def note(self, actions: list[Action], cooldown: int) -> None:
        """Forced collapses must happen (hard budget); one that undoes a recent expand starts
        a cooldown like any other action, one that folds new text does not."""
        for a in actions:
            kind = "expand" if a.kind == "expand" else "collapse"
            prev = self.history.get(a.node)
            if prev is not None and prev[0] != kind and a.kind != "forced_collapse":
                assert a.step - prev[1] > cooldown, f"{a} flips {prev} within cooldown {cooldown}"
            if a.kind == "forced_collapse" and not (prev and prev[0] == "expand" and a.step - prev[1] <= cooldown):
                self.history.pop(a.node, None)
            else:
                self.history[a.node] = (kind, a.step)

    def refocus(self, alloc: FocusAllocator, wc: CheckedWC, scores: np.ndarray) -> list[Action]:
        cfg, K = self.cfg, wc.block_size
        snap = list(wc.entries)
        cost0, step0 = wc.cost, wc.step
        born = dict(zip(snap, wc.born))
        blocked = {n: a for n, a in wc.recent_actions().items() if step0 + 1 - a[1] <= cfg.cooldown}
        exp_cands = {
            e: scores[p]
            for p, e in enumerate(snap)
            if e[0] >= 1 and scores[p] > cfg.tau_expand and blocked.get(e, ("",))[0] != "collapse"
        }
        col_cands = {}  # threshold with float slack; EPS-clear ones must be taken (greedy)
        pay_cands = {}  # every legal, non-blocked group: may pay for a strong enough expand
        for p in range(len(snap)):
            if wc.can_collapse(p):
                parent = (snap[p][0] + 1, snap[p][1] // K)
                mean = float(np.mean(scores[p : p + K]))
                if blocked.get(parent, ("",))[0] != "expand":
                    pay_cands[parent] = mean
                    if mean < -cfg.tau_collapse + EPS:
                        col_cands[parent] = mean
        assert wc.collapsible_positions().tolist() == [p for p in range(len(snap)) if wc.can_collapse(p)]

        wc.edits.clear()
        actions = alloc.refocus(wc, scores)
        REFOCUSES["n"] += 1
        assert actions == wc.edits, "the allocator reports exactly the edits it made"
        assert wc.step == step0 + 1 and len(actions) <= cfg.n_diff
        cost, cap = cost0, wc.budget - wc.headroom
        margin = cfg.pay_margin
        for i, a in enumerate(actions):
            assert a.step == wc.step and a.cost_before == cost
            if a.kind == "expand":
                assert a.node in exp_cands and a.score == pytest.approx(exp_cands[a.node])
                assert a.cost_after == cost + K - 1 <= cap
                assert a.residency == wc.step - born[a.node]
            elif a.node in col_cands:
                assert a.kind == "collapse"
                assert a.score == pytest.approx(col_cands[a.node]) and a.score < -cfg.tau_collapse + EPS
            else:  # a payment: the next expand is strong enough to displace this group
                assert cfg.pay_for_expands and a.kind == "collapse" and a.node in pay_cands
                paid = next(b for b in actions[i + 1 :] if b.kind == "expand")
                assert a.score == pytest.approx(pay_cands[a.node]) and a.score < paid.score - margin + EPS
                assert a.cost_after == cost - (K - 1)
                children = [(a.level - 1, a.index * K + j) for j in range(K)]
                assert a.residency == pytest.approx(wc.step - np.mean([born[c] for c in children]))
            cost = a.cost_after
        assert cost == wc.cost
        self.note(actions, cfg.cooldown)
        if cfg.stochastic:
            self._within_top_k(actions, exp_cands, col_cands, margin)
        else:
            self._greedy_complete(wc, actions, exp_cands, col_cands, pay_cands, cost0)
        return actions

    def _within_top_k(self, actions, exp_cands, col_cands, margin) -> None:
        k = self.cfg.top_k
        top_e = sorted(exp_cands.values(), reverse=True)[:k]
        top_c = sorted(col_cands.values())[:k]
        for i, a in enumerate(actions):
            pays = self.cfg.pay_for_expands and any(
                b.kind == "expand" and a.score < b.score - margin + EPS for b in actions[i + 1 :])
            if a.kind == "expand":
                assert a.score >= top_e[-1]
            elif not pays:  # a payment comes from every legal group, lowest first, not the top k
                assert a.score <= top_c[-1] + EPS

    def _greedy_complete(self, wc, actions, exp_cands, col_cands, pay_cands, cost0) -> None:
        expands = [a.score for a in actions if a.kind == "expand"]
        assert expands == sorted(expands, reverse=True), "greedy expands go by score"
        if len(actions) == self.cfg.n_diff:
            return
        # Under n_diff: every collapse candidate was used or became illegal, and no
        # remaining expand candidate fits.
        for parent, mean in col_cands.items():
            if mean > -self.cfg.tau_collapse - EPS:
                continue
            first = wc.position_of((parent[0] - 1, parent[1] * wc.block_size))
            assert first is None or not wc.can_collapse(first), f"missed collapse into {parent}"
        K, margin = wc.block_size, self.cfg.pay_margin
        for node, score in exp_cands.items():
            if wc.position_of(node) is None:
                continue
            assert wc.cost + K - 1 > wc.budget - wc.headroom, f"missed expand {node}"
            over = cost0 > wc.budget - wc.headroom  # grown past the cap: one payment may not be enough
            if not self.cfg.pay_for_expands or over or len(actions) >= self.cfg.n_diff - 1:
                continue
            for parent, mean in pay_cands.items():  # no payment left that this expand could have made
                first = wc.position_of((parent[0] - 1, parent[1] * K))
                if first is None or not wc.can_collapse(first) or mean >= score - margin - EPS:
                    continue
                start, end = wc.span(parent)
                inside = node[0] < parent[0] and start <= wc.span(node)[0] < end
                assert inside, f"expand {node} ({score:.2f}) skipped while {parent} ({mean:.2f}) could pay for it"


def score_stream(rng: np.random.Generator, mode: str, W: int, flip: int) -> np.ndarray:
    if mode == "uniform":
        return rng.uniform(-1, 1, W)
    if mode == "biased":
        return np.clip(rng.normal(rng.uniform(-0.5, 0.5), 0.5, W), -1, 1)
    if mode == "pingpong":  # the whole window flips sign every refocus
        return np.full(W, 0.9 if flip % 2 else -0.9)
    if mode == "spikes":
        s = np.full(W, -0.5)
        s[rng.integers(0, max(W, 1), size=3)] = 1.0
        return s
    return np.round(rng.uniform(-1, 1, W), 1)  # "ties"


@st.composite
def scenarios(draw):
    K = draw(st.sampled_from([2, 3, 4]))
    tail_blocks = draw(st.integers(0, 2))
    headroom = draw(st.sampled_from([0, 1, 2])) * K
    budget = draw(st.integers((tail_blocks + 2) * K + headroom + 4, 64))
    cfg = FocusConfig(
        budget=budget,
        tail_blocks=tail_blocks,
        tau_expand=draw(st.sampled_from([0.0, 0.2, 0.5])),
        tau_collapse=draw(st.sampled_from([0.0, 0.2, 0.5])),
        n_diff=draw(st.integers(1, 6)),
        cooldown=draw(st.integers(0, 3)),
        stochastic=draw(st.booleans()),
        temperature=draw(st.sampled_from([0.3, 1.0, 3.0])),
        top_k=draw(st.integers(1, 8)),
        passes=draw(st.integers(1, 3)),
        pay_for_expands=draw(st.booleans()),
        pay_margin=draw(st.sampled_from([0.0, 0.2, 0.4])),
    )
    return {
        "K": K,
        "L": draw(st.integers(1, 3)),
        "headroom": headroom,
        "cfg": cfg,
        "start": draw(st.integers(0, 150)),
        "seed": draw(st.integers(0, 2**16)),
    }


ROUNDS = 25


@settings(derandomize=True, deadline=None, max_examples=50)
@given(sc=scenarios())
def _random_streams(sc):
    K, L, cfg, headroom = sc["K"], sc["L"], sc["cfg"], sc["headroom"]
    rng = np.random.default_rng(sc["seed"])
    try:
        wc = CheckedWC.initial(sc["start"], K, L, cfg.budget, cfg.tail_blocks, headroom)
    except MegaContextError:
        assert minimum_cost(sc["start"], K, L, cfg.tail_blocks) > cfg.budget
        wc = CheckedWC(K, L, cfg.budget, cfg.tail_blocks, headroom)
    wc.check_invariants()
    alloc = FocusAllocator(cfg, K, np.random.default_rng(sc["seed"]))
    judge = Judge(cfg)
    trace = FocusTrace()
    growing = True
    for r in range(ROUNDS):
        if growing:
            n = wc.num_tokens + int(rng.integers(0, 3 * K))
            before = wc.to_dict()
            try:
                forced = wc.extend(n)
            except MegaContextError:
                assert minimum_cost(n, K, L, cfg.tail_blocks) > cfg.budget
                assert wc.to_dict() == before
                growing = False
                forced = []
            wc.check_invariants()
            for a in forced:
                assert a.kind == "forced_collapse" and a.step == wc.step and math.isnan(a.score)
            judge.note(forced, cfg.cooldown)
        mode = ["uniform", "biased", "pingpong", "spikes", "ties"][r % 5]
        for _p in range(cfg.passes):
            window = wc.cost
            acts = judge.refocus(alloc, wc, score_stream(rng, mode, wc.cost, r))
            trace.record(acts, window)
            if not acts:
                break
    stats = trace.summary()
    assert stats["refocuses"] == trace.refocuses >= ROUNDS


def test_random_growth_and_score_streams_keep_every_invariant():
    REFOCUSES["n"] = 0
    _random_streams()
    assert REFOCUSES["n"] >= 1000


# ------------------------------------------------------------------ units
def cfg(**kw) -> FocusConfig:
    base = dict(budget=64, tail_blocks=1, tau_expand=0.2, tau_collapse=0.2, n_diff=4, cooldown=2)
    base.update(kw)
    return FocusConfig(**base)


def window(num_tokens=200, K=4, L=2, budget=64, tail_blocks=1, headroom=4) -> WorkingContext:
    return WorkingContext.initial(num_tokens, K, L, budget, tail_blocks, headroom)


def test_expands_go_best_first_and_only_above_threshold():
    wc = window()
    for _ in range(2):  # make room for exactly two expands
        wc.collapse(int(wc.collapsible_positions()[-1]))
    s = np.zeros(wc.cost)
    gists = [p for p, e in enumerate(wc.entries) if e[0] >= 1]
    s[gists[0]], s[gists[1]], s[gists[2]], s[gists[3]] = 0.6, 0.9, 0.15, 0.7
    want = [wc.entries[gists[1]], wc.entries[gists[3]]]
    acts = FocusAllocator(cfg(n_diff=4, pay_for_expands=False), 4).refocus(wc, s)
    assert [(a.kind, a.node, a.score) for a in acts] == [("expand", want[0], 0.9), ("expand", want[1], 0.7)]
    assert wc.cost + 3 > wc.budget - wc.headroom


def test_expand_that_does_not_fit_applies_collapses_first():
    wc = window()
    assert wc.cost + 3 > wc.budget - wc.headroom  # full
    s = np.zeros(wc.cost)
    g = next(p for p, e in enumerate(wc.entries) if e[0] >= 1)
    col = int(wc.collapsible_positions()[-1])
    s[g] = 0.9
    s[col : col + 4] = -0.9
    parent = (wc.entries[col][0] + 1, wc.entries[col][1] // 4)
    gist = wc.entries[g]
    acts = FocusAllocator(cfg(n_diff=2), 4).refocus(wc, s)
    assert [(a.kind, a.node) for a in acts] == [("collapse", parent), ("expand", gist)]
    assert acts[1].cost_after <= wc.budget - wc.headroom


def test_expand_skipped_when_nothing_can_make_room():
    wc = window()
    before = list(wc.entries)
    s = np.where(wc.levels_array() >= 1, 0.9, 0.0)
    assert FocusAllocator(cfg(pay_for_expands=False), 4).refocus(wc, s) == []
    assert wc.entries == before and wc.step == 1
    s = np.where(wc.levels_array() >= 1, 0.3, 0.0)  # too weak to displace anything (0.3 - 0 < pay_margin 0.4)
    assert FocusAllocator(cfg(), 4).refocus(wc, s) == []
    assert wc.entries == before


def test_a_strong_expand_is_paid_for_by_the_lowest_scored_groups():
    wc = window()  # full: an expand needs a collapse first; no score is below -tau_collapse
    s = np.zeros(wc.cost)
    target = wc.entries[3]
    s[3] = 0.9
    groups = wc.collapsible_positions()
    cheap = int(groups[-1])  # the newest legal group scores lowest: it pays, not the oldest
    s[cheap : cheap + 4] = -0.1
    paid = (wc.entries[cheap][0] + 1, wc.entries[cheap][1] // 4)
    acts = FocusAllocator(cfg(), 4).refocus(wc, s)
    assert [(a.kind, a.node) for a in acts] == [("collapse", paid), ("expand", target)]
    wc.check_invariants()
    s = np.zeros(wc.cost)  # ties: the oldest legal group pays
    s[int(np.flatnonzero(wc.levels_array() >= 1)[0])] = 0.9
    first = int(wc.collapsible_positions()[0])
    oldest = (wc.entries[first][0] + 1, wc.entries[first][1] // 4)
    acts = FocusAllocator(cfg(cooldown=0), 4).refocus(wc, s)
    assert [a.kind for a in acts] == ["collapse", "expand"] and acts[0].node == oldest


def test_room_is_not_made_by_collapsing_the_expand_target_itself():
    wc = window()  # [L2 x9, L1 #36 #37, tokens...], full
    wc.expand(8)  # L2 #8 -> L1 #32..#37 at positions 8..13 (cost 62 > cap 60, <= budget 64)
    assert wc.entries[8:14] == [(1, j) for j in range(32, 38)] and wc.can_collapse(8)
    s = np.zeros(wc.cost)
    s[8], s[9:12] = 1.0, -1.0  # target (1,32) sits in the most negative group (mean -0.5)
    lod0 = [int(p) for p in wc.collapsible_positions() if wc.entries[p][0] == 0][:2]
    for p in lod0:
        s[p : p + 4] = -0.3
    acts = FocusAllocator(cfg(n_diff=3), 4).refocus(wc, s)
    assert [a.kind for a in acts] == ["collapse", "collapse", "expand"]
    assert acts[2].node == (1, 32) and all(a.node != (2, 8) for a in acts)


def test_cooldown_blocks_the_opposite_action():
    wc = window()
    wc.collapse(int(wc.collapsible_positions()[-1]))  # room for one expand
    alloc = FocusAllocator(cfg(cooldown=2, n_diff=1), 4)
    s = np.where(wc.levels_array() >= 1, 0.9, 0.0)
    (a,) = alloc.refocus(wc, s)  # step 1: expand
    assert a.kind == "expand"
    pos = wc.position_of((a.level - 1, a.index * 4))
    for step in (2, 3, 4):
        s = np.zeros(wc.cost)
        s[pos : pos + 4] = -1.0
        acts = alloc.refocus(wc, s)
        if step - 1 <= 2:
            assert all(b.node != a.node for b in acts), f"collapsed back at step {step}"
        else:
            assert [(b.kind, b.node) for b in acts] == [("collapse", a.node)]
            assert acts[0].residency == 3.0  # the children were born at step 1


def test_stochastic_is_deterministic_given_the_seed_and_explores():
    traces = []
    for seed in (5, 5, 6):
        wc = window(num_tokens=600, budget=64)
        alloc = FocusAllocator(cfg(stochastic=True, top_k=6, temperature=2.0, n_diff=2), 4, np.random.default_rng(seed))
        rng = np.random.default_rng(0)
        trace = []
        for _ in range(30):
            trace += [(a.kind, a.node) for a in alloc.refocus(wc, rng.uniform(-1, 1, wc.cost))]
            wc.check_invariants()
        traces.append(trace)
    assert traces[0] == traces[1] and traces[0]
    assert traces[0] != traces[2]


def test_refocus_passes_rescore_and_stop_early():
    wc = window(num_tokens=600, budget=64)
    alloc = FocusAllocator(cfg(passes=3, n_diff=1), 4)
    calls = []

    def score_fn(w: WorkingContext) -> np.ndarray:
        calls.append(w.cost)
        return np.full(w.cost, -0.9 if len(calls) == 1 else 0.0)

    acts = alloc.refocus_passes(wc, score_fn)
    assert len(acts) == 1 and len(calls) == 2 and calls[1] == calls[0] - 3 and wc.step == 2


def test_stats_and_score_validation():
    wc = window(num_tokens=600, budget=64)
    alloc = FocusAllocator(cfg(n_diff=2), 4)
    W = wc.cost
    acts = alloc.refocus(wc, np.full(W, -0.9))
    trace = FocusTrace()
    trace.record(acts, W)
    st_ = trace.summary()
    assert st_["swap_rate"] == pytest.approx(len(acts) / W) and st_["collapses"] == len(acts) == 2
    assert st_["residency_mean"] == pytest.approx(1.0) and st_["residency_p95"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="scores"):
        alloc.refocus(wc, np.zeros(wc.cost + 1))
    with pytest.raises(ValueError, match="NaN"):
        alloc.refocus(wc, np.full(wc.cost, np.nan))
    with pytest.raises(ValueError, match="block_size"):
        FocusAllocator(cfg(), 32).refocus(wc, np.zeros(wc.cost))


def test_w8192_refocus_is_legal():
    wc = WorkingContext.initial(200_000, 32, 2, 8192, 2)
    alloc = FocusAllocator(replace(cfg(budget=8192, n_diff=8), tail_blocks=2), 32)
    rng = np.random.default_rng(0)
    n = wc.num_tokens
    for _ in range(10):
        alloc.refocus(wc, np.clip(rng.normal(0, 0.6, wc.cost), -1, 1))
        n += 32
        wc.extend(n)
    wc.check_invariants()


@pytest.mark.parametrize("needle", [100, 1500, 2900, 3700])
@pytest.mark.parametrize("headroom", [0, 1])
@pytest.mark.parametrize("filler", [-0.5, 0.0])
def test_the_needle_path_is_reachable_within_the_refocus_rounds(needle, headroom, filler):
    """W=256, history 4,096 (16x), the default allocator: from the initial assembly, scores
    that point at the needle (+0.9 on every gist over it; raw filler outside the tail at
    -0.5, collapsed on its own, or at 0, collapsed only to pay for the needle's expands)
    bring the needle to LOD0 in 3 refocuses, LOD2 -> LOD1 -> LOD0, collapsing elsewhere."""
    focus = FocusConfig(budget=256, tail_blocks=2, n_diff=4, cooldown=2)
    wc = WorkingContext.initial(4096, 32, 2, 256, 2, headroom=headroom)
    alloc = FocusAllocator(focus, 32)

    def scores(w: WorkingContext) -> np.ndarray:
        starts, ends = w.spans()
        over = (starts <= needle) & (needle < ends)
        lv = w.levels_array()
        return np.where(over & (lv >= 1), 0.9, np.where((lv == 0) & ~over & (starts < w.tail_start), filler, 0.0))

    for _ in range(3):
        alloc.refocus_passes(wc, scores)
        wc.check_invariants()
    starts, ends = wc.spans()
    at = int(np.flatnonzero((starts <= needle) & (needle < ends))[0])
    assert wc.levels_array()[at] == 0 and wc.cost <= wc.budget - wc.headroom
