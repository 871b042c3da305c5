"""Validation after every phase: loss@H at ``focus.budget`` through the focus room's policies.

``megacontext`` (on-policy focus) and ``uniform_gists`` on the current system (LoRA on),
against ``recency`` and ``reference`` on the frozen base (the baselines of record, as in
evaluation), plus ``recency`` on the adapted base (how much of a gain is LoRA alone), and
the allocator's swap rate, residency and actions (:class:`~megacontext.focus.trace.FocusTrace`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from megacontext.config import Config, derive_seed
from megacontext.data import Window
from megacontext.focus.policies import FocusSettings, PolicyWindow, policy_nll
from megacontext.focus.source import build_source
from megacontext.focus.trace import FocusTrace
from megacontext.modules import Modules


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values))


@torch.no_grad()
def raw_losses(m: Modules, cfg: Config, windows: Sequence[Window], adapted: bool) -> dict[str, float]:
    """loss@H of the raw baselines. ``adapted=False``: recency and reference on the frozen
    base (adapters off); ``adapted=True``: recency on the current adapted base."""
    settings = FocusSettings.from_config(cfg, greedy=False)
    n = len(windows)
    none, rngs = [None] * n, [np.random.default_rng(0)] * n  # raw policies draw nothing
    if adapted:
        rec, _ = policy_nll("recency", m, settings, windows, none, rngs, plain=False)
        return {"loss_recency_adapted": _mean(rec)}
    rec, _ = policy_nll("recency", m, settings, windows, none, rngs)
    ref, _ = policy_nll("reference", m, settings, windows, none, rngs)
    return {"loss_recency": _mean(rec), "loss_reference": _mean(ref)}


@torch.no_grad()
def focus_metrics(
    m: Modules, cfg: Config, windows: Sequence[Window], *seed_key: str
) -> tuple[dict[str, float], list[FocusTrace], list[PolicyWindow]]:
    """loss@H of megacontext (on-policy focus) and uniform_gists on ``windows``, with the
    allocator's swap rate and actions; window ``i`` draws from ``derive_seed(seed,
    "validation", *seed_key, i)``. Returns (metrics, one trace per window, megacontext's windows)."""
    settings = FocusSettings.from_config(cfg, greedy=False)
    sources = [build_source(m.base, m.gistnet, w.history, cfg.tree.shape) for w in windows]
    rngs = [np.random.default_rng(derive_seed(cfg.seed, "validation", *seed_key, i)) for i in range(len(windows))]
    traces = [FocusTrace() for _ in windows]
    mc, pws = policy_nll("megacontext", m, settings, windows, sources, rngs, traces)
    uniform, _ = policy_nll("uniform_gists", m, settings, windows, sources, rngs)
    metrics = {
        "loss_megacontext": _mean(mc),
        "loss_uniform_gists": _mean(uniform),
        "swap_rate": float(np.mean([t.swap_rate for t in traces])),
        "expands": float(sum(t.count("expand") for t in traces)),
        "collapses": float(sum(t.count("collapse") for t in traces)),
    }
    return metrics, traces, pws


def task_metrics(m: Modules, cfg: Config, windows: Sequence[Window]) -> dict[str, float]:
    """:func:`focus_metrics` per task type (passkey, multikey), prefixed with its name —
    focus at work where it matters."""
    out: dict[str, float] = {}
    for task in sorted({w.task for w in windows}):
        metrics, _, _ = focus_metrics(m, cfg, [w for w in windows if w.task == task], task)
        out |= {f"{task}_{k}": v for k, v in metrics.items()}
    return out


@torch.no_grad()
def validate(
    m: Modules,
    cfg: Config,
    windows: Sequence[Window],
    cache: dict[str, dict[str, float]] | None = None,
    task_windows: Sequence[Window] = (),
) -> tuple[dict[str, float], list[dict]]:
    """Validation metrics and the allocator trace records (see the module docstring);
    with ``task_windows``, :func:`task_metrics` too.

    ``cache`` keeps the raw baselines between calls (the frozen ones never change, the
    adapted one only with the adapter). Window ``i`` uses a fixed allocator seed.
    """
    m.set_trainable(None)
    focus, traces, mc = focus_metrics(m, cfg, windows)
    cache = {} if cache is None else cache
    keys = {"frozen": False, f"adapted-{m.adapter_version()}": True}
    for key, adapted in keys.items():
        if key not in cache:
            cache[key] = raw_losses(m, cfg, windows, adapted)
    raw = {k: v for key in keys for k, v in cache[key].items()}
    loss_rec, loss_ref = raw["loss_recency"], raw["loss_reference"]
    res = np.asarray([r for t in traces for r in t.residency], dtype=np.float64)
    gap, loss_mc = loss_rec - loss_ref, focus["loss_megacontext"]
    metrics = {
        "loss_megacontext": loss_mc,
        "loss_uniform_gists": focus["loss_uniform_gists"],
        **raw,
        "dnll": loss_mc - loss_ref,
        "gap_closed": (loss_rec - loss_mc) / gap if gap > 0 else float("nan"),  # nan: no gap to close
        "swap_rate": focus["swap_rate"],
        "residency_mean": float(res.mean()) if len(res) else float("nan"),
        "residency_p95": float(np.percentile(res, 95)) if len(res) else float("nan"),
        "budget_utilisation": float(np.mean([pw.cost / cfg.focus.budget for pw in mc])),
        "expands": focus["expands"],
        "collapses": focus["collapses"],
        **task_metrics(m, cfg, task_windows),
    }
    records = [{"window": i, **r} for i, t in enumerate(traces) for r in t.records()]
    return metrics, records
