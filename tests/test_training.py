"""Alternating training: horizon alignment, per-phase ownership, on-policy labels, resume."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from megacontext.base_model import BaseModel
from megacontext.checkpoint import CheckpointWarning
from megacontext.data import WindowSampler
from megacontext.focus.horizon import horizon_nll
from megacontext.focus.source import HistorySource
from megacontext.modules import Modules
from megacontext.training.loop import make_optimizer, plateaued, schedule, train
from megacontext.training.phases import PHASE_BY_NAME, label_step, lens_examples, lens_step
from megacontext.working_context import WorkingContext, assemble

from conftest import SHORT_RUN_SETS, smoke_config


@pytest.fixture(scope="module")
def windows(smoke_cfg, smoke_data):
    t = smoke_cfg.train
    return WindowSampler(smoke_data.documents("train"), t.horizon, t.history_min, t.history_max, "random", 3).batch(0, 2)


# --------------------------------------------------------------------- §8: horizon alignment
def test_horizon_nll_scores_exactly_the_horizon_tokens(smoke_cfg, smoke_base, windows):
    base, K, L = smoke_base, smoke_cfg.tree.block_size, smoke_cfg.tree.levels
    rows, expected = [], []
    for w, n in zip(windows, (200, 131)):
        hist = w.history[-n:]
        wc = WorkingContext.initial(n, K, L, n + K, smoke_cfg.focus.tail_blocks, headroom=0)
        assert (wc.levels_array() == 0).all()
        source = HistorySource(base.embed(torch.as_tensor(hist)), gists=[])
        rows.append(assemble(wc, source, "compact"))
        ids = torch.as_tensor(np.concatenate([hist, w.horizon]))
        with torch.no_grad():
            logits = base.forward(base.embed(ids)[None], torch.arange(len(ids))[None]).logits[0]
        # the logit at the last history token predicts horizon[0], ..., at horizon[i] -> horizon[i+1]
        expected.append(F.cross_entropy(logits[n - 1 : n - 1 + len(w.horizon)], torch.as_tensor(w.horizon)))
    with torch.no_grad():
        single = horizon_nll(base, rows[0], windows[0].horizon)
        batched = horizon_nll(base, rows, np.stack([w.horizon for w in windows]))  # left-padded rows
    torch.testing.assert_close(single[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched, torch.stack(expected), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------- schedule
def test_schedule_optimizer_and_early_stop(smoke_cfg):
    phases = dataclasses.replace(smoke_cfg.train.phases, jt3=dataclasses.replace(smoke_cfg.train.phases.jt3, steps=0))
    t = dataclasses.replace(smoke_cfg.train, cycles=2, phases=phases)
    assert [p.name for p in schedule(t)] == ["c0-warm_gist", "c0-warm_lens", "c1-jt1", "c1-jt2", "c2-jt1", "c2-jt2"]
    w = torch.nn.Parameter(torch.zeros(2))
    opt, sched = make_optimizer([w], 1.0, dataclasses.replace(t.optim, warmup_fraction=0.2), steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:3] == [0.5, 1.0, 1.0] and lrs[-1] < 0.05 and lrs == sorted(lrs[:2]) + sorted(lrs[2:], reverse=True)
    assert plateaued([3.0, 2.5, 2.499], patience=1, tolerance=0.005)
    assert not plateaued([3.0, 2.5, 2.4], patience=1, tolerance=0.005)
    assert not plateaued([3.0, 3.0, 3.0], patience=0, tolerance=0.005)


# --------------------------------------------------------------------- phases own their parameters
@pytest.fixture(scope="module")
def modules(smoke_cfg, smoke_base):
    """Fresh modules on a private copy of the smoke base (LoRA is injected into it)."""
    return Modules.fresh(smoke_cfg, BaseModel.from_config(smoke_cfg), lora=True)


def _params(m) -> dict[tuple[str, str], torch.Tensor]:
    out = {("gistnet", n): p for n, p in m.gistnet.named_parameters()}
    out |= {("lensnet", n): p for n, p in m.lensnet.named_parameters()}
    for n, p in m.base.model.named_parameters():
        out[("lora" if "lora_" in n else "base", n)] = p
    return {k: v.detach().clone() for k, v in out.items()}


PHASE_LR = {"warm_gist": 3e-3, "jt1": 3e-3, "jt3": 3e-3, "warm_lens": 3e-3, "jt2": 3e-3}


@pytest.mark.parametrize("phase", ["warm_gist", "warm_lens", "jt1", "jt2", "jt3"])
def test_phase_lowers_its_loss_and_changes_only_its_module(phase, modules, smoke_cfg, windows):
    m, cfg, spec = modules, smoke_cfg, PHASE_BY_NAME[phase]
    owner = spec.owner
    if spec.step is None:
        rng = np.random.default_rng(0)
        snaps, rows = label_step(m, cfg, windows, rng, 1, 0, on_policy=phase == "jt2", gist_version="v")
        examples = lens_examples(m, cfg, snaps, rows)

        def step():
            return lens_step(m, cfg, examples)
    else:
        def step():
            return spec.step(m, cfg, windows, np.random.default_rng(0))  # the same batch every step

    m.set_trainable(owner)
    before = _params(m)
    opt = torch.optim.AdamW(m.parameters_of(owner), lr=PHASE_LR[phase])
    losses = []
    for _ in range(6):
        opt.zero_grad(set_to_none=True)
        out = step()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    with torch.no_grad():
        losses.append(step().loss.item())
    m.set_trainable(None)
    after = _params(m)
    assert losses[-1] < losses[0], f"{phase}: loss {losses}"
    changed = {k[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {owner}, f"{phase} changed {changed}"


@pytest.mark.parametrize("phase,key", [("warm_gist", "gist"), ("jt3", "lora")])
def test_reconstruction_term_falls_and_moves_only_its_owner(phase, key, modules, smoke_cfg, windows):
    """The reconstruction term alone (weight 1, other terms still computed): GistNet learns
    to write blocks into gists in warm_gist, the LoRA to read them in JT3."""
    section = getattr(smoke_cfg.train, key)  # train.gist / train.lora .reconstruction_weight
    cfg = dataclasses.replace(smoke_cfg, train=dataclasses.replace(smoke_cfg.train, **{
        key: dataclasses.replace(section, reconstruction_weight=1.0)}))
    m, owner = modules, PHASE_BY_NAME[phase].owner
    m.set_trainable(owner)
    before = _params(m)
    opt = torch.optim.AdamW(m.parameters_of(owner), lr=3e-3)
    recon = []
    for _ in range(6):
        opt.zero_grad(set_to_none=True)
        out = PHASE_BY_NAME[phase].step(m, cfg, windows, np.random.default_rng(0))
        out.loss.backward()
        opt.step()
        recon.append(out.metrics["reconstruction"])
    m.set_trainable(None)
    assert recon[-1] < recon[0], recon
    assert {"reconstruction_gain", "reconstruction_top1"} <= set(out.metrics)
    after = _params(m)
    changed = {k[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {owner}, changed


# --------------------------------------------------------------------- whole runs
@pytest.fixture(scope="module")
def run_a(smoke_roots, smoke_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "A"
    summary = train(smoke_config(smoke_roots, *SHORT_RUN_SETS), out_dir=out, progress=False)
    return out, summary


def test_run_layout_matches_the_spec(run_a):
    out, summary = run_a
    names = ["c0-warm_gist", "c0-warm_lens"] + [f"c{c}-{p}" for c in (1, 2) for p in ("jt1", "jt2", "jt3")]
    ckpts = {p.name for p in (out / "checkpoints").iterdir()}
    assert set(names) <= ckpts and "c1-jt1-s00001" in ckpts
    assert (out / "checkpoints" / "latest").read_text().strip() == "c2-jt3"
    for c in (0, 1, 2):
        assert (out / "deltas" / f"cycle{c}" / "labels.parquet").is_file()
    assert (out / "config.yaml").is_file() and (out / "summary.json").is_file()
    assert [r["name"] for r in summary["validation"]] == names
    assert len((out / "telemetry.jsonl").read_text().splitlines()) == 2 * len(names)  # 2 steps per phase
    assert len((out / "validation.jsonl").read_text().splitlines()) == len(names)
    row = summary["final"]
    assert row["loss_megacontext"] > 0 and row["loss_recency"] > 0 and 0 <= row["swap_rate"] <= 1


def test_labels_are_regenerated_on_policy_after_jt1(run_a):
    out, summary = run_a
    tables = {c: pq.read_table(out / "deltas" / f"cycle{c}" / "labels.parquet").to_pydict() for c in (1, 2)}
    versions = {c: set(tables[c]["gist_version"]) for c in (1, 2)}
    state_versions = {c: summary["validation"][[r["name"] for r in summary["validation"]].index(f"c{c}-jt1")]["gist_version"] for c in (1, 2)}
    # every label of cycle c was made with the GistNet that JT1 of cycle c produced
    assert versions[1] == {state_versions[1]} and versions[2] == {state_versions[2]}
    assert versions[1] != versions[2]
    assert tables[1]["delta_nll"] != tables[2]["delta_nll"]
    assert set(tables[1]["action"]) == {"expand", "collapse"}
    assert all(-1 < t < 1 for t in tables[1]["target"])


def test_sigkill_then_resume_latest_reproduces_the_run(run_a, smoke_roots, tmp_path):
    out_a, summary_a = run_a
    out_b = tmp_path / "B"
    sets = [f"paths.data_root={smoke_roots['data_root']}", f"paths.artifact_root={smoke_roots['artifact_root']}"]
    cmd = [sys.executable, "-m", "megacontext", "train", "--config", "smoke", "--out", str(out_b), "--no-progress"]
    for s in sets + list(SHORT_RUN_SETS):
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    mid = out_b / "checkpoints" / "c1-jt2-s00001"
    deadline = time.time() + 240
    while not mid.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out_b / "checkpoints" / "c2-jt3").exists()
    # damage the newest checkpoint: resume must warn and fall back to the one before it
    latest = out_b / "checkpoints" / (out_b / "checkpoints" / "latest").read_text().strip()
    with open(latest / "lensnet.safetensors", "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x01\x02\x03")
    with pytest.warns(CheckpointWarning, match=latest.name):
        summary_b = train(smoke_config(smoke_roots, *SHORT_RUN_SETS), out_dir=out_b, resume="latest", progress=False)
    dump = lambda rows: json.dumps(rows, sort_keys=True)  # noqa: E731  (NaN-safe comparison)
    assert dump(summary_b["validation"]) == dump(summary_a["validation"])
    final_a, final_b = out_a / "checkpoints" / "c2-jt3", out_b / "checkpoints" / "c2-jt3"
    for f in ("gistnet.safetensors", "lensnet.safetensors", "lora/adapter_model.safetensors"):
        ta, tb = load_file(final_a / f), load_file(final_b / f)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), f
    assert (out_a / "telemetry.jsonl").read_text() == (out_b / "telemetry.jsonl").read_text()
