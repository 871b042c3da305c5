"""MegaContext tree: streaming gists, node arithmetic, versioning, RAM/disk storage, crash safety."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megacontext.errors import MegaContextError, TreeError
from megacontext.tree import MegaContextTree
from megacontext.tree_format import HEADER_SIZE, MAGIC

VOCAB = 997
DIM = 8


class FakeGister:
    """Deterministic stand-in for GistNet: a random embedding table and a position-weighted mix.

    Only exact IEEE operations (no transcendental functions), so a batched call gives
    bit-identical rows whatever the batch size. Logs every call it receives.
    """

    def __init__(self, dim: int = DIM, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.dim = dim
        self.table = torch.randn(VOCAB, dim, generator=g)
        self.scale = torch.randn(8, dim, generator=g)
        self.seen_ids: list[np.ndarray] = []
        self.calls: list[tuple[int, tuple[int, ...]]] = []
        self._rehash()

    def _rehash(self) -> None:
        params = self.table.numpy().tobytes() + self.scale.numpy().tobytes()
        self.version = hashlib.sha256(params).hexdigest()[:16]

    def perturb(self) -> None:
        """What a training step does: other weights, another version."""
        self.scale += 0.5
        self._rehash()

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        self.seen_ids.append(ids.numpy().copy())
        return self.table[ids]

    def mix(self, level: int, children: torch.Tensor) -> torch.Tensor:
        K = children.shape[1]
        w = torch.arange(1, K + 1, dtype=torch.float32) * (0.25 + 0.1 * level)
        x = (children * w[None, :, None]).sum(1) / K * self.scale[level] + 0.1 * level
        return x / (1 + x.abs())

    def gist(self, level: int, children: torch.Tensor) -> torch.Tensor:
        assert not torch.is_grad_enabled()
        self.calls.append((level, tuple(children.shape)))
        return self.mix(level, children)


def token_stream(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=n, dtype=np.int64)


def chunk_bounds(seed: int, n: int, most: int) -> list[tuple[int, int]]:
    """Random (start, end) pieces of [0, n), each 1..most long."""
    rng = np.random.default_rng(seed)
    out, pos = [], 0
    while pos < n:
        end = min(n, pos + int(rng.integers(1, most + 1)))
        out.append((pos, end))
        pos = end
    return out


def reference_gists(gister: FakeGister, tokens: np.ndarray, K: int, L: int, dtype: str = "float32") -> list[torch.Tensor]:
    """Independent recompute of every complete node, level by level (each from the rounded level below)."""

    def rounded(g: torch.Tensor) -> torch.Tensor:
        return g if dtype == "float32" else g.to(getattr(torch, dtype)).float()

    blocks = len(tokens) // K
    emb = gister.table[torch.from_numpy(tokens[: blocks * K].astype(np.int64))]
    cur = rounded(gister.mix(1, emb.reshape(blocks, K, gister.dim)))
    out = [cur]
    for level in range(2, L + 1):
        n = len(cur) // K
        cur = rounded(gister.mix(level, cur[: n * K].reshape(n, K, gister.dim)))
        out.append(cur)
    return out


def all_gists(tree: MegaContextTree) -> list[torch.Tensor]:
    return [tree.gist_range(k) for k in range(1, tree.levels + 1)]


def assert_tree_equals(tree: MegaContextTree, tokens: np.ndarray, expected: list[torch.Tensor]) -> None:
    assert tree.num_tokens == len(tokens)
    np.testing.assert_array_equal(tree.tokens(0, len(tokens)), tokens.astype(np.uint32))
    for k, (got, want) in enumerate(zip(all_gists(tree), expected), start=1):
        assert got.dtype == torch.float32 and got.shape == want.shape, f"level {k}"
        assert torch.equal(got, want), f"level {k} gists differ"


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def make_disk(path: Path, gister: FakeGister, K: int = 4, L: int = 2, dtype: str = "float16", **kw) -> MegaContextTree:
    return MegaContextTree.create_disk(path, K, L, gister.dim, gister, model_name="fake/model",
                                       tokenizer_hash="tok123", gist_dtype=dtype, **kw)


# ------------------------------------------------------------------ streaming & arithmetic
@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    n=st.integers(0, 400),
    seed=st.integers(0, 10_000),
    most=st.sampled_from([1, 3, 17, 64, 500]),
    chunk_tokens=st.sampled_from([5, 64, 8192]),
)
def test_streaming_append_equals_one_shot(n, seed, most, chunk_tokens):
    K, L = 4, 3
    tokens = token_stream(seed, n)
    one = MegaContextTree.create_ram(K, L, DIM, FakeGister())
    one.append(tokens)
    streamed = MegaContextTree.create_ram(K, L, DIM, FakeGister(), chunk_tokens=chunk_tokens)
    for a, b in chunk_bounds(seed, n, most):
        streamed.append(tokens[a:b])
    expected = reference_gists(FakeGister(), tokens, K, L)
    assert_tree_equals(one, tokens, expected)
    assert_tree_equals(streamed, tokens, expected)


def test_node_counts_follow_block_arithmetic():
    K, L = 3, 3
    tree = MegaContextTree.create_ram(K, L, DIM, FakeGister())
    tokens = token_stream(1, 120)
    for n in range(1, len(tokens) + 1):
        tree.append(tokens[n - 1 : n])
        assert [tree.num_nodes(k) for k in range(L + 1)] == [n // K**k for k in range(L + 1)]
        assert tree.gist_range(L).shape == (n // K**L, DIM)
    # node (k, i) is the gist of exactly the tokens [i*K**k, (i+1)*K**k)
    lod2 = tree.gists(2, torch.tensor([5]))
    sub = MegaContextTree.create_ram(K, 2, DIM, FakeGister())
    sub.append(tokens[5 * K**2 : 6 * K**2])
    assert torch.equal(lod2, sub.gists(2, [0]))


def test_unfinished_block_never_reaches_the_gister():
    K, L = 4, 2
    gister = FakeGister()
    tree = MegaContextTree.create_ram(K, L, DIM, gister, chunk_tokens=64)
    tokens = token_stream(2, 1000)
    for a, b in chunk_bounds(3, len(tokens), 150):
        before = len(gister.calls)
        tree.append(tokens[a:b])
        new_calls = gister.calls[before:]
        for level in (1, 2):  # one batched call per level per chunk of <= 64 tokens
            assert sum(c[0] == level for c in new_calls) <= -(-(b - a) // 64)
    seen = np.concatenate(gister.seen_ids)
    complete = (len(tokens) // K) * K
    np.testing.assert_array_equal(seen, tokens[:complete])  # each complete block once, nothing else
    assert all(shape[1:] == (K, DIM) and shape[0] >= 1 for _, shape in gister.calls)
    assert tree.num_tokens == 1000 and tree.num_nodes(1) == 250


# ------------------------------------------------------------------ backends
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_disk_matches_ram_and_reference(tmp_path, dtype):
    K, L = 4, 2
    tokens = token_stream(4, 700)
    ram = MegaContextTree.create_ram(K, L, DIM, FakeGister())
    disk = make_disk(tmp_path / "t", FakeGister(), K, L, dtype, chunk_tokens=100)
    for a, b in chunk_bounds(5, len(tokens), 90):
        ram.append(tokens[a:b])
        disk.append(tokens[a:b])
    assert_tree_equals(disk, tokens, reference_gists(FakeGister(), tokens, K, L, dtype))
    np.testing.assert_array_equal(disk.tokens(), ram.tokens())
    tol = {"float32": 0.0, "float16": 2e-3, "bfloat16": 2e-2}[dtype]
    for got, want in zip(all_gists(disk), all_gists(ram)):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    idx = torch.tensor([7, 0, 7, 174])
    assert torch.equal(disk.gists(1, idx), disk.gist_range(1)[idx])
    assert disk.bytes_on_disk > HEADER_SIZE * (L + 1) + 4 * len(tokens)
    assert ram.bytes_on_disk == 0 and ram.path is None and disk.path == tmp_path / "t"
    disk.close()


def test_reopen_gives_the_same_tree_and_appends_continue(tmp_path):
    K, L = 4, 3
    tokens = token_stream(6, 900)
    with make_disk(tmp_path / "t", FakeGister(), K, L) as tree:
        tree.append(tokens[:333])  # leaves an unfinished block and partial parents at every level
        version = tree.gist_version
    gister = FakeGister()
    with MegaContextTree.open(tmp_path / "t", gister, expect_model="fake/model", expect_tokenizer="tok123") as tree:
        assert gister.calls == [] and tree.gist_version == version  # same version: nothing recomputed
        assert (tree.block_size, tree.levels, tree.dim, tree.gist_dtype) == (K, L, DIM, "float16")
        assert_tree_equals(tree, tokens[:333], reference_gists(FakeGister(), tokens[:333], K, L, "float16"))
        tree.append(tokens[333:])
    with MegaContextTree.open(tmp_path / "t") as tree:  # read-only use needs no gister
        assert_tree_equals(tree, tokens, reference_gists(FakeGister(), tokens, K, L, "float16"))
        with pytest.raises(TreeError, match="without a gister"):
            tree.append([1, 2, 3])


def test_metadata_and_header_follow_the_documented_layout(tmp_path):
    K, L = 4, 2
    with make_disk(tmp_path / "t", FakeGister(), K, L, "bfloat16") as tree:
        tree.append(token_stream(7, 75))
    meta = json.loads((tmp_path / "t" / "metadata.json").read_text())
    assert meta["committed"] == {"LOD0": 75, "LOD1": 18, "LOD2": 4}
    assert (meta["block_size"], meta["levels"], meta["dim"], meta["gist_dtype"]) == (K, L, DIM, "bfloat16")
    assert meta["gist_version"] == FakeGister().version and meta["model_name"] == "fake/model"
    for level, (count, item) in enumerate([(75, 4), (18, 2 * DIM), (4, 2 * DIM)]):
        raw = (tmp_path / "t" / f"LOD{level}.ctx").read_bytes()
        assert len(raw) == HEADER_SIZE + count * item
        assert raw[:8] == MAGIC
        assert struct.unpack_from("<6I", raw, 8) == (2, level, L, K, DIM, 0)
        assert raw[32:40].rstrip(b"\0") == (b"uint32" if level == 0 else b"bfloat16")
        assert raw[40:296].rstrip(b"\0") == b"fake/model"
        assert raw[296:360].rstrip(b"\0") == (b"" if level == 0 else FakeGister().version.encode())
    tokens0 = np.frombuffer((tmp_path / "t" / "LOD0.ctx").read_bytes()[HEADER_SIZE:], dtype="<u4")
    np.testing.assert_array_equal(tokens0, token_stream(7, 75))


# ------------------------------------------------------------------ versions
def test_open_with_another_gister_recomputes_everything(tmp_path):
    K, L = 4, 2
    tokens = token_stream(8, 600)
    with make_disk(tmp_path / "t", FakeGister(seed=0), K, L) as tree:
        tree.append(tokens)
    new = FakeGister(seed=1)
    with MegaContextTree.open(tmp_path / "t", new, chunk_tokens=64) as tree:
        assert tree.gist_version == new.version != FakeGister(seed=0).version
        assert max(shape[0] for level, shape in new.calls if level == 1) <= 64 // K  # bounded chunks
        assert_tree_equals(tree, tokens, reference_gists(FakeGister(seed=1), tokens, K, L, "float16"))
        tree.append(tokens[:50])
    fresh = make_disk(tmp_path / "fresh", FakeGister(seed=1), K, L)
    fresh.append(np.concatenate([tokens, tokens[:50]]))
    with MegaContextTree.open(tmp_path / "t") as tree:
        assert tree.gist_version == new.version
        for got, want in zip(all_gists(tree), all_gists(fresh)):
            assert torch.equal(got, want)
    fresh.close()


def test_changed_gister_is_never_read_stale():
    K, L = 4, 2
    gister = FakeGister()
    tree = MegaContextTree.create_ram(K, L, DIM, gister)
    tokens = token_stream(9, 300)
    tree.append(tokens)
    old = tree.gist_range(1)
    gister.perturb()
    expected = reference_gists(gister, tokens, K, L)
    assert torch.equal(tree.gists(2, torch.arange(tree.num_nodes(2))), expected[1])
    assert tree.gist_version == gister.version
    assert not torch.equal(tree.gist_range(1), old)
    gister.perturb()
    tree.append(tokens[:10])  # appending also refreshes first: no mix of versions
    assert_tree_equals(tree, np.concatenate([tokens, tokens[:10]]),
                       reference_gists(gister, np.concatenate([tokens, tokens[:10]]), K, L))


@pytest.mark.parametrize("failing_replace, stale", [(2, True), (3, False)])
def test_interrupted_refresh_is_detected(tmp_path, monkeypatch, failing_replace, stale):
    """Crash between the swaps of a refresh: mixed gist files are stale; all swapped are adopted."""
    K, L = 4, 2
    tokens = token_stream(10, 500)
    with make_disk(tmp_path / "t", FakeGister(seed=0), K, L) as tree:
        tree.append(tokens)
    tree = MegaContextTree.open(tmp_path / "t", FakeGister(seed=0))
    real_replace, count = os.replace, []

    def crashing_replace(src, dst):
        count.append(dst)
        if len(count) == failing_replace:
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(OSError, match="simulated"):
        tree.refresh(FakeGister(seed=1))
    monkeypatch.undo()
    tree.close()
    new_ref = reference_gists(FakeGister(seed=1), tokens, K, L, "float16")
    with MegaContextTree.open(tmp_path / "t") as reopened:
        np.testing.assert_array_equal(reopened.tokens(), tokens.astype(np.uint32))
        if stale:
            assert reopened.gist_version == ""
            with pytest.raises(TreeError, match="refresh was interrupted"):
                reopened.gists(1, [0])
        else:
            assert reopened.gist_version == FakeGister(seed=1).version
            assert_tree_equals(reopened, tokens, new_ref)
    with MegaContextTree.open(tmp_path / "t", FakeGister(seed=1)) as reopened:
        assert_tree_equals(reopened, tokens, new_ref)


# ------------------------------------------------------------------ crash safety
def test_torn_append_past_the_commit_is_ignored(tmp_path):
    K, L = 4, 2
    tokens = token_stream(11, 400)
    with make_disk(tmp_path / "t", FakeGister(), K, L) as tree:
        tree.append(tokens[:201])
    sizes = {f.name: f.stat().st_size for f in (tmp_path / "t").iterdir() if f.name != "writer.lock"}
    for level in range(L + 1):  # a crash after writing data, before the commit
        with open(tmp_path / "t" / f"LOD{level}.ctx", "ab") as f:
            f.write(os.urandom(1000 + level))
    (tmp_path / "t" / "metadata.json.tmp").write_text('{"half": ')
    (tmp_path / "t" / "LOD1.ctx.refresh").write_bytes(b"junk")
    with MegaContextTree.open(tmp_path / "t", FakeGister()) as tree:
        assert {f.name: f.stat().st_size for f in (tmp_path / "t").iterdir() if f.name != "writer.lock"} == sizes
        assert_tree_equals(tree, tokens[:201], reference_gists(FakeGister(), tokens[:201], K, L, "float16"))
        tree.append(tokens[201:])
        assert_tree_equals(tree, tokens, reference_gists(FakeGister(), tokens, K, L, "float16"))


CHILD = """
import sys
sys.path.insert(0, {tests!r})
from test_tree import FakeGister, chunk_bounds, token_stream
from megacontext.tree import MegaContextTree
tokens = token_stream({seed}, {n})
tree = MegaContextTree.create_disk({path!r}, 4, 2, 8, FakeGister(), model_name="fake/model",
                                   tokenizer_hash="tok123", gist_dtype="float16")
for a, b in chunk_bounds({seed}, {n}, 300):
    tree.append(tokens[a:b])
print("finished", flush=True)
"""


def _committed_tokens(path: Path) -> int:
    try:
        return json.loads((path / "metadata.json").read_text())["committed"]["LOD0"]
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.parametrize("trial", [0, 1])
def test_sigkill_at_a_random_moment_leaves_a_consistent_prefix(tmp_path, trial):
    K, L, n, seed = 4, 2, 2_000_000, 100 + trial
    path = tmp_path / "tree"
    script = CHILD.format(tests=str(Path(__file__).parent), seed=seed, n=n, path=str(path))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while (seen := _committed_tokens(path)) < 64:
            if child.poll() is not None or time.monotonic() > deadline:
                child.kill()
                pytest.fail(f"the writer never committed: {child.communicate()[1].decode()[-2000:]}")
            time.sleep(0.01)
        time.sleep(float(np.random.default_rng(trial).uniform(0.0, 0.5)))
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate()
    assert child.returncode == -signal.SIGKILL  # killed mid-ingest, not finished

    tokens = token_stream(seed, n)
    appends_end = {b for _, b in chunk_bounds(seed, n, 300)}
    gister = FakeGister()
    with MegaContextTree.open(path, gister) as tree:
        got = tree.num_tokens
        assert got >= seen and got in appends_end  # everything seen committed survives, whole appends only
        assert [tree.num_nodes(k) for k in range(L + 1)] == [got // K**k for k in range(L + 1)]
        assert gister.calls == []  # nothing was recomputed on open
        assert_tree_equals(tree, tokens[:got], reference_gists(FakeGister(), tree.tokens(), K, L, "float16"))
        tree.append(tokens[got : got + 100])  # and the history goes on
        assert tree.num_tokens == got + 100


# ------------------------------------------------------------------ user mistakes
@pytest.mark.parametrize(
    "bad, message",
    [
        (np.array([1.5, 2.0]), "must be integers"),
        ([3, -1], r"\[0, 4294967295\]"),
        (np.array([2**32]), r"\[0, 4294967295\]"),
        (np.zeros((2, 3), dtype=np.int64), "1-D"),
        (["a", "b"], "must be integers"),
    ],
)
def test_bad_tokens_leave_the_tree_untouched(tmp_path, bad, message):
    with make_disk(tmp_path / "t", FakeGister()) as tree:
        tree.append(token_stream(12, 50))
        before = digest(tmp_path / "t")
        with pytest.raises(TreeError, match=message):
            tree.append(bad)
        assert tree.num_tokens == 50 and digest(tmp_path / "t") == before
        tree.append([])  # empty append: a no-op
        assert digest(tmp_path / "t") == before


def test_bad_reads_raise_tree_errors():
    tree = MegaContextTree.create_ram(4, 2, DIM, FakeGister())
    tree.append(token_stream(13, 70))
    with pytest.raises(TreeError, match="level must be"):
        tree.gists(0, [0])
    with pytest.raises(TreeError, match="level must be"):
        tree.num_nodes(3)
    with pytest.raises(TreeError, match="out of range"):
        tree.gists(2, [4])  # 70 // 16 = 4 complete LOD2 nodes: 0..3
    with pytest.raises(TreeError, match="outside the history"):
        tree.tokens(60, 71)
    with pytest.raises(TreeError, match="outside level"):
        tree.gist_range(1, 10, 18)
    assert tree.gists(1, np.array([], dtype=np.int64)).shape == (0, DIM)
    tree.close()
    with pytest.raises(TreeError, match="closed"):
        tree.tokens(0, 1)


def test_bad_creation_arguments():
    g = FakeGister()
    with pytest.raises(TreeError, match="block_size"):
        MegaContextTree.create_ram(1, 2, DIM, g)
    with pytest.raises(TreeError, match="levels"):
        MegaContextTree.create_ram(4, 0, DIM, g)
    with pytest.raises(TreeError, match="16-dim"):
        MegaContextTree.create_ram(4, 2, 16, g)
    g.version = ""
    with pytest.raises(TreeError, match="version"):
        MegaContextTree.create_ram(4, 2, DIM, g)


def test_create_refuses_existing_tree_and_foreign_folders(tmp_path):
    g = FakeGister()
    with make_disk(tmp_path / "t", g) as tree:
        tree.append(token_stream(14, 40))
    before = digest(tmp_path / "t")
    with pytest.raises(TreeError, match="already exists"):
        make_disk(tmp_path / "t", g)
    assert digest(tmp_path / "t") == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(TreeError, match="not empty"):
        make_disk(tmp_path / "other", g)
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]
    with pytest.raises(TreeError, match="gist_dtype"):
        make_disk(tmp_path / "new", g, dtype="int8")
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    make_disk(tmp_path / "empty", g).close()  # an existing empty folder is fine


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _set_meta(path: Path, **fields) -> None:
    """Edit metadata.json as a tree written before checksums would look (no checksum field)."""
    meta = json.loads((path / "metadata.json").read_text())
    meta.pop("checksum")
    meta.update(fields)
    (path / "metadata.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: _patch(p / "LOD1.ctx", 0, b"NOTATREE"), "bad magic"),
        (lambda p: _patch(p / "LOD0.ctx", 8, struct.pack("<I", 9)), "format version 9"),
        (lambda p: _set_meta(p, format_version=3), "format version 3; this megacontext reads versions 1 and 2"),
        (lambda p: _patch(p / "LOD2.ctx", 20, struct.pack("<I", 8)), "block_size=8"),
        (lambda p: _set_meta(p, dim=DIM * 2), "dim="),
        (lambda p: _set_meta(p, model_name="other/model"), "model_name="),
        (lambda p: _set_meta(p, committed={"LOD0": 64, "LOD1": 16, "LOD2": 3}), "do not follow"),
        (lambda p: _set_meta(p, committed={"LOD0": 640, "LOD1": 160, "LOD2": 40}), "damaged"),
        (lambda p: (p / "LOD2.ctx").unlink(), "missing"),
        (lambda p: (p / "metadata.json").write_text("{not json"), "cannot read"),
        (lambda p: (p / "metadata.json").unlink(), "not a MegaContext tree"),
    ],
)
def test_open_refuses_damaged_trees_without_touching_them(tmp_path, damage, message):
    path = tmp_path / "t"
    with make_disk(path, FakeGister()) as tree:
        tree.append(token_stream(15, 70))
    damage(path)
    before = digest(path)
    with pytest.raises(TreeError, match=message):
        MegaContextTree.open(path, FakeGister())
    assert digest(path) == before


def test_open_refuses_other_models_tokenizers_and_widths(tmp_path):
    path = tmp_path / "t"
    with make_disk(path, FakeGister()) as tree:
        tree.append(token_stream(16, 70))
    before = digest(path)
    with pytest.raises(TreeError, match="'fake/model', not 'mine/model'"):
        MegaContextTree.open(path, FakeGister(), expect_model="mine/model")
    with pytest.raises(TreeError, match="tokenizer 'tok123'"):
        MegaContextTree.open(path, FakeGister(), expect_tokenizer="other")
    with pytest.raises(TreeError, match="16-dim"):
        MegaContextTree.open(path, FakeGister(dim=16))
    with pytest.raises(TreeError, match="does not exist"):
        MegaContextTree.open(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(TreeError, match="is a file"):
        MegaContextTree.open(tmp_path / "file")
    assert digest(path) == before
    assert issubclass(TreeError, MegaContextError)
