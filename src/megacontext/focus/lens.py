"""LensNet's view of a working context: entry features + conditioning -> one score per entry."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from megacontext.focus.likelihood import likelihood_feature
from megacontext.lensnet import LensNet, build_conditioning, entry_features
from megacontext.working_context import Assembled, EntrySource, WorkingContext, assemble


@dataclass
class LensInput:
    """Everything LensNet reads for one window (all ``[W, ...]`` / ``[C, d]``, no batch)."""

    embeds: torch.Tensor  # [W, d]
    levels: torch.Tensor  # [W]
    log_width: torch.Tensor  # [W]
    log_distance: torch.Tensor  # [W]
    cond: torch.Tensor  # [C, d]
    cond_mask: torch.Tensor  # [C]
    likelihood: torch.Tensor  # [W]: focus.likelihood.likelihood_feature (zeros when LensNet does not read it)


def lens_input(wc: WorkingContext, assembled: Assembled, source: EntrySource, lensnet: LensNet) -> LensInput:
    """LensNet's view of one assembled window: entry features + the conditioning set.
    With ``lensnet.cfg.query_likelihood`` the source must offer ``query_gains(block_size)``
    (both :class:`~megacontext.focus.source.HistorySource` and ``TreeSource`` do)."""
    K = wc.block_size
    log_w, log_d = entry_features(assembled.levels, assembled.starts, assembled.ends, wc.num_tokens, K)
    cond, cond_mask = build_conditioning(
        source, wc.num_tokens, wc.tail_start, K, wc.levels, lensnet.cfg.lod1_conditioning, assembled.embeds.shape[1]
    )
    if lensnet.cfg.query_likelihood:
        first, gains = source.query_gains(K)
        lk = torch.as_tensor(likelihood_feature(wc, gains, first), dtype=torch.float32)
    else:
        lk = torch.zeros(len(log_w))
    return LensInput(assembled.embeds, assembled.levels, log_w, log_d, cond, cond_mask, lk)


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
    lk = torch.zeros(B, W, device=dev)
    mask = torch.zeros(B, W, dtype=torch.bool, device=dev)
    cond = torch.zeros(B, C, d, device=dev)
    cmask = torch.zeros(B, C, dtype=torch.bool, device=dev)
    for b, x in enumerate(inputs):
        n, c = x.embeds.shape[0], x.cond.shape[0]
        emb[b, :n] = x.embeds.float()
        lev[b, :n] = x.levels
        lw[b, :n] = x.log_width.float()
        ld[b, :n] = x.log_distance.float()
        lk[b, :n] = x.likelihood.float()
        mask[b, :n] = True
        cond[b, :c] = x.cond.float()
        cmask[b, :c] = x.cond_mask
    scores = lensnet(emb, lev, lw, ld, mask, cond, cmask, lk)
    return [scores[b, : x.embeds.shape[0]] for b, x in enumerate(inputs)]


@torch.no_grad()
def score_window(
    wc: WorkingContext, source: EntrySource, lensnet: LensNet, position_mode: str, timer: dict[str, float] | None = None
) -> np.ndarray:
    """float [W]: LensNet's scores for ``wc`` as it stands (assemble -> features -> one call).

    ``timer`` (optional) accumulates the seconds spent in ``"assemble"`` and ``"lensnet"``.
    """
    t0 = time.perf_counter()
    assembled = assemble(wc, source, position_mode)
    t1 = time.perf_counter()
    (s,) = lens_scores(lensnet, [lens_input(wc, assembled, source, lensnet)])
    scores = s.float().cpu().numpy()
    if timer is not None:
        timer["assemble"] = timer.get("assemble", 0.0) + t1 - t0
        timer["lensnet"] = timer.get("lensnet", 0.0) + time.perf_counter() - t1
    return scores
