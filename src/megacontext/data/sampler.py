"""Training/eval windows: (history before a cursor, the H tokens right after it)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from megacontext.config import derive_seed
from megacontext.errors import DataError


@dataclass
class Window:
    doc_index: int  # index into the sampler's documents
    cursor: int  # position of the first horizon token in the document
    history: np.ndarray  # int64 [T_hist]: doc[cursor - T_hist : cursor]
    horizon: np.ndarray  # int64 [H]: doc[cursor : cursor + H]
    task: str = "corpus"  # or a training task of data.tasks ("passkey", "multikey")


class WindowSampler:
    """Samples windows from documents, deterministically per (seed, step).

    cursor="random": documents are chosen with probability proportional to their number of
    valid cursors (``history_min <= cursor <= len - horizon``), the cursor uniformly among
    them. cursor="end": a uniformly chosen long-enough document, horizon = its last H tokens.
    Either way the history length is uniform in ``[history_min, min(history_max, cursor)]``.
    """

    def __init__(
        self,
        docs: Sequence[np.ndarray],
        horizon: int,
        history_min: int,
        history_max: int,
        cursor: Literal["random", "end"] = "random",
        seed: int = 0,
    ) -> None:
        if cursor not in ("random", "end"):
            raise DataError(f"cursor must be 'random' or 'end', got {cursor!r}")
        if horizon < 1 or history_min < 0 or history_max < history_min:
            raise DataError(
                f"need horizon >= 1 and 0 <= history_min <= history_max, got "
                f"horizon={horizon}, history_min={history_min}, history_max={history_max}"
            )
        self.docs = docs
        self.horizon = horizon
        self.history_min = history_min
        self.history_max = history_max
        self.cursor = cursor
        self.seed = seed
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        counts = np.maximum(lengths - horizon - history_min + 1, 0)  # valid cursors per doc
        self.eligible = np.flatnonzero(counts)
        if len(self.eligible) == 0:
            longest = int(lengths.max()) if len(lengths) else 0
            raise DataError(
                f"no document is long enough for a window: need history_min + horizon = "
                f"{history_min + horizon} tokens, the longest of {len(docs)} has {longest}"
            )
        weights = counts[self.eligible].astype(np.float64)
        self._probs = weights / weights.sum() if cursor == "random" else None

    def sample(self, rng: np.random.Generator) -> Window:
        i = int(rng.choice(self.eligible, p=self._probs))
        doc = self.docs[i]
        if self.cursor == "end":
            cursor = len(doc) - self.horizon
        else:
            cursor = int(rng.integers(self.history_min, len(doc) - self.horizon + 1))
        t_hist = int(rng.integers(self.history_min, min(self.history_max, cursor) + 1))
        return Window(
            doc_index=i,
            cursor=cursor,
            history=np.asarray(doc[cursor - t_hist : cursor], dtype=np.int64),
            horizon=np.asarray(doc[cursor : cursor + self.horizon], dtype=np.int64),
        )

    def batch(self, step: int, batch_size: int) -> list[Window]:
        """``batch_size`` windows, a pure function of (seed, step) — resume-safe."""
        rng = np.random.default_rng(derive_seed(self.seed, "windows", step))
        return [self.sample(rng) for _ in range(batch_size)]


def sample_blocks(histories: Sequence[np.ndarray], block_size: int, per_history: int,
                  rng: np.random.Generator) -> np.ndarray:
    """Token ids int64 ``[N, K]``: up to ``per_history`` random complete blocks of each
    history (block-aligned from its start), in order."""
    rows = []
    for h in histories:
        n = len(h) // block_size
        pick = np.sort(rng.choice(n, size=min(per_history, n), replace=False))
        rows.append(np.asarray(h[: n * block_size], dtype=np.int64).reshape(n, block_size)[pick])
    return np.concatenate(rows) if rows else np.zeros((0, block_size), dtype=np.int64)
