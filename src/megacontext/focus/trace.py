"""The one record of what the allocator did (spec §5): swap rate, residency, expands, collapses.

Training validation, evaluation and the runtime session all record their refocuses here::

    trace = FocusTrace()
    trace.record(allocator.refocus(wc, scores), window=cost_before)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from megacontext.working_context import Action


@dataclass
class FocusTrace:
    """Actions per refocus and the window size (entries) each refocus started from."""

    actions: list[list[Action]] = field(default_factory=list)  # per refocus (all its passes)
    entries: list[int] = field(default_factory=list)  # window entries at each refocus

    def record(self, actions: list[Action], window: int) -> None:
        """One refocus: its ``actions`` on a window of ``window`` entries."""
        self.actions.append(list(actions))
        self.entries.append(int(window))

    @property
    def refocuses(self) -> int:
        return len(self.actions)

    def _rates(self) -> list[float]:
        return [len(a) / max(1, n) for a, n in zip(self.actions, self.entries)]

    @property
    def swap_rate(self) -> float:
        """Mean over refocuses of actions / entries in the window (0 with no refocus)."""
        rates = self._rates()
        return float(np.mean(rates)) if rates else 0.0

    @property
    def last_swap_rate(self) -> float:
        rates = self._rates()
        return rates[-1] if rates else 0.0

    @property
    def residency(self) -> list[float]:
        """Refocuses the replaced entries had kept their level, one value per action."""
        return [a.residency for acts in self.actions for a in acts]

    def count(self, kind: str) -> int:
        """Actions of ``kind`` ("expand", "collapse", "forced_collapse") over every refocus."""
        return sum(a.kind == kind for acts in self.actions for a in acts)

    def summary(self) -> dict[str, float]:
        """Mean / p95 residency, swap rate (last and mean), refocuses, expands, collapses."""
        res = np.asarray(self.residency, dtype=np.float64)
        return {
            "residency_mean": float(res.mean()) if len(res) else math.nan,
            "residency_p95": float(np.percentile(res, 95)) if len(res) else math.nan,
            "swap_rate": self.last_swap_rate,
            "swap_rate_mean": self.swap_rate if self.refocuses else math.nan,
            "refocuses": float(self.refocuses),
            "expands": float(self.count("expand")),
            "collapses": float(self.count("collapse")),
        }

    def records(self) -> list[dict[str, Any]]:
        """Allocator trace rows: refocus, node, action, score, cost before/after, residency."""
        return [{"refocus": r, **dataclasses.asdict(a)} for r, acts in enumerate(self.actions) for a in acts]
