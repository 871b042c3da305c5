"""The eval.json schema, the derived numbers (ΔNLL, gap closed) and the printed table.

eval.json (exactly these keys)::

    {"horizon", "block_size", "base", "checkpoint", "data", "split", "cursor",
     "results":  [{"budget", "policy", "loss_at_h", "delta_nll_vs_reference", "se", "delta_vs_uniform_gists",
                   "se_vs_uniform_gists", "n_windows", "swap_rate"}]   (s.e.: of the paired per-window difference),
     "gap_closed": {"<budget>": share},
     "ceiling":  [{"budget", "policy", "loss_second_half", "delta_vs_uniform_gists", "se", "n_windows"}],
     "passkey":  [{"budget", "history_tokens", "depth", "policy", "accuracy", "n"}],
     "multikey": [the same keys as passkey: multi-key recall, the asked fact at the depth],
     "gists":    [{"budget", "raw_tokens", "displaced_value", "won_back", "target_margin", ... (eval.gists)}],
     "reconstruction": {"blocks", "top1", "nll", "blank_nll", "gain"} (empty when not measured),
     "timing":   {"base_forward_ms", "refocus_ms", "gist_ms_per_block"}}

``gap_closed[W] = (recency - megacontext) / (recency - reference)`` in loss@H; null when
there is no gap (the reference is not better than recency: the ratio would be
meaningless). Non-finite numbers are written as null.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

EVAL_KEYS = ("horizon", "block_size", "base", "checkpoint", "data", "split", "cursor",
             "results", "gap_closed", "ceiling", "passkey", "multikey", "gists", "reconstruction", "timing")
RESULT_KEYS = ("budget", "policy", "loss_at_h", "delta_nll_vs_reference", "se", "delta_vs_uniform_gists",
               "se_vs_uniform_gists", "n_windows", "swap_rate")
PASSKEY_KEYS = ("budget", "history_tokens", "depth", "policy", "accuracy", "n")
TIMING_KEYS = ("base_forward_ms", "refocus_ms", "gist_ms_per_block")
ACCEPT_DELTA_NLL = 0.1  # seed doc: ΔNLL degradation <= 0.1 at W_max


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def paired_se(values: Sequence[float], base: Sequence[float] | None) -> float | None:
    """Standard error of the mean paired difference ``values - base`` over the same windows;
    None without a baseline or with fewer than two windows."""
    if base is None or len(values) < 2 or len(values) != len(base):
        return None
    d = np.asarray(values, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    return _finite(float(d.std(ddof=1) / math.sqrt(len(d))))


def _mean(values: Sequence[float] | None) -> float:
    return sum(values) / len(values) if values else math.nan


def loss_rows(
    losses: Mapping[tuple[int, str], Sequence[float]], swap_rates: Mapping[tuple[int, str], Sequence[float]]
) -> list[dict[str, Any]]:
    """One results row per (budget, policy) from per-window NLLs: the mean, its difference to
    the reference's and to ``uniform_gists``' (the same windows), each with its paired s.e.

    ``losses[(budget, policy)]``: loss@H of each window (the same windows for every key);
    ``swap_rates``: the allocator's swap rate on each window (0 for a policy that never refocuses).
    """
    rows = []
    for (budget, policy), values in losses.items():
        ref, uni = losses.get((budget, "reference")), losses.get((budget, "uniform_gists"))
        loss = _mean(values)
        rows.append({
            "budget": int(budget),
            "policy": policy,
            "loss_at_h": _finite(loss),
            "delta_nll_vs_reference": _finite(loss - _mean(ref)),
            "se": None if policy == "reference" else paired_se(values, ref),
            "delta_vs_uniform_gists": _finite(loss - _mean(uni)),
            "se_vs_uniform_gists": None if policy == "uniform_gists" else paired_se(values, uni),
            "n_windows": len(values),
            "swap_rate": _finite(float(np.mean(swap_rates[(budget, policy)]))) if swap_rates.get((budget, policy)) else 0.0,
        })
    return rows


def _loss(rows: Sequence[Mapping[str, Any]], budget: int, policy: str) -> float | None:
    for r in rows:
        if r["budget"] == budget and r["policy"] == policy:
            return r["loss_at_h"]
    return None


def gap_closed(rows: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """Share of the recency -> reference loss gap that megacontext closes, per budget
    (None where the reference is not better than recency)."""
    out: dict[str, float | None] = {}
    for budget in sorted({r["budget"] for r in rows}):
        rec, ref, mc = (_loss(rows, budget, p) for p in ("recency", "reference", "megacontext"))
        if None in (rec, ref, mc) or rec <= ref:  # type: ignore[operator]
            out[str(budget)] = None
        else:
            out[str(budget)] = _finite((rec - mc) / (rec - ref))  # type: ignore[operator]
    return out


def make_eval_json(
    header: Mapping[str, Any], results: list[dict], passkey: list[dict], timing: Mapping[str, Any],
    ceiling: list[dict] | None = None,
    multikey: list[dict] | None = None,
    gists: list[dict] | None = None,
    reconstruction: Mapping[str, Any] | None = None,
) -> dict:
    """Assemble eval.json from its header fields and the measured parts (``ceiling``: the
    oracle_focus rows of :mod:`megacontext.eval.ceiling`, empty when not measured)."""
    out = {k: header[k] for k in EVAL_KEYS[:7]}
    out["results"] = results
    out["gap_closed"] = gap_closed(results)
    out["ceiling"] = [{k: _finite(v) if isinstance(v, float) else v for k, v in r.items()} for r in ceiling or []]
    out["passkey"] = passkey
    out["multikey"] = multikey or []
    out["gists"] = [{k: _finite(v) if isinstance(v, float) else v for k, v in r.items()} for r in gists or []]
    out["reconstruction"] = {k: _finite(v) if isinstance(v, float) else v for k, v in (reconstruction or {}).items()}
    out["timing"] = {k: _finite(timing.get(k)) for k in TIMING_KEYS}
    return out


def write_eval_json(data: Mapping[str, Any], path: Path) -> Path:
    """Atomic write (tmp + rename) of eval.json."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def format_table(data: Mapping[str, Any]) -> str:
    """Plain-text loss@H table (each difference with its paired s.e.), gap closed, the
    ceiling, the gist panel, passkey and multi-key accuracy, and timing."""
    lines = []
    if data["results"]:
        lines.append(f"loss@H (H={data['horizon']}, {data['split']} split of {data['data']}, cursor={data['cursor']})")
        lines.append(f"{'budget':>7} {'policy':<16} {'loss@H':>8} {'ΔNLL':>8} {'± s.e.':>7} "
                     f"{'Δ uniform':>9} {'± s.e.':>7} {'windows':>7} {'swap':>6}")
    for r in data["results"]:  # .get: an eval.json of an older version has no s.e. columns
        lines.append(
            f"{r['budget']:>7} {r['policy']:<16} {_fmt(r['loss_at_h']):>8} "
            f"{_fmt(r['delta_nll_vs_reference'], '+.4f'):>8} {_fmt(r.get('se')):>7} "
            f"{_fmt(r.get('delta_vs_uniform_gists'), '+.4f'):>9} {_fmt(r.get('se_vs_uniform_gists')):>7} "
            f"{r['n_windows']:>7} {_fmt(r.get('swap_rate'), '.3f'):>6}"
        )
    for budget, share in data["gap_closed"].items():
        rec, ref = _loss(data["results"], int(budget), "recency"), _loss(data["results"], int(budget), "reference")
        no_gap = None not in (rec, ref) and rec <= ref  # type: ignore[operator]
        note = " (reference is not better than recency here: no gap to close)" if no_gap else ""
        shown = "n/a" if share is None else f"{100 * share:.1f}%"
        lines.append(f"gap closed at W={budget}: {shown}{note}")
    lines += _ceiling_table(data.get("ceiling") or [])
    lines += gist_lines(data)
    if data["passkey"]:
        lines += _passkey_table(data["passkey"])
    if data.get("multikey"):
        lines += _passkey_table(data["multikey"], "multi-key recall")
    t = data["timing"]
    ratio = (t["refocus_ms"] / t["base_forward_ms"]) if t["refocus_ms"] and t["base_forward_ms"] else None
    lines.append(
        f"timing: base forward {_fmt(t['base_forward_ms'], '.2f')} ms, refocus {_fmt(t['refocus_ms'], '.2f')} ms "
        f"(ratio {_fmt(ratio, '.3f')}), GistNet {_fmt(t['gist_ms_per_block'], '.3f')} ms/block"
    )
    return "\n".join(lines)


def _ceiling_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The oracle_focus ceiling rows (scored on the second half of each horizon)."""
    if not rows:
        return []
    out = ["ceiling: oracle_focus picks its expands on the first half of each horizon; every row here is "
           "scored on the second half (a ceiling, never a policy)",
           f"{'budget':>7} {'policy':<16} {'loss 2nd half':>13} {'Δ vs uniform_gists':>19} {'± s.e.':>7} {'windows':>7}"]
    for r in rows:
        out.append(f"{r['budget']:>7} {r['policy']:<16} {_fmt(r['loss_second_half']):>13} "
                   f"{_fmt(r['delta_vs_uniform_gists'], '+.4f'):>19} {_fmt(r['se']):>7} {r['n_windows']:>7}")
    return out


def gist_lines(data: Mapping[str, Any]) -> list[str]:
    """The gist-value rows (are gists worth the raw tokens they displace?) and reconstruction."""
    out = []
    for r in data.get("gists") or []:
        out.append(
            f"gists at W={r['budget']} ({r['n_windows']} windows, paired): the {r['budget'] - r['raw_tokens']} raw "
            f"tokens they displace are worth {_fmt(r['displaced_value'], '+.4f')} ± {_fmt(r['displaced_se'])}; "
            f"{r['gist_entries']} gists win back {_fmt(r['won_back'], '+.4f')} ± {_fmt(r['won_back_se'])} "
            f"(won back - half of it: {_fmt(r['target_margin'], '+.4f')} ± {_fmt(r['target_margin_se'])}); "
            f"their content is worth {_fmt(r['content_value'], '+.4f')} ± {_fmt(r['content_value_se'])} "
            f"(another window's gists in their place)")
        out.append("  recency by raw tokens kept: " + ", ".join(
            f"{c['raw_tokens']}: {_fmt(c['loss_at_h'])}" for c in r["curve"]) + f"; uniform_gists {_fmt(r['uniform_gists'])}")
        pm = r["position_modes"]
        out.append(f"  uniform_gists by position mode: compact {_fmt(pm['compact'])}, absolute {_fmt(pm['absolute'])} "
                   f"(absolute - compact {_fmt(pm['absolute_minus_compact'], '+.4f')} ± {_fmt(pm['se'])})")
    rec = data.get("reconstruction") or {}
    if rec:
        out.append(f"reconstruction from LOD1 gists ({rec['blocks']} blocks): top-1 {_fmt(rec['top1'], '.3f')}, "
                   f"NLL {_fmt(rec['nll'], '.3f')} vs {_fmt(rec['blank_nll'], '.3f')} with the gist blanked "
                   f"(gain {_fmt(rec['gain'], '+.3f')} nats/token)")
    return out


def _passkey_table(rows: Sequence[Mapping[str, Any]], title: str = "passkey") -> list[str]:
    """Passkey accuracy: one line per (budget, history, depth), one column per policy."""
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    cells: dict[tuple, dict[str, float]] = {}
    trials: set[int] = set()
    for r in rows:
        cells.setdefault((r["budget"], r["history_tokens"], r["depth"]), {})[r["policy"]] = r["accuracy"]
        trials.add(r["n"])
    width = max(8, *(len(p) for p in policies))
    out = [f"{title} exact match ({'/'.join(map(str, sorted(trials)))} trials per cell)",
           f"{'budget':>7} {'history':>8} {'depth':>6} " + " ".join(f"{p:>{width}}" for p in policies)]
    for (budget, history, depth), acc in cells.items():
        out.append(f"{budget:>7} {history:>8} {depth:>6.2f} "
                   + " ".join(f"{_fmt(acc.get(p), '.3f'):>{width}}" for p in policies))
    return out


def acceptance_lines(data: Mapping[str, Any], threshold: float = ACCEPT_DELTA_NLL) -> list[str]:
    """The seed doc's check: megacontext ΔNLL vs reference <= threshold, per budget."""
    out = []
    for r in data["results"]:
        if r["policy"] != "megacontext":
            continue
        d = r["delta_nll_vs_reference"]
        verdict = "n/a" if d is None else ("PASS" if d <= threshold else "FAIL")
        out.append(f"acceptance W={r['budget']}: megacontext ΔNLL vs reference {_fmt(d, '+.4f')} "
                   f"(target <= {threshold}) {verdict}")
    return out
