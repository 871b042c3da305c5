"""The trainable modules and one step function per phase (spec §4).

=============  =========  ====================================================================
phase          trains     loss
=============  =========  ====================================================================
``warm_gist``  GistNet    random complete blocks (sometimes whole LOD2 groups) of the reference
                          context replaced by their gists: KL(reference || replaced) over H
``warm_lens``  LensNet    counterfactual labels on uniform-gist snapshots (initial assembly)
``jt1``        GistNet    on-policy window (frozen LensNet + allocator): KL(reference || window)
                          or ΔNLL@H, through the frozen base into the gists the window uses
``jt2``        LensNet    labels regenerated on-policy: signed regression + ranking + budget +
                          legality
``jt3``        LoRA       NLL@H on the discrete window + keep-alive KL to the adapter-free
                          reference
=============  =========  ====================================================================

Every step function takes the windows (or labelled snapshots) of ONE step plus a
step-derived ``np.random.Generator`` and returns the loss (with grad) and float metrics.
Each phase's optimiser holds only the owner's parameters (:meth:`Modules.parameters_of`).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from megacontext.base_model import BaseModel
from megacontext.config import Config, LoraConfig, derive_seed
from megacontext.data import Window
from megacontext.errors import MegaContextError
from megacontext.gistnet import GistNet, TreeGister, gistnet_version, gists_for_history
from megacontext.lensnet import LensNet
from megacontext.training import losses
from megacontext.training.episode import (
    FocusTrace,
    HistorySource,
    build_source,
    focus_window,
    horizon_logits,
    horizon_nll,
    lens_scores,
    raw_prefix,
    recency_prefix,
    reference_context,
    reference_prefix,
)
from megacontext.training.labels import (
    LabelRows,
    LensExample,
    Snapshot,
    label_snapshot,
    lens_example,
)
from megacontext.working_context import WorkingContext, assemble

PHASE_OWNER = {"warm_gist": "gistnet", "warm_lens": "lensnet", "jt1": "gistnet", "jt2": "lensnet", "jt3": "lora"}


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar, with grad into the phase owner's parameters
    metrics: dict[str, float]


# ------------------------------------------------------------------------ modules
def lora_targets(model: torch.nn.Module, cfg: LoraConfig) -> list[str]:
    """Full names of the q/k/v/o projections of the first or last two decoder blocks
    (plus the input embedding when ``cfg.embeddings``)."""
    pattern = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)$")
    found = [(int(m.group(1)), name) for name, _ in model.named_modules() if (m := pattern.search(name))]
    if not found:
        raise MegaContextError(f"cannot place LoRA adapters: no layers.N.self_attn.q/k/v/o_proj in {type(model).__name__}")
    layers = sorted({i for i, _ in found})
    chosen = set(layers[:2] if cfg.blocks == "first" else layers[-2:])
    targets = [name for i, name in found if i in chosen]
    if cfg.embeddings:
        emb = model.get_input_embeddings()
        targets += [name for name, mod in model.named_modules() if mod is emb]
    return targets


def attach_lora(base: BaseModel, cfg: LoraConfig):
    """Inject peft LoRA adapters into ``base.model`` in place; returns the PeftModel.

    ``base.forward``/``base.embed`` use the adapters from now on; ``lora.disable_adapter()``
    gives back the plain frozen base. Fresh adapters are a no-op (B = 0).
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=lora_targets(base.model, cfg),
    )
    with warnings.catch_warnings():
        # peft probes deprecated transformers attributes, and notes that a tied embedding is
        # adapted: intended — only the INPUT embedding path gets the adapter, the head is untouched.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        return get_peft_model(base.model, peft_cfg)


@dataclass
class Modules:
    """The frozen base and the three trainable parts (``lora`` is None when JT3 is off)."""

    base: BaseModel
    gistnet: GistNet
    lensnet: LensNet
    lora: object | None

    def parameters_of(self, owner: str) -> list[torch.nn.Parameter]:
        if owner == "gistnet":
            return list(self.gistnet.parameters())
        if owner == "lensnet":
            return list(self.lensnet.parameters())
        if owner == "lora":
            if self.lora is None:
                raise MegaContextError("JT3 needs LoRA adapters but none are attached")
            return [p for n, p in self.lora.named_parameters() if "lora_" in n]
        raise ValueError(f"unknown module {owner!r}")

    def set_trainable(self, owner: str | None) -> None:
        """requires_grad only on ``owner``'s parameters (None: nothing trains); base always frozen."""
        self.base.model.requires_grad_(False)
        self.gistnet.requires_grad_(owner == "gistnet")
        self.lensnet.requires_grad_(owner == "lensnet")
        self.gistnet.train(owner == "gistnet")
        self.lensnet.train(owner == "lensnet")
        if self.lora is not None:
            for p in self.parameters_of("lora"):
                p.requires_grad_(owner == "lora")

    def gist_version(self) -> str:
        """Version of everything a gist depends on: GistNet and the (adapted) input embedding."""
        return TreeGister(self.gistnet, self.base.model.get_input_embeddings()).version

    def adapter_version(self) -> str:
        """Hash of the LoRA weights ("none" without LoRA): what the raw baselines depend on."""
        if self.lora is None:
            return "none"
        return gistnet_version(torch.nn.ParameterList(self.parameters_of("lora")))

    def adapters_off(self):
        """Context manager: the plain base (adapters disabled) — a no-op without LoRA."""
        from contextlib import nullcontext

        return self.lora.disable_adapter() if self.lora is not None else nullcontext()


def build_modules(cfg: Config, base: BaseModel) -> Modules:
    """Fresh GistNet, LensNet (and LoRA when JT3 trains), seeded from ``cfg.seed``."""
    base.model.requires_grad_(False)
    base.model.eval()
    torch.manual_seed(derive_seed(cfg.seed, "init"))
    K, L = cfg.tree.block_size, cfg.tree.levels
    gistnet = GistNet(cfg.gistnet, base.dim, K, L).to(base.device)
    lensnet = LensNet(cfg.lensnet, base.dim, L).to(base.device)
    lora = attach_lora(base, cfg.train.lora) if cfg.train.jt3_steps > 0 else None
    modules = Modules(base, gistnet, lensnet, lora)
    modules.set_trainable(None)
    return modules


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
    """GistNet substitutability on random replaced spans of each window's reference context."""
    H, K, L = cfg.train.horizon, cfg.tree.block_size, cfg.tree.levels
    refs, replaced, gist_share = [], [], []
    for w in windows:
        ids = reference_context(w.history, m.base.max_context, H)
        ref = raw_prefix(m.base, ids)
        source = HistorySource(ref.embeds.detach(), list(gists_for_history(m.gistnet, ref.embeds.detach(), K, L)))
        wc = replaced_context(len(ids), cfg, rng)
        refs.append(ref)
        replaced.append(assemble(wc, source, cfg.focus.position_mode))
        gist_share.append(1.0 - float((wc.levels_array() == 0).sum()) / len(ids))
    horizons = np.stack([w.horizon for w in windows])
    with torch.no_grad():
        ref_logits = horizon_logits(m.base, refs, horizons)
    logits = horizon_logits(m.base, replaced, horizons)
    target = torch.as_tensor(horizons, device=logits.device)
    sub = losses.substitutability(ref_logits, logits, target, cfg.train.substitutability)
    nll_rep, nll_ref = losses.nll(logits.detach(), target), losses.nll(ref_logits, target)
    return StepOutput(
        loss=sub.mean(),
        metrics={
            "loss": sub.mean().item(),
            "dnll": (nll_rep - nll_ref).mean().item(),
            "nll_replaced": nll_rep.mean().item(),
            "replaced_share": float(np.mean(gist_share)),
        },
    )


# ------------------------------------------------------------------------ JT1 / JT3: on-policy windows
def _on_policy(
    m: Modules, cfg: Config, windows: Sequence[Window], rng: np.random.Generator, gist_grad: bool
) -> tuple[list, list[HistorySource]]:
    """Gists of each history and the on-policy window over them (see ``build_source``)."""
    K, L = cfg.tree.block_size, cfg.tree.levels
    assembled, sources = [], []
    for w in windows:
        source = build_source(m.base, m.gistnet, w.history, K, L, gist_grad)
        wc = focus_window(
            len(w.history), source, m.lensnet, cfg.focus, K, L, cfg.focus.budget, cfg.train.focus_rounds, rng
        )
        assembled.append(assemble(wc, source, cfg.focus.position_mode))
        sources.append(source)
    return assembled, sources


def jt1_step(m: Modules, cfg: Config, windows: Sequence[Window], rng: np.random.Generator) -> StepOutput:
    """GistNet on the on-policy window: substitutability over H (+ neighbour contrastive term)."""
    H = cfg.train.horizon
    assembled, sources = _on_policy(m, cfg, windows, rng, gist_grad=True)
    horizons = np.stack([w.horizon for w in windows])
    with torch.no_grad():
        ref_logits = horizon_logits(m.base, [reference_prefix(m.base, w.history, H) for w in windows], horizons)
    logits = horizon_logits(m.base, assembled, horizons)
    target = torch.as_tensor(horizons, device=logits.device)
    sub = losses.substitutability(ref_logits, logits, target, cfg.train.substitutability).mean()
    loss = sub
    metrics = {"substitutability": sub.item()}
    if cfg.train.contrastive_weight > 0:
        con = torch.stack([losses.neighbour_contrastive(s.gists) for s in sources]).mean()
        loss = loss + cfg.train.contrastive_weight * con
        metrics["contrastive"] = con.item()
    nll_win, nll_ref = losses.nll(logits.detach(), target), losses.nll(ref_logits, target)
    metrics.update(loss=loss.item(), nll=nll_win.mean().item(), dnll=(nll_win - nll_ref).mean().item())
    return StepOutput(loss=loss, metrics=metrics)


def jt3_step(m: Modules, cfg: Config, windows: Sequence[Window], rng: np.random.Generator) -> StepOutput:
    """LoRA: NLL@H on the on-policy window + keep-alive KL to the adapter-free reference."""
    H = cfg.train.horizon
    assembled, _ = _on_policy(m, cfg, windows, rng, gist_grad=False)
    horizons = np.stack([w.horizon for w in windows])
    with torch.no_grad(), m.adapters_off():
        ref_logits = horizon_logits(m.base, [reference_prefix(m.base, w.history, H) for w in windows], horizons)
    logits = horizon_logits(m.base, assembled, horizons)
    target = torch.as_tensor(horizons, device=logits.device)
    task = losses.nll(logits, target).mean()
    keep = losses.kl_from_reference(ref_logits, logits).mean()
    loss = task + cfg.train.keepalive_weight * keep
    return StepOutput(loss=loss, metrics={"loss": loss.item(), "nll": task.item(), "keepalive_kl": keep.item()})


# ------------------------------------------------------------------------ LensNet: labels and step
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
    start uses the initial assembly (uniform gists, no LensNet).
    """
    K, L, t = cfg.tree.block_size, cfg.tree.levels, cfg.train
    snapshots, rows = [], []
    for i, w in enumerate(windows):
        source = build_source(m.base, m.gistnet, w.history, K, L)
        rounds = int(rng.integers(1, t.focus_rounds + 1)) if on_policy and t.focus_rounds > 0 else 0
        wc = focus_window(len(w.history), source, m.lensnet, cfg.focus, K, L, cfg.focus.budget, rounds, rng)
        nll0, r = label_snapshot(
            m.base, source, wc, w.horizon, rng, t.label_candidates, cfg.focus.position_mode, t.label_batch
        )
        snapshots.append(Snapshot(cycle, step, i, w.doc_index, w.cursor, w.history, w.horizon, wc, nll0, gist_version))
        rows.append(r)
    return snapshots, rows


@torch.no_grad()
def lens_examples(m: Modules, cfg: Config, snapshots: Sequence[Snapshot], rows: Sequence[LabelRows]) -> list[LensExample]:
    """Snapshots -> LensNet inputs and per-entry targets (gists from the frozen GistNet)."""
    K, L = cfg.tree.block_size, cfg.tree.levels
    out = []
    for s, r in zip(snapshots, rows):
        source = build_source(m.base, m.gistnet, s.history, K, L)
        out.append(lens_example(s.wc, source, r, m.lensnet, cfg.focus.position_mode))
    return out


def lens_step(m: Modules, cfg: Config, examples: Sequence[LensExample]) -> StepOutput:
    """LensNet on labelled snapshots: regression + ranking + budget + legality (mean over snapshots)."""
    t, f, K = cfg.train, cfg.focus, cfg.tree.block_size
    scores = lens_scores(m.lensnet, [e.inputs for e in examples])
    parts: dict[str, list[torch.Tensor]] = {"regression": [], "ranking": [], "budget": [], "legality": []}
    agree, labelled = 0.0, 0
    for s, e in zip(scores, examples):
        dev = s.device
        tgt, lab = e.targets.to(dev), e.labelled.to(dev)
        exp, col = e.expandable.to(dev), e.collapsible.to(dev)
        cand = torch.stack([s[g.to(dev)].mean() for g in e.groups]) if e.groups else s[:0]
        parts["regression"].append(losses.signed_regression(s, tgt, lab))
        parts["ranking"].append(losses.pairwise_ranking(cand, e.candidate_targets.to(dev)))
        parts["budget"].append(losses.budget_regulariser(s, exp, col, K, f.budget, f.tau_expand, f.tau_collapse))
        parts["legality"].append(losses.legality(s, exp, col))
        agree += float(((s[lab] > 0) == (tgt[lab] > 0)).float().sum())
        labelled += int(lab.sum())
    mean = {k: torch.stack(v).mean() for k, v in parts.items()}
    loss = (
        mean["regression"]
        + t.lens_rank_weight * mean["ranking"]
        + t.lens_budget_weight * mean["budget"]
        + t.lens_legality_weight * mean["legality"]
    )
    metrics = {"loss": loss.item(), **{k: v.item() for k, v in mean.items()}}
    metrics["sign_agreement"] = agree / max(1, labelled)
    return StepOutput(loss=loss, metrics=metrics)


# ------------------------------------------------------------------------ validation
@torch.no_grad()
def raw_losses(m: Modules, cfg: Config, windows: Sequence[Window], adapted: bool) -> dict[str, float]:
    """loss@H of the raw baselines. ``adapted=False``: recency and reference on the frozen
    base (adapters off) — the baselines of record, as in evaluation; ``adapted=True``:
    recency on the current adapted base (how much of a gain is LoRA alone)."""
    budget, H = cfg.focus.budget, cfg.train.horizon
    horizons = np.stack([w.horizon for w in windows])
    if adapted:
        rec = horizon_nll(m.base, [recency_prefix(m.base, w.history, budget) for w in windows], horizons)
        return {"loss_recency_adapted": float(rec.mean())}
    with m.adapters_off():
        rec = horizon_nll(m.base, [recency_prefix(m.base, w.history, budget) for w in windows], horizons)
        ref = horizon_nll(m.base, [reference_prefix(m.base, w.history, H) for w in windows], horizons)
    return {"loss_recency": float(rec.mean()), "loss_reference": float(ref.mean())}


@torch.no_grad()
def validate(
    m: Modules, cfg: Config, windows: Sequence[Window], cache: dict[str, dict[str, float]] | None = None
) -> tuple[dict[str, float], list[dict]]:
    """loss@H at ``cfg.focus.budget`` for megacontext (on-policy focus) and uniform gists
    (the initial assembly, no LensNet) on the current system (LoRA on), against recency and
    reference on the frozen base; plus recency on the adapted base, swap rate, residency.

    ``cache`` keeps the raw baselines between calls (the frozen ones never change, the
    adapted one only with the adapter). Returns (metrics, allocator trace records).
    Window ``i`` uses a fixed allocator seed.
    """
    K, L, budget = cfg.tree.block_size, cfg.tree.levels, cfg.focus.budget
    m.set_trainable(None)
    assembled, uniform, traces, records, utilisation = [], [], [], [], []
    for i, w in enumerate(windows):
        rng = np.random.default_rng(derive_seed(cfg.seed, "validation", i))
        source = build_source(m.base, m.gistnet, w.history, K, L)
        trace = FocusTrace()
        wc = focus_window(len(w.history), source, m.lensnet, cfg.focus, K, L, budget, cfg.train.focus_rounds, rng, trace)
        wc0 = WorkingContext.initial(len(w.history), K, L, budget, cfg.focus.tail_blocks, headroom=0)
        assembled.append(assemble(wc, source, cfg.focus.position_mode))
        uniform.append(assemble(wc0, source, cfg.focus.position_mode))
        traces.append(trace)
        utilisation.append(wc.cost / budget)
        records += [{"window": i, **r} for r in trace.records()]
    horizons = np.stack([w.horizon for w in windows])
    loss_mc = float(horizon_nll(m.base, assembled, horizons).mean())
    loss_uniform = float(horizon_nll(m.base, uniform, horizons).mean())
    cache = {} if cache is None else cache
    keys = {"frozen": False, f"adapted-{m.adapter_version()}": True}
    for key, adapted in keys.items():
        if key not in cache:
            cache[key] = raw_losses(m, cfg, windows, adapted)
    raw = {k: v for key in keys for k, v in cache[key].items()}
    loss_rec, loss_ref = raw["loss_recency"], raw["loss_reference"]
    res = np.asarray([r for t in traces for r in t.residency], dtype=np.float64)
    gap = loss_rec - loss_ref
    metrics = {
        "loss_megacontext": loss_mc,
        "loss_uniform_gists": loss_uniform,
        **raw,
        "dnll": loss_mc - loss_ref,
        "gap_closed": (loss_rec - loss_mc) / gap if gap > 0 else float("nan"),  # nan: no gap to close
        "swap_rate": float(np.mean([t.swap_rate for t in traces])),
        "residency_mean": float(res.mean()) if len(res) else float("nan"),
        "residency_p95": float(np.percentile(res, 95)) if len(res) else float("nan"),
        "budget_utilisation": float(np.mean(utilisation)),
        "expands": float(sum(a.kind == "expand" for t in traces for acts in t.actions for a in acts)),
        "collapses": float(sum(a.kind == "collapse" for t in traces for acts in t.actions for a in acts)),
    }
    return metrics, records
