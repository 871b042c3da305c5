"""`megacontext report`: report.md + PNG plots from a run folder; missing inputs survive."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from megacontext.cli import main
from megacontext.eval.report import ReportInputs, lod_matrix, read_jsonl, rolling_mean, write_report
from megacontext.eval.timing import SessionTrace, trace_session
from megacontext.focus.policies import FocusSettings
from megacontext.modules import Modules

EVAL = {
    "horizon": 32, "block_size": 32, "base": "embedded", "checkpoint": None, "data": "smoke", "split": "test",
    "cursor": "random",
    "results": [
        {"budget": b, "policy": p, "loss_at_h": v + (0.2 if b == 96 else 0.0),
         "delta_nll_vs_reference": v - 2.0 + (0.2 if b == 96 else 0.0), "n_windows": 4}
        for b in (96, 128) for p, v in (("reference", 2.0), ("recency", 3.0), ("megacontext", 2.5))
    ],
    "gap_closed": {"96": 0.5, "128": 0.5},
    "passkey": [
        {"budget": 128, "history_tokens": n, "depth": d, "policy": p, "accuracy": a, "n": 2}
        for n in (512, 1024) for d in (0.1, 0.9) for p, a in (("recency", 0.0), ("megacontext", 1.0))
    ],
    "multikey": [
        {"budget": 128, "history_tokens": 1024, "depth": d, "policy": p, "accuracy": a, "n": 2}
        for d in (0.1, 0.9) for p, a in (("similarity_focus", 0.0), ("megacontext", 0.5))
    ],
    "ceiling": [
        {"budget": 128, "policy": p, "loss_second_half": v, "delta_vs_uniform_gists": v - 2.6, "se": 0.01,
         "n_windows": 4} for p, v in (("oracle_focus", 2.4), ("uniform_gists", 2.6))
    ],
    "timing": {"base_forward_ms": 10.0, "refocus_ms": 1.0, "gist_ms_per_block": 0.2},
}


def _write_run(run: Path) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "eval.json").write_text(json.dumps(EVAL))
    with open(run / "telemetry.jsonl", "w") as f:
        for phase, cycles in (("warm_gist", [0]), ("jt1", [1, 2]), ("jt2", [1, 2])):
            for c in cycles:
                for s in range(5):
                    rec = {"phase": phase, "cycle": c, "step": s, "metrics": {"loss": 1 / (s + c + 1)}}
                    f.write(json.dumps(rec) + "\n")
        f.write('{"phase": "jt3", "cyc')  # torn last line of a killed writer
    rows = [{"cycle": c, "phase": p, "name": f"c{c}-{p}", "swap_rate": 0.1 * c, "residency_mean": 3.0 + c,
             "residency_p95": 5.0 + c} for c in (1, 2) for p in ("jt1", "jt2", "jt3")]
    (run / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def trace(smoke_cfg, smoke_base, smoke_data) -> SessionTrace:
    mods = Modules.fresh(smoke_cfg, smoke_base)
    tokens = np.concatenate(smoke_data.documents("test"))[:640].astype(np.int64)
    return trace_session(mods, FocusSettings.from_config(smoke_cfg, greedy=True), tokens, seed=0)


def test_trace_records_every_refocus(trace, smoke_cfg):
    assert len(trace.entries) == 640 // 32 == trace.blocks
    assert trace.history_tokens == [32 * (i + 1) for i in range(20)]
    for n, e in zip(trace.history_tokens, trace.entries):
        assert e[0, 1] == 0 and e[-1, 2] == n and (e[1:, 1] == e[:-1, 2]).all()  # tiles [0, n)
        assert len(e) <= smoke_cfg.focus.budget
    assert (trace.entries[-1][:, 0] > 0).any()  # history 640 > budget 128: gists in the window
    assert trace.gist_ms > 0 and all(ms > 0 for ms in trace.refocus_ms)


def test_lod_matrix_marks_levels_and_the_future():
    entries = [np.array([[0, 0, 1], [0, 1, 2]]), np.array([[1, 0, 2], [0, 2, 3], [0, 3, 4]])]
    t = SessionTrace(budget=8, history_tokens=[2, 4], entries=entries, refocus_ms=[1.0, 1.0])
    m = lod_matrix(t, bins=4)
    assert m.shape == (4, 2)
    assert m[:2, 0].tolist() == [0, 0] and np.isnan(m[2:, 0]).all()  # not yet ingested
    assert m[:, 1].tolist() == [1, 1, 0, 0]


def test_report_writes_markdown_and_plots(tmp_path, trace):
    run = tmp_path / "run"
    _write_run(run)
    inputs = ReportInputs.from_run(run, trace, passkey_trace=dataclasses.replace(trace, marker=300))
    assert len(inputs.telemetry) == 25  # the torn line is skipped
    path = write_report(run, inputs, levels=2)
    text = path.read_text()
    pngs = {p.name: p for p in (run / "report").glob("*.png")}
    assert set(pngs) == {"loss_vs_budget.png", "passkey.png", "multikey.png", "training_curves.png",
                         "focus_training.png", "lod_map.png", "lod_map_passkey.png"}
    assert "oracle_focus" in text and "second half" in text  # the ceiling table, apart from the policies
    assert all(p.stat().st_size > 1000 for p in pngs.values())
    for name in pngs:
        assert f"report/{name}" in text
    assert "Missing inputs" not in text
    assert "| 128 | megacontext | 2.5000 | +0.5000 | 4 |" in text
    assert "gap closed at W=128: 50.0%" in text


def test_report_survives_missing_inputs(tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    path = write_report(run, ReportInputs.from_run(run, None, "no checkpoint"), levels=2)
    text = path.read_text()
    assert "## Missing inputs" in text
    for name in ("eval.json", "telemetry.jsonl", "validation.jsonl", "no checkpoint"):
        assert name in text
    assert not list(run.glob("report/*.png"))


def test_rolling_mean_is_trailing():
    y = np.arange(1.0, 40.0, 2.0)  # 20 points: a window of 2
    assert rolling_mean(y).tolist() == [1.0, 2.0] + [(a + b) / 2 for a, b in zip(y[1:-1], y[2:])]
    assert rolling_mean(y[:3]).tolist() == y[:3].tolist()  # fewer than 10 points: no smoothing


def test_read_jsonl_skips_torn_lines(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"a": 1}\n{"a": 2}\n{"a"')
    assert read_jsonl(f) == [{"a": 1}, {"a": 2}]


def test_cli_report_on_a_run_without_checkpoints(smoke_cfg, smoke_base, tmp_path, capsys):
    run = tmp_path / "run"
    _write_run(run)
    (run / "telemetry.jsonl").unlink()
    argv = ["report", "--config", "smoke", "--set", f"paths.data_root={smoke_cfg.paths.data_root}",
            "--set", f"paths.artifact_root={smoke_cfg.paths.artifact_root}", "--run", str(run)]
    assert main(argv) == 0
    text = (run / "report.md").read_text()
    assert "telemetry.jsonl" in text and "level-of-detail map" in text  # both reported missing
    assert (run / "report" / "passkey.png").stat().st_size > 0
    assert str(run / "report.md") in capsys.readouterr().out
