"""KV cache reuse across a refocus (issue #14): the decode step keeps the base's cache up to
the first window entry that changed, and its logits equal a from-scratch forward over the
assembled window, for every kind of edit and both position modes (tiny random Llama, CPU)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from megacontext.base_model import BaseModel, crop_cache
from megacontext.config import load_config
from megacontext.modules import Modules
from megacontext.runtime import Session, first_change
from megacontext.tree import MegaContextTree
from megacontext.working_context import WorkingContext

VOCAB, K = 96, 8
SETTINGS = ["tree.block_size=8", "tree.levels=2", "focus.budget=64", "focus.tail_blocks=1", "focus.n_diff=4"]


@pytest.fixture(scope="module")
def base() -> BaseModel:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024)
    return BaseModel(LlamaForCausalLM(config).float(), tokenizer=None, name="tiny-llama")


def _session(base: BaseModel, mode: str, tau: float) -> Session:
    """A RAM session; LensNet's scores are in [-1, 1]: ``tau`` > 1 takes no refocus edits, < -1 every one it can."""
    cfg = load_config("smoke", [*SETTINGS, f"focus.position_mode={mode}"], env={})
    modules = Modules.fresh(cfg, base)
    tree = MegaContextTree.create_ram(K, cfg.tree.levels, base.dim, modules.gister())
    return Session(modules, tree, dataclasses.replace(cfg.focus, tau_expand=tau, tau_collapse=tau), seed=0)


def _history(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=n)


@torch.no_grad()
def _fresh_logits(s: Session) -> torch.Tensor:
    """[V]: the last logits of a forward over the whole assembled window, no cache."""
    window = s.assemble()
    return s.base.forward(window.embeds[None], window.position_ids[None]).logits[0, -1].float()


def _gists(wc: WorkingContext) -> list[int]:
    return [p for p, (level, _) in enumerate(wc.entries) if level > 0]


def _expand(which: int) -> Callable[[WorkingContext], None]:
    return lambda wc: wc.expand(_gists(wc)[which])


def _collapse(which: int) -> Callable[[WorkingContext], None]:
    return lambda wc: wc.collapse(int(wc.collapsible_positions()[which]))


def _expand_then_collapse(wc: WorkingContext) -> None:
    wc.collapse(int(wc.collapsible_positions()[-1]))
    wc.expand(_gists(wc)[1])


EDITS = {
    "expand_first": _expand(0),
    "expand_middle": _expand(2),
    "expand_last": _expand(-1),  # its children and the tail are raw: embedded without assembling
    "collapse_first": _collapse(0),
    "collapse_last": _collapse(-1),
    "collapse_and_expand": _expand_then_collapse,
    "no_change": lambda wc: None,
}


@pytest.mark.parametrize("mode", ["compact", "absolute"])
@pytest.mark.parametrize("edit", list(EDITS))
def test_logits_after_an_edit_equal_a_forward_from_scratch(base, mode, edit):
    s = _session(base, mode, tau=10.0)  # no refocus edits
    s.ingest(_history(20 * K + 3))
    s.wc = WorkingContext.initial(s.num_tokens, K, s.levels, s.focus.budget, s.focus.tail_blocks)  # room to expand
    s.next_logits()
    s.ingest([5])  # one more token on the cached window
    torch.testing.assert_close(s.next_logits(), _fresh_logits(s), atol=1e-5, rtol=1e-5)
    assert s.base_forward_entries[-1] == 1
    before = list(s.wc.entries)
    EDITS[edit](s.wc)
    s.wc.check_invariants()
    changed = first_change(before, s.wc.entries)
    torch.testing.assert_close(s.next_logits(), _fresh_logits(s), atol=1e-5, rtol=1e-5)
    W = len(s.wc.entries)
    assert s.base_forward_entries[-1] == W - min(changed, W - 1)  # only what changed went through the base
    assert (edit == "expand_first") == (s.base_forward_entries[-1] == W)  # expand_first: nothing to keep
    s.ingest([7])  # and the cache goes on from there
    torch.testing.assert_close(s.next_logits(), _fresh_logits(s), atol=1e-5, rtol=1e-5)
    assert s.base_forward_entries[-1] == 1


@pytest.mark.parametrize("mode", ["compact", "absolute"])
def test_greedy_decoding_with_reuse_equals_decoding_from_scratch(base, mode):
    """Eager thresholds make every refocus edit the window; the tokens match step by step."""
    prompt, n_new = _history(30 * K + 5, seed=1), 6 * K
    reused = _session(base, mode, tau=-10.0)
    reused.ingest(prompt[:-2])
    tokens = reused.generate(prompt[-2:], n_new)
    scratch = _session(base, mode, tau=-10.0)
    scratch.ingest(prompt)
    expected = []
    for _ in range(n_new):
        expected.append(int(torch.argmax(_fresh_logits(scratch))))
        scratch.ingest(expected[-1:])
    assert tokens == expected
    assert reused.wc.entries == scratch.wc.entries
    assert sum(t.actions for t in reused.telemetry) > 10  # the windows did change
    fed = reused.base_forward_entries
    assert any(1 < n < len(reused.wc.entries) for n in fed)  # ... and the cache was kept across some


@pytest.mark.parametrize("mode", ["compact", "absolute"])
def test_a_forced_collapse_keeps_the_cache_up_to_the_first_changed_entry(base, mode):
    s = _session(base, mode, tau=10.0)  # no refocus edits: only the growth of the history changes the window
    s.ingest(_history(20 * K + 3))
    s.next_logits()
    for token in _history(8 * K, seed=2).tolist():  # decoding: one token, then a step
        before, forced = list(s.wc.entries), len(s.forced)
        s.ingest([token])
        torch.testing.assert_close(s.next_logits(), _fresh_logits(s), atol=1e-5, rtol=1e-5)
        if len(s.forced) > forced:
            W = len(s.wc.entries)
            assert 0 < first_change(before, s.wc.entries) < W - 1  # the collapse changed entries inside the window
            assert s.base_forward_entries[-1] == W - first_change(before, s.wc.entries)  # ... and only those were fed
            return
    raise AssertionError("no forced collapse happened")


def test_a_failed_step_leaves_a_cache_that_still_matches(base, monkeypatch):
    s = _session(base, "compact", tau=10.0)
    s.ingest(_history(12 * K))
    s.next_logits()
    s.ingest([3])

    forward = s.base.forward

    def broken(*args, **kwargs):
        forward(*args, **kwargs)  # the cache grows in place, then the step fails
        raise RuntimeError("out of memory")

    with monkeypatch.context() as m:
        m.setattr(s.base, "forward", broken)
        with pytest.raises(RuntimeError):
            s.next_logits()
    torch.testing.assert_close(s.next_logits(), _fresh_logits(s), atol=1e-5, rtol=1e-5)


def test_crop_cache_cuts_back_or_declines(base):
    emb = base.embed(torch.arange(10))[None]
    full = base.forward(emb, torch.arange(10)[None], use_cache=True)
    cache = full.cache
    assert isinstance(cache, DynamicCache) and crop_cache(cache, 6) and cache.get_seq_length() == 6
    out = base.forward(emb[:, 6:], torch.arange(6, 10)[None], past_key_values=cache, use_cache=True)
    torch.testing.assert_close(out.logits, full.logits[:, 6:], atol=1e-5, rtol=1e-5)
    sliding = SimpleNamespace(layers=[SimpleNamespace(is_croppable=True, is_sliding=True)])
    assert not crop_cache(sliding, 3)
    assert not crop_cache(object(), 3)  # a transformers without cache layers


def test_first_change():
    a = [(1, 0), (0, 32), (0, 33)]
    assert first_change(a, a) == 3
    assert first_change(a, a + [(0, 34)]) == 3
    assert first_change(a, [(1, 0), (0, 32)]) == 2
    assert first_change(a, [(0, 0)] + a[1:]) == 0
    assert first_change(a, [(1, 0), (1, 1)]) == 1
