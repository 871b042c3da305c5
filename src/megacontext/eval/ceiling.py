"""The ``oracle_focus`` ceiling beside the loss@H table (issue: honest oracle baselines).

:func:`~megacontext.focus.oracle.oracle_focus_context` chooses its expands on the FIRST half
of each window's horizon; every row here is scored on the SECOND half, on the same windows:
``oracle_focus`` and, for comparison, the policies named in :data:`COMPARED`. A row's
``delta_vs_uniform_gists`` is its paired mean difference to ``uniform_gists`` (with its
standard error), so "how much could a focus win here" reads off one column. The oracle
peeks at the future: it is a ceiling, never a policy, and never part of a "beats" check.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from megacontext.config import derive_seed
from megacontext.data import Window
from megacontext.eval.results import paired_se
from megacontext.focus.horizon import horizon_nll
from megacontext.focus.oracle import oracle_focus_context
from megacontext.focus.policies import FocusSettings, initial_context, policy_nll
from megacontext.focus.source import HistorySource, build_source
from megacontext.modules import Modules
from megacontext.working_context import assemble

ORACLE = "oracle_focus"
COMPARED = ("recency", "uniform_gists", "similarity_focus", "likelihood_focus", "megacontext")
CEILING_KEYS = ("budget", "policy", "loss_second_half", "delta_vs_uniform_gists", "se", "n_windows")


def oracle_steps(settings: FocusSettings) -> int:
    """Expands the oracle may take: as many as the allocator can pay for in its rounds."""
    return max(1, settings.rounds * settings.focus.n_diff // 2)


@torch.no_grad()
def oracle_nll(mods: Modules, settings: FocusSettings, window: Window, source: HistorySource, chunk: int) -> float:
    """Second-half NLL of ``window`` under the oracle focus chosen on its first half."""
    half = len(window.horizon) // 2
    wc = initial_context(source.num_tokens, settings)
    mode = settings.focus.position_mode
    wc = oracle_focus_context(mods.base, source, wc, window.horizon[:half], oracle_steps(settings), mode, chunk)
    return float(horizon_nll(mods.base, assemble(wc, source, mode), window.horizon, start=half)[0])


def ceiling_rows(
    mods: Modules, settings: FocusSettings, windows: Sequence[Window], budgets: Sequence[int], seed: int, chunk: int
) -> list[dict]:
    """eval.json ``ceiling`` rows: second-half loss of the oracle and of :data:`COMPARED`."""
    if not windows:
        return []
    half = len(windows[0].horizon) // 2
    sources = [build_source(mods.base, mods.gistnet, w.history, settings.shape) for w in windows]
    rows = []
    for budget in budgets:
        at = settings.at_budget(budget)
        losses = {ORACLE: [oracle_nll(mods, at, w, s, chunk) for w, s in zip(windows, sources)]}
        for policy in COMPARED:
            rngs = [np.random.default_rng(derive_seed(seed, "ceiling", policy, budget, i)) for i in range(len(windows))]
            losses[policy], _ = policy_nll(policy, mods, at, windows, sources, rngs, start=half)
        base = np.asarray(losses["uniform_gists"])
        for policy, values in losses.items():
            rows.append({
                "budget": int(budget), "policy": policy, "loss_second_half": float(np.mean(values)),
                "delta_vs_uniform_gists": float(np.mean(np.asarray(values) - base)),
                "se": paired_se(values, base),
                "n_windows": len(values),
            })
    return rows
