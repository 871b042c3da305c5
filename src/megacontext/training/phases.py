"""The trainable modules and one step function per phase (spec §4).

=============  =========  ====================================================================
phase          trains     loss
=============  =========  ====================================================================
``warm_gist``  GistNet    random complete blocks (sometimes whole LOD2 groups) of the reference
                          context replaced by their gists: KL(reference || replaced) over H
``warm_lens``  LensNet    counterfactual labels on uniform-gist snapshots (initial assembly;
                          ``labels.explore`` of them after exploring refocuses)
``jt1``        GistNet    on-policy window (frozen LensNet + allocator): KL(reference || window)
                          or ΔNLL@H, through the frozen base into the gists the window uses
``jt2``        LensNet    labels regenerated on-policy: signed regression (needles weighted up)
                          + ranking + listwise + budget + legality
``jt3``        LoRA       NLL@H on the discrete window + keep-alive KL to the adapter-free
                          reference
=============  =========  ====================================================================

Every step function takes the windows (or labelled snapshots) of ONE step plus a
step-derived ``np.random.Generator`` and returns the loss (with grad) and float metrics.
Each phase's optimiser holds only the owner's parameters (:meth:`Modules.parameters_of`).
:data:`PHASES` is the one record of the phases (name, owner, step function, warm start or
cycle) that the loop reads; the names and their order are the config's
(``config.PHASE_NAMES``), which checkpoint names and the report read too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from megacontext.config import PHASE_NAMES, Config, PhaseConfig
from megacontext.data import Window, sample_blocks
from megacontext.focus.horizon import horizon_logits, raw_prefix, reconstruction
from megacontext.focus.lens import lens_scores
from megacontext.focus.policies import FocusSettings, focus_window, reference_context, refocus_rounds
from megacontext.focus.source import HistorySource, build_source
from megacontext.gistnet import gists_for_history
from megacontext.modules import Modules
from megacontext.training import losses
from megacontext.training.labels import (
    LabelRows,
    LensExample,
    Snapshot,
    label_snapshot,
    lens_example,
)
from megacontext.working_context import WorkingContext, assemble


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar, with grad into the phase owner's parameters
    metrics: dict[str, float]


# ------------------------------------------------------------------------ warm start: GistNet
def replaced_context(num_tokens: int, cfg: Config, rng: np.random.Generator) -> WorkingContext:
    """All-LOD0 context over ``num_tokens`` with random complete blocks collapsed into gists.

    Each level-0 sibling group (outside the raw tail) collapses with probability
    ``p ~ U(0.25, 1)``; afterwards each complete group of gists collapses again (a LOD2
    gist) with probability 1/2. Groups are visited newest first so positions stay valid.
    """
    K, L = cfg.tree.block_size, cfg.tree.levels
    wc = WorkingContext.initial(num_tokens, K, L, num_tokens + K, cfg.focus.tail_blocks, headroom=0)
    p = rng.uniform(0.25, 1.0)
    for level, level_p in enumerate([p] + [0.5] * (L - 1)):
        for pos in wc.collapsible_positions()[::-1].tolist():
            if wc.entries[pos][0] == level and rng.random() < level_p:
                wc.collapse(pos)
    return wc


def warm_gist_step(m: Modules, cfg: Config, windows: Sequence[Window], rng: np.random.Generator) -> StepOutput:
    """GistNet substitutability on each window's reference context read with gists: a share
    ``train.gist.initial_assembly`` of the windows as the initial assembly at ``focus.budget``
    (the newest blocks raw, every older one gisted: what ``uniform_gists`` and the focus loop
    start from), the others with random spans replaced (:func:`replaced_context`)."""
    H, K, L = cfg.train.horizon, cfg.tree.block_size, cfg.tree.levels
    f = cfg.focus
    refs, replaced, gist_share = [], [], []
    for w in windows:
        ids = reference_context(w.history, m.base.max_context, H)
        ref = raw_prefix(m.base, ids)
        source = HistorySource(ref.embeds.detach(), list(gists_for_history(m.gistnet, ref.embeds.detach(), K, L)))
        if rng.random() < cfg.train.gist.initial_assembly:
            wc = WorkingContext.initial(len(ids), K, L, f.budget, f.tail_blocks, headroom=0)
        else:
            wc = replaced_context(len(ids), cfg, rng)
        refs.append(ref)
        replaced.append(assemble(wc, source, cfg.focus.position_mode))
        gist_share.append(1.0 - float((wc.levels_array() == 0).sum()) / len(ids))
    horizons = np.stack([w.horizon for w in windows])
    with torch.no_grad():
        ref_logits = horizon_logits(m.base, refs, horizons)
    logits = horizon_logits(m.base, replaced, horizons)
    target = torch.as_tensor(horizons, device=logits.device)
    sub = losses.substitutability(ref_logits, logits, target, cfg.train.gist.substitutability)
    nll_rep, nll_ref = losses.nll(logits.detach(), target), losses.nll(ref_logits, target)
    loss = sub.mean()
    metrics = {
        "substitutability": sub.mean().item(),
        "dnll": (nll_rep - nll_ref).mean().item(),
        "nll_replaced": nll_rep.mean().item(),
        "replaced_share": float(np.mean(gist_share)),
    }
    if cfg.train.gist.reconstruction_weight > 0:
        rec, rec_metrics = reconstruction_term(m, cfg, windows, rng, gist_grad=True)
        loss = loss + cfg.train.gist.reconstruction_weight * rec
        metrics.update(rec_metrics)
    return StepOutput(loss=loss, metrics={"loss": loss.item(), **metrics})


def reconstruction_term(
    m: Modules, cfg: Config, windows: Sequence[Window], rng: np.random.Generator, gist_grad: bool
) -> tuple[torch.Tensor, dict[str, float]]:
    """NLL of random blocks that the (adapted) base reconstructs from their LOD1 gists, and
    its metrics (top-1 accuracy; gain = NLL with the gist zeroed minus NLL)."""
    ids = sample_blocks([w.history for w in windows], cfg.tree.block_size, cfg.train.gist.reconstruction_blocks, rng)
    rec = reconstruction(m.base, m.gistnet, torch.as_tensor(ids, device=m.base.device), gist_grad)
    return rec.loss, {"reconstruction": rec.loss.item(), "reconstruction_gain": rec.gain,
                      "reconstruction_top1": rec.top1}


# ------------------------------------------------------------------------ JT1 / JT3: on-policy windows
def _reference(m: Modules, history: np.ndarray, horizon: int):
    """The reference context of ``history`` as a raw prefix (what substitutability targets)."""
    return raw_prefix(m.base, reference_context(history, m.base.max_context, horizon))


def _on_policy(
    m: Modules, cfg: Config, windows: Sequence[Window], rng: np.random.Generator, gist_grad: bool
) -> tuple[list, list[HistorySource]]:
    """Gists of each history and the on-policy window over them (see ``build_source``)."""
    settings = FocusSettings.from_config(cfg, greedy=False)
    assembled, sources = [], []
    for w in windows:
        source = build_source(m.base, m.gistnet, w.history, cfg.tree.shape, gist_grad)
        wc = focus_window(source, m.lensnet, settings, rng)
        assembled.append(assemble(wc, source, cfg.focus.position_mode))
        sources.append(source)
    return assembled, sources


def jt1_step(m: Modules, cfg: Config, windows: Sequence[Window], rng: np.random.Generator) -> StepOutput:
    """GistNet on the on-policy window: substitutability over H (+ neighbour contrastive term)."""
    H = cfg.train.horizon
    assembled, sources = _on_policy(m, cfg, windows, rng, gist_grad=True)
    horizons = np.stack([w.horizon for w in windows])
    with torch.no_grad():
        ref_logits = horizon_logits(m.base, [_reference(m, w.history, H) for w in windows], horizons)
    logits = horizon_logits(m.base, assembled, horizons)
    target = torch.as_tensor(horizons, device=logits.device)
    sub = losses.substitutability(ref_logits, logits, target, cfg.train.gist.substitutability).mean()
    loss = sub
    metrics = {"substitutability": sub.item()}
    if cfg.train.gist.contrastive_weight > 0:
        con = torch.stack([losses.neighbour_contrastive(s.gists) for s in sources]).mean()
        loss = loss + cfg.train.gist.contrastive_weight * con
        metrics["contrastive"] = con.item()
    nll_win, nll_ref = losses.nll(logits.detach(), target), losses.nll(ref_logits, target)
    metrics.update(loss=loss.item(), nll=nll_win.mean().item(), dnll=(nll_win - nll_ref).mean().item())
    return StepOutput(loss=loss, metrics=metrics)


def jt3_step(m: Modules, cfg: Config, windows: Sequence[Window], rng: np.random.Generator) -> StepOutput:
    """LoRA: NLL@H on the on-policy window + keep-alive KL to the adapter-free reference."""
    H = cfg.train.horizon
    assembled, _ = _on_policy(m, cfg, windows, rng, gist_grad=False)
    horizons = np.stack([w.horizon for w in windows])
    with torch.no_grad(), m.plain():
        ref_logits = horizon_logits(m.base, [_reference(m, w.history, H) for w in windows], horizons)
    logits = horizon_logits(m.base, assembled, horizons)
    target = torch.as_tensor(horizons, device=logits.device)
    task = losses.nll(logits, target).mean()
    keep = losses.kl_from_reference(ref_logits, logits).mean()
    loss = task + cfg.train.lora.keepalive_weight * keep
    metrics = {"nll": task.item(), "keepalive_kl": keep.item()}
    if cfg.train.lora.reconstruction_weight > 0:
        rec, rec_metrics = reconstruction_term(m, cfg, windows, rng, gist_grad=False)
        loss = loss + cfg.train.lora.reconstruction_weight * rec
        metrics.update(rec_metrics)
    return StepOutput(loss=loss, metrics={"loss": loss.item(), **metrics})


# ------------------------------------------------------------------------ LensNet: labels and step
def explore_scores(wc: WorkingContext, rng: np.random.Generator) -> np.ndarray:
    """Exploration scores [W]: uniform in [-1, 1], plus 1 on gists of level >= 2 — coarse
    gists get opened (paid for by random collapses), so deep LOD1 gists come into view."""
    return rng.uniform(-1.0, 1.0, wc.cost) + (wc.levels_array() >= 2)


@torch.no_grad()
def label_step(
    m: Modules,
    cfg: Config,
    windows: Sequence[Window],
    rng: np.random.Generator,
    cycle: int,
    step: int,
    on_policy: bool,
    gist_version: str,
) -> tuple[list[Snapshot], list[LabelRows]]:
    """Counterfactual labels for one LensNet step: one snapshot per window.

    On-policy snapshots take 1..focus_rounds refocuses with the current LensNet; the warm
    start uses the initial assembly (uniform gists, no LensNet). A share ``labels.explore``
    of snapshots (both) takes 1..focus_rounds refocuses on :func:`explore_scores` instead, so
    that LensNet also learns on windows it would not reach yet (e.g. a needle's LOD1 gist in
    view after its LOD2 parent was expanded).
    """
    settings, labels = FocusSettings.from_config(cfg, greedy=False), cfg.train.labels
    snapshots, rows = [], []
    for i, w in enumerate(windows):
        source = build_source(m.base, m.gistnet, w.history, cfg.tree.shape)
        explore = labels.explore > 0 and rng.random() < labels.explore
        rounds = int(rng.integers(1, settings.rounds + 1)) if (on_policy or explore) and settings.rounds > 0 else 0
        if explore:
            wc = refocus_rounds(source.num_tokens, settings, rng, lambda w: explore_scores(w, rng), rounds)
        else:
            wc = focus_window(source, m.lensnet, settings, rng, rounds)
        nll0, r = label_snapshot(m.base, source, wc, w.horizon, rng, labels, cfg.focus.position_mode)
        snapshots.append(Snapshot(cycle, step, i, w.doc_index, w.cursor, w.history, w.horizon, wc, nll0, gist_version))
        rows.append(r)
    return snapshots, rows


@torch.no_grad()
def lens_examples(m: Modules, cfg: Config, snapshots: Sequence[Snapshot], rows: Sequence[LabelRows]) -> list[LensExample]:
    """Snapshots -> LensNet inputs and per-entry targets (gists from the frozen GistNet)."""
    out = []
    for s, r in zip(snapshots, rows):
        source = build_source(m.base, m.gistnet, s.history, cfg.tree.shape)
        out.append(lens_example(s.wc, source, r, m.lensnet, cfg.focus.position_mode))
    return out


def lens_step(m: Modules, cfg: Config, examples: Sequence[LensExample]) -> StepOutput:
    """LensNet on labelled snapshots: regression (weighted ``1 + lens.positive_weight * max(0, t)``)
    + ranking + listwise (a snapshot's expands + "nothing helps" at ``tau_expand``) + budget +
    legality, mean over snapshots."""
    t, f, K = cfg.train.lens, cfg.focus, cfg.tree.block_size
    scores = lens_scores(m.lensnet, [e.inputs for e in examples])
    parts: dict[str, list[torch.Tensor]] = {"regression": [], "ranking": [], "listwise": [], "budget": [],
                                            "legality": []}
    agree, labelled = 0.0, 0
    for s, e in zip(scores, examples):
        dev = s.device
        tgt, lab = e.targets.to(dev), e.labelled.to(dev)
        exp, col = e.expandable.to(dev), e.collapsible.to(dev)
        cand = torch.stack([s[g.to(dev)].mean() for g in e.groups]) if e.groups else s[:0]
        weights = e.weights.to(dev) * (1 + t.positive_weight * tgt.clamp_min(0))  # rare needles count
        parts["regression"].append(losses.signed_regression(s, tgt, lab, weights))
        parts["ranking"].append(losses.pairwise_ranking(cand, e.candidate_targets.to(dev)))
        exp_c = e.candidate_expand.to(dev)
        parts["listwise"].append(losses.listwise(cand[exp_c], e.candidate_targets.to(dev)[exp_c], f.tau_expand,
                                                 t.listwise_temperature, t.listwise_null_target))
        parts["budget"].append(losses.budget_regulariser(s, exp, col, K, f.budget, f.tau_expand, f.tau_collapse))
        parts["legality"].append(losses.legality(s, exp, col))
        agree += float(((s[lab] > 0) == (tgt[lab] > 0)).float().sum())
        labelled += int(lab.sum())
    mean = {k: torch.stack(v).mean() for k, v in parts.items()}
    loss = (
        mean["regression"]
        + t.rank_weight * mean["ranking"]
        + t.listwise_weight * mean["listwise"]
        + t.budget_weight * mean["budget"]
        + t.legality_weight * mean["legality"]
    )
    metrics = {"loss": loss.item(), **{k: v.item() for k, v in mean.items()}}
    metrics["sign_agreement"] = agree / max(1, labelled)
    return StepOutput(loss=loss, metrics=metrics)




# ------------------------------------------------------------------------ the phases
WindowStep = Callable[[Modules, Config, Sequence[Window], np.random.Generator], StepOutput]


@dataclass(frozen=True)
class Phase:
    """One training phase: what trains and on what.

    ``step`` trains on sampled windows; ``None`` marks a LensNet phase, which trains with
    :func:`lens_step` on counterfactual labels (on-policy inside a cycle, on the initial
    assembly in the warm start).
    """

    name: str
    owner: str  # "gistnet" | "lensnet" | "lora": the only parameters its optimiser holds
    step: WindowStep | None
    in_cycle: bool  # False: the warm start (cycle 0, once); True: every cycle

    def settings(self, cfg: Config) -> PhaseConfig:
        """Steps and learning rate from ``train.phases.<name>``."""
        return getattr(cfg.train.phases, self.name)


PHASES: tuple[Phase, ...] = (
    Phase("warm_gist", "gistnet", warm_gist_step, in_cycle=False),
    Phase("warm_lens", "lensnet", None, in_cycle=False),
    Phase("jt1", "gistnet", jt1_step, in_cycle=True),
    Phase("jt2", "lensnet", None, in_cycle=True),
    Phase("jt3", "lora", jt3_step, in_cycle=True),
)
PHASE_BY_NAME = {p.name: p for p in PHASES}
assert tuple(PHASE_BY_NAME) == PHASE_NAMES, "PHASES must follow config.PhasesConfig"
