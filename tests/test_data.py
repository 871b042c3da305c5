"""Data pipeline: sources, splits, shards + manifest caching, sampler, passkeys."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from megacontext.config import load_config
from megacontext.data import (
    PreparedDataset,
    TaskMixture,
    WindowSampler,
    load_base_tokenizer,
    make_passkey,
    prepare_dataset,
)
from megacontext.data.passkey import ANSWER, NEEDLE, QUESTIONS, random_key
from megacontext.data.prepare import split_of
from megacontext.data.sources import parse_source, stdlib_root
from megacontext.data.tokenizer import tokenizer_hash
from megacontext.errors import DataError

# ----------------------------------------------------------------------------- helpers


def tiny_cfg(data_root: Path, *overrides: str):
    """Smoke settings with a tiny BPE, a derived dataset name and no val/test split."""
    sets = [
        f"paths.data_root={data_root}",
        "data.name=",
        "data.vocab_size=300",
        "data.val_fraction=0",
        "data.test_fraction=0",
    ]
    return load_config("smoke", sets + list(overrides), env={})


def make_tree(root: Path) -> Path:
    """A small corpus: nested .py files, one non-UTF-8 file, one empty file, one .txt."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "return", "def", "class", "self", "42", "\n"]
    for rel in ["a.py", "pkg/b.py", "pkg/deep/c.py", "pkg/deep/d.py"]:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"# {rel}\n" + " ".join(rng.choice(words, size=400)), encoding="utf-8")
    (root / "pkg" / "latin1.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))
    (root / "pkg" / "empty.py").write_text("", encoding="utf-8")
    (root / "notes.txt").write_text("not python", encoding="utf-8")
    return root


@pytest.fixture
def corpus(tmp_path) -> Path:
    return make_tree(tmp_path / "corpus")


# ----------------------------------------------------------------------- smoke dataset


def test_smoke_dataset_manifest_and_shards(smoke_data):
    m = smoke_data.manifest
    assert m["format_version"] == 1 and m["source"]["spec"] == "python-stdlib"
    assert m["tokenizer"]["kind"] == "bpe" and m["tokenizer"]["vocab_size"] == 512
    assert m["tokenizer"]["sha256"] == tokenizer_hash(smoke_data.tokenizer())
    for split, info in m["splits"].items():
        docs = smoke_data.documents(split)
        assert len(docs) == info["documents"] > 0
        assert sum(len(d) for d in docs) == info["tokens"]
        assert all(d.dtype == np.uint32 and d.max() < 512 for d in docs)
        for shard in info["shards"]:
            path = smoke_data.root / shard["file"]
            assert path.name.startswith("shard-") and path.parent.name == split
            assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
            assert path.stat().st_size == shard["bytes"]


def test_splits_are_disjoint_and_follow_content_hash(smoke_data, smoke_cfg):
    ids = {s: smoke_data.doc_ids(s) for s in ("train", "val", "test")}
    all_ids = [i for v in ids.values() for i in v]
    assert len(all_ids) == len(set(all_ids)), "a document is in two splits"
    root = stdlib_root()
    for split, names in ids.items():
        for doc_id in names:
            sha = hashlib.sha256((root / doc_id).read_bytes()).hexdigest()
            assert split_of(sha, smoke_cfg.data.val_fraction, smoke_cfg.data.test_fraction) == split


def test_stdlib_source_skips_test_suites(smoke_data):
    ids = smoke_data.doc_ids("train")
    assert ids == sorted(ids), "documents keep their sorted-path order"
    assert not any(part in ("test", "tests", "site-packages") for i in ids for part in i.split("/")[:-1])


def test_documents_decode_back_to_source_text(smoke_data):
    tok = smoke_data.tokenizer()
    doc_id = smoke_data.doc_ids("val")[0]
    text = (stdlib_root() / doc_id).read_text(encoding="utf-8")
    assert tok.decode(smoke_data.documents("val")[0].tolist()) == text


def test_split_fractions_match_config():
    rng = np.random.default_rng(0)
    shas = [hashlib.sha256(rng.bytes(16)).hexdigest() for _ in range(4000)]
    splits = [split_of(s, 0.1, 0.2) for s in shas]
    assert splits == [split_of(s, 0.1, 0.2) for s in shas]
    assert abs(splits.count("test") / 4000 - 0.2) < 0.03
    assert abs(splits.count("val") / 4000 - 0.1) < 0.03


def test_load_base_tokenizer_matches_dataset(smoke_cfg, smoke_data):
    assert tokenizer_hash(load_base_tokenizer(smoke_cfg)) == smoke_data.manifest["tokenizer"]["sha256"]


def test_load_base_tokenizer_errors(tmp_path):
    cfg = tiny_cfg(tmp_path)
    with pytest.raises(DataError, match="megacontext prepare"):
        load_base_tokenizer(cfg)
    cfg = tiny_cfg(tmp_path, f"base.name={tmp_path / 'no-such-model'}")
    with pytest.raises(DataError, match="cannot load the tokenizer"):
        load_base_tokenizer(cfg)


# ----------------------------------------------------------------------------- sources


def test_files_glob_recursive_with_non_utf8(tmp_path, corpus):
    cfg = tiny_cfg(tmp_path / "data")
    ds = prepare_dataset(cfg, source=f"files:{corpus}/**/*.py", progress=False)
    assert ds.status == "built"
    assert ds.doc_ids("train") == ["a.py", "pkg/b.py", "pkg/deep/c.py", "pkg/deep/d.py"]
    src = ds.manifest["source"]
    assert src["skipped_non_utf8"] == 1 and src["skipped_empty"] == 1
    assert ds.name.startswith("files-") and "bpe300" in ds.name
    assert (ds.root / "tokenizer" / "tokenizer.json").is_file()
    # non-recursive glob only sees the top level
    flat = prepare_dataset(cfg, source=f"files:{corpus}/*.py", progress=False)
    assert flat.doc_ids("train") == ["a.py"] and flat.root != ds.root


def test_max_documents_caps_in_sorted_order(tmp_path, corpus):
    cfg = tiny_cfg(tmp_path / "data", "data.max_documents=2")
    ds = prepare_dataset(cfg, source=f"files:{corpus}/**/*.py", progress=False)
    assert ds.doc_ids("train") == ["a.py", "pkg/b.py"]


def test_jsonl_source_with_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"body": f"document number {i} " * 50, "text": "wrong field"} for i in range(5)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    cfg = tiny_cfg(tmp_path / "data")
    ds = prepare_dataset(cfg, source=f"jsonl:{path}:body", progress=False)
    docs = ds.documents("train")
    assert len(docs) == 5
    assert ds.tokenizer().decode(docs[3].tolist()) == rows[3]["body"]
    with pytest.raises(DataError, match="'missing'"):
        prepare_dataset(cfg, source=f"jsonl:{path}:missing", progress=False)


def test_parse_source_specs():
    assert parse_source("jsonl:/x/y.jsonl") == ("jsonl", ["/x/y.jsonl", "text"])
    assert parse_source("jsonl:/x/y.jsonl:body") == ("jsonl", ["/x/y.jsonl", "body"])
    assert parse_source("hf:emozilla/pg19") == ("hf", ["emozilla/pg19", "train"])
    assert parse_source("hf:emozilla/pg19:test[:10]") == ("hf", ["emozilla/pg19", "test[:10]"])
    with pytest.raises(DataError, match="unknown data source"):
        parse_source("ftp:somewhere")


def test_hf_source_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    if "datasets" in sys.modules:  # the flags are read at import time
        monkeypatch.setattr(sys.modules["datasets"].config, "HF_HUB_OFFLINE", True, raising=False)
    cfg = tiny_cfg(tmp_path / "data")
    with pytest.raises(DataError, match="needs network"):
        prepare_dataset(cfg, source="hf:megacontext-tests/no-such-dataset", progress=False)


# ----------------------------------------------------------------- caching and integrity


def test_rerun_reuses_and_force_rebuilds(tmp_path, corpus, capsys):
    cfg = tiny_cfg(tmp_path / "data")
    spec = f"files:{corpus}/**/*.py"
    first = prepare_dataset(cfg, source=spec, progress=False)
    shard = first.root / first.manifest["splits"]["train"]["shards"][0]["file"]
    mtime = shard.stat().st_mtime_ns
    capsys.readouterr()
    t0 = time.perf_counter()
    again = prepare_dataset(cfg, source=spec, progress=False)
    assert time.perf_counter() - t0 < 5
    assert again.status == "reused" and "reused" in capsys.readouterr().err
    assert shard.stat().st_mtime_ns == mtime
    assert again.manifest == first.manifest

    force_cfg = tiny_cfg(tmp_path / "data", "data.force_rebuild=true")
    forced = prepare_dataset(force_cfg, source=spec, progress=False)
    assert forced.status == "rebuilt"
    assert [d.tolist() for d in forced.documents("train")] == [d.tolist() for d in first.documents("train")]


def test_changed_source_is_detected_and_rebuilt(tmp_path, corpus, capsys):
    """The manifest fingerprints the files a source reads (paths, sizes, mtimes): any change rebuilds."""
    cfg = tiny_cfg(tmp_path / "data")
    spec = f"files:{corpus}/**/*.py"
    first = prepare_dataset(cfg, source=spec, progress=False)
    assert first.manifest["source"]["fingerprint"]["files"] == 6  # every matched file, read or skipped
    capsys.readouterr()

    def again(expect: str) -> tuple:
        ds = prepare_dataset(cfg, source=spec, progress=False)
        err = capsys.readouterr().err
        assert ds.status == expect, err
        return ds, err

    again("reused")
    (corpus / "a.py").write_text("# rewritten\nvalue = 1\n", encoding="utf-8")
    ds, err = again("rebuilt")
    assert f"the source {spec} changed since {ds.name} was prepared" in err and "rebuilding" in err
    assert ds.tokenizer().decode(ds.documents("train")[0].tolist()) == "# rewritten\nvalue = 1\n"
    again("reused")
    st = (corpus / "pkg" / "b.py").stat()
    os.utime(corpus / "pkg" / "b.py", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same size, touched
    assert "same total size" in again("rebuilt")[1]
    (corpus / "pkg" / "new.py").write_text("x = 2\n", encoding="utf-8")
    assert "files 6 -> 7" in again("rebuilt")[1]

    manifest = json.loads((ds.root / "manifest.json").read_text())
    del manifest["source"]["fingerprint"], manifest["checksum"]  # prepared before fingerprints (and checksums)
    (ds.root / "manifest.json").write_text(json.dumps(manifest))
    (corpus / "pkg" / "new.py").write_text("x = 3\n", encoding="utf-8")
    again("reused")


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_shard_is_detected_and_rebuilt(tmp_path, corpus, capsys, damage):
    cfg = tiny_cfg(tmp_path / "data")
    spec = f"files:{corpus}/**/*.py"
    ds = prepare_dataset(cfg, source=spec, progress=False)
    original = [d.copy() for d in ds.documents("train")]
    info = ds.manifest["splits"]["train"]["shards"][0]
    path = ds.root / info["file"]
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[:-7]))
    else:
        path.unlink()

    with pytest.raises(DataError, match=info["file"].split("/")[-1] if damage != "delete" else "missing"):
        PreparedDataset.open(ds.root).documents("train")  # loading never yields corrupt tokens
    capsys.readouterr()
    rebuilt = prepare_dataset(cfg, source=spec, progress=False)
    err = capsys.readouterr().err
    assert rebuilt.status == "rebuilt"
    assert info["file"] in err and "rebuilding" in err
    assert [d.tolist() for d in rebuilt.documents("train")] == [d.tolist() for d in original]


def test_fixed_name_refuses_changed_settings(tmp_path, corpus):
    spec = f"files:{corpus}/**/*.py"
    named = ("data.name=mine", f"data.source={spec}")
    ds = prepare_dataset(tiny_cfg(tmp_path / "data", *named), progress=False)
    assert ds.root.name == "mine"
    with pytest.raises(DataError, match="max_documents"):
        prepare_dataset(tiny_cfg(tmp_path / "data", *named, "data.max_documents=1"), progress=False)
    force_cfg = tiny_cfg(tmp_path / "data", *named, "data.max_documents=1", "data.force_rebuild=1")
    forced = prepare_dataset(force_cfg, progress=False)
    assert forced.root.name == "mine" and forced.manifest["splits"]["train"]["documents"] == 1
    # another source under the same config gets its own derived folder
    other_spec = f"files:{corpus}/*.py"
    other = prepare_dataset(tiny_cfg(tmp_path / "data", *named), source=other_spec, progress=False)
    assert other.root.name != "mine"


def test_different_settings_never_collide(tmp_path, corpus):
    spec = f"files:{corpus}/**/*.py"
    a = prepare_dataset(tiny_cfg(tmp_path / "data"), source=spec, progress=False)
    b = prepare_dataset(tiny_cfg(tmp_path / "data", "data.vocab_size=320"), source=spec, progress=False)
    assert a.root != b.root and a.status == b.status == "built"


def test_given_tokenizer_is_used_and_recorded(tmp_path, corpus, smoke_data):
    tok = smoke_data.tokenizer()
    cfg = tiny_cfg(tmp_path / "data")
    ds = prepare_dataset(cfg, source=f"files:{corpus}/**/*.py", tokenizer=tok, progress=False)
    assert ds.manifest["tokenizer"]["kind"] == "given"
    assert ds.manifest["tokenizer"]["sha256"] == tokenizer_hash(tok)
    text = (corpus / "a.py").read_text(encoding="utf-8")
    assert ds.documents("train")[0].tolist() == tok.encode(text, add_special_tokens=False)


def test_cli_prepare_summary(smoke_cfg, smoke_data, capsys):
    from megacontext.cli import main

    rc = main(["prepare", "--config", "smoke", "--set", f"paths.data_root={smoke_cfg.paths.data_root}"])
    out = capsys.readouterr().out
    assert rc == 0
    assert str(smoke_data.root) in out and "reused" in out
    assert f"{smoke_data.manifest['splits']['train']['tokens']:,}" in out


# ----------------------------------------------------------------------------- sampler


def ramp_docs(lengths: list[int]) -> list[np.ndarray]:
    """Documents whose token at position p is 1000*doc + p (so windows are checkable)."""
    return [(1000 * i + np.arange(n)).astype(np.uint32) for i, n in enumerate(lengths)]


def test_sampler_windows_are_exact_slices():
    docs = ramp_docs([50, 400, 120, 260])
    s = WindowSampler(docs, horizon=16, history_min=64, history_max=100, seed=3)
    for w in s.batch(0, 64):
        d = docs[w.doc_index]
        assert w.history.dtype == np.int64 and w.horizon.dtype == np.int64
        assert 64 <= w.cursor <= len(d) - 16
        assert 64 <= len(w.history) <= 100
        assert w.horizon.tolist() == d[w.cursor : w.cursor + 16].tolist()
        assert w.history.tolist() == d[w.cursor - len(w.history) : w.cursor].tolist()
    assert 0 not in {w.doc_index for w in s.batch(1, 64)}, "a too-short document was sampled"


def test_sampler_is_deterministic_per_step():
    docs = ramp_docs([300, 500, 700])
    a = WindowSampler(docs, 8, 32, 64, seed=11)
    b = WindowSampler(docs, 8, 32, 64, seed=11)
    key = lambda ws: [(w.doc_index, w.cursor, len(w.history)) for w in ws]  # noqa: E731
    assert key(a.batch(5, 6)) == key(b.batch(5, 6))
    assert key(b.batch(4, 6)) != key(a.batch(5, 6))
    assert key(WindowSampler(docs, 8, 32, 64, seed=12).batch(5, 6)) != key(a.batch(5, 6))


def test_sampler_weights_documents_by_valid_cursors():
    docs = ramp_docs([100, 1000])  # 100-8-32+1=61 vs 961 valid cursors
    s = WindowSampler(docs, 8, 32, 32, seed=0)
    share = np.mean([w.doc_index for w in s.batch(0, 2000)])
    assert abs(share - 961 / (961 + 61)) < 0.03


def test_sampler_end_cursor():
    docs = ramp_docs([90, 300])
    s = WindowSampler(docs, horizon=10, history_min=40, history_max=200, cursor="end", seed=1)
    for w in s.batch(0, 20):
        d = docs[w.doc_index]
        assert w.cursor == len(d) - 10
        assert w.horizon.tolist() == d[-10:].tolist()


def test_sampler_too_short_documents():
    with pytest.raises(DataError, match=r"need .*= 72 tokens.*longest of 2 has 60"):
        WindowSampler(ramp_docs([60, 20]), horizon=8, history_min=64, history_max=64)


def test_sampler_on_smoke_data(smoke_cfg, smoke_data):
    t = smoke_cfg.train
    docs = smoke_data.documents("train")
    s = WindowSampler(docs, t.horizon, t.history_min, t.history_max, seed=smoke_cfg.seed)
    w = s.batch(0, 2)
    assert all(len(x.horizon) == t.horizon and len(x.history) >= t.history_min for x in w)


# ----------------------------------------------------------------------------- passkey


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_passkey_structure(smoke_data, depth):
    tok = smoke_data.tokenizer()
    filler = smoke_data.documents("train")
    rng = np.random.default_rng(int(depth * 100))
    ex = make_passkey(rng, tok, filler, total_tokens=400, depth=depth)
    assert len(ex.prompt) == 400 and ex.prompt.dtype == np.int64 and ex.answer.dtype == np.int64
    assert len(ex.key) == 5 and ex.key.isdigit()
    assert tok.decode(ex.answer.tolist()) == ANSWER.format(key=ex.key)
    needle = tok.encode(NEEDLE.format(key=ex.key), add_special_tokens=False)
    assert ex.prompt[ex.needle_pos : ex.needle_pos + len(needle)].tolist() == needle
    assert abs(ex.needle_pos / (400 - len(needle)) - depth) < 0.1
    # the prompt ends with a question, and question + answer tokenise exactly as the full text
    questions = {q: tok.encode(q, add_special_tokens=False) for q in QUESTIONS}
    ending = [q for q, ids in questions.items() if ex.prompt[-len(ids) :].tolist() == ids]
    assert len(ending) == 1
    full = tok.encode(ending[0] + ANSWER.format(key=ex.key), add_special_tokens=False)
    assert full == questions[ending[0]] + ex.answer.tolist()


def test_a_spread_moves_the_needle_through_every_block_phase_of_one_depth(smoke_data):
    tok, filler = smoke_data.tokenizer(), smoke_data.documents("train")
    fixed = {make_passkey(np.random.default_rng(i), tok, filler, 1000, 0.3).needle_pos for i in range(24)}
    assert len(fixed) <= 2  # without a spread one depth is (nearly) one position: one block phase
    spread = [make_passkey(np.random.default_rng(i), tok, filler, 1000, 0.3, spread=32) for i in range(24)]
    pos = np.array([ex.needle_pos for ex in spread])
    assert np.abs(pos - min(fixed)).max() <= 17 and len({p % 32 for p in pos}) > 8  # within half a block, many phases
    again = [make_passkey(np.random.default_rng(i), tok, filler, 1000, 0.3, spread=32).needle_pos for i in range(24)]
    assert again == pos.tolist()  # still seeded
    for ex in spread:
        needle = tok.encode(NEEDLE.format(key=ex.key), add_special_tokens=False)
        assert ex.prompt[ex.needle_pos : ex.needle_pos + len(needle)].tolist() == needle


def test_passkey_keys_vary_and_are_seeded(smoke_data):
    tok, filler = smoke_data.tokenizer(), smoke_data.documents("train")
    keys = [make_passkey(np.random.default_rng(i), tok, filler, 200, 0.5).key for i in range(6)]
    assert len(set(keys)) > 1
    assert keys == [make_passkey(np.random.default_rng(i), tok, filler, 200, 0.5).key for i in range(6)]


def _longest_run(key: str) -> int:
    return max(len(m.group(0)) for m in re.finditer(r"(.)\1*", key))


def test_run_keys_hold_digit_runs_and_leave_uniform_keys_alone():
    uniform = [random_key(np.random.default_rng(i)) for i in range(400)]
    assert uniform == [str(int(np.random.default_rng(i).integers(10_000, 100_000))) for i in range(400)]
    assert sum(_longest_run(k) >= 3 for k in uniform) < 40  # ~3% of uniform keys hold a run of 3
    runs = [random_key(np.random.default_rng(i), run_keys=1.0) for i in range(400)]
    assert all(len(k) == 5 and k.isdigit() and k[0] != "0" for k in runs)
    assert all(_longest_run(k) >= 3 for k in runs)
    assert {_longest_run(k) for k in runs} == {3, 4, 5}
    half = [random_key(np.random.default_rng(i), run_keys=0.5) for i in range(400)]
    assert 150 < sum(_longest_run(k) >= 3 for k in half) < 260


def test_passkey_errors(smoke_data):
    tok = smoke_data.tokenizer()
    with pytest.raises(DataError, match="too short"):
        make_passkey(np.random.default_rng(0), tok, smoke_data.documents("train"), 5, 0.5)
    with pytest.raises(DataError, match="filler"):
        make_passkey(np.random.default_rng(0), tok, [], 300, 0.5)


def test_training_tasks_are_deterministic_and_apart_from_evaluation(smoke_data):
    from megacontext.config import TaskConfig
    from megacontext.data.tasks import TRAIN_PASSKEY_TEMPLATES, multikey_window, passkey_window

    tok, filler = smoke_data.tokenizer(), smoke_data.documents("train")
    corpus = WindowSampler(filler, 32, 600, 700, "random", 1)
    mix = TaskMixture(corpus, filler, tok, TaskConfig(passkey=0.5, multikey=0.25, history_max=900, facts=3), 9)
    a, b = mix.batch(4, 16), mix.batch(4, 16)
    assert [w.task for w in a] == [w.task for w in b] and all((x.history == y.history).all() for x, y in zip(a, b))
    assert {w.task for w in a} == {"corpus", "passkey", "multikey"}
    for w in a:
        assert len(w.horizon) == 32 and 600 <= len(w.history) <= 900
    none = TaskMixture(corpus, filler, tok, TaskConfig(), 9).batch(4, 16)
    assert [w.history.tolist() for w in none] == [w.history.tolist() for w in corpus.batch(4, 16)]

    for seed in range(4):
        w = passkey_window(np.random.default_rng(seed), tok, filler, 500, 32)
        text = tok.decode(w.history.tolist())
        assert len(w.history) == 500 and NEEDLE.split("{")[0] not in text  # never the eval template
        assert any(t.needle.split("{")[0] in text for t in TRAIN_PASSKEY_TEMPLATES)
        answer = tok.decode(w.horizon.tolist())
        digits = "".join(ch for ch in answer.split("\n")[0] if ch.isdigit())
        assert len(digits) == 5 and digits in text
    w = multikey_window(np.random.default_rng(3), tok, filler, 600, 32, facts=4)
    text = tok.decode(w.history.tolist())
    assert text.count(" code: ") == 4 and len(w.history) == 600
    asked = text.rsplit("what is the ", 1)[1].split(" code")[0]
    key = text.split(f"# {asked} code: ", 1)[1][:5]
    assert tok.decode(w.horizon.tolist()).strip().startswith(key)


def test_eval_multikey_plants_the_asked_fact_at_its_depth_apart_from_training(smoke_data):
    from megacontext.data import EVAL_FACTS, make_multikey
    from megacontext.data.tasks import TRAIN_FACTS

    tok, filler = smoke_data.tokenizer(), smoke_data.documents("test")
    assert not set(EVAL_FACTS.names) & set(TRAIN_FACTS.names) and EVAL_FACTS.needle != TRAIN_FACTS.needle
    for depth in (0.0, 0.5, 1.0):
        a = make_multikey(np.random.default_rng(5), tok, filler, 800, 4, depth=depth)
        b = make_multikey(np.random.default_rng(5), tok, filler, 800, 4, depth=depth)
        assert (a.prompt == b.prompt).all() and a.key == b.key and len(a.prompt) == 800
        text = tok.decode(a.prompt.tolist())
        assert text.count(" id: ") == 4 and " code: " not in text
        asked = text.rsplit("which is the ", 1)[1].split(" id")[0]
        assert text.split(f"# {asked} id: ", 1)[1][:5] == a.key and tok.decode(a.answer.tolist()).strip() == a.key
        assert tok.decode(a.prompt[a.needle_pos : a.needle_pos + 12].tolist()).strip().startswith(f"# {asked} id:")
        assert abs(a.depth - depth) < 0.01
    with pytest.raises(DataError, match="facts"):
        make_multikey(np.random.default_rng(0), tok, filler, 800, 99)


def test_unreadable_manifest_is_rebuilt(tmp_path, corpus, capsys):
    cfg = tiny_cfg(tmp_path / "data")
    spec = f"files:{corpus}/**/*.py"
    ds = prepare_dataset(cfg, source=spec, progress=False)
    (ds.root / "manifest.json").write_text("{", encoding="utf-8")
    with pytest.raises(DataError, match="no valid prepared dataset"):
        PreparedDataset.open(ds.root)
    again = prepare_dataset(cfg, source=spec, progress=False)
    assert again.status == "rebuilt" and "unreadable" in capsys.readouterr().err
    assert PreparedDataset.open(ds.root).manifest["splits"] == ds.manifest["splits"]


def test_passkey_with_a_sentencepiece_style_tokenizer(smoke_data):
    """Metaspace (Llama-style) tokenizers: answer ids are still the exact continuation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [smoke_data.tokenizer().decode(d[:2000].tolist()) for d in smoke_data.documents("train")[:10]]
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>"])
    raw.train_from_iterator(texts + ["0123456789 \n#?:="], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    filler = [np.asarray(tok.encode(t), dtype=np.int64) for t in texts]
    ex = make_passkey(np.random.default_rng(5), tok, filler, 300, 0.3)
    assert len(ex.prompt) == 300 and tok.decode(ex.answer.tolist()).strip() == ex.key
    questions = [tok.encode(q, add_special_tokens=False) for q in QUESTIONS]
    q_ids = next(q for q in questions if ex.prompt[-len(q) :].tolist() == q)
    q_text = QUESTIONS[questions.index(q_ids)]
    full = tok.encode(q_text + ANSWER.format(key=ex.key), add_special_tokens=False)
    assert full == q_ids + ex.answer.tolist()
