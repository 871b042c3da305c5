"""The public Python API (megacontext.api) on the smoke base: load, sessions, append, generate, window."""

from __future__ import annotations

import errno
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import megacontext.tree_storage
from megacontext import MegaContext, MegaSession, Window, inspect_tree
from megacontext.api import resolve_config
from megacontext.errors import ConfigError, MegaContextError, MegaContextWarning
from megacontext.lock import LockedError
from megacontext.runtime import SESSION_FILE


@pytest.fixture(scope="module")
def mc(smoke_cfg, smoke_base) -> MegaContext:
    return MegaContext.load(smoke_cfg, checkpoint=None)


@pytest.fixture(scope="module")
def history(smoke_data) -> np.ndarray:
    """1,500 tokens of smoke training text (more than the budget of 128: the window needs gists)."""
    return np.concatenate(smoke_data.documents("train"))[:1500].astype(np.int64)


def _check_window(w: Window, n: int) -> None:
    assert w.cost == len(w.entries) <= w.budget
    assert w.history_tokens == w.covered_tokens == n
    assert [s for s, _ in w.spans] == [0] + [e for _, e in w.spans[:-1]]  # contiguous, oldest first
    assert w.spans[-1][1] == n
    assert sum(w.entries_per_level.values()) == w.cost and w.levels == tuple(k for k, _ in w.entries)


# ------------------------------------------------------------------------- load
def test_import_is_cheap():
    code = "import sys, megacontext; megacontext.MegaContext; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_load_and_resolve_config(mc, smoke_cfg):
    assert mc.config is smoke_cfg and mc.checkpoint is None
    assert mc.modules.base.dim == 64 and "untrained" not in repr(mc)  # the repr names the base, not a dump
    assert mc.decode(mc.encode("def f(x):\n    return x\n")) == "def f(x):\n    return x\n"
    changed = resolve_config(smoke_cfg, ["focus.budget=256"])
    assert changed.focus.budget == 256 and smoke_cfg.focus.budget == 128  # a copy
    assert resolve_config("smoke", ["seed=3"]).seed == 3


@pytest.mark.parametrize(
    "kwargs, error, needle",
    [
        ({"config": "no-such-config"}, ConfigError, "config file not found: no-such-config"),
        ({"config": 3}, MegaContextError, "config must be a config name"),
        ({"config": "smoke", "overrides": "focus.budget=64"}, MegaContextError, "list of 'section.key=value'"),
        ({"config": "smoke", "overrides": ["focus.nope=1"]}, ConfigError, "unknown key 'focus.nope'"),
    ],
)
def test_bad_load_arguments_are_one_line_errors(kwargs, error, needle):
    with pytest.raises(error, match=needle) as e:
        MegaContext.load(**kwargs)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------- RAM sessions
def test_ram_session_appends_text_and_ids(mc, history, smoke_cfg):
    with mc.session() as s:
        assert isinstance(s, MegaSession) and s.path is None and s.num_tokens == 0
        assert s.window().cost == 0
        text = mc.decode(history[:100].tolist())
        n_text = s.append(text)
        assert n_text == len(mc.encode(text)) == s.num_tokens
        assert s.append(history[100:]) == 1400  # numpy ids
        assert s.append(torch.as_tensor(history[:10])) == 10 and s.append([]) == 0
        n = n_text + 1410
        w = s.window()
        _check_window(w, n)
        assert w.entries_per_level["1"] + w.entries_per_level["2"] > 0  # the history needs gists
        assert s.append(history[:200].tolist()) == 200  # the window is live: extended and refocused
        _check_window(s.window(), n + 200)
        assert s.window().refocuses == w.refocuses + 1
        info = s.tree_info()
        assert info.path is None and info.tokens == n + 200 and info.nodes_per_level["1"] == (n + 200) // 32
    assert s.closed
    with pytest.raises(MegaContextError, match="session is closed"):
        s.append([1, 2])


def test_a_long_append_to_a_live_window_equals_block_by_block_ingest(mc, history):
    """MegaSession.append (chunked tree appends, the window extended once) = runtime.Session.ingest (per block)."""
    with mc.session() as bulk, mc.session() as blocks:
        for s in (bulk, blocks):
            s.append(history[:300])
            s.window()
        bulk.append(history[300:])
        blocks.runtime.ingest(history[300:])
        a, b = bulk.window(), blocks.window()
        assert bulk.runtime.forced and len(bulk.runtime.forced) == len(blocks.runtime.forced)  # collapses on the way
        assert (a.entries, a.cost, a.refocuses) == (b.entries, b.cost, b.refocuses)


def test_generate_greedy_stream_and_stop(mc, history):
    def fresh() -> MegaSession:
        s = mc.session()
        s.append(history)
        return s

    with fresh() as a, fresh() as b, fresh() as c:
        text = a.generate("def main(", max_new_tokens=24)
        assert isinstance(text, str) and text
        assert a.num_tokens == 1500 + len(mc.encode("def main(")) + 24
        pieces = list(b.generate("def main(", max_new_tokens=24, stream=True))
        assert len(pieces) > 1 and "".join(pieces) == text  # greedy: deterministic, and the stream is the text
        _check_window(b.window(), b.num_tokens)
        stop = text[len(text) // 2 : len(text) // 2 + 2]
        cut = text[: text.find(stop)]
        assert c.generate("def main(", max_new_tokens=24, stop=stop) == cut
        assert c.num_tokens <= a.num_tokens
    with fresh() as d:
        assert "".join(d.generate("def main(", 24, stop=[stop, "\x00"], stream=True)) == cut
        assert d.generate("x", max_new_tokens=0) == ""
        sampled = d.generate("y", max_new_tokens=5, temperature=0.8)
        assert isinstance(sampled, str)


def test_decoded_pieces_join_to_the_text_and_stop_before_a_stop_string(mc):
    from megacontext.data.tokenizer import decode_pieces

    text = "héllo wörld ✓ — done; 日本語 ok"  # multi-byte characters split over byte-level tokens
    ids = mc.encode(text)
    assert len(ids) > len(text.split())
    pieces = list(decode_pieces(mc.tokenizer, iter(ids)))
    assert "".join(pieces) == mc.decode(ids) == text and all("\ufffd" not in p for p in pieces)
    for stop in ("wör", "日本", "ok", " — d"):
        assert "".join(decode_pieces(mc.tokenizer, iter(ids), (stop, "zzz"))) == text[: text.find(stop)]
    consumed = []
    list(decode_pieces(mc.tokenizer, (consumed.append(t) or t for t in ids), ("✓",)))
    assert len(consumed) < len(ids)  # the token stream is not read past the stop string


@pytest.mark.parametrize(
    "call, needle",
    [
        (lambda s: s.generate("x", max_new_tokens=-1), "max_new_tokens must be an integer >= 0, got -1"),
        (lambda s: s.generate("x", max_new_tokens=2.5), "max_new_tokens must be an integer"),
        (lambda s: s.generate("x", 2, temperature=-1.0), "temperature must be a finite number >= 0"),
        (lambda s: s.generate("x", 2, temperature=float("nan")), "temperature must be a finite number"),
        (lambda s: s.generate("x", 2, stop=""), "stop must be a non-empty string"),
        (lambda s: s.generate("x", 2, stop=[1]), "stop must be a non-empty string"),
        (lambda s: s.append([1, 2, 10**6]), "token id 1000000 at position 2 .* nothing was appended"),
        (lambda s: s.append([-1]), "token id -1 at position 0"),
        (lambda s: s.append([0.5, 1.5]), "1-D sequence of integer token ids"),
        (lambda s: s.append([[1, 2]]), "shape \\(1, 2\\)"),
        (lambda s: s.append(b"bytes"), "takes text \\(str\\) or a 1-D sequence"),
        (lambda s: s.append("\ud800"), "not valid UTF-8"),
        (lambda s: s.save(), "a RAM session has no folder"),
        # the levels grow, but no tiling of 163,871+ tokens fits 128 (3 full digits of 31 + the tail)
        (lambda s: s.append(np.arange(170_000) % 300), "needs a working-context budget of at least"),
    ],
)
def test_bad_input_is_refused_before_any_change(mc, history, call, needle):
    with mc.session() as s:
        s.append(history[:300])
        s.window()  # the window is live: appends are checked against the budget
        before = s.window()
        with pytest.raises(MegaContextError, match=needle) as e:
            call(s)
        assert "\n" not in str(e.value)
        assert s.num_tokens == 300 and s.window() == before


def test_bad_session_arguments(mc, tmp_path):
    with pytest.raises(MegaContextError, match="budget of 4096 is more than the base's context length"):
        mc.session(budget=4096)
    with pytest.raises(MegaContextError, match="budget must be an integer >= 96"):
        mc.session(budget=50)
    with pytest.raises(MegaContextError, match="no tree at"):
        mc.session(tmp_path / "missing", create=False)
    assert not (tmp_path / "missing").exists()
    with mc.session(budget=256) as s:
        assert s.budget == 256 and s.window().budget == 256
    wide = MegaContext(resolve_config(mc.config, ["focus.budget=1024"]), mc.modules)  # the config's budget: checked
    with wide.session() as s:  # when the window is first needed; appending needs none (as `ingest`)
        assert s.append([1, 2, 3]) == 3
        with pytest.raises(MegaContextError, match="budget of 1024 is more than the base's context length"):
            s.generate("x", 2)


# ------------------------------------------------------------------------- disk sessions
def test_disk_session_reopens_with_history_and_focus(mc, history, tmp_path):
    path = tmp_path / "tree"
    with mc.session(path) as s:
        s.append(history)
        s.generate("class A:", max_new_tokens=6)
        saved_window, n = s.window(), s.num_tokens
        with pytest.raises(LockedError, match="already open for writing in this process"):
            mc.session(path)
    assert s.closed and (path / SESSION_FILE).is_file()
    state = json.loads((path / SESSION_FILE).read_text())
    assert state["wc"]["num_tokens"] == n
    info = inspect_tree(path)
    assert info.tokens == n and info.path == path and info.bytes_on_disk > 4 * n

    s2 = mc.session(path)  # reopened: the same history, the saved window
    assert s2.num_tokens == n and s2.tree_info() == info
    w2 = s2.window()
    assert (w2.entries, w2.spans, w2.cost) == (saved_window.entries, saved_window.spans, saved_window.cost)
    s2.append(history[:100])
    s2.close()
    with mc.session(path, create=False) as s3:
        assert s3.num_tokens == n + 100
        _check_window(s3.window(), n + 100)


def test_context_manager_saves_on_success_and_releases_on_error(mc, history, tmp_path):
    path = tmp_path / "tree"
    with mc.session(path) as s:
        s.append(history[:600])  # the window was never built: nothing to save
    assert not (path / SESSION_FILE).exists()
    with pytest.raises(RuntimeError, match="boom"):
        with mc.session(path) as s:
            s.generate("x = ", max_new_tokens=2)
            raise RuntimeError("boom")
    assert s.closed and not (path / SESSION_FILE).exists()  # released without saving
    with mc.session(path) as s:  # the lock was released; the history kept every appended token
        assert s.num_tokens == 600 + len(mc.encode("x = ")) + 2
        s.window()
        s.save()
        assert (path / SESSION_FILE).exists()


def _held_back(mc: MegaContext, path) -> MegaSession:
    """A disk session holding generated tokens it has not committed yet (an unfinished block)."""
    s = mc.session(path)
    s.append(np.arange(600) % 300)
    s.generate("x = ", max_new_tokens=2)
    assert s.tree.committed_tokens == 600 < s.num_tokens
    return s


def test_a_full_disk_on_closing_is_one_clear_error_and_never_hides_the_first(mc, tmp_path, monkeypatch):
    def full_disk(path, text, *rest):  # every commit of the tree fails; session.json could still be written
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    a, b, c = (_held_back(mc, tmp_path / name) for name in "abc")
    monkeypatch.setattr(megacontext.tree_storage, "replace_file", full_disk)
    with pytest.raises(MegaContextError, match=rf"No space left on device .*keeps 600 of its {a.num_tokens} tokens"):
        a.close()  # a normal close whose final commit fails
    assert a.closed
    with pytest.warns(MegaContextWarning, match="keeps 600 of its"), pytest.raises(RuntimeError, match="boom"):
        with b:
            raise RuntimeError("boom")  # the error on its way out stays the one raised
    with pytest.raises(MegaContextError, match=r"No space left on device .*keeps 600 tokens \(0 of the \d+ new"):
        c.append(np.arange(50) % 300)  # a failing append says what the tree kept, not the close's failure
    monkeypatch.undo()
    for name in "abc":  # every tree was released and keeps its committed prefix
        with mc.session(tmp_path / name) as again:
            assert again.num_tokens == 600

