"""Evaluation: policies at equal budget, loss@H, passkey, timing, eval.json, the eval CLI."""

from __future__ import annotations

import json
import math
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from megacontext.checkpoint import save_checkpoint
from megacontext.cli import main
from megacontext.config import Config
from megacontext.data import make_passkey
from megacontext.eval.evaluate import EvalOptions, evaluate, select_windows
from megacontext.eval.passkey import SESSION_ROW, answer_correct
from megacontext.eval.results import (
    EVAL_KEYS,
    PASSKEY_KEYS,
    RESULT_KEYS,
    TIMING_KEYS,
    format_table,
    gap_closed,
    loss_rows,
)
from megacontext.focus.horizon import raw_prefix
from megacontext.focus.policies import (
    POLICIES,
    RAW_POLICIES,
    FocusSettings,
    PolicyRequest,
    PolicyWindow,
    policy_window,
    reading,
    sinks_ids,
)
from megacontext.focus.source import build_source
from megacontext.modules import Modules

BUDGETS = [96, 128]


def _cli_sets(cfg: Config) -> list[str]:
    return ["--config", "smoke", "--set", f"paths.data_root={cfg.paths.data_root}",
            "--set", f"paths.artifact_root={cfg.paths.artifact_root}", "--set", "eval.passkey_trials=1",
            "--no-progress"]


@pytest.fixture(scope="module")
def untrained(smoke_cfg, smoke_base) -> Modules:
    return Modules.fresh(smoke_cfg, smoke_base)


def _window(policy: str, mods: Modules, cfg: Config, history: np.ndarray, source, budget: int) -> PolicyWindow:
    settings = FocusSettings.from_config(cfg, greedy=True).at_budget(budget)
    with reading(mods, policy):
        return policy_window(policy, PolicyRequest(mods, settings, history, source, 32, np.random.default_rng(0)))


@pytest.fixture(scope="module")
def eval_run(smoke_cfg, smoke_data, untrained):
    opts = EvalOptions.from_config(smoke_cfg)
    opts.budgets = BUDGETS
    return evaluate(smoke_cfg, untrained, opts, progress=False, say=lambda _m: None)


def test_eval_json_has_exactly_the_schema(eval_run, smoke_cfg):
    data = json.loads(json.dumps(eval_run.json))  # JSON-serialisable as is
    assert tuple(data) == EVAL_KEYS
    assert all(tuple(r) == RESULT_KEYS for r in data["results"])
    assert all(tuple(r) == PASSKEY_KEYS for r in data["passkey"])
    assert tuple(data["timing"]) == TIMING_KEYS
    assert set(data["gap_closed"]) == {str(b) for b in BUDGETS}
    assert data["horizon"] == smoke_cfg.train.horizon and data["block_size"] == smoke_cfg.tree.block_size
    assert data["split"] == "test" and data["cursor"] == smoke_cfg.eval.cursor
    assert all(tuple(r) == PASSKEY_KEYS for r in data["multikey"]) and data["multikey"]
    from megacontext.eval.ceiling import CEILING_KEYS, COMPARED

    assert all(tuple(r) == CEILING_KEYS for r in data["ceiling"])
    for b in BUDGETS:  # the ceiling beside the policies, on the eval.oracle_windows first windows
        rows = {r["policy"]: r for r in data["ceiling"] if r["budget"] == b}
        assert set(rows) == {"oracle_focus", *COMPARED}
        assert all(r["n_windows"] == smoke_cfg.eval.oracle_windows for r in rows.values())
        assert rows["uniform_gists"]["delta_vs_uniform_gists"] == 0
    assert "oracle_focus" not in {r["policy"] for r in data["results"] + data["passkey"] + data["multikey"]}


def test_gist_value_rows_are_paired_differences_on_one_curve(eval_run, smoke_cfg):
    """won_back / displaced_value are differences of the recency curve and uniform_gists
    on the same windows; the curve starts at the budget and falls one block at a time."""
    rows = eval_run.json["gists"]
    assert [r["budget"] for r in rows] == BUDGETS
    K = smoke_cfg.tree.block_size
    for r in rows:
        assert r["n_windows"] == smoke_cfg.eval.gist_windows
        assert r["raw_tokens"] + r["gist_entries"] <= r["budget"] and r["gist_entries"] > 0
        curve = {c["raw_tokens"]: c["loss_at_h"] for c in r["curve"]}
        assert max(curve) == r["budget"] and sorted(curve) == sorted(r["budget"] - K * k for k in range(len(curve)))
        assert r["recency_at_budget"] == pytest.approx(curve[r["budget"]])
        assert r["displaced_value"] == pytest.approx(r["recency_at_raw"] - r["recency_at_budget"], abs=1e-9)
        assert r["won_back"] == pytest.approx(r["recency_at_raw"] - r["uniform_gists"], abs=1e-9)
        assert r["target_margin"] == pytest.approx(r["won_back"] - r["displaced_value"] / 2, abs=1e-9)
        pm = r["position_modes"]
        assert pm[smoke_cfg.focus.position_mode] == pytest.approx(r["uniform_gists"])
        assert pm["absolute_minus_compact"] == pytest.approx(pm["absolute"] - pm["compact"], abs=1e-9)
    rec = eval_run.json["reconstruction"]
    assert 0 <= rec["top1"] <= 1 and rec["gain"] == pytest.approx(rec["blank_nll"] - rec["nll"], abs=1e-6)
    assert "gists at W=" in format_table(eval_run.json) and "reconstruction from LOD1 gists" in format_table(eval_run.json)


def test_every_policy_evaluated_on_the_same_windows(eval_run, smoke_cfg):
    rows = eval_run.json["results"]
    assert {(r["budget"], r["policy"]) for r in rows} == {(b, p) for b in BUDGETS for p in POLICIES}
    assert all(r["n_windows"] == smoke_cfg.eval.windows for r in rows)
    for r in rows:
        assert math.isfinite(r["loss_at_h"]) and r["loss_at_h"] > 0
    ref = {r["budget"]: r["loss_at_h"] for r in rows if r["policy"] == "reference"}
    assert ref[BUDGETS[0]] == ref[BUDGETS[1]]  # the reference does not depend on the budget
    for r in rows:
        assert r["delta_nll_vs_reference"] == pytest.approx(r["loss_at_h"] - ref[r["budget"]], abs=1e-9)
    for b, share in eval_run.json["gap_closed"].items():
        by = {r["policy"]: r["loss_at_h"] for r in rows if r["budget"] == int(b)}
        gap = by["recency"] - by["reference"]
        assert share == (pytest.approx((by["recency"] - by["megacontext"]) / gap) if gap > 0 else None)


def test_windows_respect_the_budget_and_gist_policies_use_gists(eval_run, smoke_cfg):
    """§8: with history > budget the megacontext window must contain gists (no sliding window)."""
    history = len(eval_run.windows[0].history)
    assert all(len(w.history) == history > max(BUDGETS) for w in eval_run.windows)
    assert all(len(w.horizon) == smoke_cfg.train.horizon for w in eval_run.windows)
    for (budget, policy), st in eval_run.stats.items():
        assert len(st.costs) == len(eval_run.windows)
        if policy != "reference":
            assert max(st.costs) <= budget, (budget, policy)
        if policy in RAW_POLICIES:
            assert sum(st.gist_entries) == 0
        else:
            assert min(st.gist_entries) > 0, (budget, policy)
    ref_cost = eval_run.stats[(BUDGETS[0], "reference")].costs
    assert min(ref_cost) == min(history, smoke_cfg.base.max_context - smoke_cfg.train.horizon) > max(BUDGETS)


def test_passkey_rows_cover_the_grid(eval_run, smoke_cfg):
    e = smoke_cfg.eval
    rows = eval_run.json["passkey"]
    rows_of = (*POLICIES, SESSION_ROW)  # megacontext through the grid's protocol, and the runtime's session
    expect = {(b, n, d, p) for b in BUDGETS for n in e.passkey_lengths for d in e.passkey_depths for p in rows_of}
    assert {(r["budget"], r["history_tokens"], r["depth"], r["policy"]) for r in rows} == expect
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["n"] == e.passkey_trials for r in rows)
    assert all((r["accuracy"] * r["n"]).is_integer() for r in rows)


def test_timing_is_measured(eval_run):
    t = eval_run.json["timing"]
    assert all(t[k] is not None and t[k] > 0 for k in TIMING_KEYS)


def test_gap_closed_formula():
    def rows(ref, rec, mc):
        return [{"budget": 64, "policy": p, "loss_at_h": v} for p, v in
                (("reference", ref), ("recency", rec), ("megacontext", mc))]

    assert gap_closed(rows(2.0, 3.0, 2.25)) == {"64": pytest.approx(0.75)}
    assert gap_closed(rows(2.0, 3.0, 3.5)) == {"64": pytest.approx(-0.5)}  # worse than recency
    assert gap_closed(rows(2.0, 2.0, 2.5)) == {"64": None}  # no gap to close
    assert gap_closed(rows(3.0, 2.0, 2.5)) == {"64": None}  # reference worse than recency: meaningless


def test_standard_errors_are_paired_against_the_reference_and_uniform_gists():
    losses = {(64, "reference"): [1.0, 2.0, 3.0], (64, "recency"): [1.5, 2.5, 3.5], (64, "sinks"): [1.0, 3.0, 3.0],
              (64, "uniform_gists"): [1.5, 2.0, 4.0]}
    rows = {r["policy"]: r for r in loss_rows(losses, {})}
    assert rows["reference"]["se"] is None and rows["uniform_gists"]["se_vs_uniform_gists"] is None
    assert rows["recency"]["se"] == 0.0  # a constant shift per window: no noise in the paired difference
    assert rows["recency"]["delta_nll_vs_reference"] == pytest.approx(0.5)
    assert rows["sinks"]["se"] == pytest.approx(np.std([0.0, 1.0, 0.0], ddof=1) / np.sqrt(3))
    assert rows["sinks"]["delta_vs_uniform_gists"] == pytest.approx(-0.5 / 3)
    assert rows["sinks"]["se_vs_uniform_gists"] == pytest.approx(np.std([-0.5, 1.0, -1.0], ddof=1) / np.sqrt(3))
    table = format_table({"horizon": 8, "split": "test", "data": "d", "cursor": "end", "results": list(rows.values()),
                          "gap_closed": {}, "passkey": [], "timing": dict.fromkeys(TIMING_KEYS)})
    assert "Δ uniform" in table and "-0.1667" in table


def test_sinks_keep_the_first_and_newest_tokens():
    h = np.arange(1000)
    out = sinks_ids(h, 100, 4)
    assert len(out) == 100
    assert out[:4].tolist() == [0, 1, 2, 3] and out[4:].tolist() == list(range(904, 1000))
    assert sinks_ids(h[:50], 100, 4).tolist() == list(range(50))


def test_policy_windows_see_the_newest_tokens(smoke_cfg, smoke_base, untrained):
    """Every policy ends with the token right before the cursor, at LOD0 (the raw tail)."""
    history = np.random.default_rng(0).integers(0, 500, size=700)
    source = build_source(smoke_base, untrained.gistnet, history, smoke_cfg.tree.shape)
    last = smoke_base.embed(torch.as_tensor(history[-1:]))[0]
    for policy in POLICIES:
        pw = _window(policy, untrained, smoke_cfg, history, source, 128)
        torch.testing.assert_close(pw.prefix.embeds[-1].float(), last.float())


def test_select_windows_end_cursor_uses_distinct_document_ends():
    docs = [np.arange(n) for n in (300, 50, 400, 500)]
    ws = select_windows(docs, 200, 16, "end", 10, seed=3)
    assert sorted(w.doc_index for w in ws) == [0, 2, 3]  # the short document is skipped
    for w in ws:
        doc = docs[w.doc_index]
        assert w.horizon.tolist() == doc[-16:].tolist() and w.history.tolist() == doc[-216:-16].tolist()
    rnd = select_windows(docs, 200, 16, "random", 5, seed=3)
    assert len(rnd) == 5 and all(len(w.history) == 200 for w in rnd)
    assert [w.cursor for w in rnd] == [w.cursor for w in select_windows(docs, 200, 16, "random", 5, seed=3)]


@torch.no_grad()
def test_passkey_exact_match_equals_greedy_decoding(smoke_base, smoke_data):
    rng = np.random.default_rng(5)
    ex = make_passkey(rng, smoke_base.tokenizer, smoke_data.documents("test"), 300, 0.5)
    prefix = raw_prefix(smoke_base, ex.prompt)
    ids = list(ex.prompt)
    greedy = []
    for _ in range(len(ex.answer)):  # plain greedy decoding, one token at a time
        emb = smoke_base.embed(torch.as_tensor(ids))[None]
        logits = smoke_base.forward(emb, torch.arange(len(ids))[None]).logits[0, -1]
        greedy.append(int(logits.argmax()))
        ids.append(greedy[-1])
    assert answer_correct(smoke_base, [prefix], np.asarray(greedy)) == [True]
    assert answer_correct(smoke_base, [prefix], ex.answer) == [greedy == ex.answer.tolist()]
    wrong = np.asarray(greedy)
    wrong[-1] = (wrong[-1] + 1) % len(smoke_base.tokenizer)
    assert answer_correct(smoke_base, [prefix], wrong) == [False]


# ---------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def fake_checkpoint(smoke_cfg, smoke_base, tmp_path_factory) -> Path:
    """A checkpoint with non-default GistNet/LensNet weights and a non-zero LoRA adapter."""
    from megacontext.base_model import BaseModel

    base = BaseModel.from_config(smoke_cfg)  # gets adapters injected: not the shared fixture
    m = Modules.fresh(smoke_cfg, base, lora=True)
    torch.manual_seed(11)
    with torch.no_grad():
        for module in (m.gistnet, m.lensnet):
            for p in module.parameters():
                p.add_(0.05 * torch.randn_like(p))
        for name, p in m.lora.named_parameters():
            if "lora_" in name:
                p.copy_(0.05 * torch.randn_like(p))
    root = tmp_path_factory.mktemp("run") / "checkpoints"
    return save_checkpoint(root, "c1-jt3", gistnet=m.gistnet, lensnet=m.lensnet, lora=m.lora,
                           state={}, config_text="")


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@torch.no_grad()
def _logits(base, ids: torch.Tensor) -> torch.Tensor:
    return base.forward(base.embed(ids)[None], torch.arange(len(ids))[None]).logits


def test_ablate_swaps_exactly_one_module(smoke_cfg, smoke_base, fake_checkpoint):
    full = Modules.load(smoke_cfg, str(fake_checkpoint))
    fresh = Modules.fresh(smoke_cfg, smoke_base)  # the one seed rule: the same untrained weights
    fresh_gist, fresh_lens = fresh.gistnet, fresh.lensnet
    ids = torch.arange(40)
    assert full.checkpoint == fake_checkpoint
    assert not _same(full.gistnet, fresh_gist) and not _same(full.lensnet, fresh_lens)
    # the adapted base reads gist windows; the plain one (adapter off) the raw baselines
    with full.plain():
        plain = _logits(full.base, ids)
    assert not torch.allclose(_logits(full.base, ids), plain)
    torch.testing.assert_close(plain, _logits(smoke_base, ids))

    no_gist = Modules.load(smoke_cfg, str(fake_checkpoint), "gistnet")
    assert _same(no_gist.gistnet, fresh_gist) and _same(no_gist.lensnet, full.lensnet)
    no_lens = Modules.load(smoke_cfg, str(fake_checkpoint), "lensnet")
    assert _same(no_lens.lensnet, fresh_lens) and _same(no_lens.gistnet, full.gistnet)
    no_lora = Modules.load(smoke_cfg, str(fake_checkpoint), "lora")
    assert _same(no_lora.gistnet, full.gistnet) and _same(no_lora.lensnet, full.lensnet)
    torch.testing.assert_close(_logits(no_lora.base, ids), _logits(smoke_base, ids))


def test_cli_eval_with_ablation_writes_eval_json(smoke_cfg, smoke_data, fake_checkpoint, capsys):
    argv = ["eval", *_cli_sets(smoke_cfg), "--checkpoint", str(fake_checkpoint), "--windows", "2",
            "--ablate", "lensnet"]
    assert main(argv) == 0
    out = fake_checkpoint.parent.parent / "eval-ablate-lensnet" / "eval.json"
    data = json.loads(out.read_text())
    assert tuple(data) == EVAL_KEYS and data["checkpoint"] == str(fake_checkpoint)
    assert {r["n_windows"] for r in data["results"]} == {2}
    printed = capsys.readouterr().out
    assert "megacontext" in printed and "acceptance W=128" in printed and str(out) in printed


def test_cli_eval_on_a_folder_of_python_files(smoke_cfg, smoke_data, tmp_path, capsys):
    src = Path(sysconfig.get_paths()["stdlib"])
    folder = tmp_path / "code"
    folder.mkdir()
    for name in ("textwrap.py", "shlex.py", "fractions.py", "bisect.py"):
        shutil.copy(src / name, folder / name)
    out = tmp_path / "out"
    argv = ["eval", *_cli_sets(smoke_cfg), "--checkpoint", "none", "--data", f"files:{folder}/*.py",
            "--windows", "3", "--out", str(out)]
    assert main(argv) == 0
    data = json.loads((out / "eval.json").read_text())
    assert tuple(data) == EVAL_KEYS and data["data"].startswith("files-")
    assert {r["n_windows"] for r in data["results"]} == {3}
    assert all(math.isfinite(r["loss_at_h"]) for r in data["results"])
    assert data["split"] in ("test", "train+val+test")


def test_cli_eval_rejects_bad_budgets(smoke_cfg, capsys):
    assert main(["eval", *_cli_sets(smoke_cfg), "--checkpoint", "none", "--budgets", "64"]) == 2
    assert "budget 64" in capsys.readouterr().err
    assert main(["eval", *_cli_sets(smoke_cfg), "--checkpoint", "none", "--budgets", "x,1"]) == 2


def test_gist_baselines_fill_the_budget_like_megacontext(smoke_cfg, smoke_base, untrained):
    """uniform_gists / random_focus get the same budget as megacontext: no block held back as
    headroom (they used to start one block short, an unfair comparison)."""
    history = np.random.default_rng(1).integers(0, 500, size=900)
    source = build_source(smoke_base, untrained.gistnet, history, smoke_cfg.tree.shape)
    K = smoke_cfg.tree.block_size
    for policy in ("uniform_gists", "random_focus", "megacontext"):
        pw = _window(policy, untrained, smoke_cfg, history, source, 128)
        assert 128 - (K - 1) <= pw.cost <= 128, (policy, pw.cost)
