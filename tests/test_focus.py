"""The focus room: one registry of policies, one trace, one module bundle and seed rule."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from megacontext.allocator import FocusAllocator
from megacontext.config import FocusConfig
from megacontext.focus.policies import (
    POLICIES,
    RAW_POLICIES,
    FocusSettings,
    PolicyRequest,
    focus_window,
    initial_context,
    policy_nll,
    policy_window,
)
from megacontext.focus.source import build_source
from megacontext.focus.trace import FocusTrace
from megacontext.modules import Modules
from megacontext.working_context import WorkingContext


def test_every_policy_is_registered_once_and_raw_ones_are_marked():
    assert POLICIES == ("reference", "recency", "sinks", "uniform_gists", "random_focus", "similarity_focus",
                        "likelihood_focus", "megacontext")
    assert set(RAW_POLICIES) < set(POLICIES)


def test_unknown_policy_and_missing_gists_are_errors(smoke_cfg, smoke_base):
    mods = Modules.fresh(smoke_cfg, smoke_base)
    req = PolicyRequest(mods, FocusSettings.from_config(smoke_cfg, greedy=True), np.arange(300), None, 32,
                        np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown policy"):
        policy_window("everything", req)
    with pytest.raises(ValueError, match="needs the history's gists"):
        policy_window("uniform_gists", req)


def test_settings_sweep_the_budget_without_touching_the_config(smoke_cfg):
    s = FocusSettings.from_config(smoke_cfg, greedy=True)
    t = s.at_budget(96)
    assert (t.budget, s.budget, smoke_cfg.focus.budget) == (96, 128, 128)
    assert t.shape == smoke_cfg.tree.shape and not t.focus.stochastic


def test_trace_counts_swap_rate_residency_and_actions():
    wc = WorkingContext.initial(600, 4, 2, 64, 1, headroom=0)
    alloc = FocusAllocator(FocusConfig(budget=64, n_diff=2, tail_blocks=1), 4)
    trace = FocusTrace()
    empty = trace.summary()
    assert trace.swap_rate == 0.0 and empty["refocuses"] == 0 and np.isnan(empty["residency_mean"])
    W = wc.cost
    acts = alloc.refocus(wc, np.full(W, -0.9))
    trace.record(acts, W)
    trace.record([], wc.cost)
    s = trace.summary()
    assert s["refocuses"] == 2 and s["collapses"] == len(acts) == trace.count("collapse") > 0
    assert s["swap_rate"] == 0.0 and trace.swap_rate == pytest.approx(len(acts) / W / 2)
    assert len(trace.records()) == len(acts) and all(r["refocus"] == 0 for r in trace.records())


def test_fresh_modules_follow_one_seed_rule(smoke_cfg, smoke_base):
    a, b = Modules.fresh(smoke_cfg, smoke_base), Modules.fresh(smoke_cfg, smoke_base)
    other = Modules.fresh(dataclasses.replace(smoke_cfg, seed=smoke_cfg.seed + 1), smoke_base)
    same = lambda x, y: all(torch.equal(p, q) for p, q in zip(x.state_dict().values(), y.state_dict().values()))  # noqa: E731
    assert same(a.gistnet, b.gistnet) and same(a.lensnet, b.lensnet)
    assert not same(a.gistnet, other.gistnet)
    assert a.lora is None and a.adapter_version() == "none" and a.checkpoint is None


@torch.no_grad()
def test_megacontext_policy_is_the_on_policy_loop(smoke_cfg, smoke_base, smoke_data):
    """policy_nll("megacontext") reads exactly focus_window's context, and records its trace."""
    mods = Modules.fresh(smoke_cfg, smoke_base)
    settings = FocusSettings.from_config(smoke_cfg, greedy=True)
    history = np.concatenate(smoke_data.documents("train"))[:900].astype(np.int64)
    source = build_source(mods.base, mods.gistnet, history, settings.shape)
    trace = FocusTrace()
    pw = policy_window("megacontext", PolicyRequest(mods, settings, history, source, 32, np.random.default_rng(3),
                                                    trace))
    wc = focus_window(source, mods.lensnet, settings, np.random.default_rng(3))
    assert pw.wc.to_dict() == wc.to_dict() and trace.refocuses == settings.rounds
    uniform = initial_context(len(history), settings)
    assert settings.budget - smoke_cfg.tree.block_size < uniform.cost <= settings.budget  # no headroom held back

    from megacontext.data import Window

    w = Window(0, len(history), history, np.concatenate(smoke_data.documents("train"))[900:932].astype(np.int64))
    nll, pws = policy_nll("recency", mods, settings, [w], [None], [np.random.default_rng(0)])
    assert len(nll) == 1 and np.isfinite(nll[0]) and pws[0].cost == settings.budget


@torch.no_grad()
def test_oracle_focus_only_takes_expands_that_help_its_probe_and_stays_in_budget(smoke_cfg, smoke_base, smoke_data):
    """The ceiling: each greedy step lowers the probe's NLL, pays for itself within the budget,
    and never collapses what it expanded; it is not a policy (never in POLICIES)."""
    from megacontext.focus.counterfactual import windows_nll
    from megacontext.focus.oracle import oracle_focus_context

    assert "oracle_focus" not in POLICIES
    mods = Modules.fresh(smoke_cfg, smoke_base)
    settings = FocusSettings.from_config(smoke_cfg, greedy=True)
    doc = next(d for d in smoke_data.documents("train") if len(d) >= 700)
    history, probe = np.asarray(doc[:640]), np.asarray(doc[640:660])
    source = build_source(mods.base, mods.gistnet, history, settings.shape)
    start = initial_context(len(history), settings)
    mode = settings.focus.position_mode
    one = oracle_focus_context(mods.base, source, start.copy(), probe, 1, mode, 8)
    more = oracle_focus_context(mods.base, source, start.copy(), probe, 4, mode, 8)
    nll = windows_nll(mods.base, source, [start, one, more], probe, mode, 8)
    for wc in (one, more):
        wc.check_invariants()
        assert wc.cost <= start.budget and wc.num_tokens == len(history)
    assert nll[1] <= nll[0] and nll[2] <= nll[1]
    assert one.entries != start.entries and nll[1] < nll[0]  # this probe has an expand that helps
    raw = lambda wc: {i for (lv, i) in wc.entries if lv == 0}  # noqa: E731
    assert raw(one) - raw(start) <= raw(more)  # what the first step expanded stays expanded
