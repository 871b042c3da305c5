"""Loss functions of the three phases. Pure tensor code; shapes in every docstring.

Horizon losses work on logits ``[B, H, V]`` from :func:`megacontext.focus.horizon.horizon_logits` and targets
``[B, H]`` (the real horizon tokens). LensNet losses work on one snapshot's scores ``[W]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megacontext.focus.horizon import nll

# ------------------------------------------------------------------------ horizon

def kl_from_reference(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(reference || window) per row [B], averaged over the H horizon positions.

    ref_logits, logits: [B, H, V]; the reference side is treated as a constant target.
    """
    ref_logp = F.log_softmax(ref_logits.detach().float(), dim=-1)
    logp = F.log_softmax(logits.float(), dim=-1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(dim=-1).mean(dim=1)


def substitutability(
    ref_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, kind: str
) -> torch.Tensor:
    """``kl``: KL(reference || window); ``dnll``: NLL(window) - NLL(reference). Per row [B]."""
    if kind == "kl":
        return kl_from_reference(ref_logits, logits)
    return nll(logits, targets) - nll(ref_logits.detach(), targets)


def neighbour_contrastive(gists: list[torch.Tensor]) -> torch.Tensor:
    """Mean positive cosine similarity of time-adjacent gists; pushes neighbours apart.

    gists[k]: [N_k, d] per level; levels with fewer than two gists are skipped.
    """
    terms = [
        F.cosine_similarity(g[1:].float(), g[:-1].float(), dim=-1).clamp_min(0).mean()
        for g in gists
        if g.shape[0] >= 2
    ]
    return torch.stack(terms).mean() if terms else torch.zeros(())


# ------------------------------------------------------------------------ LensNet
def signed_regression(
    scores: torch.Tensor, targets: torch.Tensor, labelled: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """(Weighted) MSE on labelled entries. scores, targets, weights [W]; labelled [W] bool.

    ``weights`` lets every candidate count once: a collapse labels K entries, an expand one.
    """
    if not bool(labelled.any()):
        return scores.sum() * 0
    if weights is None:
        return F.mse_loss(scores[labelled], targets[labelled])
    w = weights[labelled]
    return (w * (scores[labelled] - targets[labelled]) ** 2).sum() / w.sum().clamp_min(1e-12)


def pairwise_ranking(
    candidate_scores: torch.Tensor, candidate_targets: torch.Tensor, margin: float = 0.1, sharpness: float = 5.0
) -> torch.Tensor:
    """Logistic ranking within one snapshot.

    candidate_scores, candidate_targets: [N] (one value per expand/collapse candidate).
    For every pair with ``t_i > t_j + margin``: ``softplus(-sharpness * (s_i - s_j))``.
    """
    dt = candidate_targets[:, None] - candidate_targets[None, :]
    ds = candidate_scores[:, None] - candidate_scores[None, :]
    pairs = dt > margin
    if not bool(pairs.any()):
        return candidate_scores.sum() * 0
    return F.softplus(-sharpness * ds[pairs]).mean()


def listwise(
    candidate_scores: torch.Tensor, candidate_targets: torch.Tensor, null: float, temperature: float,
    null_target: float | None = None,
) -> torch.Tensor:
    """Cross-entropy between two softmaxes over one snapshot's expand candidates plus a
    "nothing here helps" option scored ``null`` (the allocator's ``tau_expand``).

    candidate_scores, candidate_targets: [N]. The target distribution is
    ``softmax([targets; null_target] / temperature)`` (``null_target`` defaults to ``null``;
    higher: only a candidate whose target clearly beats it takes the mass), the predicted
    one ``softmax([scores; null] / temperature)``: the best candidate must stand out above
    the threshold, and a snapshot where nothing helps puts its mass on the null option
    (every score below ``null``).
    """
    if candidate_scores.numel() == 0:
        return candidate_scores.sum() * 0
    pad = candidate_scores.new_full((1,), null)
    goal = candidate_scores.new_full((1,), null if null_target is None else null_target)
    p = F.softmax(torch.cat([candidate_targets.to(pad.dtype), goal]) / temperature, dim=0)
    logq = F.log_softmax(torch.cat([candidate_scores, pad]) / temperature, dim=0)
    return -(p * logq).sum()


def budget_regulariser(
    scores: torch.Tensor,
    expandable: torch.Tensor,
    collapsible: torch.Tensor,
    block_size: int,
    budget: int,
    tau_expand: float,
    tau_collapse: float,
) -> torch.Tensor:
    """Squared imbalance between the cost the scores ask to spend and to refund.

    scores [W]; expandable/collapsible [W] bool. An expand above ``tau_expand`` costs
    ``K-1`` units; each collapsible entry below ``-tau_collapse`` refunds ``(K-1)/K``.
    """
    spend = (F.relu(scores - tau_expand) * expandable).sum() * (block_size - 1)
    refund = (F.relu(-scores - tau_collapse) * collapsible).sum() * (block_size - 1) / block_size
    return ((spend - refund) / budget) ** 2


def legality(scores: torch.Tensor, expandable: torch.Tensor, collapsible: torch.Tensor) -> torch.Tensor:
    """Penalise positive scores where no expand exists (LOD0) and negative scores where no
    collapse exists (tail, top level, incomplete groups). scores, masks [W]."""
    pos = F.relu(scores) ** 2 * (~expandable)
    neg = F.relu(-scores) ** 2 * (~collapsible)
    return (pos + neg).mean()
