"""LensNet (spec §3.5): a non-causal focus scorer, one score in [-1, 1] per window entry.

Positive = expanding the entry would help prediction, negative = it can be collapsed.
Inputs per entry: its vector (token embedding or gist), level, ``log_width`` and
``log_distance`` (:func:`entry_features`); plus a conditioning set of C = 1 + m + 1 vectors
(:func:`build_conditioning`): the latest LOD2 gist, the latest m LOD1 gists (newest first)
and the mean of the raw tail, which holds the current question or code being written.
With ``cfg.query_likelihood`` a third entry feature joins ``log_width``/``log_distance``: how much
the entry's best raw block raises the base's likelihood of the newest tokens
(``focus.likelihood.likelihood_feature``). Gists alone do not tell a needle from code (the base
reads their presence, not their content); this feature does, and LensNet learns when to act on it.

``kind == "dual_cross"`` (seed: "dual cross-attn (8k -> 6 -> 8k)")::

    e   = Linear(RMSNorm(embeds)) + level_embed + MLP([log_width, log_distance(, likelihood)])  [B, W, w]
    lat = Linear(RMSNorm(cond)) + slot_embed                                       [B, C, w]
    stacks x:  lat += XAttn(lat <- masked entries)      context -> latents
               e   += XAttn(e <- masked latents)        latents -> context
               e   += MLP(e)                            (all pre-norm)
    scores = tanh(Linear(RMSNorm(e)))  [B, W], 0 at padded entries

Every entry reads latents that have read every entry, so an early entry's score depends on
the tail (spec §8: never causal). Cost is O(W * C * w) per stack.
``kind == "transformer"``: ``cfg.stacks`` bidirectional pre-norm blocks over ``[lat ; e]``
(same inputs/outputs), O((W + C)^2 * w), for comparison.
"""

from __future__ import annotations

import torch
from torch import nn

from megacontext.config import LensNetConfig
from megacontext.layers import EPS, MLP, TransformerBlock, masked_attention
from megacontext.working_context import EntrySource

HEAD_INIT_STD = 0.01  # scores start near 0 (below the allocator's thresholds)


def conditioning_slots(lod1_count: int) -> int:
    """C = 1 (latest LOD2) + ``lod1_count`` (latest LOD1s) + 1 (raw tail mean)."""
    return lod1_count + 2


def entry_features(
    levels: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, cursor: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_width [W], log_distance [W])`` float32: ``log1p(end - start)`` and
    ``log1p(cursor - end)``. ``levels``/``block_size`` check that every span is one node
    (width ``K**level``)."""
    width = ends - starts
    if not torch.equal(width, torch.pow(block_size, levels.to(width.device)).to(width.dtype)):
        raise ValueError("entry spans must be exactly block_size**level tokens wide")
    return width.float().log1p(), (cursor - ends).float().clamp_min(0).log1p()


def build_conditioning(
    source: EntrySource,
    num_tokens: int,
    tail_start: int,
    block_size: int,
    levels: int,
    lod1_count: int,
    dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditioning set ``(cond [C, d] float32, cond_mask [C] bool)``, C = lod1_count + 2.

    Row 0: the latest complete LOD2 gist (masked when there is none or ``levels == 1``).
    Rows 1..lod1_count: the latest complete LOD1 gists, newest first (masked when fewer).
    Row C-1: the mean of the raw tail token embeddings ``[tail_start, num_tokens)`` (masked
    when empty). Masked rows are zeros. Differentiable w.r.t. what ``source`` returns.
    """
    K = block_size
    rows: list[torch.Tensor | None] = [None] * conditioning_slots(lod1_count)
    n2 = num_tokens // K**2 if levels >= 2 else 0
    if n2:
        rows[0] = source.gist_vectors(2, torch.tensor([n2 - 1]))[0]
    n1 = num_tokens // K
    take = min(lod1_count, n1)
    if take:
        lod1 = source.gist_vectors(1, torch.arange(n1 - 1, n1 - 1 - take, -1))
        rows[1 : 1 + take] = list(lod1)
    if num_tokens > tail_start:
        rows[-1] = source.token_embeddings(torch.arange(tail_start, num_tokens)).float().mean(0)
    device = next((r.device for r in rows if r is not None), torch.device("cpu"))
    zero = torch.zeros(dim, device=device)
    cond = torch.stack([zero if r is None else r.float() for r in rows])
    mask = torch.tensor([r is not None for r in rows], device=device)
    return cond, mask


class CrossAttention(nn.Module):
    """Pre-norm multi-head cross-attention: ``x [B, Sq, w]`` reads ``ctx [B, Sk, w]``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_q = nn.RMSNorm(width, eps=EPS)
        self.norm_kv = nn.RMSNorm(width, eps=EPS)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor) -> torch.Tensor:
        """Residual update ``[B, Sq, w]``; ``ctx_mask [B, Sk]`` True = real context entry."""
        B, Sq, w = x.shape
        Sk, hd = ctx.shape[1], w // self.heads
        q = self.q(self.norm_q(x)).view(B, Sq, self.heads, hd).transpose(1, 2)
        k, v = self.kv(self.norm_kv(ctx)).view(B, Sk, 2, self.heads, hd).permute(2, 0, 3, 1, 4)
        return self.out(masked_attention(q, k, v, ctx_mask).transpose(1, 2).reshape(B, Sq, w))


class DualCrossStack(nn.Module):
    """One stack: latents <- entries, entries <- latents, per-entry MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.read = CrossAttention(width, heads)  # latents read the context
        self.write = CrossAttention(width, heads)  # entries read the latents
        self.norm = nn.RMSNorm(width, eps=EPS)
        self.mlp = MLP(width, 4 * width, width)

    def forward(
        self, e: torch.Tensor, lat: torch.Tensor, mask: torch.Tensor, cond_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lat = lat + self.read(lat, e, mask)
        e = e + self.write(e, lat, cond_mask)
        return e + self.mlp(self.norm(e)), lat


class LensNet(nn.Module):
    """Non-causal focus scorer. See the module docstring for the architecture."""

    def __init__(self, cfg: LensNetConfig, dim: int, levels: int = 2) -> None:
        super().__init__()
        self.cfg, self.dim, self.levels = cfg, dim, levels
        w = cfg.width
        self.slots = conditioning_slots(cfg.lod1_conditioning)
        self.entry_norm = nn.RMSNorm(dim, eps=EPS)
        self.entry_proj = nn.Linear(dim, w)
        self.level_embed = nn.Embedding(levels + 1, w)
        self.feature_mlp = MLP(3 if cfg.query_likelihood else 2, w, w)
        self.cond_norm = nn.RMSNorm(dim, eps=EPS)
        self.cond_proj = nn.Linear(dim, w)
        self.slot_embed = nn.Embedding(self.slots, w)
        if cfg.kind == "dual_cross":
            self.stacks = nn.ModuleList(DualCrossStack(w, cfg.heads) for _ in range(cfg.stacks))
        else:
            self.stacks = nn.ModuleList(TransformerBlock(w, cfg.heads) for _ in range(cfg.stacks))
        self.head_norm = nn.RMSNorm(w, eps=EPS)
        self.head = nn.Linear(w, 1)
        nn.init.normal_(self.head.weight, std=HEAD_INIT_STD)
        nn.init.zeros_(self.head.bias)

    def forward(
        self,
        embeds: torch.Tensor,
        levels: torch.Tensor,
        log_width: torch.Tensor,
        log_distance: torch.Tensor,
        mask: torch.Tensor,
        cond: torch.Tensor,
        cond_mask: torch.Tensor,
        likelihood: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores ``[B, W]`` in [-1, 1], exactly 0 where ``mask`` is False.

        embeds [B, W, d]; levels [B, W] long >= 0 (a level above ``levels``, grown by the tree,
        shares the top level's embedding; log_width tells them apart); log_width, log_distance [B, W];
        mask [B, W] bool (True = real entry); cond [B, C, d]; cond_mask [B, C] bool;
        likelihood [B, W] (``cfg.query_likelihood``: each entry's query-likelihood feature, zeros when None).
        """
        if cond.shape[1] != self.slots:
            raise ValueError(f"LensNet expects {self.slots} conditioning vectors, got {cond.shape[1]}")
        dtype = self.entry_proj.weight.dtype
        extra = [likelihood if likelihood is not None else torch.zeros_like(log_width)] if self.cfg.query_likelihood else []
        feats = torch.stack([log_width, log_distance, *extra], dim=-1).to(dtype)
        level = self.level_embed(levels.clamp(max=self.levels))
        e = self.entry_proj(self.entry_norm(embeds.to(dtype))) + level + self.feature_mlp(feats)
        lat = self.cond_proj(self.cond_norm(cond.to(dtype))) + self.slot_embed.weight
        if self.cfg.kind == "dual_cross":
            for stack in self.stacks:
                e, lat = stack(e, lat, mask, cond_mask)
        else:
            x = torch.cat([lat, e], dim=1)
            key_mask = torch.cat([cond_mask, mask], dim=1)
            for block in self.stacks:
                x = block(x, key_mask=key_mask)
            e = x[:, self.slots :]
        scores = torch.tanh(self.head(self.head_norm(e)).squeeze(-1))
        return scores.masked_fill(~mask, 0.0)
