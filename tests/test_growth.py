"""Levels that grow with the history, and commits batched per block (issue #14).

* The tree: ``grow`` adds levels gisted from the stored level below, so a tree grown early,
  late, in RAM, on disk, across reopens and with deferred appends holds the same vectors;
  a grown disk tree reopens with its levels; a growth interrupted at any durability step
  leaves the tree it had or the grown one; version-1 trees open and are written as version 2.
* The GistNet and LensNet serve levels they were not built for.
* The runtime: a session grows the levels its budget needs (RAM and disk), the smoke
  acceptance scenario at test size (K=4: 3,000 tokens need LOD5 at budget 20),
  and a decoding session commits once per block, never losing the committed prefix.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from test_tree import FakeGister, all_gists, assert_tree_equals, chunk_bounds, make_disk, reference_gists, token_stream

import megacontext.tree_storage
from megacontext.api import MegaContext, inspect_tree
from megacontext.cli import main
from megacontext.cli.memory import _sigterm_interrupts
from megacontext.config import GistNetConfig, LensNetConfig
from megacontext.durable import with_checksum
from megacontext.errors import MegaContextError
from megacontext.gistnet import GistNet
from megacontext.lensnet import LensNet
from megacontext.tree import MegaContextTree
from megacontext.tree_format import HEADER_SIZE
from megacontext.working_context import WorkingContext, fitting_levels, minimum_cost

from conftest import smoke_config

K = 4


# ------------------------------------------------------------------ the tree
def test_grown_trees_hold_the_same_vectors_however_they_were_built(tmp_path):
    tokens = token_stream(31, 1500)  # 1500 // 4**5 = 1 node at LOD5
    expected = reference_gists(FakeGister(), tokens, K, 5, "float16")
    late = make_disk(tmp_path / "late", FakeGister())
    late.append(tokens)
    late.grow(5)
    early = make_disk(tmp_path / "early", FakeGister())
    early.grow(5)  # empty levels first, then streamed
    for a, b in chunk_bounds(3, len(tokens), 70):
        early.append(tokens[a:b], defer=bool(a % 2))
    ram = MegaContextTree.create_ram(K, 2, FakeGister().dim, FakeGister())
    ram.append(tokens[:700])
    ram.grow(4)
    ram.append(tokens[700:])
    ram.grow(5)
    assert_tree_equals(ram, tokens, reference_gists(FakeGister(), tokens, K, 5))
    for tree in (late, early):
        assert tree.levels == 5
        assert_tree_equals(tree, tokens, expected)
        tree.close()
    with MegaContextTree.open(tmp_path / "early") as reopened:
        assert reopened.levels == 5 and [reopened.num_nodes(k) for k in range(6)] == [1500, 375, 93, 23, 5, 1]
        assert_tree_equals(reopened, tokens, expected)


def test_a_grown_disk_tree_reopens_with_its_levels_and_goes_on(tmp_path):
    path = tmp_path / "t"
    tokens = token_stream(32, 900)
    with make_disk(path, FakeGister()) as tree:
        tree.append(tokens[:333])
        tree.grow(4)
        tree.grow(3)  # fewer than it has: nothing happens
    meta = json.loads((path / "metadata.json").read_text())
    assert (meta["format_version"], meta["levels"]) == (2, 4)
    assert meta["committed"] == {"LOD0": 333, "LOD1": 83, "LOD2": 20, "LOD3": 5, "LOD4": 1}
    for level, levels_then in enumerate([2, 2, 2, 3, 4]):  # a header holds the levels when its file was written
        raw = (path / f"LOD{level}.ctx").read_bytes()
        assert struct.unpack_from("<3I", raw, 8) == (2, level, levels_then)
    gister = FakeGister()
    with MegaContextTree.open(path, gister) as tree:
        assert gister.calls == [] and tree.levels == 4
        tree.append(tokens[333:])
    with MegaContextTree.open(path) as tree:
        assert_tree_equals(tree, tokens, reference_gists(FakeGister(), tokens, K, 4, "float16"))


def _fail_at(monkeypatch, n: int) -> list[int]:
    """Every os.fsync / os.replace counts; the n-th raises (0: none does)."""
    calls = [0]

    def counted(real):
        def call(*args):
            calls[0] += 1
            if calls[0] == n:
                raise OSError("injected crash")
            return real(*args)
        return call

    monkeypatch.setattr(os, "fsync", counted(os.fsync))
    monkeypatch.setattr(os, "replace", counted(os.replace))
    return calls


def test_a_growth_interrupted_at_any_durability_step_keeps_a_sound_tree(tmp_path, monkeypatch):
    tokens = token_stream(33, 300)
    pristine = tmp_path / "pristine"
    with make_disk(pristine, FakeGister()) as tree:
        tree.append(tokens)
    probe = tmp_path / "probe"
    shutil.copytree(pristine, probe)
    calls = _fail_at(monkeypatch, 0)
    with MegaContextTree.open(probe, FakeGister()) as tree:
        calls[0] = 0
        tree.grow(4)
        steps = calls[0]
    monkeypatch.undo()
    assert steps >= 10  # per level: the file, the folder, then metadata.json (tmp, rename, folder)
    for n in range(1, steps + 1):
        path = tmp_path / f"k{n}"
        shutil.copytree(pristine, path)
        tree = MegaContextTree.open(path, FakeGister())
        _fail_at(monkeypatch, n)
        with pytest.raises(OSError, match="injected crash"):
            tree.grow(4)
        monkeypatch.undo()
        tree.close()  # nothing deferred: closing writes nothing more (as a killed process would not)
        with MegaContextTree.open(path, FakeGister()) as reopened:
            assert reopened.levels in (2, 3, 4), n
            assert not (path / f"LOD{reopened.levels + 1}.ctx").exists()  # an uncommitted level is dropped
            assert_tree_equals(reopened, tokens, reference_gists(FakeGister(), tokens, K, reopened.levels, "float16"))
            reopened.grow(4)
            assert_tree_equals(reopened, tokens, reference_gists(FakeGister(), tokens, K, 4, "float16"))


def _as_version_1(path: Path) -> None:
    """Rewrite a 2-level tree as format version 1 wrote it."""
    meta = json.loads((path / "metadata.json").read_text())
    meta.pop("checksum")
    meta["format_version"] = 1
    (path / "metadata.json").write_text(json.dumps(with_checksum(meta), indent=1))
    for f in path.glob("LOD*.ctx"):
        with open(f, "r+b") as fh:
            fh.seek(8)
            fh.write(struct.pack("<I", 1))


def test_a_version_1_tree_opens_and_is_written_as_version_2(tmp_path):
    path = tmp_path / "t"
    tokens = token_stream(34, 400)
    with make_disk(path, FakeGister()) as tree:
        tree.append(tokens[:250])
    _as_version_1(path)
    with MegaContextTree.open(path) as tree:  # read as it is
        assert_tree_equals(tree, tokens[:250], reference_gists(FakeGister(), tokens[:250], K, 2, "float16"))
    with MegaContextTree.open(path, FakeGister()) as tree:
        tree.append(tokens[250:])
        tree.grow(4)
    assert json.loads((path / "metadata.json").read_text())["format_version"] == 2
    with MegaContextTree.open(path) as tree:
        assert_tree_equals(tree, tokens, reference_gists(FakeGister(), tokens, K, 4, "float16"))


def test_deferred_appends_commit_once_per_block_and_on_close(tmp_path, monkeypatch):
    path = tmp_path / "t"
    tokens = token_stream(35, 41)
    commits = []
    real = megacontext.tree_storage.DiskStore.commit
    monkeypatch.setattr(megacontext.tree_storage.DiskStore, "commit",
                        lambda self, t, g: commits.append(len(t)) or real(self, t, g))
    tree = make_disk(path, FakeGister())
    for i, tok in enumerate(tokens):
        tree.append([tok], defer=True)
        assert tree.num_tokens == i + 1 and tree.tokens()[-1] == tok  # readable at once
        assert tree.committed_tokens == (i + 1) // K * K
        shutil.copytree(path, tmp_path / "crash", dirs_exist_ok=True)  # a crash now keeps the committed prefix
        with MegaContextTree.open(tmp_path / "crash") as crashed:
            assert crashed.num_tokens == tree.committed_tokens
    assert commits == [K] * (41 // K)
    tree.close()
    assert commits[-1] == 1  # the unfinished block, at close
    with MegaContextTree.open(path) as tree:
        assert_tree_equals(tree, tokens, reference_gists(FakeGister(), tokens, K, 2, "float16"))


def test_a_writer_dropped_without_close_commits_its_deferred_tokens(tmp_path):
    path = tmp_path / "t"
    tokens = token_stream(42, 10)
    tree = make_disk(path, FakeGister())
    for tok in tokens:
        tree.append([tok], defer=True)
    assert tree.committed_tokens == 8
    child = os.fork()
    if child == 0:  # a forked child's copy is the parent's to commit: dropping it writes nothing
        del tree
        gc.collect()
        os._exit(0)
    assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0
    with MegaContextTree.open(path) as seen:
        assert seen.num_tokens == 8
    assert (path / "writer.lock").read_text().strip() == str(os.getpid())  # still ours
    del tree
    gc.collect()
    with MegaContextTree.open(path, FakeGister()) as reopened:  # committed, and the lock released
        assert_tree_equals(reopened, tokens, reference_gists(FakeGister(), tokens, K, 2, "float16"))


# ------------------------------------------------------------------ levels the modules were not built for
@pytest.mark.parametrize("kind, per_level", [("transformer", False), ("transformer", True), ("mean", False)])
def test_gistnet_serves_levels_above_its_own_with_its_top_level(kind, per_level):
    net = GistNet(GistNetConfig(kind=kind, layers=1, heads=2, per_level=per_level), 16, block_size=K, levels=2).eval()
    children = torch.randn(5, K, 16)
    with torch.no_grad():
        top = net(children, 2)
        assert torch.equal(net(children, 3), top) and torch.equal(net(children, 7), top)
        assert torch.equal(net(children, torch.tensor([3, 2, 5, 2, 4])), top)
    with pytest.raises(ValueError, match="level must be >= 1"):
        net(children, 0)


def test_lensnet_scores_entries_of_grown_levels():
    net = LensNet(LensNetConfig(width=16, stacks=1, heads=2, lod1_conditioning=4), 8, levels=2)
    levels = torch.tensor([[4, 3, 2, 1, 0, 0]])
    widths = torch.log(torch.tensor(float(K)) ** levels)
    scores = net(torch.randn(1, 6, 8), levels, widths, torch.zeros(1, 6), torch.ones(1, 6, dtype=torch.bool),
                 torch.randn(1, 6, 8), torch.ones(1, 6, dtype=torch.bool))
    assert scores.shape == (1, 6) and torch.isfinite(scores).all()


# ------------------------------------------------------------------ sessions
def test_fitting_levels_is_the_fewest_that_fit():
    assert fitting_levels(600_000, 32, 2, 1, 256) == 3 and minimum_cost(600_000, 32, 3, 1) <= 256
    assert minimum_cost(600_000, 32, 2, 1) > 256
    assert fitting_levels(600_000, 32, 2, 1, 1024) == 2
    assert fitting_levels(30_000, 32, 2, 1, 70) == 2  # no LOD3 node can exist yet: more levels change nothing


def test_a_window_too_long_for_its_levels_names_the_levels_that_would_fit():
    with pytest.raises(MegaContextError, match=r"at least \d+, got 256: raise focus.budget or tree.levels to 3$"):
        WorkingContext.initial(600_000, 32, 2, 256, 1)  # fixed levels (training): three would fit
    with pytest.raises(MegaContextError, match=r"got 70: raise focus.budget$"):
        WorkingContext.initial(30_000, 32, 2, 70, 1)  # what a session meets: more levels would not help


@pytest.fixture(scope="module")
def small_k(smoke_roots, smoke_base) -> MegaContext:
    """The smoke settings with K=4 (the smoke base serves any K), untrained modules."""
    return MegaContext.load(smoke_config(smoke_roots, f"tree.block_size={K}", "focus.budget=24"), checkpoint=None)


def test_a_ram_session_grows_the_levels_its_budget_needs(small_k):
    ids = np.arange(2000) % 300
    with small_k.session() as s:
        s.window()  # the window is live: every append is checked and fitted
        for i in range(0, len(ids), 250):
            s.append(ids[i : i + 250])
            w = s.window()
            assert w.cost <= 24 and w.covered_tokens == w.history_tokens == i + 250
        assert s.tree.levels == fitting_levels(2000, K, 2, 1, 24) >= 4
        assert max(w.levels) >= 4
        text = s.generate("x = ", max_new_tokens=6)
        assert isinstance(text, str) and s.window().cost <= 24


def test_smoke_acceptance_at_test_size(small_k, tmp_path, capsys):
    """Ingest a long history into a disk tree with no window (no budget), then generate on a
    small budget: the tree grows, the window fits and covers all, inspect --json shows the levels."""
    path = tmp_path / "tree"
    ids = (np.arange(3000) * 7) % 500
    with small_k.session(path) as s:
        s.append(ids)
        assert s.tree.levels == 2
    with small_k.session(path, budget=20, create=False) as s:
        s.generate("def f(", max_new_tokens=8)
        w = s.window()
        assert w.cost <= 20 and w.covered_tokens == w.history_tokens == s.num_tokens
        grown = s.tree.levels
        assert grown == 5 and max(w.levels) >= 3
    capsys.readouterr()
    assert main(["inspect", "--tree", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["levels"] == grown and list(info["nodes_per_level"]) == [str(k) for k in range(1, grown + 1)]
    assert info["nodes_per_level"][str(grown)] >= 1 and info["tokens"] == inspect_tree(path).tokens
    with small_k.session(path, budget=20, create=False) as s:  # reopens with its levels and window
        assert s.tree.levels == grown and s.window().cost <= 20


def test_a_disk_generate_commits_per_block_and_keeps_a_prefix(smoke_cfg, smoke_base, tmp_path, monkeypatch):
    mc = MegaContext.load(smoke_cfg, checkpoint=None)
    path = tmp_path / "tree"
    with mc.session(path) as s:
        s.append(np.arange(700) % 300)
    commits = [0]
    real = megacontext.tree_storage.DiskStore.commit
    monkeypatch.setattr(megacontext.tree_storage.DiskStore, "commit",
                        lambda self, t, g: commits.__setitem__(0, commits[0] + 1) or real(self, t, g))
    block = smoke_cfg.tree.block_size
    with mc.session(path) as s:
        before = s.num_tokens
        for i, _ in enumerate(s.runtime.stream([], 3 * block)):  # one token per step
            committed = s.tree.committed_tokens
            assert committed == max(s.num_tokens // block * block, before) and commits[0] <= i // block + 1
        assert s.num_tokens == before + 3 * block
    assert commits[0] <= 4  # 3 blocks + the close (instead of 96 commits, one per token)
    with MegaContextTree.open(path) as tree:
        assert tree.num_tokens == before + 3 * block


def test_sigterm_interrupts_the_cli_block():
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"), _sigterm_interrupts():
        os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) == previous


def test_grow_writes_the_new_level_file(tmp_path):
    with make_disk(tmp_path / "t", FakeGister()) as tree:
        tree.append(token_stream(36, 80))
        tree.grow(3)
        assert [len(g) for g in all_gists(tree)] == [20, 5, 1]
        assert (tmp_path / "t" / "LOD3.ctx").stat().st_size == HEADER_SIZE + 2 * tree.dim
