"""Fault injection (issue #13): kills, damaged files and a full disk never lose a commit and
never pass damaged data off as good.

* SIGKILL of ``ingest``, ``generate`` (a disk session) and ``train`` at random moments, each
  followed by a reopen / resume checked against an uninterrupted run (the commands run in
  children forked from one helper process, :mod:`faultkit`; ``benchmarks/bench_faults.py``
  runs 20+ kills of each), and at every fsync and rename of a tree's commit protocol.
* Truncated and bit-flipped files of every kind: tree level files, ``metadata.json``,
  ``session.json``, checkpoint files and the ``latest`` pointer, data shards, the
  tokenizer and manifest, focus-label Parquet files. Each is either refused with one
  clear line naming what is damaged, or recovered as documented (a stale gist file is
  recomputed, a damaged session starts a fresh window, a damaged checkpoint falls back to
  the previous one, a damaged dataset is rebuilt).
* A full disk (writes failing with ENOSPC) in the middle of a tree commit, a session
  save and a checkpoint: the last committed state survives, and the writer can go on.
* A fault or an interrupt (Ctrl-C, SIGTERM) just after a deferred commit passed its commit
  point: the writer's state follows the commit, so closing neither rolls it back nor writes
  its tokens twice.

Two writers at once (the writer locks on trees and run folders) are tested in test_hardening.py.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from faultkit import TRAIN_SETS, DiskQuota, Forker, GenerateKills, IngestKills, Kill, TrainKills
from test_data import make_tree, tiny_cfg
from test_hardening import _cli, _one_error_line, content
from test_tree import FakeGister, all_gists, assert_tree_equals, make_disk, reference_gists, token_stream

import megacontext.data.prepare
import megacontext.durable
import megacontext.tree_storage
from megacontext.checkpoint import (
    CheckpointError,
    CheckpointWarning,
    resolve_resume,
    save_checkpoint,
    verify_checkpoint,
)
from megacontext.cli import main
from megacontext.cli.memory import _sigterm_interrupts
from megacontext.data import PreparedDataset, prepare_dataset
from megacontext.errors import DataError, MegaContextError, TreeError
from megacontext.modules import Modules
from megacontext.runtime import SESSION_FILE, Session, SessionWarning
from megacontext.training.labels import LABELS, SNAPSHOTS
from megacontext.training.loop import TrainState, _read_labels_checked
from megacontext.tree import MegaContextTree
from megacontext.tree_storage import HEADER_SIZE, DiskStore
from megacontext.working_context import WorkingContext


def one_line(e: BaseException, *needles: str) -> str:
    """The message of a user-facing error: one line, containing each needle."""
    msg = str(e)
    assert "\n" not in msg and "Traceback" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def flip(path: Path, offset: int, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def damages(path: Path, rng: np.random.Generator, offsets: list[int], cuts: list[int]) -> list[tuple[str, object]]:
    """("flip", (offset, bit)) for each offset and ("cut", size) for each size below the file's."""
    size = path.stat().st_size
    out: list[tuple[str, object]] = [("flip", (o, int(rng.integers(8)))) for o in offsets if o < size]
    return out + [("cut", c) for c in cuts if 0 <= c < size]


def apply(path: Path, damage: tuple[str, object]) -> None:
    kind, arg = damage
    if kind == "flip":
        flip(path, *arg)  # type: ignore[misc]
    else:
        truncate(path, arg)  # type: ignore[arg-type]


# ------------------------------------------------------------------ the fork helper
@pytest.fixture(scope="module", autouse=True)
def forker(tmp_path_factory):
    """Started with the module (it imports the stack while the in-process tests run)."""
    helper = Forker(tmp_path_factory.mktemp("forker"), paths=(str(Path(__file__).parent),), preload=("test_tree",))
    yield helper
    helper.close()


@pytest.fixture(scope="module")
def kill_work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kills")


@pytest.fixture(scope="module")
def texts(smoke_data, kill_work) -> dict[str, Path]:
    """UTF-8 text of the first 40,000 (ingest) and 4,000 (generate) training tokens."""
    ids = np.concatenate(smoke_data.documents("train"))
    out = {}
    for name, n in (("ingest", 40_000), ("generate", 4_000)):
        out[name] = kill_work / f"{name}.txt"
        out[name].write_text(smoke_data.tokenizer().decode(ids[:n].tolist()), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def ingest_kills(forker, kill_work, smoke_roots, smoke_base, texts) -> IngestKills:
    return IngestKills(forker, kill_work, _cli(smoke_roots), texts["ingest"])


@pytest.fixture(scope="module")
def generate_kills(forker, kill_work, smoke_roots, smoke_base, texts) -> GenerateKills:
    return GenerateKills(forker, kill_work, _cli(smoke_roots), texts["generate"], new_tokens=48)


@pytest.fixture(scope="module")
def train_kills(forker, kill_work, smoke_roots, smoke_base) -> TrainKills:
    cli = _cli(smoke_roots) + [a for s in TRAIN_SETS for a in ("--set", s)]
    return TrainKills(forker, kill_work, cli)


def _kill_during_work(trials, seed: int) -> Kill:
    """A moment in the first half of the reference run's work: the command is still running then."""
    return Kill(float(np.random.default_rng(seed).uniform(0.05, 0.5)) * trials.span, at_work=True)


# ------------------------------------------------------------------ damaged tree files
def _tree_outcomes(path: Path, tokens: np.ndarray, expected: list[torch.Tensor]) -> list[str]:
    """Open a damaged tree for reading, then for writing: each must be refused (one line naming a
    file of the tree, nothing changed) or give exactly the original history."""
    outcomes = []
    for gister in (None, FakeGister()):
        before = content(path)
        try:
            tree = MegaContextTree.open(path, gister)
        except TreeError as e:
            one_line(e, str(path))
            assert content(path) == before
            outcomes.append("refused")
            continue
        with tree:
            np.testing.assert_array_equal(tree.tokens(), tokens.astype(np.uint32))
            try:
                gists = all_gists(tree)
            except TreeError as e:  # a gist file's header version was hit: the gists are stale
                assert gister is None, e
                one_line(e, "refresh was interrupted")
                outcomes.append("stale")
                continue
            assert all(torch.equal(g, w) for g, w in zip(gists, expected))
            outcomes.append("intact")
    return outcomes


@pytest.mark.parametrize("name", ["LOD0.ctx", "LOD1.ctx", "LOD2.ctx", "metadata.json"])
def test_a_damaged_tree_file_is_refused_or_read_intact(tmp_path, name):
    tokens = token_stream(22, 300)
    pristine = tmp_path / "pristine"
    with make_disk(pristine, FakeGister()) as tree:
        tree.append(tokens)
    expected = reference_gists(FakeGister(), tokens, 4, 2, "float16")
    file = pristine / name
    size, rng = file.stat().st_size, np.random.default_rng(len(name))
    if name == "metadata.json":
        cases = damages(file, rng, list(range(0, size, 2)), list(range(0, size, 23)))
    else:
        data = sorted(rng.choice(np.arange(HEADER_SIZE, size), 30, replace=False).tolist())
        cases = damages(file, rng, list(range(0, 360, 5)) + data, [0, 7, HEADER_SIZE - 1, HEADER_SIZE + 3, size - 1])
    tally: dict[str, int] = {}
    for i, damage in enumerate(cases):
        path = tmp_path / f"case{i}"
        shutil.copytree(pristine, path)
        apply(path / name, damage)
        outcomes = _tree_outcomes(path, tokens, expected)
        in_data = damage[0] == "cut" or damage[1][0] >= HEADER_SIZE  # type: ignore[index]
        if name != "metadata.json" and in_data:
            assert outcomes == ["refused", "refused"], (damage, outcomes)  # the CRC-32 / length check
        if "stale" in outcomes:
            assert outcomes[1] == "intact"  # the writer recomputed the gists from LOD0
        tally[outcomes[0]] = tally.get(outcomes[0], 0) + 1
        shutil.rmtree(path)
    assert tally.get("refused", 0) > len(cases) // 2, tally


def test_a_tree_without_crc32_opens_unchecked_and_its_next_commit_records_them(tmp_path):
    path = tmp_path / "t"
    tokens = token_stream(23, 120)
    with make_disk(path, FakeGister()) as tree:
        tree.append(tokens[:100])
    meta = json.loads((path / "metadata.json").read_text())
    del meta["crc32"], meta["checksum"]  # as written before CRC-32s and checksums existed
    (path / "metadata.json").write_text(json.dumps(meta))
    with MegaContextTree.open(path, FakeGister()) as tree:
        tree.append(tokens[100:])
    flip(path / "LOD0.ctx", HEADER_SIZE + 17, 3)
    with pytest.raises(TreeError, match="LOD0.ctx is damaged: its committed data fails the CRC-32"):
        MegaContextTree.open(path)


# ------------------------------------------------------------------ damaged session.json
@pytest.fixture()
def disk_session(smoke_cfg, smoke_base, smoke_data, tmp_path):
    modules = Modules.fresh(smoke_cfg, smoke_base)
    tree = MegaContextTree.create_disk(tmp_path / "tree", smoke_cfg.tree.block_size, smoke_cfg.tree.levels,
                                       smoke_base.dim, modules.gister(), "embedded", "tok")
    session = Session(modules, tree, smoke_cfg.focus, seed=0)
    session.ingest(np.concatenate(smoke_data.documents("train"))[:700])
    session.save()
    yield session
    tree.close()


def _restored(s: Session) -> tuple[Session, list[str]]:
    fresh = Session(s.modules, s.tree, s.focus, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh.restore_focus()
    return fresh, [str(w.message) for w in caught if issubclass(w.category, SessionWarning)]


def test_a_damaged_session_is_reported_and_starts_a_fresh_window(disk_session):
    s = disk_session
    f = s.tree.path / SESSION_FILE
    saved, raw = s.wc.to_dict(), f.read_bytes()
    initial = Session(s.modules, s.tree, s.focus, seed=0).wc.to_dict()
    assert saved != initial  # the refocus moved the window: a restore is visible
    rng = np.random.default_rng(5)
    cases = damages(f, rng, sorted(rng.choice(len(raw), 150, replace=False).tolist()), [0, 1, len(raw) // 2, len(raw) - 1])
    warned = 0
    for damage in cases:
        f.write_bytes(raw)
        apply(f, damage)
        fresh, messages = _restored(s)
        if messages:
            assert len(messages) == 1 and "\n" not in messages[0], messages
            assert f"{f} is damaged" in messages[0] and "fresh window" in messages[0]
            assert fresh.wc.to_dict() == initial, damage
            warned += 1
        else:  # the flip missed every value (e.g. the name of the checksum field): the state is intact
            assert fresh.wc.to_dict() == saved, damage
    assert warned >= len(cases) - 5


def test_a_session_saved_before_the_last_tokens_is_extended_over_them(disk_session):
    """A generate killed after it appended tokens, before it saved: the saved window is carried forward."""
    s = disk_session
    expected = WorkingContext.from_dict(s.wc.to_dict())
    s.tree.append(np.arange(1, 40))  # committed, never saved into session.json
    expected.extend(s.tree.num_tokens)
    fresh, messages = _restored(s)
    assert not messages and fresh.wc.to_dict() == expected.to_dict()


# ------------------------------------------------------------------ damaged datasets
class _Rebuild(Exception):
    """prepare_dataset decided to rebuild (the build itself is tested in test_data.py)."""


@pytest.fixture()
def tiny_dataset(tmp_path):
    cfg = tiny_cfg(tmp_path / "data")
    spec = f"files:{make_tree(tmp_path / 'corpus')}/**/*.py"
    ds = prepare_dataset(cfg, source=spec, progress=False)
    return cfg, spec, ds


def _prepare_outcome(cfg, spec: str, docs: list[list[int]], monkeypatch) -> str:
    """"rebuild", "refused" (one DataError line) or "reused" (then the documents are the original ones)."""
    def rebuild(*args, **kwargs):
        raise _Rebuild

    monkeypatch.setattr(megacontext.data.prepare, "_build", rebuild)
    try:
        ds = prepare_dataset(cfg, source=spec, progress=False)
    except _Rebuild:
        return "rebuild"
    except DataError as e:
        one_line(e)
        return "refused"
    finally:
        monkeypatch.undo()
    try:
        assert [d.tolist() for d in PreparedDataset.open(ds.root).documents("train")] == docs
    except DataError as e:
        one_line(e)
        return "refused"
    return "reused"


def test_damaged_shards_tokenizer_and_manifest_are_refused_or_rebuilt(tiny_dataset, monkeypatch, capsys):
    cfg, spec, ds = tiny_dataset
    docs = [d.tolist() for d in ds.documents("train")]
    rng = np.random.default_rng(8)
    shard = ds.root / ds.manifest["splits"]["train"]["shards"][0]["file"]
    tok = ds.root / "tokenizer" / "tokenizer.json"
    manifest = ds.root / "manifest.json"
    for file in (shard, tok, manifest):
        raw = file.read_bytes()
        n = 100 if file == manifest else 12
        for damage in damages(file, rng, sorted(rng.choice(len(raw), n, replace=False).tolist()), [0, len(raw) // 2]):
            apply(file, damage)
            if file == shard:
                with pytest.raises(DataError) as e:
                    PreparedDataset.open(ds.root).documents("train")
                one_line(e.value, shard.name)
            outcome = _prepare_outcome(cfg, spec, docs, monkeypatch)
            assert outcome != "reused" or file == manifest, (file.name, damage, outcome)
            file.write_bytes(raw)
    assert _prepare_outcome(cfg, spec, docs, monkeypatch) == "reused"
    capsys.readouterr()


# ------------------------------------------------------------------ a full disk
def _quota(monkeypatch) -> DiskQuota:
    quota = DiskQuota()
    for module in (megacontext.tree_storage, megacontext.durable):
        monkeypatch.setattr(module, "open", quota.open, raising=False)
    return quota


def test_a_full_disk_at_any_byte_of_an_append_loses_no_commit(tmp_path, monkeypatch):
    tokens = token_stream(24, 500)
    expected = reference_gists(FakeGister(), tokens, 4, 2, "float16")
    pristine = tmp_path / "pristine"
    with make_disk(pristine, FakeGister(), chunk_tokens=64) as tree:
        tree.append(tokens[:100])
    quota = _quota(monkeypatch)
    probe = tmp_path / "probe"
    shutil.copytree(pristine, probe)
    quota.left = 10**9
    with MegaContextTree.open(probe, FakeGister(), chunk_tokens=64) as tree:
        tree.append(tokens[100:])
    needed, quota.left = 10**9 - quota.left, None  # bytes the append writes (6 commits)
    for i, left in enumerate(np.random.default_rng(9).integers(0, needed, 25).tolist()):
        path = tmp_path / f"case{i}"
        shutil.copytree(pristine, path)
        tree = MegaContextTree.open(path, FakeGister(), chunk_tokens=64)
        quota.left = left
        with pytest.raises(OSError) as e:
            tree.append(tokens[100:])
        assert e.value.errno == errno.ENOSPC
        quota.left = None  # space again: the same writer goes on from its last commit
        kept = tree.num_tokens
        assert kept >= 100 and (kept - 100) % 64 == 0
        tree.append(tokens[kept:])
        tree.close()
        assert not (path / "metadata.json.tmp").exists()
        with MegaContextTree.open(path) as reopened:
            assert_tree_equals(reopened, tokens, expected)
    with MegaContextTree.open(pristine, FakeGister(), chunk_tokens=64) as tree:  # and after a reopen instead
        quota.left = needed // 2
        with pytest.raises(OSError):
            tree.append(tokens[100:])
        quota.left = None
    with MegaContextTree.open(pristine, FakeGister(), chunk_tokens=64) as tree:
        kept = tree.num_tokens
        assert_tree_equals(tree, tokens[:kept], reference_gists(FakeGister(), tokens[:kept], 4, 2, "float16"))
        tree.append(tokens[kept:])
        assert_tree_equals(tree, tokens, expected)


def test_a_full_disk_while_saving_a_session_keeps_the_previous_one(disk_session, monkeypatch):
    s = disk_session
    f = s.tree.path / SESSION_FILE
    before = f.read_bytes()
    s.ingest(np.arange(1, 60))
    quota = _quota(monkeypatch)
    for left in (0, 10, len(before) // 2):
        quota.left = left
        with pytest.raises(OSError, match="No space left"):
            s.save()
        assert f.read_bytes() == before and not f.with_name(SESSION_FILE + ".tmp").exists()
    quota.left = None
    s.save()
    assert _restored(s)[0].wc.to_dict() == s.wc.to_dict()


def _enospc_on_call(n: int, counter: list[int]):
    def fail(real):
        def call(*args, **kwargs):
            counter[0] += 1
            if counter[0] == n:
                raise OSError(errno.ENOSPC, "No space left on device", str(args[0]) if args else None)
            return real(*args, **kwargs)
        return call
    return fail


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    modules = {"gistnet": torch.nn.Linear(3, 3), "lensnet": torch.nn.Linear(3, 1), "lora": None, "config_text": "x"}
    save_checkpoint(root, "c1-jt1-s00001", state={"step": 1}, optimizer_state={"a": torch.ones(2)}, **modules)
    before = {p.name for p in root.iterdir()}
    leftovers = {"c1-jt1-s00002", ".latest.tmp"} | {f".{k}-c1-jt1-s00002-{os.getpid()}" for k in ("tmp", "stale")}
    writes = 0
    for n in range(1, 30):
        counter = [0]
        fail = _enospc_on_call(n, counter)
        monkeypatch.setattr("megacontext.checkpoint.save_module", fail(megacontext.checkpoint.save_module))
        monkeypatch.setattr(torch, "save", fail(torch.save))
        monkeypatch.setattr(Path, "write_text", fail(Path.write_text))
        monkeypatch.setattr(os, "rename", fail(os.rename))
        monkeypatch.setattr(os, "replace", fail(os.replace))
        try:
            save_checkpoint(root, "c1-jt1-s00002", state={"step": 2}, optimizer_state={"a": torch.ones(2)}, **modules)
        except OSError as e:
            assert e.errno == errno.ENOSPC
        else:
            writes = n - 1
            break
        finally:
            monkeypatch.undo()
        assert (root / "latest").read_text().strip() == "c1-jt1-s00001"
        assert {p.name for p in root.iterdir()} - before <= leftovers, n
        assert resolve_resume(root, "latest").path.name == "c1-jt1-s00001"
    assert writes >= 12  # every file write and rename was hit once
    assert resolve_resume(root, "latest").path.name == "c1-jt1-s00002"
    assert not [p for p in root.iterdir() if p.name.startswith((".tmp-", ".stale-"))]


def test_cli_generate_on_a_full_disk_is_one_line_and_keeps_the_tree(smoke_roots, tmp_path, texts, capsys, monkeypatch):
    tree = tmp_path / "tree"
    base = [*_cli(smoke_roots), "--tree", str(tree), "--checkpoint", "none"]
    assert main(["ingest", *base, "--input", str(texts["generate"])]) == 0
    assert main(["generate", *base, "--prompt", "x = ", "--max-new-tokens", "2"]) == 0
    session = (tree / SESSION_FILE).read_bytes()
    capsys.readouterr()
    quota = DiskQuota(0)
    monkeypatch.setattr(megacontext.durable, "open", quota.open, raising=False)  # metadata and session writes
    assert main(["generate", *base, "--prompt", "y = ", "--max-new-tokens", "2"]) == 2
    _one_error_line(capsys.readouterr().err, "No space left on device", "metadata.json.tmp")
    monkeypatch.undo()
    assert (tree / SESSION_FILE).read_bytes() == session
    assert main(["generate", *base, "--prompt", "y = ", "--max-new-tokens", "2", "--json"]) == 0
    assert ": warning: " not in capsys.readouterr().err


# ------------------------------------------------------------------ faults after a deferred commit
def _deferred(tree: MegaContextTree, tokens: np.ndarray) -> None:
    for tok in tokens:
        tree.append([tok], defer=True)


def _on_disk(path: Path) -> int:
    return json.loads((path / "metadata.json").read_text())["committed"]["LOD0"]


@pytest.mark.parametrize("fault", ["folder fsync fails", "SIGINT", "SIGTERM"])
def test_a_fault_just_after_the_rename_of_a_deferred_commit_keeps_it(tmp_path, monkeypatch, fault):
    """The commit point (metadata.json's rename) passed: close() must not roll the block back
    by committing the tokens it held before (stale in-memory metadata)."""
    tokens, path = token_stream(40, 23), tmp_path / "t"
    tree = make_disk(path, FakeGister())
    _deferred(tree, tokens[:10])  # 8 committed, 2 held back
    real_replace, real_fsync_dir = os.replace, megacontext.durable.fsync_dir

    def replace_then_signal(src, dst):
        real_replace(src, dst)
        monkeypatch.setattr(os, "replace", real_replace)
        signal.raise_signal(signal.SIGINT if fault == "SIGINT" else signal.SIGTERM)

    def fsync_dir_fails(folder):
        monkeypatch.setattr(megacontext.durable, "fsync_dir", real_fsync_dir)
        raise OSError(errno.EIO, "Input/output error", str(folder))

    if fault == "folder fsync fails":  # what replace_file does right after the rename
        monkeypatch.setattr(megacontext.durable, "fsync_dir", fsync_dir_fails)
    else:
        monkeypatch.setattr(os, "replace", replace_then_signal)
    with _sigterm_interrupts(), pytest.raises(OSError if fault == "folder fsync fails" else KeyboardInterrupt):
        _deferred(tree, tokens[10:12])  # completes the third block: a commit of 4 tokens
    monkeypatch.undo()
    committed = _on_disk(path)
    assert committed == 12 and tree.num_tokens == tree.committed_tokens == 12
    tree.close()
    with MegaContextTree.open(path, FakeGister()) as reopened:
        n = reopened.num_tokens
        assert n >= committed and np.array_equal(reopened.tokens(), tokens[:n])  # an exact prefix, the commit kept
        assert_tree_equals(reopened, tokens[:n], reference_gists(FakeGister(), tokens[:n], 4, 2, "float16"))
        _deferred(reopened, tokens[n:])
    with MegaContextTree.open(path) as reopened:
        assert_tree_equals(reopened, tokens, reference_gists(FakeGister(), tokens, 4, 2, "float16"))


@pytest.mark.parametrize("fault", ["raised there", "SIGINT"])
def test_an_interrupt_after_a_deferred_commit_returns_never_commits_it_twice(tmp_path, monkeypatch, fault):
    """KeyboardInterrupt between the store's commit and the tree's own state (its held-back
    tokens): the next commit must not append those tokens a second time."""
    tokens, path = token_stream(41, 23), tmp_path / "t"
    tree = make_disk(path, FakeGister())
    _deferred(tree, tokens[:10])
    real = DiskStore.commit

    def commit_then_interrupt(self, part, gists):
        real(self, part, gists)
        monkeypatch.setattr(DiskStore, "commit", real)
        if fault == "raised there":  # as if the signal's handler ran on the very next bytecode
            raise KeyboardInterrupt
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(DiskStore, "commit", commit_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        _deferred(tree, tokens[10:12])
    assert _on_disk(path) == 12 and tree.num_tokens == 12 and np.array_equal(tree.tokens(), tokens[:12])
    _deferred(tree, tokens[12:])  # the same writer goes on
    tree.close()
    with MegaContextTree.open(path) as reopened:
        assert_tree_equals(reopened, tokens, reference_gists(FakeGister(), tokens, 4, 2, "float16"))


# ------------------------------------------------------------------ kills: the tree's commit protocol
COMMIT_KILL = """
import os, signal
from test_tree import FakeGister, token_stream
from megacontext.tree import MegaContextTree
calls = 0
def counted(real):
    def call(*args):
        global calls
        calls += 1
        if calls == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args)
    return call
os.fsync, os.replace = counted(os.fsync), counted(os.replace)
tokens = token_stream(21, 200)
tree = MegaContextTree.create_disk({path!r}, 4, 2, 8, FakeGister(), model_name="fake/model",
                                   tokenizer_hash="tok123", chunk_tokens=64)
for a in range(0, 200, 100):
    tree.append(tokens[a : a + 100])
    print("committed", tree.num_tokens, flush=True)
tree.close()
print("calls", calls, flush=True)
"""


def test_sigkill_before_every_fsync_and_rename_of_a_commit_keeps_the_last_commit(forker, tmp_path):
    """Create + 4 commits (two appends of two chunks): killed before each durability step in turn."""
    tokens = token_stream(21, 200)
    done = forker.run(code=COMMIT_KILL.format(kill_at=0, path=str(tmp_path / "whole")))
    steps = int(re.findall(r"calls (\d+)", done.log)[-1])
    assert done.rc == 0 and steps >= 20
    for kill_at in range(1, steps + 1):
        path = tmp_path / f"k{kill_at}"
        r = forker.run(code=COMMIT_KILL.format(kill_at=kill_at, path=str(path)))
        assert r.rc == -9, r.log
        seen = [int(n) for n in re.findall(r"committed (\d+)", r.log)]
        if not (path / "metadata.json").exists():
            assert not seen  # killed inside create: a folder that create accepts again
            tree = make_disk(path, FakeGister(), chunk_tokens=64)
        else:
            tree = MegaContextTree.open(path, FakeGister(), chunk_tokens=64)
        with tree:
            n = tree.num_tokens
            assert n >= (seen[-1] if seen else 0) and n in (0, 64, 100, 164, 200), f"kill {kill_at}: {n} tokens"
            assert_tree_equals(tree, tokens[:n], reference_gists(FakeGister(), tokens[:n], 4, 2, "float16"))
            tree.append(tokens[n:])
            assert_tree_equals(tree, tokens, reference_gists(FakeGister(), tokens, 4, 2, "float16"))


# ------------------------------------------------------------------ kills: the commands
@pytest.mark.parametrize("trial", [0, 1])
def test_sigkill_during_ingest_keeps_an_exact_prefix_that_continues(ingest_kills, trial):
    outcome = ingest_kills.trial(_kill_during_work(ingest_kills, trial))
    assert outcome.killed and outcome.consistent and not outcome.lost, outcome.detail


@pytest.mark.parametrize("trial", [0, 1])
def test_sigkill_during_generate_keeps_a_prefix_and_a_valid_session(generate_kills, trial):
    outcome = generate_kills.trial(_kill_during_work(generate_kills, 10 + trial))
    assert outcome.killed and outcome.consistent and not outcome.lost, outcome.detail


def test_sigkill_during_train_then_resume_reproduces_the_run(train_kills):
    """What test_training's resume test asserts (validation, final weights, telemetry), on a smaller run."""
    outcome = train_kills.trial(_kill_during_work(train_kills, 20))
    assert outcome.killed and outcome.consistent and not outcome.lost, outcome.detail


# ------------------------------------------------------------------ damaged checkpoints and labels
@pytest.fixture(scope="module")
def run_ref(train_kills) -> Path:
    """The uninterrupted reference run of the train kills (every kind of checkpoint file)."""
    return train_kills.ref


def test_every_damaged_checkpoint_file_is_named_and_resume_falls_back(run_ref, tmp_path):
    root = tmp_path / "checkpoints"
    shutil.copytree(run_ref / "checkpoints", root)
    ckpt = root / "c1-jt3-s00001"
    files = sorted(p.relative_to(ckpt) for p in ckpt.rglob("*") if p.is_file())
    assert {"gistnet.safetensors", "lensnet.safetensors", "optimizer.pt", "rng.pt", "state.json", "config.yaml",
            "checksums.json", "lora/adapter_model.safetensors"} <= {str(f) for f in files}
    rng = np.random.default_rng(6)
    (root / "latest").write_text("c1-jt3-s00001\n")
    for rel in files:
        raw = (ckpt / rel).read_bytes()
        for damage in damages(ckpt / rel, rng, rng.integers(0, len(raw), 3).tolist(), [0, len(raw) // 2]):
            apply(ckpt / rel, damage)
            with pytest.raises(CheckpointError) as e:
                verify_checkpoint(ckpt)
            one_line(e.value, str(ckpt), *([str(rel)] if str(rel) != "checksums.json" else []))
            (ckpt / rel).write_bytes(raw)
        apply(ckpt / rel, ("cut", len(raw) // 2))
        with pytest.warns(CheckpointWarning, match="c1-jt3-s00001"):
            assert resolve_resume(root, "latest").path.name == "c0-warm_lens"  # the one before, in training order
        (ckpt / rel).write_bytes(raw)


def test_a_damaged_latest_pointer_still_resumes_from_a_valid_checkpoint(run_ref, tmp_path):
    root = tmp_path / "checkpoints"
    shutil.copytree(run_ref / "checkpoints", root)
    raw = (root / "latest").read_bytes()
    for offset in range(len(raw)):
        for bit in range(8):
            (root / "latest").write_bytes(raw)
            flip(root / "latest", offset, bit)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CheckpointWarning)
                verify_checkpoint(resolve_resume(root, "latest").path)


def test_damaged_focus_labels_are_refused_on_resume(run_ref, tmp_path):
    """A resume in the middle of a LensNet phase reads the saved labels: damage is a clear error."""
    run = tmp_path / "run"
    shutil.copytree(run_ref, run)
    state = json.loads((run / "checkpoints" / "c0-warm_lens-s00001" / "state.json").read_text())
    ctx = SimpleNamespace(run_dir=run, state=TrainState(**state))
    folder = run / "deltas" / "cycle0"
    assert set(ctx.state.labels_sha256) == {f"deltas/cycle0/{SNAPSHOTS}", f"deltas/cycle0/{LABELS}"}
    clean = _read_labels_checked(ctx, folder)
    rng = np.random.default_rng(7)
    for name in (SNAPSHOTS, LABELS):
        raw = (folder / name).read_bytes()
        for damage in damages(folder / name, rng, rng.integers(0, len(raw), 12).tolist(), [0, len(raw) // 3]):
            apply(folder / name, damage)
            with pytest.raises(MegaContextError) as e:
                _read_labels_checked(ctx, folder)
            one_line(e.value, str(folder / name), "fail their checksum", str(run / "checkpoints" / "c0-warm_gist"))
            (folder / name).write_bytes(raw)
    assert len(_read_labels_checked(ctx, folder)[0]) == len(clean[0])
    ctx.state.labels_sha256.clear()  # a run written before the digests: unreadable files still give one line
    truncate(folder / LABELS, 100)
    with pytest.raises(MegaContextError) as e:
        _read_labels_checked(ctx, folder)
    one_line(e.value, f"cannot read the focus labels in {folder}")
