"""``oracle_focus``: greedy counterfactual focus that peeks at the horizon — a ceiling.

Never a policy (it reads the future) and never in a "beats" check: evaluation reports it
beside the policies to show how much a focus could win on these windows. From the
initial assembly it takes, up to ``steps`` times, the expand (or, for a coarse gist, the
expand of it and one child: the lookahead path of ``counterfactual.sample_candidates``)
that lowers the NLL of the *probe* (the first half of the horizon) the most, paying for
it within the budget by collapsing the oldest legal sibling groups outside everything
it expanded; it stops when no candidate helps. The window is then scored on the
*second* half of the horizon, which it never saw.
"""

from __future__ import annotations

import numpy as np
import torch

from megacontext.base_model import BaseModel
from megacontext.focus.counterfactual import Candidate, apply_candidate, sample_candidates, windows_nll
from megacontext.focus.source import HistorySource
from megacontext.working_context import WorkingContext

Span = tuple[int, int]


def _overlaps(span: Span, kept: list[Span]) -> bool:
    return any(span[0] < end and start < span[1] for start, end in kept)


def expanded_spans(wc: WorkingContext, cand: Candidate) -> list[Span]:
    """Token spans ``[start, end)`` that ``cand`` expands (the gist, and its child on a path)."""
    spans = [wc.span(wc.entries[cand.pos])]
    if cand.child >= 0:
        level, index = wc.entries[cand.pos]
        spans.append(wc.span((level - 1, index * wc.block_size + cand.child)))
    return spans


def paid(wc: WorkingContext, cand: Candidate, kept: list[Span]) -> WorkingContext | None:
    """``cand`` applied, then the oldest legal groups outside ``kept`` (and ``cand``'s own
    spans) collapsed until the window fits ``wc.budget`` again; None when it cannot."""
    keep = kept + expanded_spans(wc, cand)
    out = apply_candidate(wc, cand)
    while out.cost > wc.budget:
        groups = [int(g) for g in out.collapsible_positions()]
        starts, ends = out.spans()
        free = [g for g in groups if not _overlaps((int(starts[g]), int(ends[g + out.block_size - 1])), keep)]
        if not free:
            return None
        out.collapse(free[0])
    out.budget = wc.budget
    return out


@torch.no_grad()
def oracle_focus_context(
    base: BaseModel,
    source: HistorySource,
    wc: WorkingContext,
    probe: np.ndarray,
    steps: int,
    position_mode: str,
    chunk: int,
) -> WorkingContext:
    """Greedy counterfactual focus from ``wc`` (see the module docstring); ``probe`` int64 [P]."""
    kept: list[Span] = []
    rng = np.random.default_rng(0)  # no collapse candidates are sampled: unused
    for _ in range(steps):
        cands = sample_candidates(wc, rng, 0, lookahead=True)
        options = [(c, w) for c in cands if (w := paid(wc, c, kept)) is not None]
        if not options:
            break
        nll = windows_nll(base, source, [wc] + [w for _, w in options], probe, position_mode, chunk)
        best = int(np.argmin(nll[1:]))
        if nll[1 + best] >= nll[0]:
            break
        cand, after = options[best]
        kept += expanded_spans(wc, cand)  # later payments leave them alone
        wc = after
    return wc
