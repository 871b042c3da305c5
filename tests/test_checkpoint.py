"""Training checkpoints: atomic layout, checksums, fallback on damage, RNG and telemetry replay."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from megacontext.checkpoint import (
    CheckpointError,
    CheckpointWarning,
    checkpoint_name,
    list_checkpoints,
    open_checkpoint,
    order_key,
    resolve_resume,
    save_checkpoint,
)
from megacontext.config import Config
from megacontext.telemetry import Telemetry


def _save(root, name, value: float, opt_state=None):
    g, lens = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    torch.nn.init.constant_(g.weight, value)
    return save_checkpoint(
        root, name, gistnet=g, lensnet=lens, lora=None, state={"value": value},
        config_text="seed: 1\n", optimizer_state=opt_state,
    )


def test_names_sort_in_training_order():
    names = ["c1-jt2", "c1-jt1", "c0-warm_lens", "c1-jt1-s00002", "c0-warm_gist", "c2-jt1-s00010", "c1-jt3"]
    expected = ["c0-warm_gist", "c0-warm_lens", "c1-jt1-s00002", "c1-jt1", "c1-jt2", "c1-jt3", "c2-jt1-s00010"]
    assert sorted(names, key=order_key) == expected
    assert checkpoint_name(1, "jt1", 20) == "c1-jt1-s00020"
    assert order_key("latest") is None and order_key(".tmp-c1-jt1-77") is None


def test_save_is_complete_and_moves_latest(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, "c0-warm_gist", 1.0)
    path = _save(root, "c0-warm_lens", 2.0)
    assert (root / "latest").read_text().strip() == "c0-warm_lens"
    assert not any(p.name.startswith(".") for p in root.iterdir())  # no temp folders left
    sums = json.loads((path / "checksums.json").read_text())
    assert {"gistnet.safetensors", "lensnet.safetensors", "state.json", "config.yaml", "rng.pt"} <= set(sums)
    ckpt = resolve_resume(root, "latest")
    assert ckpt.path == path and ckpt.state == {"value": 2.0}
    g = torch.nn.Linear(3, 2)
    ckpt.load_module("gistnet", g)
    assert torch.all(g.weight == 2.0)


def test_corrupted_latest_warns_and_uses_previous(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, "c1-jt1", 1.0)
    _save(root, "c1-jt2-s00001", 2.0)
    bad = _save(root, "c1-jt2-s00002", 3.0)
    blob = bytearray((bad / "gistnet.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (bad / "gistnet.safetensors").write_bytes(bytes(blob))
    with pytest.warns(CheckpointWarning, match="checksum"):
        ckpt = resolve_resume(root, "latest")
    assert ckpt.path.name == "c1-jt2-s00001"
    with pytest.raises(CheckpointError, match="corrupted"):
        open_checkpoint(bad)


def test_partial_checkpoint_is_skipped(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, "c0-warm_gist", 1.0)
    partial = _save(root, "c0-warm_lens", 2.0)
    (partial / "checksums.json").unlink()  # as if killed before the last file
    with pytest.warns(CheckpointWarning, match="incomplete"):
        assert resolve_resume(root, str(partial)).path.name == "c0-warm_gist"
    (root / "c0-warm_gist" / "state.json").unlink()
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError, match="no valid checkpoint"):
        resolve_resume(root, "latest")


def test_rewriting_a_checkpoint_replaces_it(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, "c1-jt1-s00001", 1.0)
    _save(root, "c1-jt1-s00001", 5.0)  # a resumed run reaching the same step again
    assert [p.name for p in list_checkpoints(root)] == ["c1-jt1-s00001"]
    assert resolve_resume(root, "latest").state == {"value": 5.0}


def test_optimizer_and_rng_state_round_trip(tmp_path):
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched.step()
    torch.manual_seed(11), np.random.seed(11), random.seed(11)
    path = _save(tmp_path, "c1-jt3-s00001", 0.0, {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    ckpt = open_checkpoint(path)
    ckpt.restore_rng()
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
    saved = ckpt.optimizer_state()
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt2.load_state_dict(saved["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert saved["scheduler"]["last_epoch"] == 1


def test_telemetry_truncates_back_to_offsets(tmp_path):
    tel = Telemetry(tmp_path, Config(), progress=False)
    tel.log_step("jt1", 1, 0, 1, {"loss": 1.0})
    tel.log_traces("c1-jt1", [{"kind": "expand"}])
    offsets = tel.offsets()
    tel.log_step("jt1", 1, 1, 2, {"loss": float("nan")})
    tel.log_traces("c1-jt2", [{"kind": "collapse"}])
    tel.truncate(offsets)
    lines = (tmp_path / "telemetry.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0]
    assert not (tmp_path / "traces" / "c1-jt2.jsonl").exists()
    tel.close()


def test_wandb_offline_run_needs_no_network(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", "")
    cfg = Config()
    cfg.wandb.enabled = True
    tel = Telemetry(tmp_path, cfg, progress=False)
    tel.log_step("jt1", 1, 0, 1, {"loss": 1.5})
    tel.log_validation({"cycle": 1, "phase": "jt1", "loss_megacontext": 2.0}, 1)
    tel.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    assert json.loads((tmp_path / "telemetry.jsonl").read_text())["metrics"] == {"loss": 1.5}


def test_find_checkpoint_says_why_instead_of_crashing(tmp_path):
    """A run folder (or the newest run, for `latest`) whose checkpoints are empty or all
    damaged is a clear CheckpointError; `auto` falls back to untrained modules."""
    from megacontext.checkpoint import find_checkpoint
    from megacontext.config import load_config

    cfg = load_config("smoke", [f"paths.artifact_root={tmp_path}"], env={})
    run = tmp_path / "runs" / "20260101-000000-aaaaaaaa"
    (run / "checkpoints").mkdir(parents=True)
    for which in (str(run), "latest"):
        with pytest.raises(CheckpointError, match="no checkpoint"):
            find_checkpoint(cfg, which)
    with pytest.warns(CheckpointWarning, match="no checkpoint in .*: using untrained modules"):
        assert find_checkpoint(cfg, "auto") is None
    bad = _save(run / "checkpoints", "c0-warm_gist", 1.0)
    (bad / "state.json").write_text("{}")  # fails its checksum
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError, match="no valid checkpoint"):
        find_checkpoint(cfg, str(run))
    good = _save(run / "checkpoints", "c0-warm_lens", 2.0)
    assert find_checkpoint(cfg, str(run)) == good == find_checkpoint(cfg, "latest")
