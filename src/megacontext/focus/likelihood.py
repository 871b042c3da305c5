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
as "unknown": feature 0). The runtime keeps each pair's keys and values (:class:`PairCache`),
so a query there costs ``[n_blocks, query_tokens + 1]``.
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
MAX_CACHE_BYTES = 512 * 2**20  # keys and values a PairCache keeps (the newest pairs)


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
    if n == 0:
        return np.zeros(0)
    width = min(2, n)  # blocks per prefix
    prefixes = ids[: n * K].unfold(0, width * K, K)  # [n - width + 1, width * K]: blocks j..j+width-1
    return _fold(_prefix_logprobs(base, prefixes, ids[-query_tokens:]), n, width)


def _prefix_logprobs(base: BaseModel, prefixes: torch.Tensor, query: torch.Tensor) -> np.ndarray:
    """float64 [P]: log p(query | prefix) of each row of prefixes int64 [P, S], read whole."""
    out = []
    for lo in range(0, len(prefixes), BATCH_BLOCKS):
        chunk = prefixes[lo : lo + BATCH_BLOCKS]
        seq = torch.cat([chunk, query[None].expand(len(chunk), -1)], dim=1)  # [b, S + Q]
        out.append(_query_logprob(base, seq, prefixes.shape[1]))
    return torch.cat(out).double().cpu().numpy() if out else np.zeros(0)


def _fold(pair: np.ndarray, n: int, width: int) -> np.ndarray:
    """Per-block gains [n] from the prefix log-probs [n - width + 1] (prefix j = blocks
    j..j+width-1): each block's best prefix, less the median block's."""
    gains = np.full(n, -np.inf)
    for offset in range(width):  # block b is in the prefixes starting at b - width + 1 .. b
        gains[offset : offset + len(pair)] = np.maximum(gains[offset : offset + len(pair)], pair)
    return gains - np.median(gains)


class PairCache:
    """:func:`block_gains` for a growing history, with every block pair's keys and values kept.

    The pairs never change (a history is append-only, the runtime's base frozen); only the
    query does. So each pair's first ``2K - 1`` tokens go through the base once, and a query
    then costs ``Q + 1`` tokens per pair (the pair's last token, then the query) instead of
    ``2K + Q``: 8x fewer at K = 32, Q = 8. The keys and values of the newest ``max_bytes``
    worth of pairs are kept (the embedded base: ~0.26 MB a pair, so all of :data:`MAX_BLOCKS`;
    a 135M Llama in float32 ~2.9 MB, so ~170 pairs); older pairs are read whole, as
    :func:`block_gains` reads them. A model whose cache is not plain per-layer keys and values
    is read whole everywhere. The gains equal :func:`block_gains`' up to float rounding.
    """

    def __init__(self, base: BaseModel, block_size: int, max_bytes: int = MAX_CACHE_BYTES) -> None:
        self.base, self.block_size, self.max_bytes = base, block_size, max_bytes
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer [P, heads, 2K - 1, head_dim]
        self.first = 0  # history pair index of kv's row 0
        self.supported = True

    @property
    def pairs(self) -> int:
        return int(self.kv[0][0].shape[0]) if self.kv else 0

    @torch.no_grad()
    def gains(self, ids: np.ndarray, offset: int = 0, query_tokens: int = QUERY_TOKENS) -> np.ndarray:
        """float64 [len(ids) // K]: :func:`block_gains` of ``ids`` int64 [T] (all its complete
        blocks; query = its newest ``query_tokens``), whose first token starts history block
        ``offset`` (pairs are kept by their place in the history, so ``ids`` may start later
        as the history grows)."""
        K = self.block_size
        n = len(ids) // K
        if n < 2 or not self.supported:
            return block_gains(self.base, ids, K, n * K, query_tokens)
        t = torch.as_tensor(np.asarray(ids, dtype=np.int64), device=self.base.device)
        prefixes = t[: n * K].unfold(0, 2 * K, K)  # [n - 1, 2K]: pair j = history pair offset + j
        self._extend(prefixes, offset)
        if not self.supported:
            return block_gains(self.base, ids, K, n * K, query_tokens)
        query = t[-query_tokens:]
        cached_from = max(self.first - offset, 0)  # pairs before it are read whole
        old = _prefix_logprobs(self.base, prefixes[:cached_from], query)
        new = self._cached_logprobs(prefixes[cached_from:, -1], query, offset + cached_from)
        return _fold(np.concatenate([old, new]), n, 2)

    def _extend(self, prefixes: torch.Tensor, offset: int) -> None:
        """Keep the keys and values of the pairs of ``prefixes`` [P, 2K] (history pairs
        ``offset..offset + P - 1``) that are newer than the kept ones; drop kept pairs older
        than ``offset``, and the oldest past ``max_bytes``."""
        if self.kv:
            end = self.first + self.pairs
            if offset + len(prefixes) < end or offset >= end:
                self.kv = []  # not the history it was built on, or all of it is behind: start over
            elif offset > self.first:
                self._drop(offset - self.first)
        if not self.kv:
            self.first = offset
        todo = prefixes[self.first + self.pairs - offset :, :-1]  # [m, 2K - 1]
        for lo in range(0, len(todo), BATCH_BLOCKS):
            chunk = todo[lo : lo + BATCH_BLOCKS]
            positions = torch.arange(chunk.shape[1], device=self.base.device).expand(len(chunk), -1)
            out = self.base.forward(self.base.embed(chunk), positions, use_cache=True, last_only=True)
            layers = _plain_layers(out.cache)
            if layers is None:
                self.supported, self.kv = False, []
                return
            self.kv = layers if not self.kv else [
                (torch.cat([k0, k]), torch.cat([v0, v])) for (k0, v0), (k, v) in zip(self.kv, layers)
            ]
        per_pair = sum(k[0].numel() * k.element_size() + v[0].numel() * v.element_size() for k, v in self.kv)
        self._drop(self.pairs - max(1, self.max_bytes // max(per_pair, 1)))

    def _drop(self, count: int) -> None:
        """Forget the ``count`` oldest kept pairs (none when ``count <= 0``)."""
        if count > 0:
            self.kv = [(k[count:].clone(), v[count:].clone()) for k, v in self.kv]
            self.first += count

    def _cached_logprobs(self, last: torch.Tensor, query: torch.Tensor, first_pair: int) -> np.ndarray:
        """float64 [P]: log p(query | pair) for history pairs ``first_pair..`` from their kept
        keys and values; last int64 [P] is each pair's last token (read again with the query)."""
        from transformers import DynamicCache

        Q, S = len(query), 2 * self.block_size - 1
        row0 = first_pair - self.first
        out = []
        for lo in range(0, len(last), BATCH_BLOCKS):
            b = min(BATCH_BLOCKS, len(last) - lo)
            rows = slice(row0 + lo, row0 + lo + b)
            cache = DynamicCache(ddp_cache_data=[(k[rows], v[rows]) for k, v in self.kv])
            seq = torch.cat([last[lo : lo + b, None], query[None].expand(b, -1)], dim=1)  # [b, Q + 1]
            positions = torch.arange(S, S + Q + 1, device=self.base.device).expand(b, -1)
            logits = self.base.forward(self.base.embed(seq), positions, past_key_values=cache).logits.float()
            logp = torch.log_softmax(logits[:, :Q], dim=-1)
            out.append(logp.gather(-1, seq[:, 1:, None]).squeeze(-1).sum(-1))
        return torch.cat(out).double().cpu().numpy() if out else np.zeros(0)


def _plain_layers(cache: object) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per-layer (keys, values) [B, heads, S, head_dim] of a KV cache of full-attention layers,
    else None (sliding-window, linear-attention or unknown layers)."""
    layers = getattr(cache, "layers", None)
    if not layers or any(getattr(layer, "is_sliding", True) for layer in layers):
        return None
    kv = [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in layers]
    if any(not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor) or k.dim() != 4 for k, v in kv):
        return None
    return kv


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
