"""Runtime session and the ingest/inspect/generate CLI on the smoke base."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megacontext.cli import main
from megacontext.modules import Modules
from megacontext.runtime import Session
from megacontext.tree import MegaContextTree


def _history(smoke_data, n: int) -> np.ndarray:
    docs = smoke_data.documents("train")
    return np.concatenate(docs)[:n].astype(np.int64)


def _session(smoke_cfg, smoke_base) -> Session:
    modules = Modules.fresh(smoke_cfg, smoke_base)
    tree = MegaContextTree.create_ram(smoke_cfg.tree.block_size, smoke_cfg.tree.levels, smoke_base.dim, modules.gister())
    return Session(modules, tree, smoke_cfg.focus, seed=0)


def test_window_uses_gists_once_history_exceeds_budget(smoke_cfg, smoke_base, smoke_data):
    """§8: the runtime must not silently fall back to a sliding window."""
    s = _session(smoke_cfg, smoke_base)
    budget = smoke_cfg.focus.budget
    s.ingest(_history(smoke_data, budget // 2))
    assert s.window_summary()["entries_per_level"]["1"] == 0  # fits raw: no gists needed yet
    s.ingest(_history(smoke_data, 1500)[budget // 2 :])
    summary = s.window_summary()
    assert summary["cost"] <= budget
    assert summary["covered_tokens"] == summary["history_tokens"] == 1500
    gist_entries = sum(v for k, v in summary["entries_per_level"].items() if k != "0")
    assert gist_entries > 0
    window = s.assemble()
    assert (window.levels > 0).any()
    assert window.embeds.shape[0] == summary["cost"]
    s.wc.check_invariants()
    assert len(s.telemetry) == 2  # one refocus per ingest call that completes a block
    K = smoke_cfg.tree.block_size
    for lo in range(0, 3 * K, K // 2):  # decoding-like ingest: one refocus per completed block
        s.ingest(_history(smoke_data, 1500 + 3 * K)[1500 + lo : 1500 + lo + K // 2])
    assert len(s.telemetry) == 2 + 3


def test_cached_decoding_matches_fresh_forward(smoke_cfg, smoke_base, smoke_data):
    """Logits from the in-block KV cache equal a fresh forward over the assembled window."""
    s = _session(smoke_cfg, smoke_base)
    hist = _history(smoke_data, 700)
    s.ingest(hist[:-3])
    for tok in hist[-3:]:
        cached = s.next_logits()
        window = s.assemble()
        with torch.no_grad():
            fresh = smoke_base.forward(window.embeds[None], window.position_ids[None])[0][0, -1]
        torch.testing.assert_close(cached, fresh.float(), atol=1e-4, rtol=1e-4)
        s.ingest([int(tok)])


def test_generate_is_deterministic_and_extends_history(smoke_cfg, smoke_base, smoke_data):
    hist = _history(smoke_data, 600)
    outs = []
    for _ in range(2):
        s = _session(smoke_cfg, smoke_base)
        s.ingest(hist)
        outs.append(s.generate([1, 2, 3], max_new_tokens=40))
        assert s.num_tokens == 600 + 3 + 40
        assert s.wc.cost <= smoke_cfg.focus.budget
        s.wc.check_invariants()
    assert outs[0] == outs[1]


# ------------------------------------------------------------------------------- CLI
def _cli_args(smoke_roots) -> list[str]:
    return [
        "--config",
        "smoke",
        "--set",
        f"paths.data_root={smoke_roots['data_root']}",
        "--set",
        f"paths.artifact_root={smoke_roots['artifact_root']}",
    ]


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture()
def text_file(tmp_path, smoke_data) -> Path:
    tok = smoke_data.tokenizer()
    text = tok.decode(_history(smoke_data, 2400).tolist())
    f = tmp_path / "history.txt"
    f.write_text(text, encoding="utf-8")
    return f


def test_cli_ingest_inspect_generate(smoke_roots, smoke_base, text_file, tmp_path, capsys):
    common = _cli_args(smoke_roots)
    tree = tmp_path / "tree"
    assert main(["ingest", *common, "--tree", str(tree), "--input", str(text_file), "--checkpoint", "none"]) == 0
    capsys.readouterr()
    assert main(["inspect", *common, "--tree", str(tree), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    n = info["tokens"]
    assert n > 1024
    assert info["nodes_per_level"] == {"1": n // 32, "2": n // 1024}
    assert info["bytes_on_disk"] > 4 * n

    rc = main(
        ["generate", *common, "--tree", str(tree), "--prompt", "def main(", "--budget", "128",
         "--max-new-tokens", "8", "--json", "--checkpoint", "none"]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cost"] <= out["budget"] == 128
    assert out["covered_tokens"] == out["history_tokens"] > n
    assert out["entries_per_level"]["1"] + out["entries_per_level"]["2"] > 0
    assert isinstance(out["text"], str)

    # ingesting more text later appends to the same history
    assert main(["ingest", *common, "--tree", str(tree), "--input", str(text_file), "--checkpoint", "none"]) == 0
    capsys.readouterr()
    main(["inspect", *common, "--tree", str(tree), "--json"])
    assert json.loads(capsys.readouterr().out)["tokens"] > out["history_tokens"]


def test_cli_bad_input_leaves_tree_untouched(smoke_roots, smoke_base, text_file, tmp_path, capsys):
    common = _cli_args(smoke_roots)
    tree = tmp_path / "tree"
    assert main(["ingest", *common, "--tree", str(tree), "--input", str(text_file), "--checkpoint", "none"]) == 0
    before = _tree_digest(tree)
    capsys.readouterr()

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe not utf8")
    assert main(["ingest", *common, "--tree", str(tree), "--input", str(bad), "--checkpoint", "none"]) == 2
    assert "not UTF-8" in capsys.readouterr().err

    assert main(["generate", *common, "--tree", str(tree), "--prompt", "x", "--budget", "40", "--checkpoint", "none"]) == 2
    err = capsys.readouterr().err
    assert "focus.budget" in err and "Traceback" not in err

    assert main(["generate", *common, "--tree", str(tmp_path / "missing"), "--prompt", "x", "--checkpoint", "none"]) == 2
    assert "no tree" in capsys.readouterr().err

    assert _tree_digest(tree) == before


def test_tree_of_another_model_is_refused(smoke_roots, smoke_cfg, smoke_base, text_file, tmp_path, capsys):
    gister = Modules.fresh(smoke_cfg, smoke_base).gister()
    tree = tmp_path / "other"
    t = MegaContextTree.create_disk(tree, 32, 2, smoke_base.dim, gister, model_name="someone/else", tokenizer_hash="0")
    t.append(np.arange(100))
    t.close()
    before = _tree_digest(tree)
    rc = main(["ingest", *_cli_args(smoke_roots), "--tree", str(tree), "--input", str(text_file), "--checkpoint", "none"])
    assert rc == 2
    assert "someone/else" in capsys.readouterr().err
    assert _tree_digest(tree) == before


def test_session_save_and_reopen(smoke_roots, smoke_cfg, smoke_base, text_file, tmp_path, capsys):
    common = _cli_args(smoke_roots)
    tree = tmp_path / "tree"
    main(["ingest", *common, "--tree", str(tree), "--input", str(text_file), "--checkpoint", "none"])
    main(["generate", *common, "--tree", str(tree), "--prompt", "class A:", "--max-new-tokens", "5",
          "--json", "--checkpoint", "none"])
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    state = json.loads((tree / "session.json").read_text())
    assert state["wc"]["num_tokens"] == first["history_tokens"]
    main(["generate", *common, "--tree", str(tree), "--prompt", "x", "--max-new-tokens", "3",
          "--json", "--checkpoint", "none"])
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["history_tokens"] > first["history_tokens"]


def test_readme_python_example_runs_verbatim(smoke_cfg, smoke_base, monkeypatch, capsys):
    """The README's Python block, as written, on the smoke settings (no trained run: untrained modules)."""
    import re

    import megacontext.config

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    (code,) = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    monkeypatch.setattr(megacontext.config, "load_config", lambda *a, **k: smoke_cfg)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.strip().splitlines()
    summary = eval(out[-1])  # the window summary dict
    assert summary["cost"] <= smoke_cfg.focus.budget and summary["history_tokens"] > smoke_cfg.focus.budget
