"""One window of history -> on-policy working context -> NLL of the horizon tokens.

Shared by training (every phase) and evaluation (policies, loss@H). The pieces:

- :class:`HistorySource` — an ``EntrySource`` over one window's token embeddings ``[T, d]``
  and its per-level gists (computed with or without grad);
- :func:`focus_window` — ``WorkingContext.initial`` then ``rounds`` refocuses
  (assemble -> conditioning -> LensNet scores -> ``FocusAllocator.refocus``), no grad;
- :class:`Prefix` — anything fed to the base before the horizon: an ``Assembled`` window,
  the reference context, or the recency baseline (all share ``embeds``/``position_ids``/
  ``next_position``);
- :func:`horizon_logits` / :func:`horizon_nll` — append the horizon after the prefix
  (positions continue from ``next_position``) and score ONLY the real horizon tokens:
  the logit at the prefix's last slot predicts ``horizon[0]``, the logit at ``horizon[i]``
  predicts ``horizon[i+1]`` (spec §8: targets are never aligned to window slots).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from megacontext.allocator import FocusAllocator
from megacontext.base_model import BaseModel
from megacontext.config import FocusConfig
from megacontext.gistnet import gists_for_history
from megacontext.lensnet import LensNet, build_conditioning, entry_features
from megacontext.training import losses
from megacontext.working_context import Action, Assembled, WorkingContext, assemble


# ------------------------------------------------------------------------ sources
@dataclass
class HistorySource:
    """EntrySource over one window: token embeddings ``[T, d]``, ``gists[k-1]`` ``[T//K**k, d]``."""

    tokens: torch.Tensor
    gists: list[torch.Tensor]

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def token_embeddings(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [n] -> [n, d]."""
        return self.tokens.index_select(0, positions.to(self.tokens.device))

    def gist_vectors(self, level: int, indices: torch.Tensor) -> torch.Tensor:
        """indices [n] of ``level`` (>= 1) -> [n, d]."""
        table = self.gists[level - 1]
        return table.index_select(0, indices.to(table.device))


def build_source(
    base: BaseModel,
    gistnet: torch.nn.Module,
    history: np.ndarray | torch.Tensor,
    block_size: int,
    levels: int,
    gist_grad: bool = True,
) -> HistorySource:
    """Embed ``history`` [T] with the base (adapted embeddings when LoRA is on) and gist it.

    Autograd follows the caller's grad mode and the modules' ``requires_grad`` flags: in
    JT1 the gists carry grad into GistNet. ``gist_grad=False`` computes the gists without
    a graph (JT3: the embedding adapter then trains through the raw entries only).
    """
    ids = torch.as_tensor(np.asarray(history, dtype=np.int64), device=base.device)
    tokens = base.embed(ids)
    with torch.set_grad_enabled(gist_grad and torch.is_grad_enabled()):
        gists = gists_for_history(gistnet, tokens if gist_grad else tokens.detach(), block_size, levels)
    return HistorySource(tokens=tokens, gists=list(gists))


# ------------------------------------------------------------------------ prefixes
@dataclass
class Prefix:
    """A raw context fed before the horizon: ``embeds`` [n, d], ``position_ids`` [n]."""

    embeds: torch.Tensor
    position_ids: torch.Tensor
    next_position: int


def reference_context(history: np.ndarray, max_context: int, horizon: int) -> np.ndarray:
    """The reference history (spec §4): all of it at LOD0 when it fits
    ``max_context - horizon`` tokens, else the newest ``max_context - horizon`` tokens."""
    keep = max_context - horizon
    return history[-keep:] if len(history) > keep else history


def raw_prefix(base: BaseModel, ids: np.ndarray | torch.Tensor) -> Prefix:
    """Token ids [n] as a plain LOD0 prefix at positions 0..n-1."""
    ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64), device=base.device)
    n = int(ids_t.shape[0])
    return Prefix(base.embed(ids_t), torch.arange(n, device=base.device), n)


def reference_prefix(base: BaseModel, history: np.ndarray, horizon: int) -> Prefix:
    return raw_prefix(base, reference_context(history, base.max_context, horizon))


def recency_prefix(base: BaseModel, history: np.ndarray, budget: int) -> Prefix:
    """The ``recency`` policy: the newest ``budget`` raw tokens."""
    return raw_prefix(base, history[-budget:])


# ------------------------------------------------------------------------ horizon
def _horizon_ids(horizons: Any, rows: int, device: torch.device) -> torch.Tensor:
    """Horizon token ids (array / tensor, [H] or [B, H]) -> LongTensor [rows, H]."""
    ids = horizons if torch.is_tensor(horizons) else torch.from_numpy(np.asarray(horizons, dtype=np.int64))
    return ids.long().reshape(rows, -1).to(device)


def horizon_logits(
    base: BaseModel, prefixes: Prefix | Assembled | Sequence[Prefix | Assembled], horizons: Any
) -> torch.Tensor:
    """Logits ``[B, H, V]`` predicting ``horizons`` [B, H] (or [H]) after each prefix.

    Row b is ``prefix_b ++ embed(horizon_b[:-1])`` at positions
    ``prefix.position_ids ++ next_position + (0..H-2)``; one batched, left-padded forward.
    Output slot ``j`` is the logit at the prefix's last entry (``j = 0``) or at
    ``horizon[j-1]`` (``j >= 1``): it predicts ``horizon[j]``.
    """
    prefixes = [prefixes] if isinstance(prefixes, (Prefix, Assembled)) else list(prefixes)
    horizon = _horizon_ids(horizons, len(prefixes), base.device)
    H = horizon.shape[1]
    embeds, positions = [], []
    for p, h in zip(prefixes, horizon):
        start = int(p.next_position)
        embeds.append(torch.cat([p.embeds.to(base.dtype), base.embed(h[:-1]).to(base.dtype)]))
        positions.append(
            torch.cat([p.position_ids.to(base.device), torch.arange(start, start + H - 1, device=base.device)])
        )
    logits, _ = base.forward_padded(embeds, positions)
    return logits[:, -H:]


def horizon_nll(
    base: BaseModel, prefixes: Prefix | Assembled | Sequence[Prefix | Assembled], horizons: Any
) -> torch.Tensor:
    """Mean NLL per row ``[B]`` of the horizon tokens (nats/token)."""
    prefixes = [prefixes] if isinstance(prefixes, (Prefix, Assembled)) else list(prefixes)
    target = _horizon_ids(horizons, len(prefixes), base.device)
    return losses.nll(horizon_logits(base, prefixes, target), target)


# ------------------------------------------------------------------------ LensNet
@dataclass
class LensInput:
    """Everything LensNet reads for one window (all ``[W, ...]`` / ``[C, d]``, no batch)."""

    embeds: torch.Tensor  # [W, d]
    levels: torch.Tensor  # [W]
    log_width: torch.Tensor  # [W]
    log_distance: torch.Tensor  # [W]
    cond: torch.Tensor  # [C, d]
    cond_mask: torch.Tensor  # [C]


def lens_input(
    wc: WorkingContext, assembled: Assembled, source: HistorySource, lensnet: LensNet, block_size: int, levels: int
) -> LensInput:
    """LensNet's view of one assembled window: entry features + the conditioning set."""
    log_w, log_d = entry_features(assembled.levels, assembled.starts, assembled.ends, wc.num_tokens, block_size)
    cond, cond_mask = build_conditioning(
        source, wc.num_tokens, wc.tail_start, block_size, levels, lensnet.cfg.lod1_conditioning, source.tokens.shape[1]
    )
    return LensInput(assembled.embeds, assembled.levels, log_w, log_d, cond, cond_mask)


def lens_scores(lensnet: LensNet, inputs: Sequence[LensInput]) -> list[torch.Tensor]:
    """One LensNet call over right-padded windows -> a score tensor [W_i] per window."""
    B = len(inputs)
    W = max(int(x.embeds.shape[0]) for x in inputs)
    C = max(int(x.cond.shape[0]) for x in inputs)
    d = inputs[0].embeds.shape[1]
    dev = next(lensnet.parameters()).device
    emb = torch.zeros(B, W, d, device=dev)
    lev = torch.zeros(B, W, dtype=torch.long, device=dev)
    lw = torch.zeros(B, W, device=dev)
    ld = torch.zeros(B, W, device=dev)
    mask = torch.zeros(B, W, dtype=torch.bool, device=dev)
    cond = torch.zeros(B, C, d, device=dev)
    cmask = torch.zeros(B, C, dtype=torch.bool, device=dev)
    for b, x in enumerate(inputs):
        n, c = x.embeds.shape[0], x.cond.shape[0]
        emb[b, :n] = x.embeds.float()
        lev[b, :n] = x.levels
        lw[b, :n] = x.log_width.float()
        ld[b, :n] = x.log_distance.float()
        mask[b, :n] = True
        cond[b, :c] = x.cond.float()
        cmask[b, :c] = x.cond_mask
    scores = lensnet(emb, lev, lw, ld, mask, cond, cmask)
    return [scores[b, : x.embeds.shape[0]] for b, x in enumerate(inputs)]


# ------------------------------------------------------------------------ focusing
@dataclass
class FocusTrace:
    """What the allocator did over one window's refocuses (swap rate, residency, traces)."""

    actions: list[list[Action]] = field(default_factory=list)  # per refocus (all its passes)
    entries: list[int] = field(default_factory=list)  # window entries at each refocus

    @property
    def swap_rate(self) -> float:
        """Mean over refocuses of actions / entries in the window."""
        rates = [len(a) / max(1, n) for a, n in zip(self.actions, self.entries)]
        return float(np.mean(rates)) if rates else 0.0

    @property
    def residency(self) -> list[float]:
        """Refocuses the replaced entries had kept their level, one value per action."""
        return [a.residency for acts in self.actions for a in acts]

    def records(self) -> list[dict[str, Any]]:
        """Allocator trace rows: refocus, node, action, score, cost before/after, residency."""
        return [{"refocus": r, **dataclasses.asdict(a)} for r, acts in enumerate(self.actions) for a in acts]


def focus_window(
    num_tokens: int,
    source: HistorySource,
    lensnet: LensNet,
    allocator_cfg: FocusConfig,
    block_size: int,
    levels: int,
    budget: int,
    rounds: int,
    rng: np.random.Generator,
    trace: FocusTrace | None = None,
) -> WorkingContext:
    """On-policy working context over ``num_tokens`` of history at ``budget``.

    ``WorkingContext.initial`` (tail raw, the rest at the finest level that fits; no
    headroom: a prediction window may use the whole budget, like ``recency``), then
    ``rounds`` refocuses of up to ``allocator_cfg.passes`` passes each: assemble ->
    conditioning -> LensNet scores -> ``FocusAllocator.refocus``. No gradients; assemble
    the returned context again (with grad) to train through it.
    """
    wc = WorkingContext.initial(num_tokens, block_size, levels, budget, allocator_cfg.tail_blocks, headroom=0)
    allocator = FocusAllocator(allocator_cfg, block_size, rng)

    def score(w: WorkingContext) -> np.ndarray:
        asm = assemble(w, source, allocator_cfg.position_mode)
        (s,) = lens_scores(lensnet, [lens_input(w, asm, source, lensnet, block_size, levels)])
        return s.float().cpu().numpy()

    with torch.no_grad():
        for _ in range(rounds):
            entries = wc.cost
            actions = allocator.refocus_passes(wc, score)
            if trace is not None:
                trace.actions.append(actions)
                trace.entries.append(entries)
    return wc
