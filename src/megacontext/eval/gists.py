"""Gist quality (issue #12): are gists worth the raw tokens they displace?

At budget ``W`` the initial assembly (``uniform_gists``) keeps the newest ``r`` tokens raw
and gists the rest, so it gives up ``W - r`` raw tokens of ``recency`` for its gists.
:func:`gist_value_rows` measures, on the same windows (paired):

- ``displaced_value`` = loss(recency@r) - loss(recency@W): what the displaced raw tokens are worth;
- ``won_back``        = loss(recency@r) - loss(uniform_gists@W): what the gists win back;
- ``target_margin``   = won_back - displaced_value / 2 (the issue's bar: >= 0);
- ``curve``: loss@H of recency at ``W - K*k`` raw tokens (k = 0, 1, 2, ...), the price of
  each block of raw context given up;
- ``content_value`` = loss(uniform_gists@W with the NEXT window's gists) - loss(uniform_gists@W):
  what the gists' content is worth, apart from their presence (0: the base reads no content);
- ``position_modes``: uniform_gists@W assembled in each position mode (``compact``: entries
  at 0..n-1; ``absolute``: each entry at its span's first token) by the same modules, and
  the paired difference absolute - compact.

:func:`reconstruction_quality`: top-1 accuracy and information gain (nats/token) when the
adapted base reads a block back from its LOD1 gist
(:func:`~megacontext.focus.horizon.reconstruction`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from megacontext.config import derive_seed
from megacontext.data import Window, sample_blocks
from megacontext.eval.results import paired_se
from megacontext.focus.horizon import reconstruction
from megacontext.focus.policies import FocusSettings, initial_context, policy_nll
from megacontext.focus.source import HistorySource, build_source
from megacontext.modules import Modules

POSITION_MODES = ("compact", "absolute")
CURVE_BLOCKS = 4  # recency at W, W - K, ..., W - 4K on the curve
RECONSTRUCTION_BLOCKS = 4  # blocks per window for the reconstruction metrics


def _paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of ``a - b`` over the windows."""
    se = paired_se(a, b)
    return float((a - b).mean()), math.nan if se is None else se


def _with_mode(settings: FocusSettings, mode: str) -> FocusSettings:
    return dataclasses.replace(settings, focus=dataclasses.replace(settings.focus, position_mode=mode))


def _swapped_gists(sources: Sequence[HistorySource]) -> list[HistorySource]:
    """Each window's tokens with the next window's gists (the content control)."""
    return [HistorySource(s.tokens, sources[(i + 1) % len(sources)].gists) for i, s in enumerate(sources)]


def _losses(mods: Modules, policy: str, settings: FocusSettings, windows: Sequence[Window], batch: int,
            sources: Sequence) -> np.ndarray:
    out: list[float] = []
    for lo in range(0, len(windows), batch):
        rngs = [np.random.default_rng(i) for i in range(lo, min(lo + batch, len(windows)))]
        nll, _ = policy_nll(policy, mods, settings, windows[lo : lo + batch], sources[lo : lo + batch], rngs)
        out.extend(nll)
    return np.asarray(out, dtype=np.float64)


@torch.no_grad()
def gist_value_rows(
    mods: Modules, settings: FocusSettings, windows: Sequence[Window], budgets: Sequence[int], batch: int
) -> list[dict[str, Any]]:
    """One row per budget (keys in the module docstring); every window has the same history length."""
    if len(windows) < 2:
        return []
    sources = [build_source(mods.base, mods.gistnet, w.history, settings.shape) for w in windows]
    K = settings.shape.block_size
    rows = []
    for W in budgets:
        wc = initial_context(len(windows[0].history), settings.at_budget(W))
        raw = int((wc.levels_array() == 0).sum())
        uniform = _losses(mods, "uniform_gists", settings.at_budget(W), windows, batch, sources)
        curve = {}
        for k in range(CURVE_BLOCKS + 1):
            n = W - k * K
            if n > 0:
                curve[n] = _losses(mods, "recency", settings.at_budget(n), windows, batch, sources)
        rec_raw = curve[raw] if raw in curve else _losses(mods, "recency", settings.at_budget(raw), windows, batch,
                                                         sources)
        displaced, displaced_se = _paired(rec_raw, curve[W])
        won, won_se = _paired(rec_raw, uniform)
        margin, margin_se = _paired(rec_raw - uniform, (rec_raw - curve[W]) / 2)
        modes = {mode: uniform if mode == settings.focus.position_mode else
                 _losses(mods, "uniform_gists", _with_mode(settings.at_budget(W), mode), windows, batch, sources)
                 for mode in POSITION_MODES}
        mode_diff, mode_se = _paired(modes["absolute"], modes["compact"])
        swapped = _losses(mods, "uniform_gists", settings.at_budget(W), windows, batch, _swapped_gists(sources))
        content, content_se = _paired(swapped, uniform)
        rows.append({
            "budget": int(W), "raw_tokens": raw, "gist_entries": wc.cost - raw, "n_windows": len(windows),
            "uniform_gists": float(uniform.mean()), "recency_at_budget": float(curve[W].mean()),
            "recency_at_raw": float(rec_raw.mean()),
            "displaced_value": displaced, "displaced_se": displaced_se,
            "won_back": won, "won_back_se": won_se, "target_margin": margin, "target_margin_se": margin_se,
            "content_value": content, "content_value_se": content_se,
            "curve": [{"raw_tokens": n, "loss_at_h": float(v.mean())} for n, v in sorted(curve.items())],
            "position_modes": {**{m: float(v.mean()) for m, v in modes.items()},
                               "absolute_minus_compact": mode_diff, "se": mode_se},
        })
    return rows


@torch.no_grad()
def reconstruction_quality(mods: Modules, windows: Sequence[Window], block_size: int, seed: int) -> dict[str, Any]:
    """Top-1 accuracy and gain of reading blocks back from their LOD1 gists (adapted base)."""
    rng = np.random.default_rng(derive_seed(seed, "eval-reconstruction"))
    ids = sample_blocks([w.history for w in windows], block_size, RECONSTRUCTION_BLOCKS, rng)
    if len(ids) == 0:
        return {}
    rec = reconstruction(mods.base, mods.gistnet, torch.as_tensor(ids, device=mods.base.device))
    return {"blocks": len(ids), "top1": rec.top1, "nll": float(rec.loss), "blank_nll": rec.blank_loss,
            "gain": rec.gain}
