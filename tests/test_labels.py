"""Counterfactual labels: absolute scale, "nothing helps", lookahead credit, candidates."""

from __future__ import annotations

import numpy as np
import pytest

from megacontext.training.labels import Candidate, absolute_targets, apply_candidate, path_gains, sample_candidates
from megacontext.working_context import WorkingContext


def test_a_flat_snapshot_yields_near_zero_targets():
    rng = np.random.default_rng(0)
    kinds = ["expand"] * 20 + ["collapse"] * 10
    gains = rng.normal(0.0, 0.004, size=30)  # the per-window noise of corpus code
    t = absolute_targets(kinds, gains, scale=0.1, margin=0.01)
    assert np.abs(t).max() < 0.1  # nothing crosses the allocator's thresholds (0.2)


def test_a_needle_snapshot_pays_the_needle_and_its_collapses():
    kinds = ["expand", "expand", "expand", "collapse", "collapse"]
    gains = np.array([0.004, 0.45, -0.002, -0.003, -0.30])  # the needle, filler, a harmful collapse
    t = absolute_targets(kinds, gains, scale=0.1, margin=0.01, pay_collapses=True)
    assert t[1] > 0.99 and abs(t[0]) < 0.05 and t[2] <= 0  # the needle stands out, on an absolute scale
    assert t[3] < -0.99  # a harmless collapse is worth it: it pays for the needle
    assert t[3] < t[4] < -0.5  # a harmful one less so (0.30 of the 0.45 gain is lost)
    assert (t[3:] <= 0).all()


def test_without_payment_a_collapse_is_worth_only_its_own_gain():
    kinds = ["expand", "collapse", "collapse", "collapse"]
    t = absolute_targets(kinds, np.array([0.45, -0.003, -0.30, 0.08]), scale=0.1, margin=0.01)
    assert t[0] > 0.99 and t[1] == 0 and t[2] == 0  # harmless or harmful: no reason to collapse
    assert t[3] < -0.5  # a collapse that itself helps


def test_lookahead_credits_a_coarse_gist_with_its_best_child_path():
    cands = [Candidate("expand", 3), *(Candidate("expand", 3, j) for j in range(4)), Candidate("expand", 5),
             *(Candidate("expand", 5, j) for j in range(4)), Candidate("collapse", 7)]
    needle = [0.001, 0.02, 0.5, 0.01, 0.03]  # parent 3 (own gain, 4 paths): the needle is in child 1
    noise = [0.003, 0.04, 0.05, 0.03, 0.06]  # parent 5: every path a little better, none special
    kept, gains = path_gains(cands, np.array([*needle, *noise, -0.01]))
    assert kept == [Candidate("expand", 3), Candidate("expand", 5), Candidate("collapse", 7)]
    assert gains.tolist() == pytest.approx([0.5 - 0.025, 0.06 - 0.045, -0.01])  # advantage over the median path


def test_candidates_cover_every_gist_and_lookahead_paths_apply():
    wc = WorkingContext.initial(4096, 32, 2, 256, 2, headroom=0)
    levels = wc.levels_array()
    cands = sample_candidates(wc, np.random.default_rng(0), limit=4, lookahead=True)
    expands = [c for c in cands if c.kind == "expand" and c.child < 0]
    assert [c.pos for c in expands] == np.flatnonzero(levels >= 1).tolist()
    paths = [c for c in cands if c.child >= 0]
    assert len(paths) == 32 * int((levels == 2).sum())
    assert sum(c.kind == "collapse" for c in cands) == 4
    deep = apply_candidate(wc, paths[5])
    deep.check_invariants()
    assert deep.cost == wc.cost + 2 * 31 and deep.levels_array().tolist().count(0) == levels.tolist().count(0) + 32
