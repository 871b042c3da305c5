"""Entry sources: where an assembled window's vectors come from (``working_context.EntrySource``).

- :class:`HistorySource` — one window's token embeddings ``[T, d]`` and its per-level gists,
  computed on the fly (training and evaluation; with or without grad);
- :class:`TreeSource` — a :class:`~megacontext.tree.MegaContextTree`: LOD0 embeddings from
  the base, gists from storage (the runtime session).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from megacontext.base_model import BaseModel
from megacontext.config import TreeShape
from megacontext.focus.likelihood import MAX_BLOCKS, PairCache, block_gains
from megacontext.gistnet import GistNet, gists_for_history
from megacontext.tree import MegaContextTree


@dataclass
class HistorySource:
    """EntrySource over one window: token embeddings ``[T, d]``, ``gists[k-1]`` ``[T//K**k, d]``,
    and (for LensNet's likelihood feature) the ids int64 ``[T]`` and the base that judges them."""

    tokens: torch.Tensor
    gists: list[torch.Tensor]
    ids: torch.Tensor | None = None
    base: BaseModel | None = None
    _gains: tuple[int, np.ndarray] | None = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def token_embeddings(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [n] -> [n, d]."""
        return self.tokens.index_select(0, positions.to(self.tokens.device))

    def gist_vectors(self, level: int, indices: torch.Tensor) -> torch.Tensor:
        """indices [n] of ``level`` (>= 1) -> [n, d]."""
        table = self.gists[level - 1]
        return table.index_select(0, indices.to(table.device))

    def query_gains(self, block_size: int) -> tuple[int, np.ndarray]:
        """``(first, gains)``: :func:`~megacontext.focus.likelihood.block_gains` of the newest
        ``MAX_BLOCKS`` complete blocks (block ``first + j`` has ``gains[j]``), query = the
        newest tokens; computed once, by the base as it reads (adapter on), without grad."""
        if self._gains is None:
            if self.ids is None or self.base is None:
                raise ValueError("query gains need the source's ids and base (build_source sets them)")
            self._gains = _newest_gains(self.base, self.ids.cpu().numpy(), block_size)
        return self._gains


def build_source(
    base: BaseModel,
    gistnet: GistNet,
    history: np.ndarray | torch.Tensor,
    shape: TreeShape,
    gist_grad: bool = True,
) -> HistorySource:
    """Embed ``history`` [T] with the base (adapted embeddings when LoRA is on) and gist it.

    Autograd follows the caller's grad mode and the modules' ``requires_grad`` flags: in
    JT1 the gists carry grad into GistNet. ``gist_grad=False`` computes the gists without
    a graph (JT3: the embedding adapter then trains through the raw entries only).
    """
    ids = torch.as_tensor(np.asarray(history, dtype=np.int64), device=base.device)
    tokens = base.embed(ids)
    with torch.set_grad_enabled(gist_grad and torch.is_grad_enabled()):
        gists = gists_for_history(gistnet, tokens if gist_grad else tokens.detach(), shape.block_size, shape.levels)
    return HistorySource(tokens=tokens, gists=list(gists), ids=ids, base=base)


class TreeSource:
    """EntrySource over a tree: LOD0 embeddings from the base, gists from storage.

    The query gains keep every block pair's keys and values (:class:`PairCache`): the history
    only grows and the session's base does not change, so a refocus reads just the query per pair.
    """

    def __init__(self, tree: MegaContextTree, base: BaseModel) -> None:
        self.tree = tree
        self.base = base
        self._gains: tuple[int, int, np.ndarray] | None = None  # (num_tokens, first, gains)
        self._pairs = PairCache(base, tree.block_size)

    def query_gains(self, block_size: int) -> tuple[int, np.ndarray]:
        """Like :meth:`HistorySource.query_gains`, for the history as it stands (recomputed when it grew)."""
        n = self.tree.num_tokens
        if self._gains is None or self._gains[0] != n:
            first = max(0, n // block_size - MAX_BLOCKS)
            ids = self.tree.tokens(first * block_size, n).astype(np.int64)
            self._gains = (n, first, self._pairs.gains(ids, first))
        return self._gains[1], self._gains[2]

    def token_embeddings(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [n] -> [n, d] base input embeddings of those history tokens."""
        if positions.numel() == 0:
            return torch.zeros(0, self.base.dim, device=self.base.device, dtype=self.base.dtype)
        lo, hi = int(positions.min()), int(positions.max()) + 1
        ids = torch.from_numpy(self.tree.tokens(lo, hi).astype(np.int64))
        ids = ids[(positions - lo).cpu()].to(self.base.device)
        return self.base.embed(ids)

    def gist_vectors(self, level: int, indices: torch.Tensor) -> torch.Tensor:
        """indices [n] -> [n, d] stored gists of `level`, on the base's device/dtype."""
        g = self.tree.gists(level, indices.cpu())
        return g.to(device=self.base.device, dtype=self.base.dtype)


@torch.no_grad()
def _newest_gains(base: BaseModel, ids: np.ndarray, block_size: int) -> tuple[int, np.ndarray]:
    """``(first, gains)`` of the newest ``MAX_BLOCKS`` complete blocks of ``ids`` [T]."""
    n = len(ids) // block_size
    first = max(0, n - MAX_BLOCKS)
    return first, block_gains(base, ids[first * block_size :], block_size, (n - first) * block_size)
