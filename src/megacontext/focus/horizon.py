"""What the base reads before the horizon, and the NLL of the horizon after it.

- :class:`Prefix` — a raw context (``embeds`` [n, d], ``position_ids`` [n], ``next_position``);
  an :class:`~megacontext.working_context.Assembled` window has the same three fields;
- :func:`horizon_logits` / :func:`horizon_nll` — append the horizon after each prefix
  (positions continue from ``next_position``) and score ONLY the real horizon tokens:
  the logit at the prefix's last slot predicts ``horizon[0]``, the logit at ``horizon[i]``
  predicts ``horizon[i+1]`` (spec §8: targets are never aligned to window slots).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from megacontext.base_model import BaseModel
from megacontext.gistnet import GistNet
from megacontext.working_context import Assembled


@dataclass
class Prefix:
    """A raw context fed before the horizon: ``embeds`` [n, d], ``position_ids`` [n]."""

    embeds: torch.Tensor
    position_ids: torch.Tensor
    next_position: int


PrefixLike = Prefix | Assembled  # anything with embeds / position_ids / next_position


def raw_prefix(base: BaseModel, ids: np.ndarray | torch.Tensor) -> Prefix:
    """Token ids [n] as a plain LOD0 prefix at positions 0..n-1."""
    ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64), device=base.device)
    n = int(ids_t.shape[0])
    return Prefix(base.embed(ids_t), torch.arange(n, device=base.device), n)


def nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [B, H, V], targets [B, H] -> mean NLL per row [B]."""
    return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none").mean(dim=1)


def _horizon_ids(horizons: Any, rows: int, device: torch.device) -> torch.Tensor:
    """Horizon token ids (array / tensor, [H] or [B, H]) -> LongTensor [rows, H]."""
    ids = horizons if torch.is_tensor(horizons) else torch.from_numpy(np.asarray(horizons, dtype=np.int64))
    return ids.long().reshape(rows, -1).to(device)


def _as_list(prefixes: PrefixLike | Sequence[PrefixLike]) -> list[PrefixLike]:
    return [prefixes] if isinstance(prefixes, (Prefix, Assembled)) else list(prefixes)


def horizon_logits(base: BaseModel, prefixes: PrefixLike | Sequence[PrefixLike], horizons: Any) -> torch.Tensor:
    """Logits ``[B, H, V]`` predicting ``horizons`` [B, H] (or [H]) after each prefix.

    Row b is ``prefix_b ++ embed(horizon_b[:-1])`` at positions
    ``prefix.position_ids ++ next_position + (0..H-2)``; one batched, left-padded forward.
    Output slot ``j`` is the logit at the prefix's last entry (``j = 0``) or at
    ``horizon[j-1]`` (``j >= 1``): it predicts ``horizon[j]``.
    """
    prefixes = _as_list(prefixes)
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
    base: BaseModel, prefixes: PrefixLike | Sequence[PrefixLike], horizons: Any, start: int = 0
) -> torch.Tensor:
    """Mean NLL per row ``[B]`` of the horizon tokens ``[start:]`` (nats/token); the tokens
    before ``start`` are read as context (teacher-forced) but not scored."""
    prefixes = _as_list(prefixes)
    target = _horizon_ids(horizons, len(prefixes), base.device)
    return nll(horizon_logits(base, prefixes, target)[:, start:], target[:, start:])


def reconstruction_logits(base: BaseModel, gists: torch.Tensor, block_embeds: torch.Tensor) -> torch.Tensor:
    """The base reads a gist, then the block it replaces: logits ``[N, K, V]`` predicting it.

    gists ``[N, d]``; block_embeds ``[N, K, d]`` (the block's token embeddings). Row n is
    ``gist_n ++ block_n[:-1]`` at positions ``0..K-1``: slot ``j`` predicts token ``j`` of
    the block, so slot 0 sees the gist alone (ICAE-style reconstruction, teacher forced).
    """
    N, K, _ = block_embeds.shape
    x = torch.cat([gists[:, None, :].to(block_embeds.dtype), block_embeds[:, :-1]], dim=1)
    positions = torch.arange(K, device=base.device).expand(N, K)
    return base.forward(x, positions).logits


@dataclass
class Reconstruction:
    """How well the base reads blocks back from their gists (:func:`reconstruction`)."""

    loss: torch.Tensor  # mean NLL per token of the blocks (with grad where the inputs have it)
    blank_loss: float  # the same with every gist zeroed: what the block's own prefix predicts
    top1: float  # share of tokens the base's argmax gets right

    @property
    def gain(self) -> float:
        """Nats per token the gist is worth to the reader (blank minus with-gist)."""
        return self.blank_loss - float(self.loss.detach())


def reconstruction(base: BaseModel, gistnet: GistNet, blocks: torch.Tensor, gist_grad: bool = True) -> Reconstruction:
    """Reconstruction NLL of ``blocks`` ``[N, K]`` (token ids) from their LOD1 gists, its
    gist-blank baseline and top-1 accuracy. The blocks are embedded by the (adapted) base and
    gisted by ``gistnet``; ``gist_grad=False`` keeps the gists out of the graph (the reader
    trains, not the writer)."""
    block_embeds = base.embed(blocks)  # [N, K, d]
    with torch.set_grad_enabled(gist_grad and torch.is_grad_enabled()):
        gists = gistnet(block_embeds if gist_grad else block_embeds.detach(), 1)  # [N, d]
    logits = reconstruction_logits(base, gists, block_embeds)
    loss = F.cross_entropy(logits.float().transpose(1, 2), blocks)
    with torch.no_grad():
        blank = reconstruction_logits(base, torch.zeros_like(gists), block_embeds)
        blank_loss = F.cross_entropy(blank.float().transpose(1, 2), blocks).item()
        top1 = (logits.argmax(-1) == blocks).float().mean().item()
    return Reconstruction(loss, blank_loss, top1)
