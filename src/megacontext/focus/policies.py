"""Every context policy behind one interface (spec §6), and the on-policy focus loop.

A policy turns one history ``[T]`` into what the base reads before the horizon, at the
budget ``settings.focus.budget``:

- ``reference``     the full history at LOD0 when it fits ``max_context - H``, else the
                    newest ``max_context - H`` tokens (training's reference context);
- ``recency``       the newest ``W`` raw tokens;
- ``sinks``         the first ``sinks`` tokens + the newest ``W - sinks`` (StreamingLLM);
- ``uniform_gists`` :func:`initial_context` (tail raw, the rest gists), no LensNet;
- ``random_focus``  the allocator driven by seeded uniform scores in [-1, 1] for
                    ``settings.rounds`` refocuses;
- ``similarity_focus`` training-free retrieval (InfLLM / MoBA style): the allocator driven
                    by each entry's cosine similarity with the newest block, no learned weights;
- ``likelihood_focus`` training-free retrieval by the frozen base itself: the allocator driven
                    by each block's query likelihood gain (:mod:`megacontext.focus.likelihood`);
- ``megacontext``   LensNet + allocator on-policy (:func:`focus_window`).

Raw policies (:data:`RAW_POLICIES`) place their tokens at positions ``0..n-1`` and are read
by the plain base (``with modules.plain()`` — see :func:`reading`); gist policies are
assembled with the configured position mode and read by the adapted base. Every gist
policy starts with no headroom, so it fills ``W`` like ``recency``. Costs are in working
context units (one per entry, whatever its level). A new policy is one function with the
:data:`PolicyFn` signature, registered in :data:`POLICY_FNS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from megacontext.allocator import FocusAllocator
from megacontext.config import Config, FocusConfig, TreeShape
from megacontext.data import Window
from megacontext.focus.horizon import PrefixLike, horizon_nll, raw_prefix
from megacontext.focus.lens import score_window
from megacontext.focus.likelihood import block_gains, entry_scores
from megacontext.focus.source import HistorySource
from megacontext.focus.trace import FocusTrace
from megacontext.lensnet import LensNet
from megacontext.modules import Modules
from megacontext.working_context import Action, EntrySource, WorkingContext, assemble, tail_start_of


@dataclass(frozen=True)
class FocusSettings:
    """How policies run: allocator settings (the budget is ``focus.budget``), tree shape,
    StreamingLLM sink tokens, refocus rounds of ``random_focus`` / ``megacontext``."""

    focus: FocusConfig
    shape: TreeShape
    sinks: int
    rounds: int

    @classmethod
    def from_config(cls, cfg: Config, greedy: bool) -> FocusSettings:
        """Training uses ``cfg.focus`` as it is; evaluation (``greedy``) the greedy allocator."""
        focus = dataclasses.replace(cfg.focus, stochastic=False) if greedy else cfg.focus
        return cls(focus, cfg.tree.shape, cfg.eval.sinks, cfg.train.focus_rounds)

    @property
    def budget(self) -> int:
        return self.focus.budget

    def at_budget(self, budget: int) -> FocusSettings:
        return dataclasses.replace(self, focus=dataclasses.replace(self.focus, budget=budget))


@dataclass
class PolicyWindow:
    """What one policy feeds the base before the horizon."""

    prefix: PrefixLike  # embeds [n, d], position_ids [n], next_position
    cost: int  # cost units (entries) of the prefix
    gist_entries: int  # entries above LOD0
    wc: WorkingContext | None = None  # the working context of a gist policy


@dataclass
class PolicyRequest:
    """One policy call: the history int64 [T], its entry source (gist policies), the horizon
    length (``reference`` leaves room for it), a seeded rng and an optional trace."""

    modules: Modules
    settings: FocusSettings
    history: np.ndarray
    source: HistorySource | None
    horizon: int
    rng: np.random.Generator
    trace: FocusTrace | None = None


PolicyFn = Callable[[PolicyRequest], PolicyWindow]


# ------------------------------------------------------------------------ the focus loop
def initial_context(num_tokens: int, settings: FocusSettings) -> WorkingContext:
    """The initial assembly at ``settings.budget``: tail raw, the rest at the finest level
    that fits, no headroom (a prediction window may use the whole budget)."""
    K, L = settings.shape.block_size, settings.shape.levels
    return WorkingContext.initial(num_tokens, K, L, settings.budget, settings.focus.tail_blocks, headroom=0)


def refocus(
    wc: WorkingContext,
    source: EntrySource,
    lensnet: LensNet,
    allocator: FocusAllocator,
    position_mode: str,
    timer: dict[str, float] | None = None,
) -> list[Action]:
    """One refocus: up to ``allocator.cfg.passes`` passes of assemble -> conditioning ->
    LensNet scores -> allocator edits (re-scored between passes). No gradients."""
    return allocator.refocus_passes(wc, lambda w: score_window(w, source, lensnet, position_mode, timer))


ScoreFn = Callable[[WorkingContext], np.ndarray]  # the window as it stands -> one score per entry [W]


@torch.no_grad()
def refocus_rounds(
    num_tokens: int,
    settings: FocusSettings,
    rng: np.random.Generator,
    score: ScoreFn,
    rounds: int | None = None,
    trace: FocusTrace | None = None,
) -> WorkingContext:
    """:func:`initial_context`, then ``rounds`` (default ``settings.rounds``) refocuses of the
    allocator on ``score`` (re-scored between passes), each recorded in ``trace``."""
    wc = initial_context(num_tokens, settings)
    allocator = FocusAllocator(settings.focus, settings.shape.block_size, rng)
    for _ in range(settings.rounds if rounds is None else rounds):
        entries = wc.cost
        actions = allocator.refocus_passes(wc, score)
        if trace is not None:
            trace.record(actions, entries)
    return wc


def focus_window(
    source: HistorySource,
    lensnet: LensNet,
    settings: FocusSettings,
    rng: np.random.Generator,
    rounds: int | None = None,
    trace: FocusTrace | None = None,
) -> WorkingContext:
    """On-policy working context over ``source``: LensNet drives the allocator. Assemble the
    result again (with grad) to train through it."""
    mode = settings.focus.position_mode
    return refocus_rounds(source.num_tokens, settings, rng, lambda w: score_window(w, source, lensnet, mode),
                          rounds, trace)


def random_focus_context(
    num_tokens: int, settings: FocusSettings, rng: np.random.Generator, trace: FocusTrace | None = None
) -> WorkingContext:
    """The allocator on seeded uniform scores in [-1, 1]."""
    return refocus_rounds(num_tokens, settings, rng, lambda w: rng.uniform(-1.0, 1.0, w.cost), trace=trace)


@torch.no_grad()
def similarity_scores(wc: WorkingContext, source: EntrySource, position_mode: str) -> np.ndarray:
    """Training-free scores [W] (InfLLM / MoBA style): cosine of every entry's vector with the
    mean embedding of the newest block (the current question or code), standardised among
    the entries of the same level (a pooled gist resembles any mean far more than a single
    token does) and squashed: ``tanh(z / 2)``. No learned weights."""
    window = assemble(wc, source, position_mode)
    lo = max(0, wc.num_tokens - wc.block_size)
    query = source.token_embeddings(torch.arange(lo, wc.num_tokens)).float().mean(0)
    sims = torch.nn.functional.cosine_similarity(window.embeds.float(), query[None].to(window.embeds.device), dim=-1)
    z = torch.zeros_like(sims)
    for level in window.levels.unique().tolist():
        at = window.levels == level
        if int(at.sum()) > 1:
            z[at] = (sims[at] - sims[at].mean()) / (sims[at].std() + 1e-6)
    return torch.tanh(z / 2).cpu().numpy()


def similarity_focus_context(
    source: HistorySource, settings: FocusSettings, rng: np.random.Generator, trace: FocusTrace | None = None
) -> WorkingContext:
    """The allocator on :func:`similarity_scores` (training-free retrieval)."""
    mode = settings.focus.position_mode
    return refocus_rounds(source.num_tokens, settings, rng, lambda w: similarity_scores(w, source, mode), trace=trace)


def likelihood_focus_context(
    req: PolicyRequest, source: HistorySource, trace: FocusTrace | None = None
) -> WorkingContext:
    """The allocator on :func:`~megacontext.focus.likelihood.entry_scores` of the blocks' query
    likelihood gains, measured once by the plain base (training-free retrieval)."""
    K, n = req.settings.shape.block_size, source.num_tokens
    end = tail_start_of(n, K, req.settings.focus.tail_blocks)
    with req.modules.plain():
        gains = block_gains(req.modules.base, req.history, K, end)
    return refocus_rounds(n, req.settings, req.rng, lambda w: entry_scores(w, gains), trace=trace)


# ------------------------------------------------------------------------ the policies
def reference_context(history: np.ndarray, max_context: int, horizon: int) -> np.ndarray:
    """The reference history (spec §4): all of it at LOD0 when it fits
    ``max_context - horizon`` tokens, else the newest ``max_context - horizon`` tokens."""
    keep = max_context - horizon
    return history[-keep:] if len(history) > keep else history


def sinks_ids(history: np.ndarray, budget: int, sinks: int) -> np.ndarray:
    """int64 [min(T, budget)]: the first ``sinks`` tokens + the newest ``budget - sinks``."""
    if len(history) <= budget:
        return history
    return np.concatenate([history[:sinks], history[len(history) - (budget - sinks) :]])


def _raw(req: PolicyRequest, ids: np.ndarray) -> PolicyWindow:
    return PolicyWindow(raw_prefix(req.modules.base, ids), len(ids), 0)


def _gists(req: PolicyRequest, wc: WorkingContext) -> PolicyWindow:
    window = assemble(wc, req.source, req.settings.focus.position_mode)
    return PolicyWindow(window, wc.cost, int((window.levels > 0).sum()), wc)


def _source(req: PolicyRequest) -> HistorySource:
    if req.source is None:
        raise ValueError("a gist policy needs the history's gists (PolicyRequest.source)")
    return req.source


POLICY_FNS: dict[str, PolicyFn] = {
    "reference": lambda r: _raw(r, reference_context(r.history, r.modules.base.max_context, r.horizon)),
    "recency": lambda r: _raw(r, r.history[-r.settings.budget :]),
    "sinks": lambda r: _raw(r, sinks_ids(r.history, r.settings.budget, r.settings.sinks)),
    "uniform_gists": lambda r: _gists(r, initial_context(_source(r).num_tokens, r.settings)),
    "random_focus": lambda r: _gists(r, random_focus_context(_source(r).num_tokens, r.settings, r.rng, r.trace)),
    "similarity_focus": lambda r: _gists(r, similarity_focus_context(_source(r), r.settings, r.rng, r.trace)),
    "likelihood_focus": lambda r: _gists(r, likelihood_focus_context(r, _source(r), r.trace)),
    "megacontext": lambda r: _gists(r, focus_window(_source(r), r.modules.lensnet, r.settings, r.rng, trace=r.trace)),
}
POLICIES: tuple[str, ...] = tuple(POLICY_FNS)
RAW_POLICIES: tuple[str, ...] = ("reference", "recency", "sinks")


def policy_window(policy: str, req: PolicyRequest) -> PolicyWindow:
    """The prefix of ``policy`` for ``req.history``; build it inside :func:`reading`."""
    if policy not in POLICY_FNS:
        raise ValueError(f"unknown policy {policy!r} (known: {', '.join(POLICIES)})")
    return POLICY_FNS[policy](req)


def reading(modules: Modules, policy: str) -> AbstractContextManager:
    """The base that builds and reads ``policy``'s window: plain for raw policies."""
    return modules.plain() if policy in RAW_POLICIES else nullcontext()


@torch.no_grad()
def policy_nll(
    policy: str,
    modules: Modules,
    settings: FocusSettings,
    windows: Sequence[Window],
    sources: Sequence[HistorySource | None],
    rngs: Sequence[np.random.Generator],
    traces: Sequence[FocusTrace | None] | None = None,
    plain: bool | None = None,
    start: int = 0,
) -> tuple[list[float], list[PolicyWindow]]:
    """loss@H of ``windows`` under ``policy``: one batched forward; per-window NLL + windows.

    ``plain`` overrides who reads (None: :func:`reading`'s choice; False: the adapted base
    even for a raw policy — how much of a gain is the adapter alone). ``start``: score the
    horizon tokens from there on (the earlier ones are read, not scored).
    """
    traces = traces if traces is not None else [None] * len(windows)
    ctx = reading(modules, policy) if plain is None else modules.plain() if plain else nullcontext()
    with ctx:
        pws = [
            policy_window(policy, PolicyRequest(modules, settings, w.history, src, len(w.horizon), rng, trace))
            for w, src, rng, trace in zip(windows, sources, rngs, traces)
        ]
        horizons = np.stack([w.horizon for w in windows])
        nll = horizon_nll(modules.base, [pw.prefix for pw in pws], horizons, start)
    return nll.float().cpu().tolist(), pws
