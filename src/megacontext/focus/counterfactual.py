"""Counterfactual focus actions: what one expand (or collapse) of a working context is worth.

A :class:`Candidate` is one action on a snapshot; :func:`measure` scores the snapshot and
every candidate's window on a horizon in batched forwards. LensNet's labels
(``training/labels.py``) and the ``oracle_focus`` ceiling (``focus/oracle.py``) both read
these gains: ``g = NLL(snapshot) - NLL(after the action)`` in nats per horizon token.
Lookahead (:func:`path_gains`): a gist of level >= 2 pays off only once one of its children
is expanded too, so it is measured with each child expanded after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from megacontext.base_model import BaseModel
from megacontext.focus.horizon import horizon_nll
from megacontext.focus.source import HistorySource
from megacontext.working_context import WorkingContext, assemble


@dataclass(frozen=True)
class Candidate:
    """One counterfactual action: ``expand`` the gist at ``pos`` (then, with ``child`` >= 0,
    its ``child``-th child as well: a lookahead path) or ``collapse`` K entries from ``pos``."""

    kind: str
    pos: int
    child: int = -1


def sample_candidates(wc: WorkingContext, rng: np.random.Generator, limit: int, lookahead: bool) -> list[Candidate]:
    """Every gist entry as an expand (+ its lookahead paths) and up to ``limit`` collapses."""
    levels = wc.levels_array()
    expands = np.flatnonzero(levels >= 1)
    collapses = wc.collapsible_positions()
    n_c = min(len(collapses), limit)
    pick_c = np.sort(rng.choice(collapses, n_c, replace=False)) if n_c else []
    out = [Candidate("expand", int(p)) for p in expands]
    if lookahead:
        K = wc.block_size
        out += [Candidate("expand", int(p), j) for p in expands if levels[p] >= 2 for j in range(K)]
    return out + [Candidate("collapse", int(p)) for p in pick_c]


def apply_candidate(wc: WorkingContext, cand: Candidate) -> WorkingContext:
    """A copy of ``wc`` with the action applied (budget raised so the expands fit)."""
    out = wc.copy()
    if cand.kind == "expand":
        out.budget = max(out.budget, out.cost + 2 * (out.block_size - 1))
        out.expand(cand.pos)
        if cand.child >= 0:
            out.expand(cand.pos + cand.child)
    else:
        out.collapse(cand.pos)
    return out


@torch.no_grad()
def measure(
    base: BaseModel,
    source: HistorySource,
    wc: WorkingContext,
    candidates: Sequence[Candidate],
    horizon: np.ndarray,
    position_mode: str,
    chunk: int,
) -> tuple[float, np.ndarray]:
    """(NLL@H of the snapshot, NLL@H after each candidate [N]) in batched forwards."""
    nll = windows_nll(base, source, [wc] + [apply_candidate(wc, c) for c in candidates], horizon, position_mode, chunk)
    return float(nll[0]), nll[1:]


@torch.no_grad()
def windows_nll(
    base: BaseModel,
    source: HistorySource,
    windows: Sequence[WorkingContext],
    horizon: np.ndarray,
    position_mode: str,
    chunk: int,
    start: int = 0,
) -> np.ndarray:
    """float64 [N]: NLL of ``horizon[start:]`` after each working context, ``chunk`` per forward."""
    out = []
    for i in range(0, len(windows), chunk):
        part = [assemble(w, source, position_mode) for w in windows[i : i + chunk]]
        out.append(horizon_nll(base, part, np.stack([horizon] * len(part)), start).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def path_gains(
    candidates: Sequence[Candidate], gains: np.ndarray, noise_z: float = 0.0
) -> tuple[list[Candidate], np.ndarray]:
    """Fold lookahead paths into their parent: the parent's gain is the better of its own and
    its best path's ADVANTAGE over its median path, less ``noise_z`` robust standard
    deviations of its paths (:func:`_advantage`): the max of K noisy paths is biased up, and a
    parent over nothing in particular must not look like one over a needle."""
    paths: dict[int, list[float]] = {}
    for c, g in zip(candidates, gains):
        if c.kind == "expand" and c.child >= 0:
            paths.setdefault(c.pos, []).append(float(g))
    lookahead = {pos: _advantage(np.asarray(v), noise_z) for pos, v in paths.items()}
    keep = [i for i, c in enumerate(candidates) if c.child < 0]
    out = np.asarray([max(float(gains[i]), lookahead.get(candidates[i].pos, -np.inf))
                      if candidates[i].kind == "expand" else float(gains[i]) for i in keep])
    return [candidates[i] for i in keep], out


def _advantage(paths: np.ndarray, noise_z: float) -> float:
    """``max - median - noise_z * sigma`` of one parent's path gains [K], with the robust
    ``sigma = 1.4826 * MAD``: the best of K paths that are all noise still beats their median
    by about two sigma (K = 32), while a needle's path stands many sigma out (one outlier
    barely moves the median or the MAD)."""
    med = float(np.median(paths))
    sigma = 1.4826 * float(np.median(np.abs(paths - med)))
    return float(paths.max()) - med - noise_z * sigma
