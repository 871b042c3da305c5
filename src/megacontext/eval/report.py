"""`megacontext report`: RUN_DIR/report.md with PNG plots under RUN_DIR/report/.

Sections (each one independent: a missing input is named in the report, never fatal):

- evaluation table, gap closed, acceptance check, timing      <- RUN_DIR/eval.json
- loss@H vs budget per policy                                 <- RUN_DIR/eval.json
- passkey and multi-key recall heatmaps (history length x depth) per policy <- RUN_DIR/eval.json
- training curves per phase and cycle                         <- RUN_DIR/telemetry.jsonl
- swap rate and residency over training                       <- RUN_DIR/validation.jsonl
- level-of-detail map of a session (refocus x history position, coloured by level)
                                                              <- a :class:`SessionTrace`
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from megacontext.config import PHASE_NAMES, Config  # noqa: E402
from megacontext.errors import MegaContextError  # noqa: E402
from megacontext.eval.results import acceptance_lines, format_table  # noqa: E402
from megacontext.eval.timing import SessionTrace  # noqa: E402

PLOTS_DIR = "report"
LOD_BINS = 256  # history positions per column of the level-of-detail map


# ----------------------------------------------------------------------------- inputs
def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file; a torn last line (killed writer) is skipped."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def _load_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass
class ReportInputs:
    """What a report is made from; ``None`` = missing (``missing`` says why)."""

    eval: dict | None = None
    telemetry: list[dict] | None = None
    validation: list[dict] | None = None
    trace: SessionTrace | None = None
    passkey_trace: SessionTrace | None = None  # a passkey session (trace.marker = the needle)
    missing: list[str] = field(default_factory=list)

    @classmethod
    def from_run(
        cls, run_dir: Path, trace: SessionTrace | None = None, trace_problem: str = "",
        passkey_trace: SessionTrace | None = None,
    ) -> ReportInputs:
        out = cls(trace=trace, passkey_trace=passkey_trace)
        out.eval = _load_json(run_dir / "eval.json")
        if out.eval is None:
            out.missing.append(f"{run_dir / 'eval.json'} (run `megacontext eval --out {run_dir}`)")
        for name in ("telemetry", "validation"):
            path = run_dir / f"{name}.jsonl"
            rows = read_jsonl(path) if path.is_file() else []
            if rows:
                setattr(out, name, rows)
            else:
                out.missing.append(f"{path} (written by `megacontext train`)")
        if trace is None:
            out.missing.append(f"level-of-detail map: {trace_problem or 'no session trace'}")
        return out


def session_traces_for_run(
    cfg: Config, run_dir: Path, tokens: int | None = None
) -> tuple[SessionTrace | None, SessionTrace | None, str]:
    """(code trace, passkey trace, "") with the run's trained modules, loaded once; or
    (None, None, why not).

    The code trace: a session over the longest test document; ``tokens`` (default 16x
    focus.budget) caps the history, and when the longest document is shorter, the next
    longest ones are appended. The passkey trace: an evaluation passkey prompt of that
    length (needle at depth 0.3) ingested at once and refocused ``train.focus_rounds`` more
    times, as the passkey grid's ``megacontext_session`` row runs it; ``trace.marker`` is
    the needle.
    """
    from megacontext.data import make_passkey, prepare_dataset
    from megacontext.eval.timing import trace_session
    from megacontext.focus.policies import FocusSettings
    from megacontext.modules import Modules

    try:
        mods = Modules.load(cfg, str(run_dir))
        docs = prepare_dataset(cfg, progress=False).documents("test")
    except MegaContextError as e:
        return None, None, str(e)
    if not docs:
        return None, None, "the test split has no documents"
    settings = FocusSettings.from_config(cfg, greedy=True)
    n = tokens or 16 * cfg.focus.budget
    pieces, have = [], 0
    for doc in sorted(docs, key=len, reverse=True):
        if have >= n:
            break
        pieces.append(np.asarray(doc[: n - have], dtype=np.int64))
        have += len(pieces[-1])
    code = trace_session(mods, settings, np.concatenate(pieces), cfg.seed)
    ex = make_passkey(np.random.default_rng(cfg.seed), mods.base.tokenizer, docs, n, 0.3)
    passkey = trace_session(mods, settings, ex.prompt, cfg.seed, chunk=len(ex.prompt), final_rounds=settings.rounds)
    passkey.marker = ex.needle_pos
    return code, passkey, ""


# ------------------------------------------------------------------------------ plots
def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _main_metric(records: Sequence[dict]) -> str | None:
    """``loss`` if the records have it, else the first metric whose name has 'loss'."""
    keys = {k for r in records for k, v in r.get("metrics", {}).items() if isinstance(v, (int, float))}
    if "loss" in keys:
        return "loss"
    return next((k for k in sorted(keys) if "loss" in k), None)


def rolling_mean(y: np.ndarray, frac: float = 0.1) -> np.ndarray:
    """Trailing mean over ``max(1, frac * len(y))`` points (same length as ``y``)."""
    w = max(1, int(frac * len(y)))
    c = np.concatenate([[0.0], np.cumsum(y, dtype=np.float64)])
    idx = np.arange(1, len(y) + 1)
    lo = np.maximum(0, idx - w)
    return (c[idx] - c[lo]) / (idx - lo)


def plot_training_curves(records: Sequence[dict], path: Path) -> Path | None:
    """One panel per phase, one line per cycle of the phase's loss vs step (faint: raw,
    solid: trailing mean over a tenth of the phase)."""
    by_phase: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_phase[str(r.get("phase"))].append(r)
    phases = sorted(by_phase, key=lambda p: (PHASE_NAMES.index(p) if p in PHASE_NAMES else len(PHASE_NAMES), p))
    if not phases:
        return None
    fig, axes = plt.subplots(1, len(phases), figsize=(3.6 * len(phases), 3.0), squeeze=False)
    for ax, phase in zip(axes[0], phases):
        rows = by_phase[phase]
        metric = _main_metric(rows)
        by_cycle: dict[int, list[tuple[int, float]]] = defaultdict(list)
        for r in rows:
            v = r.get("metrics", {}).get(metric) if metric else None
            if isinstance(v, (int, float)) and math.isfinite(v):
                by_cycle[int(r.get("cycle", 0))].append((int(r.get("step", 0)), float(v)))
        for cycle in sorted(by_cycle):
            xs, ys = zip(*sorted(by_cycle[cycle]))
            raw = ax.plot(xs, ys, alpha=0.3, marker="." if len(xs) < 20 else None)[0]
            ax.plot(xs, rolling_mean(np.asarray(ys)), color=raw.get_color(), label=f"cycle {cycle}")
        ax.set_title(f"{phase}: {metric or 'no loss metric'}")
        ax.set_xlabel("step")
        if by_cycle:
            ax.legend(fontsize=7)
    return _save(fig, path)


def plot_loss_vs_budget(data: dict, path: Path) -> Path | None:
    """loss@H vs budget, one line per policy."""
    rows = [r for r in data.get("results", []) if r.get("loss_at_h") is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for policy in dict.fromkeys(r["policy"] for r in rows):
        pts = sorted((r["budget"], r["loss_at_h"]) for r in rows if r["policy"] == policy)
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", linestyle="--" if policy == "reference" else "-", label=policy)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["budget"] for r in rows}), labels=[str(b) for b in sorted({r["budget"] for r in rows})])
    ax.set_xlabel("budget W (cost units)")
    ax.set_ylabel(f"loss@H (H={data.get('horizon')}), nats/token")
    ax.legend(fontsize=8)
    ax.set_title("loss@H vs budget")
    return _save(fig, path)


def plot_gist_value(data: dict, path: Path) -> Path | None:
    """Gist panel: loss@H of recency vs the raw tokens kept, and uniform_gists at the raw
    tokens it keeps (the gists' worth is how far below the recency curve it sits)."""
    rows = data.get("gists") or []
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for r in rows:
        xs, ys = zip(*[(c["raw_tokens"], c["loss_at_h"]) for c in r["curve"]])
        line, = ax.plot(xs, ys, marker="o", label=f"recency (W={r['budget']} and fewer raw tokens)")
        ax.plot([r["raw_tokens"]], [r["uniform_gists"]], marker="*", markersize=12, linestyle="none",
                color=line.get_color(), label=f"uniform_gists W={r['budget']}: {r['raw_tokens']} raw + "
                f"{r['gist_entries']} gists")
    rec = data.get("reconstruction") or {}
    title = "Are gists worth the raw tokens they displace?"
    if rec.get("top1") is not None:
        title += f"\nreconstruction top-1 {rec['top1']:.3f}, gain {rec['gain']:+.3f} nats/token"
    ax.set_xlabel("raw tokens in the window")
    ax.set_ylabel(f"loss@H (H={data.get('horizon')}), nats/token")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_passkey(data: dict, path: Path, key: str = "passkey") -> Path | None:
    """Heatmaps of accuracy (history length x depth): one row per budget, one column per policy
    (``key``: "passkey" or "multikey")."""
    rows = data.get(key, [])
    if not rows:
        return None
    budgets = sorted({r["budget"] for r in rows})
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    lengths = sorted({r["history_tokens"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    fig, axes = plt.subplots(
        len(budgets), len(policies), figsize=(2.3 * len(policies), 1.2 + 0.5 * len(lengths) * len(budgets)),
        squeeze=False,
    )
    for i, b in enumerate(budgets):
        for j, policy in enumerate(policies):
            grid = np.full((len(lengths), len(depths)), np.nan)
            for r in rows:
                if r["budget"] == b and r["policy"] == policy:
                    grid[lengths.index(r["history_tokens"]), depths.index(r["depth"])] = r["accuracy"]
            ax = axes[i][j]
            ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            for (y, x), v in np.ndenumerate(grid):
                if not np.isnan(v):
                    ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
            ax.set_xticks(range(len(depths)), labels=[f"{d:g}" for d in depths], fontsize=7)
            ax.set_yticks(range(len(lengths)), labels=[str(n) for n in lengths], fontsize=7)
            ax.set_title(f"{policy} (W={b})", fontsize=8)
            if j == 0:
                ax.set_ylabel("history tokens")
            if i == len(budgets) - 1:
                ax.set_xlabel("depth")
    return _save(fig, path)


def lod_matrix(trace: SessionTrace, bins: int = LOD_BINS) -> np.ndarray:
    """float [bins, refocuses]: level of the entry covering each history bin (NaN = future)."""
    total = max(trace.history_tokens) if trace.history_tokens else 0
    if total == 0:
        return np.zeros((0, 0))
    bins = min(bins, total)
    centres = ((np.arange(bins) + 0.5) * total / bins).astype(np.int64)
    out = np.full((bins, len(trace.entries)), np.nan)
    for t, (n, entries) in enumerate(zip(trace.history_tokens, trace.entries)):
        live = centres < n
        idx = np.searchsorted(entries[:, 1], centres[live], side="right") - 1
        out[live, t] = entries[idx, 0]
    return out


def plot_lod_map(trace: SessionTrace, levels: int, path: Path) -> Path | None:
    """Refocus (time) x history position, coloured by the level that covers it."""
    m = lod_matrix(trace)
    if m.size == 0:
        return None
    total = max(trace.history_tokens)
    fig, ax = plt.subplots(figsize=(7, 4))
    cmap = plt.get_cmap("viridis", levels + 1)
    im = ax.imshow(m, origin="lower", aspect="auto", cmap=cmap, vmin=-0.5, vmax=levels + 0.5,
                   extent=(0, len(trace.entries), 0, total), interpolation="nearest")
    cbar = fig.colorbar(im, ax=ax, ticks=range(levels + 1))
    cbar.set_label("level (0 = raw tokens)")
    if trace.marker is not None:
        ax.axhline(trace.marker, color="red", linestyle="--", linewidth=1, label="passkey needle")
        ax.legend(loc="upper left", fontsize=7)
        ax.set_xlabel("refocus (the prompt ingested at once, then the final rounds)")
    else:
        ax.set_xlabel("refocus (one per block ingested)")
    ax.set_ylabel("history position (tokens)")
    ax.set_title(f"working-context level of detail, W={trace.budget}")
    return _save(fig, path)


def plot_focus_training(validation: Sequence[dict], path: Path) -> Path | None:
    """Swap rate and residency (mean, p95) at each validation (one per phase)."""
    rows = [r for r in validation if any(isinstance(r.get(k), (int, float)) for k in ("swap_rate", "residency_mean"))]
    if not rows:
        return None
    labels = [r.get("name") or f"c{r.get('cycle')}-{r.get('phase')}" for r in rows]
    x = np.arange(len(rows))

    def series(key: str) -> np.ndarray:
        return np.array([r[key] if isinstance(r.get(key), (int, float)) else np.nan for r in rows], dtype=float)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.4))
    a1.plot(x, series("swap_rate"), marker="o")
    a1.axhline(0.25, color="grey", linestyle=":", label="healthy <= 0.25")
    a1.set_title("swap rate (actions / entries per refocus)")
    a2.plot(x, series("residency_mean"), marker="o", label="mean")
    a2.plot(x, series("residency_p95"), marker="s", label="p95")
    a2.axhline(3, color="grey", linestyle=":", label="healthy >= 3")
    a2.set_title("residency (refocuses)")
    for ax in (a1, a2):
        ax.set_xticks(x, labels=labels, rotation=45, ha="right", fontsize=7)
        ax.legend(fontsize=7)
    return _save(fig, path)


# ----------------------------------------------------------------------------- markdown
def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def _num(x: Any, spec: str = ".4f") -> str:
    return "-" if not isinstance(x, (int, float)) else format(x, spec)


def _eval_section(data: dict) -> list[str]:
    out = [f"Base `{data.get('base')}`, checkpoint `{data.get('checkpoint')}`, data `{data.get('data')}` "
           f"({data.get('split')} split, cursor {data.get('cursor')}), H = {data.get('horizon')}.", ""]
    out += _md_table(
        ("budget", "policy", "loss@H", "ΔNLL vs reference", "windows"),
        [(r["budget"], r["policy"], _num(r["loss_at_h"]), _num(r["delta_nll_vs_reference"], "+.4f"), r["n_windows"])
         for r in data.get("results", [])],
    )
    out.append("")
    for budget, share in data.get("gap_closed", {}).items():
        if share is None:
            out.append(f"- gap closed at W={budget}: n/a (reference is not better than recency: no gap to close)")
        else:
            out.append(f"- gap closed at W={budget}: {100 * share:.1f}% of the recency → reference loss gap")
    out += [f"- {line}" for line in acceptance_lines(data)]
    t = data.get("timing", {})
    out.append(f"- timing: base forward {_num(t.get('base_forward_ms'), '.2f')} ms, refocus "
               f"{_num(t.get('refocus_ms'), '.2f')} ms, GistNet {_num(t.get('gist_ms_per_block'), '.3f')} ms/block")
    return out


def write_report(run_dir: Path, inputs: ReportInputs, levels: int) -> Path:
    """Write RUN_DIR/report.md (+ PNGs in RUN_DIR/report/); returns the report's path."""
    run_dir = Path(run_dir)
    plots = run_dir / PLOTS_DIR
    lines = [f"# MegaContext run report: {run_dir.name}", "", f"Run folder: `{run_dir}`", ""]

    def figure(title: str, made: Path | None, why_not: str) -> None:
        lines.extend([f"## {title}", ""])
        if made is not None:
            lines.extend([f"![{title}]({made.relative_to(run_dir).as_posix()})", ""])
        else:
            lines.extend([f"_Not available: {why_not}._", ""])

    lines.extend(["## Evaluation", ""])
    if inputs.eval is not None:
        lines.extend(_eval_section(inputs.eval) + ["", "```", format_table(inputs.eval), "```", ""])
    else:
        lines.extend(["_Not available: no eval.json._", ""])
    ev = inputs.eval or {}
    figure("loss@H vs budget", plot_loss_vs_budget(ev, plots / "loss_vs_budget.png") if ev else None,
           "no loss@H results in eval.json")
    figure("Gists against the raw tokens they displace", plot_gist_value(ev, plots / "gist_value.png") if ev else None,
           "no gist-value rows in eval.json")
    figure("Passkey accuracy", plot_passkey(ev, plots / "passkey.png") if ev else None,
           "no passkey results in eval.json")
    figure("Multi-key recall accuracy", plot_passkey(ev, plots / "multikey.png", "multikey") if ev else None,
           "no multikey results in eval.json")
    figure("Training curves", plot_training_curves(inputs.telemetry, plots / "training_curves.png")
           if inputs.telemetry else None, "no telemetry.jsonl")
    figure("Swap rate and residency over training",
           plot_focus_training(inputs.validation, plots / "focus_training.png") if inputs.validation else None,
           "no validation.jsonl")
    figure("Level of detail over a session",
           plot_lod_map(inputs.trace, levels, plots / "lod_map.png") if inputs.trace else None,
           "no session trace")
    figure("Level of detail over a passkey session (needle at depth 0.3)",
           plot_lod_map(inputs.passkey_trace, levels, plots / "lod_map_passkey.png") if inputs.passkey_trace else None,
           "no passkey session trace")
    if inputs.missing:
        lines.extend(["## Missing inputs", ""] + [f"- {m}" for m in inputs.missing] + [""])
    path = run_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
