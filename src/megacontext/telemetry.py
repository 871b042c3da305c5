"""Telemetry sinks for a run: JSONL (always), Weights & Biases (optional), a live progress line.

Layout inside ``RUN_DIR``::

    telemetry.jsonl      one record per training step: {"phase", "cycle", "step", "metrics"}
    validation.jsonl     one row per validation (after every phase)
    traces/<name>.jsonl  allocator action traces (node, action, score, budget, residency)
    wandb/               the W&B run (offline mode works without network)

Every file is append-only and flushed per record; in a multi-process run only the main
process writes (the others' Telemetry is built with ``writes=False``: no file, bar or W&B
run). :meth:`Telemetry.offsets` returns the
byte length of each file so that a resumed run can cut away records written after the
checkpoint it resumes from (:meth:`Telemetry.truncate`) and replay them exactly.
API keys are never read, printed or logged here; W&B finds its own credentials.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from megacontext.config import Config

VALIDATION_COLUMNS = (
    ("cycle", "{:>5}"),
    ("phase", "{:>10}"),
    ("loss_megacontext", "{:>9.4f}"),
    ("loss_uniform_gists", "{:>9.4f}"),
    ("loss_recency", "{:>9.4f}"),
    ("loss_reference", "{:>9.4f}"),
    ("loss_recency_adapted", "{:>9.4f}"),
    ("swap_rate", "{:>6.3f}"),
    ("residency_mean", "{:>6.2f}"),
    ("residency_p95", "{:>6.2f}"),
)
VALIDATION_HEADERS = (
    "cycle", "phase", "loss@H mc", "uniform", "recency", "reference", "rec+LoRA", "swap", "res", "res95"
)


def _clean(value: Any) -> Any:
    """JSON-safe floats (NaN/inf become null) and plain Python numbers."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_validation_header() -> str:
    widths = [len(fmt.format(0 if "f" in fmt else "")) for _, fmt in VALIDATION_COLUMNS]
    return " ".join(h.rjust(w) for h, w in zip(VALIDATION_HEADERS, widths))


def format_validation_row(row: Mapping[str, Any]) -> str:
    cells = []
    for key, fmt in VALIDATION_COLUMNS:
        value = row.get(key)
        cells.append(fmt.format(value) if value is not None else fmt.format(float("nan")))
    return " ".join(cells)


class Telemetry:
    """All sinks of one run. Cheap to construct; W&B starts only when enabled."""

    def __init__(self, run_dir: Path, cfg: Config, progress: bool = True, writes: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.writes = writes
        if writes:
            (self.run_dir / "traces").mkdir(parents=True, exist_ok=True)
        self.progress_enabled = progress and writes
        self._bar: tqdm | None = None
        self._printed_header = False
        self._wandb = self._start_wandb(cfg) if cfg.wandb.enabled and writes else None

    # ------------------------------------------------------------------ W&B
    def _start_wandb(self, cfg: Config):
        import wandb

        mode = os.environ.get("WANDB_MODE", cfg.wandb.mode)
        if mode not in ("online", "offline"):
            mode = cfg.wandb.mode
        id_file = self.run_dir / "wandb_id.txt"
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = uuid.uuid4().hex[:8]
            id_file.write_text(run_id)
        return wandb.init(
            project=cfg.wandb.project,
            entity=cfg.wandb.entity or None,
            name=self.run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(self.run_dir),
            mode=mode,
            config=cfg.to_dict(),
            settings=wandb.Settings(console="off", silent=True),
        )

    # -------------------------------------------------------------- records
    def _append(self, rel: str, record: Mapping[str, Any]) -> None:
        if not self.writes:
            return
        path = self.run_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def log_step(self, phase: str, cycle: int, step: int, global_step: int, metrics: Mapping[str, Any]) -> None:
        """One training step: telemetry.jsonl, W&B and the progress line."""
        clean = {k: _clean(v) for k, v in metrics.items()}
        self._append("telemetry.jsonl", {"phase": phase, "cycle": cycle, "step": step, "metrics": clean})
        if self._wandb is not None:
            self._wandb.log({f"{phase}/{k}": v for k, v in clean.items() if v is not None}, step=global_step)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in clean.items() if isinstance(v, float)}, refresh=False)

    def log_validation(self, row: Mapping[str, Any], global_step: int) -> None:
        """One validation row: validation.jsonl, W&B and a printed table row."""
        clean = {k: _clean(v) for k, v in row.items()}
        self._append("validation.jsonl", clean)
        if self._wandb is not None:
            self._wandb.log({f"val/{k}": v for k, v in clean.items() if isinstance(v, (int, float))}, step=global_step)
        if self.progress_enabled:
            if not self._printed_header:
                tqdm.write(format_validation_header())
                self._printed_header = True
            tqdm.write(format_validation_row(clean))

    def log_traces(self, name: str, records: Iterable[Mapping[str, Any]]) -> None:
        """Allocator action traces, appended to ``traces/<name>.jsonl``."""
        lines = "".join(json.dumps({k: _clean(v) for k, v in r.items()}, sort_keys=True) + "\n" for r in records)
        if lines and self.writes:
            with open(self.run_dir / "traces" / f"{name}.jsonl", "a", encoding="utf-8") as f:
                f.write(lines)

    # ------------------------------------------------------------ progress
    def start_phase(self, label: str, total: int, done: int) -> None:
        """A live progress line for one phase (no-op when progress is off)."""
        self.end_phase()
        if self.progress_enabled:
            self._bar = tqdm(total=total, initial=done, desc=label, dynamic_ncols=True, leave=True)

    def advance(self) -> None:
        """One unit of work done on the current progress line (no record written)."""
        if self._bar is not None:
            self._bar.update(1)

    def end_phase(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # -------------------------------------------------------------- resume
    def offsets(self) -> dict[str, int]:
        """Byte length of every JSONL file this run has written (for resume)."""
        files = [p for p in self.run_dir.glob("*.jsonl")] + list((self.run_dir / "traces").glob("*.jsonl"))
        return {str(p.relative_to(self.run_dir)): p.stat().st_size for p in files}

    def truncate(self, offsets: Mapping[str, int]) -> None:
        """Cut every JSONL file back to ``offsets`` (files not listed are removed)."""
        if not self.writes:
            return
        for rel, size in self.offsets().items():
            path = self.run_dir / rel
            keep = offsets.get(rel, 0)
            if keep == 0:
                path.unlink()
            elif size > keep:
                with open(path, "r+b") as f:
                    f.truncate(keep)

    def close(self) -> None:
        self.end_phase()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
