"""A traced runtime session (level-of-detail map, latencies) and eval.json's timing block.

:func:`trace_session` runs a :class:`~megacontext.runtime.Session` over a RAM tree on one
document, recording after every refocus the window's entries (level, span) and the
refocus latency, and timing GistNet per completed block while ingesting.
:func:`measure_timing` reduces it to ``base_forward_ms`` (one base forward over a full
``W_max`` window), ``refocus_ms`` (assemble + LensNet + allocator) and
``gist_ms_per_block``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from megacontext.base_model import BaseModel
from megacontext.focus.policies import FocusSettings
from megacontext.modules import Modules
from megacontext.runtime import BlockTelemetry, Session
from megacontext.tree import MegaContextTree


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedGister:
    """A Gister that forwards to ``inner`` and accumulates the time spent in ``gist``."""

    def __init__(self, inner: Any, device: torch.device) -> None:
        self.inner = inner
        self.device = device
        self.gist_s = 0.0
        self.blocks = 0  # LOD1 gists made (one per completed block)

    def __getattr__(self, name: str) -> Any:  # version, dim, embed_tokens, ...
        return getattr(self.inner, name)

    def gist(self, level: int, children: torch.Tensor) -> torch.Tensor:
        """children [N, K, d] -> [N, d], timed."""
        _sync(self.device)
        t0 = time.perf_counter()
        out = self.inner.gist(level, children)
        _sync(self.device)
        self.gist_s += time.perf_counter() - t0
        if level == 1:
            self.blocks += int(children.shape[0])
        return out


@dataclass
class SessionTrace:
    """Per refocus: history length, the window's entries and the refocus latency."""

    budget: int
    history_tokens: list[int] = field(default_factory=list)
    entries: list[np.ndarray] = field(default_factory=list)  # int64 [W, 3]: level, start, end
    refocus_ms: list[float] = field(default_factory=list)
    gist_ms: float = 0.0
    blocks: int = 0
    marker: int | None = None  # a history position to mark on the map (a passkey's needle)

    @property
    def gist_ms_per_block(self) -> float:
        return self.gist_ms / self.blocks if self.blocks else float("nan")


def _entries(session: Session) -> np.ndarray:
    """int64 [W, 3]: (level, start, end) of each window entry."""
    assert session.wc is not None
    starts, ends = session.wc.spans()
    return np.stack([session.wc.levels_array(), starts, ends], axis=1)


@torch.no_grad()
def trace_session(
    mods: Modules, settings: FocusSettings, tokens: np.ndarray, seed: int, chunk: int | None = None,
    final_rounds: int = 0,
) -> SessionTrace:
    """Ingest ``tokens`` int64 [T] in a fresh RAM session at ``settings.budget``, ``chunk``
    tokens per ingest call (default: one block, as in decoding; ``len(tokens)``: the whole
    prompt at once, as the passkey evaluation does), then refocus ``final_rounds`` times."""
    gister = TimedGister(mods.gister(), mods.base.device)
    tree = MegaContextTree.create_ram(settings.shape.block_size, settings.shape.levels, mods.base.dim, gister)
    trace = SessionTrace(settings.budget)
    session = Session(mods, tree, settings.focus, seed=seed)

    def record(t: BlockTelemetry) -> None:
        trace.history_tokens.append(t.history_tokens)
        trace.entries.append(_entries(session))
        trace.refocus_ms.append(t.ms_assemble + t.ms_lensnet + t.ms_allocator)

    session.on_block = record
    ids = np.asarray(tokens, dtype=np.int64)
    step = chunk or settings.shape.block_size
    for lo in range(0, len(ids), step):
        session.ingest(ids[lo : lo + step])
    for _ in range(final_rounds):
        session.refocus()
    trace.gist_ms, trace.blocks = 1e3 * gister.gist_s, gister.blocks
    return trace


def _median_ms(fn: Callable[[], object], device: torch.device, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


@torch.no_grad()
def base_forward_ms(base: BaseModel, tokens: np.ndarray, width: int) -> float:
    """Median ms of one base forward over ``width`` raw tokens (the first of ``tokens``)."""
    ids = torch.as_tensor(np.resize(np.asarray(tokens, dtype=np.int64), width), device=base.device)
    embeds = base.embed(ids)[None]
    positions = torch.arange(width, device=base.device)[None]
    return _median_ms(lambda: base.forward(embeds, positions), base.device)


def measure_timing(mods: Modules, settings: FocusSettings, doc: np.ndarray, seed: int) -> dict[str, float]:
    """eval.json timing on one document at ``settings.budget`` (W_max): see the module docstring.

    The session ingests up to 8x the budget tokens; ``refocus_ms`` is the median over the
    refocuses whose history already exceeds the budget (full windows).
    """
    budget = settings.budget
    tokens = np.asarray(doc[: 8 * budget], dtype=np.int64)
    trace = trace_session(mods, settings, tokens, seed)
    full = [ms for n, ms in zip(trace.history_tokens, trace.refocus_ms) if n > budget] or trace.refocus_ms
    return {
        "base_forward_ms": base_forward_ms(mods.base, tokens, budget),
        "refocus_ms": statistics.median(full) if full else float("nan"),
        "gist_ms_per_block": trace.gist_ms_per_block,
    }
