"""Query-likelihood retrieval (focus/likelihood.py) and the likelihood_focus policy."""

import numpy as np
import torch

from megacontext.focus.likelihood import block_gains, entry_scores
from megacontext.focus.policies import FocusSettings, PolicyRequest, policy_window
from megacontext.focus.source import build_source
from megacontext.modules import Modules
from megacontext.working_context import WorkingContext


def _logprob(base, seq: torch.Tensor, start: int) -> float:
    """Sum of log p(seq[t] | seq[:t]) for t >= start, one unbatched forward."""
    logp = torch.log_softmax(base.model(input_ids=seq[None]).logits[0].float(), -1)
    return float(sum(logp[t - 1, seq[t]] for t in range(start, len(seq))))


def test_block_gains_are_the_pair_counterfactual_of_each_block(smoke_cfg, smoke_base):
    mods = Modules.fresh(smoke_cfg, smoke_base)
    K = smoke_cfg.tree.block_size
    history = np.random.default_rng(0).integers(0, mods.base.vocab_size, 5 * K + 7)
    with torch.no_grad(), mods.plain():
        gains = block_gains(mods.base, history, K, 4 * K, query_tokens=6)
        ids = torch.as_tensor(history)
        q = ids[-6:]
        pair = [_logprob(mods.base, torch.cat([ids[j * K : (j + 2) * K], q]), 2 * K) for j in range(3)]
    assert gains.shape == (4,)
    best = np.array([pair[0], max(pair[0], pair[1]), max(pair[1], pair[2]), pair[2]])
    np.testing.assert_allclose(gains, best - np.median(best), rtol=1e-4, atol=1e-4)


def test_entry_scores_take_the_best_covered_block_and_leave_raw_entries_neutral():
    K = 4
    wc = WorkingContext.initial(4 * K * K + 3 * K, K, 2, 40, 1, headroom=0)
    gains = np.full(wc.tail_start // K, -5.0)
    gains[6] = 20.0  # one block deep inside the first LOD2 node
    s = entry_scores(wc, gains)
    levels, (starts, ends) = wc.levels_array(), wc.spans()
    assert np.all(s[levels == 0] == 0.0)
    holder = int(np.flatnonzero((starts <= 6 * K) & (6 * K < ends))[0])
    assert levels[holder] >= 1 and s[holder] > 0.99
    others = (levels > 0) & (np.arange(len(s)) != holder)
    assert others.any() and np.all(s[others] < -0.8)


def test_likelihood_focus_opens_the_best_block_to_raw_from_the_coarsest_gists(smoke_cfg, smoke_base, monkeypatch):
    """The allocator follows the gains down the tree (LOD2 -> LOD1 -> raw) within its rounds,
    paying with the other entries, and stays within the budget."""
    import megacontext.focus.policies as policies

    mods = Modules.fresh(smoke_cfg, smoke_base)
    settings = FocusSettings.from_config(smoke_cfg, greedy=True)
    K = settings.shape.block_size
    history = np.random.default_rng(3).integers(0, mods.base.vocab_size, 4 * K * K)
    needle = 3  # a block inside the oldest (coarsest) node
    gains = np.full(len(history) // K, -3.0)
    gains[needle] = 15.0
    monkeypatch.setattr(policies, "block_gains", lambda base, hist, k, end: gains[: end // k])
    req = PolicyRequest(mods, settings, history, build_source(mods.base, mods.gistnet, history, settings.shape),
                        16, np.random.default_rng(0))
    start = policies.initial_context(len(history), settings)
    assert start.levels_array()[int(np.flatnonzero(start.spans()[1] > needle * K)[0])] == settings.shape.levels
    with torch.no_grad():
        window = policy_window("likelihood_focus", req)
    wc = window.wc
    wc.check_invariants()
    starts, ends = wc.spans()
    at = int(np.flatnonzero((starts <= needle * K) & (needle * K < ends))[0])
    assert wc.levels_array()[at] == 0
    assert window.cost <= settings.budget


def test_lensnet_reads_the_same_gains_in_training_and_in_the_runtime(smoke_cfg, smoke_base):
    """HistorySource (training/eval) and TreeSource (a session) give LensNet one feature for one
    history, and the feature changes LensNet's scores (it is wired in, not ignored)."""
    from megacontext.focus.lens import lens_input, lens_scores
    from megacontext.focus.source import TreeSource
    from megacontext.tree import MegaContextTree
    from megacontext.working_context import assemble

    assert smoke_cfg.lensnet.query_likelihood
    mods = Modules.fresh(smoke_cfg, smoke_base)
    settings = FocusSettings.from_config(smoke_cfg, greedy=True)
    K, L = settings.shape.block_size, settings.shape.levels
    history = np.random.default_rng(5).integers(0, mods.base.vocab_size, 40 * K + 9)
    hist_src = build_source(mods.base, mods.gistnet, history, settings.shape)
    tree = MegaContextTree.create_ram(K, L, mods.base.dim, mods.gister())
    tree.append(history)
    tree_src = TreeSource(tree, mods.base)
    wc = WorkingContext.initial(len(history), K, L, settings.budget, settings.focus.tail_blocks, headroom=0)
    with torch.no_grad():
        a = lens_input(wc, assemble(wc, hist_src, "compact"), hist_src, mods.lensnet)
        b = lens_input(wc, assemble(wc, tree_src, "compact"), tree_src, mods.lensnet)
        np.testing.assert_allclose(a.likelihood.numpy(), b.likelihood.numpy(), atol=1e-4)
        assert a.likelihood.shape == (wc.cost,) and a.likelihood.abs().sum() > 0
        assert torch.all(a.likelihood[torch.as_tensor(wc.spans()[0] >= wc.tail_start)] == 0)
        (with_feature,) = lens_scores(mods.lensnet, [a])
        a.likelihood = torch.zeros_like(a.likelihood)
        (without,) = lens_scores(mods.lensnet, [a])
    assert not torch.allclose(with_feature, without)


def test_pair_cache_gives_block_gains_as_the_history_grows_and_its_window_slides(smoke_cfg, smoke_base):
    """The runtime's cached pairs score every query as block_gains does: while the history grows
    block by block, when it is read from a later block on, and with room for only a few pairs
    (older pairs read whole)."""
    from megacontext.focus.likelihood import PairCache

    mods = Modules.fresh(smoke_cfg, smoke_base)
    base, K = mods.base, smoke_cfg.tree.block_size
    history = np.random.default_rng(7).integers(0, base.vocab_size, 12 * K + 5)
    full, small = PairCache(base, K), PairCache(base, K, max_bytes=1)
    with torch.no_grad():
        for n in (K + 3, 3 * K, 3 * K + 1, 7 * K + 2, 12 * K + 5):
            ids = history[:n]
            want = block_gains(base, ids, K, n // K * K)
            np.testing.assert_allclose(full.gains(ids), want, atol=2e-3)
            np.testing.assert_allclose(small.gains(ids), want, atol=2e-3)
        assert full.pairs == 11 and small.pairs == 1 and small.first == 10
        later = history[4 * K :]
        np.testing.assert_allclose(full.gains(later, offset=4), block_gains(base, later, K, len(later) // K * K),
                                   atol=2e-3)
        assert full.first == 4 and full.pairs == 7  # the pairs before block 4 are dropped
