"""Hardening (issue #13): every user mistake or fault ends in one clear line, and nothing is lost.

Writer locks on trees and run folders, checksummed state files, token range checks,
device / budget / sampling checks, the offline probe, interrupted and failing ingests.
Data freshness (the source fingerprint) is tested with the other prepare tests in test_data.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from test_tree import FakeGister, make_disk, token_stream

import megacontext.tree_storage
from megacontext.checkpoint import save_checkpoint
from megacontext.cli import main
from megacontext.config import load_config
from megacontext.durable import with_checksum
from megacontext.errors import ConfigError, MegaContextError, TreeError
from megacontext.hub import OfflineWarning, prefer_offline, reachable
from megacontext.lock import LOCK_FILE, LockedError, WriterLock
from megacontext.modules import Modules
from megacontext.runtime import SESSION_FILE, Session
from megacontext.tree import MegaContextTree
from megacontext.tree_storage import HEADER_SIZE

HOLDER = """
import sys, time
from pathlib import Path
from megacontext.lock import WriterLock
lock = WriterLock(Path(sys.argv[1]), sys.argv[2])
print("locked", flush=True)
time.sleep(120)
"""


@contextmanager
def held_by_another_process(folder: Path, what: str):
    """A child process that holds the writer lock of ``folder``; yields its pid, then SIGKILLs it."""
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), what], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        yield child.pid
    finally:
        child.kill()
        child.wait()


def content(folder: Path) -> str:
    """Digest of a folder's files except the writer lock (which records who last held it)."""
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name != LOCK_FILE:
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _cli(roots: dict[str, str]) -> list[str]:
    return ["--config", "smoke", "--set", f"paths.data_root={roots['data_root']}",
            "--set", f"paths.artifact_root={roots['artifact_root']}"]


def _one_error_line(err: str, *needles: str) -> str:
    """The single `error:` line of a failing command (no traceback), checked to contain each needle."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------ writer lock
def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path):
    with held_by_another_process(tmp_path, "tree") as pid:
        with pytest.raises(LockedError, match=f"tree {tmp_path} is in use by process {pid}"):
            WriterLock(tmp_path, "tree")
    # the holder was SIGKILLed: its id is still in the file, but the kernel dropped the lock
    assert (tmp_path / LOCK_FILE).read_text().strip() == str(pid)
    with WriterLock(tmp_path, "tree"):
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())
    assert (tmp_path / LOCK_FILE).read_text() == ""  # a clean release empties it


def test_a_lock_file_with_a_stale_pid_and_no_lock_is_taken(tmp_path):
    (tmp_path / LOCK_FILE).write_text("999999999\n")
    with WriterLock(tmp_path, "run"):
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())
        with pytest.raises(LockedError, match="already open for writing in this process"):
            WriterLock(tmp_path, "run")


def test_tree_writers_lock_readers_do_not(tmp_path):
    path = tmp_path / "t"
    tokens = token_stream(1, 300)
    with make_disk(path, FakeGister()) as tree:
        tree.append(tokens[:100])
        with pytest.raises(LockedError, match="already open for writing"):
            MegaContextTree.open(path, FakeGister())
        with MegaContextTree.open(path) as reader:  # a reader sees the committed state, changes nothing
            assert reader.num_tokens == 100
        tree.append(tokens[100:])
    with held_by_another_process(path, "tree") as pid:
        before = content(path)
        with pytest.raises(LockedError, match=f"in use by process {pid}"):
            MegaContextTree.open(path, FakeGister())
        with MegaContextTree.open(path) as reader:
            assert reader.num_tokens == 300
        assert content(path) == before
    with MegaContextTree.open(path, FakeGister()) as tree:  # the killed holder's lock is taken over
        np.testing.assert_array_equal(tree.tokens(), tokens.astype(np.uint32))


def test_two_creators_of_one_tree_never_share_it(tmp_path):
    path = tmp_path / "new"
    path.mkdir()
    with held_by_another_process(path, "tree") as pid:
        with pytest.raises(LockedError, match=f"in use by process {pid}"):
            make_disk(path, FakeGister())
        assert [p.name for p in path.iterdir()] == [LOCK_FILE]


# ------------------------------------------------------------------ checked metadata
def test_metadata_carries_a_checksum_and_damage_is_named(tmp_path):
    path = tmp_path / "t"
    with make_disk(path, FakeGister()) as tree:
        tree.append(token_stream(2, 70))
    meta_file = path / "metadata.json"
    text = meta_file.read_text()
    assert len(json.loads(text)["checksum"]) == 64
    meta_file.write_text(text.replace('"LOD0": 70', '"LOD0": 71'))  # a flipped digit, still valid JSON
    before = content(path)
    for gister in (None, FakeGister()):
        with pytest.raises(TreeError, match=f"{meta_file} is damaged: it fails its checksum"):
            MegaContextTree.open(path, gister)
    assert content(path) == before


def test_metadata_without_a_checksum_still_opens(tmp_path):
    path = tmp_path / "t"
    tokens = token_stream(3, 70)
    with make_disk(path, FakeGister()) as tree:
        tree.append(tokens)
    meta = json.loads((path / "metadata.json").read_text())
    del meta["checksum"]  # as written before checksums existed
    (path / "metadata.json").write_text(json.dumps(meta))
    with MegaContextTree.open(path, FakeGister()) as tree:
        np.testing.assert_array_equal(tree.tokens(), tokens.astype(np.uint32))
        tree.append(tokens[:5])
    assert "checksum" in json.loads((path / "metadata.json").read_text())  # the next commit adds one


# ------------------------------------------------------------ faults during a commit
def test_a_full_disk_mid_commit_loses_nothing_committed(tmp_path, monkeypatch):
    path = tmp_path / "t"
    tokens = token_stream(4, 400)
    tree = make_disk(path, FakeGister(), chunk_tokens=100)
    tree.append(tokens[:200])
    real = megacontext.tree_storage.replace_file

    def full_disk(target, text, *rest):
        with open(target.with_name(target.name + ".tmp"), "w") as f:
            f.write(text[:10])  # a torn temp file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(megacontext.tree_storage, "replace_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        tree.append(tokens[200:])
    monkeypatch.setattr(megacontext.tree_storage, "replace_file", real)
    tree.close()
    with MegaContextTree.open(path, FakeGister()) as reopened:
        np.testing.assert_array_equal(reopened.tokens(), tokens[:200].astype(np.uint32))
        assert not (path / "metadata.json.tmp").exists()
        reopened.append(tokens[200:])
        np.testing.assert_array_equal(reopened.tokens(), tokens.astype(np.uint32))


# ------------------------------------------------------------------------- runtime
def _ram_session(cfg, base) -> Session:
    modules = Modules.fresh(cfg, base)
    tree = MegaContextTree.create_ram(cfg.tree.block_size, cfg.tree.levels, base.dim, modules.gister())
    return Session(modules, tree, cfg.focus, seed=0)


def test_out_of_vocabulary_ids_are_refused_before_anything_is_appended(smoke_cfg, smoke_base):
    s = _ram_session(smoke_cfg, smoke_base)
    s.ingest(np.arange(40))
    vocab = smoke_base.model.get_input_embeddings().weight.shape[0]
    with pytest.raises(MegaContextError, match=f"token id {vocab} at position 2 .* nothing was appended"):
        s.ingest([1, 2, vocab, 3])
    with pytest.raises(MegaContextError, match="temperature"):
        s.generate([1, 2], 3, temperature=-1.0)
    with pytest.raises(MegaContextError, match="max-new-tokens"):
        s.generate([1, 2], -1)
    assert s.num_tokens == 40


def test_a_history_that_would_outgrow_the_budget_is_refused_before_anything_is_appended(smoke_cfg, smoke_base):
    from dataclasses import replace

    from megacontext.working_context import fitting_levels, minimum_cost

    s = _ram_session(smoke_cfg, smoke_base)
    s.focus = replace(s.focus, budget=96)  # the levels grow, but 3 LOD2 + 31 LOD1 gists + the tail exceed 96
    K, L, tail, budget = smoke_cfg.tree.block_size, smoke_cfg.tree.levels, s.focus.tail_blocks, s.focus.budget

    def need(n: int) -> int:
        return minimum_cost(n, K, fitting_levels(n, K, L, tail, budget), tail)

    limit = next(n for n in range(0, 10**7, K) if need(n + K - 1) > budget)  # first block that cannot fit
    s.ingest(np.arange(limit - 5) % 200)
    with pytest.raises(MegaContextError, match="needs a working-context budget of at least .* nothing was appended"):
        s.ingest(np.arange(2 * K) % 200)  # crosses the point where the cheapest window no longer fits
    with pytest.raises(MegaContextError, match="nothing was appended"):
        s.generate([1, 2], max_new_tokens=2 * K)  # the prompt fits, prompt + generation would not
    assert s.num_tokens == limit - 5
    s.ingest([1, 2, 3])  # what fits still goes in


# ----------------------------------------------------------------------------- CLI
@pytest.fixture()
def history_text(smoke_data) -> str:
    ids = np.concatenate(smoke_data.documents("train"))[:20000]
    assert len(ids) == 20000
    return smoke_data.tokenizer().decode(ids.tolist())


@pytest.fixture()
def tree_dir(smoke_roots, smoke_base, history_text, tmp_path, capsys) -> Path:
    """A tree made by `ingest` of the first 2,400 tokens' text."""
    text = tmp_path / "small.txt"
    tok = smoke_base.tokenizer
    text.write_text(tok.decode(tok.encode(history_text, add_special_tokens=False)[:2400]), encoding="utf-8")
    tree = tmp_path / "tree"
    assert main(["ingest", *_cli(smoke_roots), "--tree", str(tree), "--input", str(text), "--checkpoint", "none"]) == 0
    capsys.readouterr()
    return tree


def _generate(roots, tree: Path, *extra: str) -> int:
    return main(["generate", *_cli(roots), "--tree", str(tree), "--prompt", "def f(", "--max-new-tokens", "3",
                 "--json", "--checkpoint", "none", *extra])


def test_cli_concurrent_ingest_is_refused_and_the_tree_untouched(smoke_roots, tree_dir, tmp_path, capsys):
    text = tmp_path / "more.txt"
    text.write_text("x = 1\n" * 50, encoding="utf-8")
    before = content(tree_dir)
    with held_by_another_process(tree_dir, "tree") as pid:
        rc = main(["ingest", *_cli(smoke_roots), "--tree", str(tree_dir), "--input", str(text), "--checkpoint", "none"])
        assert rc == 2
        _one_error_line(capsys.readouterr().err, f"tree {tree_dir} is in use by process {pid}")
        assert _generate(smoke_roots, tree_dir) == 2
        _one_error_line(capsys.readouterr().err, f"in use by process {pid}")
    assert content(tree_dir) == before


def test_cli_train_refuses_a_run_folder_in_use(smoke_roots, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    with held_by_another_process(run, "run") as pid:
        assert main(["train", *_cli(smoke_roots), "--out", str(run), "--no-progress"]) == 2
    _one_error_line(capsys.readouterr().err, f"run {run} is in use by process {pid}")
    assert [p.name for p in run.iterdir()] == [LOCK_FILE]


@pytest.mark.parametrize("damage", ["garbage", "edited", "inconsistent"])
def test_cli_damaged_session_falls_back_to_a_fresh_window(smoke_roots, tree_dir, capsys, damage):
    assert _generate(smoke_roots, tree_dir) == 0
    capsys.readouterr()
    f = tree_dir / SESSION_FILE
    state = json.loads(f.read_text())
    assert len(state["checksum"]) == 64
    if damage == "garbage":
        f.write_bytes(b"\x00{not json")
    elif damage == "edited":
        state["wc"]["entries"] = state["wc"]["entries"][:-1]
        f.write_text(json.dumps(state))
    else:  # no checksum (an older file), and a state that breaks the window's invariants
        del state["checksum"]
        state["wc"]["born"] = []
        f.write_text(json.dumps(state))
    assert _generate(smoke_roots, tree_dir) == 0
    captured = capsys.readouterr()
    warning = [line for line in captured.err.splitlines() if ": warning: " in line]
    assert len(warning) == 1 and f"{f} is damaged" in warning[0] and "fresh window" in warning[0]
    out = json.loads(captured.out.strip().splitlines()[-1])
    assert out["covered_tokens"] == out["history_tokens"]
    state = json.loads(f.read_text())  # rewritten, valid again
    assert state["wc"]["num_tokens"] == out["history_tokens"]
    assert _generate(smoke_roots, tree_dir) == 0
    assert ": warning: " not in capsys.readouterr().err


def test_cli_session_without_a_checksum_is_restored(smoke_roots, tree_dir, capsys):
    assert _generate(smoke_roots, tree_dir) == 0
    f = tree_dir / SESSION_FILE
    state = json.loads(f.read_text())
    del state["checksum"]
    f.write_text(json.dumps(state))
    capsys.readouterr()
    assert _generate(smoke_roots, tree_dir) == 0
    assert "warning" not in capsys.readouterr().err


def _reseal_lod0(tree: Path) -> None:
    """Record LOD0's current CRC-32 in metadata.json, as if its bytes had been committed so."""
    meta = json.loads((tree / "metadata.json").read_text())
    data = (tree / "LOD0.ctx").read_bytes()[HEADER_SIZE : HEADER_SIZE + 4 * meta["committed"]["LOD0"]]
    meta["crc32"]["LOD0"] = zlib.crc32(data)
    (tree / "metadata.json").write_text(json.dumps(with_checksum(meta)))


def test_cli_out_of_vocabulary_tokens_on_disk_are_reported_before_anything_changes(smoke_roots, tree_dir, capsys):
    with open(tree_dir / "LOD0.ctx", "r+b") as f:
        f.seek(HEADER_SIZE + 4 * 1234)
        f.write(np.array([1_000_000], dtype="<u4").tobytes())
    _reseal_lod0(tree_dir)  # a committed id the base cannot embed (a damaged one fails the CRC-32 first)
    before = content(tree_dir)
    assert _generate(smoke_roots, tree_dir) == 2
    _one_error_line(capsys.readouterr().err, "offset 1234", "1000000", "outside the base's vocabulary")
    assert content(tree_dir) == before
    assert main(["inspect", *_cli(smoke_roots), "--tree", str(tree_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["max_token_id"] == 1_000_000


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--budget", "4096"], ["budget of 4096", "context length (512 tokens"]),
        (["--temperature", "-1"], ["--temperature must be a finite number >= 0"]),
        (["--temperature", "nan"], ["--temperature must be a finite number >= 0"]),
        (["--set", "base.device=cuda"], ["base.device is 'cuda'", "base.device=auto"]),
    ],
)
def test_cli_bad_generate_options_are_refused(smoke_roots, tree_dir, capsys, monkeypatch, extra, needles):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # a machine without CUDA, whatever this one has
    before = content(tree_dir)
    assert _generate(smoke_roots, tree_dir, *extra) == 2
    _one_error_line(capsys.readouterr().err, *needles)
    assert content(tree_dir) == before


def test_cli_paths_that_are_files(smoke_roots, smoke_base, tmp_path, capsys, monkeypatch):
    file = tmp_path / "a-file"
    file.write_text("x")
    text = tmp_path / "in.txt"
    text.write_text("x = 1\n", encoding="utf-8")
    assert main(["ingest", *_cli(smoke_roots), "--tree", str(file), "--input", str(text), "--checkpoint", "none"]) == 2
    _one_error_line(capsys.readouterr().err, f"cannot create a tree at {file}: it is a file")
    sub = file / "tree"
    assert main(["ingest", *_cli(smoke_roots), "--tree", str(sub), "--input", str(text), "--checkpoint", "none"]) == 2
    _one_error_line(capsys.readouterr().err, f"cannot create a tree at {sub}")
    assert main(["generate", *_cli(smoke_roots), "--tree", str(file), "--prompt", "x", "--checkpoint", "none"]) == 2
    _one_error_line(capsys.readouterr().err, f"{file} is a file, not a MegaContext tree folder")
    assert file.read_text() == "x"

    monkeypatch.setenv("MEGACONTEXT_DATA_ROOT", str(file))
    monkeypatch.setenv("MEGACONTEXT_ARTIFACT_ROOT", str(tmp_path / "art"))
    assert main(["prepare", "--config", "smoke"]) == 2
    _one_error_line(capsys.readouterr().err, f"paths.data_root {file} is a file",
                    "[in environment variable MEGACONTEXT_DATA_ROOT]")
    with pytest.raises(ConfigError, match="is inside .* which is a file"):
        load_config("smoke", [f"paths.artifact_root={file / 'deeper' / 'art'}"], env={})


def test_cli_interrupted_or_failing_ingest_says_what_was_kept(smoke_roots, smoke_base, history_text, tmp_path,
                                                             capsys, monkeypatch):
    text = tmp_path / "long.txt"
    text.write_text(history_text, encoding="utf-8")
    n_new = len(smoke_base.tokenizer.encode(history_text, add_special_tokens=False))
    real_append, calls = MegaContextTree.append, []

    def append_then_fail(exc):
        def append(self, tokens):
            calls.append(len(tokens))
            if len(calls) == 2:
                raise exc
            real_append(self, tokens)
        return append

    args = ["ingest", *_cli(smoke_roots), "--input", str(text), "--checkpoint", "none"]
    monkeypatch.setattr(MegaContextTree, "append", append_then_fail(KeyboardInterrupt()))
    assert main([*args, "--tree", str(tmp_path / "a")]) == 130
    err = capsys.readouterr().err
    assert f"interrupted: the tree {tmp_path / 'a'} keeps 8192 tokens (8192 of the {n_new} new ones" in err

    calls.clear()
    monkeypatch.setattr(MegaContextTree, "append",
                        append_then_fail(OSError(errno.ENOSPC, "No space left on device", "LOD0.ctx")))
    assert main([*args, "--tree", str(tmp_path / "b")]) == 2
    _one_error_line(capsys.readouterr().err, "No space left on device (LOD0.ctx)", "keeps 8192 tokens")
    monkeypatch.undo()
    with MegaContextTree.open(tmp_path / "b") as tree:
        assert tree.num_tokens == 8192


def test_cli_checkpoint_cases_are_one_line(smoke_roots, tmp_path, capsys):
    art = tmp_path / "art"
    common = ["--config", "smoke", "--set", f"paths.data_root={smoke_roots['data_root']}",
              "--set", f"paths.artifact_root={art}"]
    run = art / "runs" / "20260101-000000-aaaaaaaa"
    (run / "checkpoints").mkdir(parents=True)
    for which in (str(run), "latest"):
        assert main(["eval", *common, "--checkpoint", which, "--no-progress"]) == 2
        _one_error_line(capsys.readouterr().err, f"no checkpoint in {run / 'checkpoints'}", "--checkpoint none")
    ckpt = save_checkpoint(run / "checkpoints", "c0-warm_gist", gistnet=torch.nn.Linear(2, 2),
                           lensnet=torch.nn.Linear(2, 1), lora=None, state={}, config_text="")
    (ckpt / "state.json").write_text('{"damaged": 1}')
    assert main(["eval", *common, "--checkpoint", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    _one_error_line(err, "no valid checkpoint at or before", "--checkpoint none")
    assert any(": warning: checkpoint " in line and "fails its checksum" in line for line in err.splitlines())


# -------------------------------------------------------------------------- offline
def test_offline_probe_switches_to_the_local_cache(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    embedded = load_config("smoke", env={})
    monkeypatch.setattr("megacontext.hub.reachable", lambda *a, **k: pytest.fail("probed without a hub name"))
    prefer_offline(embedded)  # the embedded base and a local corpus need no hub
    assert "HF_HUB_OFFLINE" not in os.environ

    hub = load_config("smoke", ["base.name=nobody/no-such-model"], env={})
    monkeypatch.setattr("megacontext.hub.reachable", lambda *a, **k: False)
    with pytest.warns(OfflineWarning, match="unreachable: using only the local cache"):
        prefer_offline(hub)
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_reachable_is_quick_and_false_for_a_closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        t0 = time.perf_counter()
        assert not reachable("127.0.0.1", port, timeout=2.0)
    assert time.perf_counter() - t0 < 2.5


def test_cli_unreachable_hub_fails_fast_with_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MEGACONTEXT_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1",
               MEGACONTEXT_DATA_ROOT=str(tmp_path / "data"), MEGACONTEXT_ARTIFACT_ROOT=str(tmp_path / "art"))
    for proxy in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(proxy, None)
    text = tmp_path / "in.txt"
    text.write_text("x = 1\n", encoding="utf-8")
    cmd = [sys.executable, "-m", "megacontext", "ingest", "--config", "smoke", "--set", "base.name=nobody/no-such-model",
           "--tree", str(tmp_path / "tree"), "--input", str(text), "--checkpoint", "none"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - t0
    assert done.returncode == 2, done.stderr
    assert "warning: the Hugging Face hub (http://127.0.0.1:9) is unreachable" in done.stderr
    _one_error_line(done.stderr, "cannot load base model 'nobody/no-such-model'")
    assert len(done.stderr.strip().splitlines()) == 2  # the warning and the error, no retry noise
    assert elapsed < 120  # process start-up included; the hub's retries alone took ~55 s
    assert not (tmp_path / "tree").exists()
