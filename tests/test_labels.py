"""Counterfactual labels: absolute scale, "nothing helps", lookahead credit, candidates."""

from __future__ import annotations

import numpy as np
import pytest

from megacontext.focus.counterfactual import Candidate, apply_candidate, path_gains, sample_candidates
from megacontext.training.labels import absolute_targets
from megacontext.working_context import WorkingContext


def test_a_flat_snapshot_yields_near_zero_targets():
    rng = np.random.default_rng(0)
    kinds = ["expand"] * 20 + ["collapse"] * 10
    gains = rng.normal(0.0, 0.004, size=30)  # the per-window noise of corpus code
    t = absolute_targets(kinds, gains, scale=0.1, margin=0.01)
    assert np.abs(t[:20]).max() < 0.1  # no expand comes near the allocator's threshold (0.2)
    assert (t[20:] <= 0).all() and t[20:].min() > -0.2  # collapses lean negative, none crosses -0.2


def test_a_needle_snapshot_pays_the_needle_and_its_collapses():
    kinds = ["expand", "expand", "expand", "collapse", "collapse"]
    gains = np.array([0.004, 0.45, -0.002, -0.003, -0.30])  # the needle, filler, a harmful collapse
    t = absolute_targets(kinds, gains, scale=0.1, margin=0.01, pay_collapses=True)
    assert t[1] > 0.99 and abs(t[0]) < 0.05 and t[2] <= 0  # the needle stands out, on an absolute scale
    assert t[3] < -0.99  # a harmless collapse is worth it: it pays for the needle
    assert t[3] < t[4] < -0.5  # a harmful one less so (0.30 of the 0.45 gain is lost)
    assert (t[3:] <= 0).all()


def test_without_payment_a_harmless_collapse_leans_negative_and_a_harmful_one_is_zero():
    kinds = ["expand", "collapse", "collapse", "collapse"]
    t = absolute_targets(kinds, np.array([0.45, -0.003, -0.30, 0.08]), scale=0.1, margin=0.01)
    assert t[0] > 0.99 and -0.2 < t[1] < -0.05 and t[2] == 0  # harmless leans negative, harmful is 0
    assert t[3] < -0.5  # a collapse that itself helps


def test_lookahead_credits_a_coarse_gist_with_its_best_child_path():
    cands = [Candidate("expand", 3), *(Candidate("expand", 3, j) for j in range(4)), Candidate("expand", 5),
             *(Candidate("expand", 5, j) for j in range(4)), Candidate("collapse", 7)]
    needle = [0.001, 0.02, 0.5, 0.01, 0.03]  # parent 3 (own gain, 4 paths): the needle is in child 1
    noise = [0.003, 0.04, 0.05, 0.03, 0.06]  # parent 5: every path a little better, none special
    kept, gains = path_gains(cands, np.array([*needle, *noise, -0.01]))
    assert kept == [Candidate("expand", 3), Candidate("expand", 5), Candidate("collapse", 7)]
    assert gains.tolist() == pytest.approx([0.5 - 0.025, 0.06 - 0.045, -0.01])  # advantage over the median path


def test_lookahead_noise_correction_removes_the_max_of_k_bias_and_keeps_a_needle():
    """32 child paths of pure noise (sigma 1): their best beats their median by about two sigma,
    which ``noise_z=2`` takes back; a needle path 10 sigma out keeps most of its credit (> 6 sigma)."""
    rng = np.random.default_rng(0)
    cands = [Candidate("expand", 0), *(Candidate("expand", 0, j) for j in range(32))]

    def credit(paths: np.ndarray, z: float) -> float:
        return float(path_gains(cands, np.array([-np.inf, *paths]), noise_z=z)[1][0])

    noise = [rng.normal(size=32) for _ in range(200)]
    assert 1.5 < np.mean([credit(v, 0.0) for v in noise]) < 2.5  # the bias
    assert abs(np.mean([credit(v, 2.0) for v in noise])) < 0.5  # gone
    needles = [np.concatenate([v[:-1], [10.0]]) for v in noise]
    assert min(credit(v, 2.0) for v in needles) > 6.0


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


def test_listwise_wants_the_best_candidate_above_the_threshold_and_nothing_when_nothing_helps():
    import torch

    from megacontext.training.losses import listwise

    flat = torch.zeros(20)
    low, high = torch.full((20,), -0.3), torch.full((20,), 0.5)
    assert listwise(low, flat, 0.2, 0.05) < listwise(high, flat, 0.2, 0.05)  # nothing helps: stay below tau
    needle = torch.zeros(20)
    needle[7] = 0.95
    found = torch.full((20,), -0.3)
    found[7] = 0.9
    missed = torch.full((20,), -0.3)
    missed[3] = 0.9
    assert listwise(found, needle, 0.2, 0.05) < 0.05 < listwise(missed, needle, 0.2, 0.05)
    assert listwise(torch.zeros(0), torch.zeros(0), 0.2, 0.05) == 0


def test_exploration_opens_coarse_gists_so_deep_lod1_gists_come_into_view():
    from megacontext.config import FocusConfig, TreeShape
    from megacontext.focus.policies import FocusSettings, refocus_rounds
    from megacontext.training.phases import explore_scores

    settings = FocusSettings(FocusConfig(budget=256, tail_blocks=2), TreeShape(32, 2), 4, 3)
    rng = np.random.default_rng(0)
    wc = refocus_rounds(4096, settings, rng, lambda w: explore_scores(w, rng), 3)
    wc.check_invariants()
    levels = wc.levels_array()
    assert (levels == 2).sum() < 3 and (levels == 1).sum() > 25  # the initial assembly has 3 LOD2, 25 LOD1
