"""Context policies compared at the same budget ``W`` (spec §6).

Every policy turns one history ``[T]`` into what the base reads before the horizon:

- ``reference``     the full history at LOD0 when it fits ``max_context - H``, else the
                    newest ``max_context - H`` tokens (training's reference context);
- ``recency``       the newest ``W`` raw tokens;
- ``sinks``         the first ``sinks`` tokens + the newest ``W - sinks`` (StreamingLLM);
- ``uniform_gists`` ``WorkingContext.initial`` at ``W`` (tail raw, the rest gists), no LensNet;
                    like every gist policy it starts with no headroom, so it fills ``W``;
- ``random_focus``  the allocator driven by seeded uniform scores in [-1, 1] for the same
                    number of refocus rounds as ``megacontext``;
- ``megacontext``   LensNet + allocator on-policy (``training.episode.focus_window``).

Raw policies place their tokens at positions ``0..n-1`` and are read by the base without
the LoRA adapter (the baselines, as training validates them); gist policies are assembled
with the configured position mode and read by the adapted base. Costs are in working
context units (one per entry, whatever its level).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from megacontext.allocator import FocusAllocator
from megacontext.base_model import BaseModel
from megacontext.config import Config, FocusConfig
from megacontext.gistnet import GistNet
from megacontext.lensnet import LensNet
from megacontext.training.episode import (
    HistorySource,
    Prefix,
    focus_window,
    raw_prefix,
    recency_prefix,
    reference_prefix,
)
from megacontext.working_context import Assembled, WorkingContext, assemble

POLICIES = ("reference", "recency", "sinks", "uniform_gists", "random_focus", "megacontext")
RAW_POLICIES = ("reference", "recency", "sinks")


@dataclass
class PolicyModules:
    """The frozen modules and settings every policy reads."""

    base: BaseModel  # with the LoRA adapter when the checkpoint has one: reads gist windows
    plain_base: BaseModel  # without the adapter: reads the raw baselines (as training validates)
    gistnet: GistNet
    lensnet: LensNet
    focus: FocusConfig  # allocator settings (greedy); the budget is given per call
    block_size: int
    levels: int
    sinks: int  # StreamingLLM sink tokens
    rounds: int  # refocus rounds of random_focus and megacontext

    @classmethod
    def from_config(
        cls, cfg: Config, base: BaseModel, plain_base: BaseModel, gistnet: GistNet, lensnet: LensNet
    ) -> PolicyModules:
        """Evaluation always uses the greedy allocator, with training's number of rounds."""
        return cls(
            base=base,
            plain_base=plain_base,
            gistnet=gistnet,
            lensnet=lensnet,
            focus=dataclasses.replace(cfg.focus, stochastic=False),
            block_size=cfg.tree.block_size,
            levels=cfg.tree.levels,
            sinks=cfg.eval.sinks,
            rounds=cfg.train.focus_rounds,
        )

    def base_for(self, policy: str) -> BaseModel:
        """The base that reads ``policy``'s window."""
        return self.plain_base if policy in RAW_POLICIES else self.base


@dataclass
class PolicyWindow:
    """What one policy feeds the base before the horizon."""

    prefix: Prefix | Assembled  # embeds [n, d], position_ids [n], next_position
    cost: int  # cost units (entries) of the prefix
    gist_entries: int  # entries above LOD0


def sinks_ids(history: np.ndarray, budget: int, sinks: int) -> np.ndarray:
    """int64 [min(T, budget)]: the first ``sinks`` tokens + the newest ``budget - sinks``."""
    if len(history) <= budget:
        return history
    return np.concatenate([history[:sinks], history[len(history) - (budget - sinks) :]])


def random_focus_context(
    num_tokens: int, focus: FocusConfig, block_size: int, levels: int, budget: int, rounds: int,
    rng: np.random.Generator,
) -> WorkingContext:
    """``WorkingContext.initial`` then ``rounds`` refocuses on uniform scores in [-1, 1]."""
    wc = WorkingContext.initial(num_tokens, block_size, levels, budget, focus.tail_blocks, headroom=0)
    allocator = FocusAllocator(focus, block_size, rng)
    for _ in range(rounds):
        allocator.refocus_passes(wc, lambda w: rng.uniform(-1.0, 1.0, w.cost))
    return wc


def gist_context(
    policy: str, mods: PolicyModules, source: HistorySource, budget: int, rng: np.random.Generator
) -> WorkingContext:
    """The working context of a gist policy over ``source.num_tokens`` tokens of history."""
    n, K, L = source.num_tokens, mods.block_size, mods.levels
    if policy == "uniform_gists":
        return WorkingContext.initial(n, K, L, budget, mods.focus.tail_blocks, headroom=0)
    if policy == "random_focus":
        return random_focus_context(n, mods.focus, K, L, budget, mods.rounds, rng)
    if policy == "megacontext":
        return focus_window(n, source, mods.lensnet, mods.focus, K, L, budget, mods.rounds, rng)
    raise ValueError(f"{policy!r} is not a gist policy")


def policy_window(
    policy: str,
    mods: PolicyModules,
    history: np.ndarray,
    source: HistorySource | None,
    budget: int,
    horizon: int,
    rng: np.random.Generator,
) -> PolicyWindow:
    """The prefix of ``policy`` for ``history`` int64 [T] at ``budget``.

    ``source`` (token embeddings + gists of ``history``) is needed by the gist policies;
    ``horizon`` only by ``reference`` (it must leave room for the horizon tokens).
    """
    base = mods.base_for(policy)
    if policy == "reference":
        p = reference_prefix(base, history, horizon)
        return PolicyWindow(p, int(p.embeds.shape[0]), 0)
    if policy == "recency":
        p = recency_prefix(base, history, budget)
        return PolicyWindow(p, int(p.embeds.shape[0]), 0)
    if policy == "sinks":
        ids = sinks_ids(history, budget, mods.sinks)
        return PolicyWindow(raw_prefix(base, ids), len(ids), 0)
    if source is None:
        raise ValueError(f"policy {policy!r} needs the history's gists")
    wc = gist_context(policy, mods, source, budget, rng)
    window = assemble(wc, source, mods.focus.position_mode)
    return PolicyWindow(window, wc.cost, int((window.levels > 0).sum()))
