"""Counterfactual focus labels for LensNet (JT2 and the LensNet warm start).

For one snapshot (a working context over a window's history):

1. candidates: EVERY gist entry as an expand (measured with the budget raised so that the
   expand, and its lookahead path, fit) and up to ``labels.candidates`` collapses (sibling groups
   outside the tail, :meth:`WorkingContext.collapsible_positions`);
2. lookahead (``labels.lookahead``): a gist of level >= 2 pays off only once one of its
   children is expanded too, so it is also measured with each child expanded after it, and
   its gain is the best path's advantage over the median path, less ``labels.lookahead_noise_z``
   robust standard deviations of the paths (the needle path LOD2 -> LOD1 -> LOD0 gets credit;
   the max of K noisy paths alone would be biased up);
3. NLL@H of the snapshot and of every counterfactual window in batched, left-padded base
   forwards; gain ``g = NLL(snapshot) - NLL(after action)`` in nats per horizon token;
4. targets on an ABSOLUTE scale (``s = labels.scale`` nats, noise floor ``m = labels.margin``):
   an expand gets ``tanh(soft(g, m) / s)`` (``soft`` shrinks |g| by m): a gain of 0.002
   stays near 0 and "nothing here helps" is a snapshot of near-zero targets. Each of a
   collapse's K entries gets ``-tanh(max(0, g + m) / s)``: a harmless collapse leans
   negative (about ``-tanh(m / s)``, well above ``-tau_collapse``: nothing is collapsed on
   its own), a harmful one gets 0, one that helps more — so when the allocator collapses
   groups to pay for a strong expand, it takes the harmless ones first. With
   ``labels.pay_collapses`` a collapse is worth what it pays
   for, the best expand ``G = max(0, max g_expand)``: ``-tanh(max(0, G - m - harm) / s)``
   with ``harm = -g_collapse`` — strongly negative when a needle waits elsewhere, but on
   corpus windows the max of many noisy expand gains makes it collapse raw text (measured:
   the default run's megacontext fell 0.1 nats below uniform_gists).

Labels are written as Parquet (``labels.parquet``: one row per labelled entry;
``snapshots.parquet``: one row per snapshot with its tokens and working context) and read
back before training, so a resumed JT2 trains on exactly the same labels.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from megacontext.base_model import BaseModel
from megacontext.config import LabelConfig
from megacontext.errors import MegaContextError
from megacontext.focus.counterfactual import measure, path_gains, sample_candidates
from megacontext.focus.lens import LensInput, lens_input
from megacontext.focus.source import HistorySource
from megacontext.working_context import WorkingContext, assemble


def absolute_targets(
    kinds: Sequence[str], gains: np.ndarray, scale: float, margin: float, pay_collapses: bool = False
) -> np.ndarray:
    """Per-candidate targets in (-1, 1) on an absolute scale (see the module docstring).

    kinds [N] ("expand" | "collapse"), gains [N] = NLL(snapshot) - NLL(after) -> float32 [N].
    ``pay_collapses``: a collapse's worth is what it pays for; else only its own gain (a
    collapse that does no harm leans slightly negative, one that harms gets 0).
    """
    if len(gains) == 0:
        return np.zeros(0, dtype=np.float32)
    exp = np.asarray(kinds) == "expand"

    def soft(x: np.ndarray) -> np.ndarray:
        return np.sign(x) * np.maximum(np.abs(x) - margin, 0.0)

    out = np.zeros(len(gains))
    g = gains[exp]
    out[exp] = np.tanh(soft(g) / scale)
    if pay_collapses:
        best = max(0.0, float(g.max())) if exp.any() else 0.0
        out[~exp] = -np.tanh(np.maximum(best - margin + gains[~exp], 0.0) / scale)
    else:
        out[~exp] = -np.tanh(np.maximum(gains[~exp] + margin, 0.0) / scale)
    return out.astype(np.float32)


# ------------------------------------------------------------------------ records
@dataclass
class Snapshot:
    """One labelled snapshot as stored in ``snapshots.parquet``."""

    cycle: int
    step: int
    snapshot: int
    doc_index: int
    cursor: int
    history: np.ndarray  # int64 [T]
    horizon: np.ndarray  # int64 [H]
    wc: WorkingContext
    nll: float
    gist_version: str


@dataclass
class LabelRows:
    """Labelled entries of one snapshot (``labels.parquet`` rows)."""

    candidate: list[int]
    position: list[int]
    level: list[int]
    index: list[int]
    action: list[str]
    delta_nll: list[float]
    target: list[float]


def label_snapshot(
    base: BaseModel,
    source: HistorySource,
    wc: WorkingContext,
    horizon: np.ndarray,
    rng: np.random.Generator,
    cfg: LabelConfig,
    position_mode: str,
) -> tuple[float, LabelRows]:
    """Sample candidates, measure them, and expand them into per-entry label rows."""
    cands = sample_candidates(wc, rng, cfg.candidates, cfg.lookahead)
    nll0, after = measure(base, source, wc, cands, horizon, position_mode, cfg.batch)
    cands, gains = path_gains(cands, nll0 - after, cfg.lookahead_noise_z)
    targets = absolute_targets([c.kind for c in cands], gains, cfg.scale, cfg.margin, cfg.pay_collapses)
    rows = LabelRows([], [], [], [], [], [], [])
    K = wc.block_size
    for j, (c, d, t) in enumerate(zip(cands, gains, targets)):
        for p in [c.pos] if c.kind == "expand" else range(c.pos, c.pos + K):
            level, index = wc.entries[p]
            rows.candidate.append(j)
            rows.position.append(p)
            rows.level.append(level)
            rows.index.append(index)
            rows.action.append(c.kind)
            rows.delta_nll.append(float(d))
            rows.target.append(float(t))
    return nll0, rows


# ------------------------------------------------------------------------ parquet
SNAPSHOTS = "snapshots.parquet"
LABELS = "labels.parquet"


def _write_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_labels(folder: Path, snapshots: Sequence[Snapshot], rows: Sequence[LabelRows]) -> None:
    """Write ``snapshots.parquet`` and ``labels.parquet`` (rows[i] belongs to snapshots[i])."""
    folder.mkdir(parents=True, exist_ok=True)
    snap_table = pa.table(
        {
            "cycle": [s.cycle for s in snapshots],
            "step": [s.step for s in snapshots],
            "snapshot": [s.snapshot for s in snapshots],
            "doc_index": [s.doc_index for s in snapshots],
            "cursor": [s.cursor for s in snapshots],
            "history": pa.array([s.history.astype(np.int32) for s in snapshots], pa.list_(pa.int32())),
            "horizon": pa.array([s.horizon.astype(np.int32) for s in snapshots], pa.list_(pa.int32())),
            "working_context": [json.dumps(s.wc.to_dict()) for s in snapshots],
            "nll": pa.array([s.nll for s in snapshots], pa.float64()),
            "gist_version": [s.gist_version for s in snapshots],
        }
    )
    cols: dict[str, list[Any]] = {k: [] for k in ("cycle", "step", "snapshot", "gist_version")}
    for s, r in zip(snapshots, rows):
        n = len(r.candidate)
        cols["cycle"] += [s.cycle] * n
        cols["step"] += [s.step] * n
        cols["snapshot"] += [s.snapshot] * n
        cols["gist_version"] += [s.gist_version] * n
    label_table = pa.table(
        {
            "cycle": pa.array(cols["cycle"], pa.int32()),
            "step": pa.array(cols["step"], pa.int32()),
            "snapshot": pa.array(cols["snapshot"], pa.int32()),
            "candidate": pa.array([c for r in rows for c in r.candidate], pa.int32()),
            "position": pa.array([p for r in rows for p in r.position], pa.int32()),
            "level": pa.array([v for r in rows for v in r.level], pa.int8()),
            "index": pa.array([v for r in rows for v in r.index], pa.int64()),
            "action": pa.array([v for r in rows for v in r.action], pa.string()),
            "delta_nll": pa.array([v for r in rows for v in r.delta_nll], pa.float64()),
            "target": pa.array([v for r in rows for v in r.target], pa.float32()),
            "gist_version": pa.array(cols["gist_version"], pa.string()),
        }
    )
    _write_atomic(snap_table, folder / SNAPSHOTS)
    _write_atomic(label_table, folder / LABELS)


def read_labels(folder: Path) -> tuple[list[Snapshot], list[LabelRows]]:
    """Inverse of :func:`write_labels` (same order)."""
    if not (folder / SNAPSHOTS).is_file() or not (folder / LABELS).is_file():
        raise MegaContextError(f"no focus labels in {folder} (expected {SNAPSHOTS} and {LABELS})")
    snaps = pq.read_table(folder / SNAPSHOTS).to_pylist()
    labels = pq.read_table(folder / LABELS).to_pydict()
    by_key: dict[tuple[int, int], LabelRows] = {}
    for i in range(len(labels["step"])):
        key = (labels["step"][i], labels["snapshot"][i])
        r = by_key.setdefault(key, LabelRows([], [], [], [], [], [], []))
        r.candidate.append(labels["candidate"][i])
        r.position.append(labels["position"][i])
        r.level.append(labels["level"][i])
        r.index.append(labels["index"][i])
        r.action.append(labels["action"][i])
        r.delta_nll.append(labels["delta_nll"][i])
        r.target.append(labels["target"][i])
    snapshots, rows = [], []
    for s in snaps:
        snapshots.append(
            Snapshot(
                cycle=s["cycle"],
                step=s["step"],
                snapshot=s["snapshot"],
                doc_index=s["doc_index"],
                cursor=s["cursor"],
                history=np.asarray(s["history"], dtype=np.int64),
                horizon=np.asarray(s["horizon"], dtype=np.int64),
                wc=WorkingContext.from_dict(json.loads(s["working_context"])),
                nll=s["nll"],
                gist_version=s["gist_version"],
            )
        )
        rows.append(by_key.get((s["step"], s["snapshot"]), LabelRows([], [], [], [], [], [], [])))
    return snapshots, rows


# ------------------------------------------------------------------------ training
@dataclass
class LensExample:
    """One snapshot ready for the LensNet losses (all per-entry tensors ``[W]``)."""

    inputs: LensInput
    targets: torch.Tensor  # float [W], 0 where unlabelled
    labelled: torch.Tensor  # bool [W]
    expandable: torch.Tensor  # bool [W]: gist entries
    collapsible: torch.Tensor  # bool [W]: members of a legal sibling group
    groups: list[torch.Tensor]  # entry positions of each candidate
    candidate_targets: torch.Tensor  # float [N]
    candidate_expand: torch.Tensor  # bool [N]: expand (else collapse) candidates
    weights: torch.Tensor  # float [W]: 1 / entries of the entry's candidate (each candidate counts once)


def lens_example(
    wc: WorkingContext, source: HistorySource, rows: LabelRows, lensnet: torch.nn.Module, position_mode: str
) -> LensExample:
    """Assemble the snapshot (no grad) and lay its labels out per entry."""
    K, W = wc.block_size, wc.cost
    with torch.no_grad():
        asm = assemble(wc, source, position_mode)
        inputs = lens_input(wc, asm, source, lensnet)
    targets = torch.zeros(W)
    labelled = torch.zeros(W, dtype=torch.bool)
    pos = torch.as_tensor(rows.position, dtype=torch.long)
    targets[pos] = torch.as_tensor(rows.target, dtype=torch.float32)
    labelled[pos] = True
    collapsible = torch.zeros(W, dtype=torch.bool)
    for g in wc.collapsible_positions().tolist():
        collapsible[g : g + K] = True
    groups: dict[int, list[int]] = {}
    cand_t: dict[int, float] = {}
    cand_e: dict[int, bool] = {}
    for c, p, t, a in zip(rows.candidate, rows.position, rows.target, rows.action):
        groups.setdefault(c, []).append(p)
        cand_t[c] = t
        cand_e[c] = a == "expand"
    order = sorted(groups)
    weights = torch.zeros(W)
    for c in order:
        weights[torch.as_tensor(groups[c], dtype=torch.long)] = 1.0 / len(groups[c])
    return LensExample(
        inputs=inputs,
        targets=targets,
        labelled=labelled,
        expandable=torch.as_tensor(wc.levels_array() >= 1),
        collapsible=collapsible,
        groups=[torch.as_tensor(groups[c], dtype=torch.long) for c in order],
        candidate_targets=torch.as_tensor([cand_t[c] for c in order], dtype=torch.float32),
        candidate_expand=torch.as_tensor([cand_e[c] for c in order], dtype=torch.bool),
        weights=weights,
    )
