"""Query likelihood: how much each raw block of the history helps the frozen base predict the newest tokens.

The gain of block ``b`` is a cheap counterfactual with the base as the judge::

    pair_j = log p(q | blocks j, j+1)      q = the newest ``query_tokens`` tokens
    best_b = max(pair_{b-1}, pair_b)
    gain_b = best_b - median_j best_j

summed over the query's tokens, each read after two consecutive raw blocks: a fact that
straddles a block border is read whole, and both of its blocks get its gain. The gain is
relative to the history's typical block: any prefix at all moves log p(q) by an offset that
depends on the text and on how the base was trained (-15 to +15 nats on re-trainings of the
embedded base), which an absolute threshold would read as signal; the needle stands out from
the median block by 11-27 nats (40 passkey trials at 4,096 tokens, a base whose absolute
needle gains were -1 to 14). A block that states what the newest
text asks about (a passkey, a definition used again) raises the likelihood of the question through the base's own
induction; ordinary code barely moves it. This is training-free retrieval in the spirit of
InfLLM / MoBA (query against block summaries, top-k), with the base's likelihood instead of a
vector similarity: block gists cannot be told apart this way (the base reads their presence,
not their content), raw blocks can.

Two users: the training-free ``likelihood_focus`` policy (the allocator on :func:`entry_scores`)
and LensNet, which reads :func:`likelihood_feature` as one more entry feature
(``lensnet.query_likelihood``) and learns when to act on it.

Cost: one forward of ``[n_blocks, 2K + query_tokens]`` tokens per query (batched), so it grows
with the history; sources score at most the newest :data:`MAX_BLOCKS` blocks (older ones read
as "unknown": feature 0).
"""

from __future__ import annotations

import numpy as np
import torch

from megacontext.base_model import BaseModel
from megacontext.working_context import WorkingContext

QUERY_TOKENS = 8  # newest tokens scored (a question is ~8-16 tokens; 8 ranked needles best)
BATCH_BLOCKS = 64  # blocks per forward
MAX_BLOCKS = 1024  # newest blocks a source scores (32k tokens at K = 32)
THRESHOLD = 9.0  # nats above the typical block to be worth opening (a passkey 11-27, most code blocks < 9)
SCALE = 3.0  # nats per unit of tanh


@torch.no_grad()
def block_gains(
    base: BaseModel, history: np.ndarray, block_size: int, end: int, query_tokens: int = QUERY_TOKENS
) -> np.ndarray:
    """float64 [end // block_size]: ``gain_b`` in nats for every complete block before ``end``,
    relative to the median block (0 = a typical block).

    history int64 [T]; the query is ``history[-query_tokens:]``. Read by ``base`` as it is
    (call inside ``modules.plain()`` for the adapter-free base).
    """
    K, n = block_size, end // block_size
    ids = torch.as_tensor(np.asarray(history, dtype=np.int64), device=base.device)
    query = ids[-query_tokens:]
    if n == 0:
        return np.zeros(0)
    width = min(2, n)  # blocks per prefix
    prefixes = ids[: n * K].unfold(0, width * K, K)  # [n - width + 1, width * K]: blocks j..j+width-1
    pairs = []
    for lo in range(0, len(prefixes), BATCH_BLOCKS):
        chunk = prefixes[lo : lo + BATCH_BLOCKS]
        seq = torch.cat([chunk, query[None].expand(len(chunk), -1)], dim=1)  # [b, width*K + Q]
        pairs.append(_query_logprob(base, seq, width * K))
    pair = torch.cat(pairs).double().cpu().numpy()
    gains = np.full(n, -np.inf)
    for offset in range(width):  # block b is in the prefixes starting at b - width + 1 .. b
        gains[offset : offset + len(pair)] = np.maximum(gains[offset : offset + len(pair)], pair)
    return gains - np.median(gains)


def _query_logprob(base: BaseModel, seq: torch.Tensor, prefix: int) -> torch.Tensor:
    """[B]: sum of log p(seq[:, t]) for t >= prefix (>= 1) of seq int64 [B, S]."""
    logits = base.last_logits(seq, seq.shape[1] - prefix + 1).float()  # [B, S - prefix + 1, V]
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    return logp.gather(-1, seq[:, prefix:, None]).squeeze(-1).sum(-1)


def likelihood_feature(wc: WorkingContext, gains: np.ndarray, first: int = 0) -> np.ndarray:
    """float64 [W] in (-1, 1): ``tanh((max gain of the scored blocks an entry covers - THRESHOLD) / SCALE)``
    (an entry pays off through its best block); 0 for entries that cover no scored block (the
    raw tail, blocks older than ``first``). ``gains[j]`` is block ``first + j``."""
    starts, ends = wc.spans()
    K = wc.block_size
    out = np.zeros(len(starts))
    for i in np.flatnonzero(starts < wc.tail_start):
        lo, hi = max(starts[i] // K - first, 0), min(-(-ends[i] // K) - first, len(gains))
        if hi > lo:
            out[i] = np.tanh((gains[lo:hi].max() - THRESHOLD) / SCALE)
    return out


def entry_scores(wc: WorkingContext, gains: np.ndarray) -> np.ndarray:
    """Allocator scores [W] of ``likelihood_focus``: :func:`likelihood_feature` on gist entries;
    raw entries score 0 (kept unless an expand needs their room)."""
    return np.where(wc.levels_array() > 0, likelihood_feature(wc, gains), 0.0)
