"""`prepare_dataset`: source -> split -> tokenizer -> Arrow shards + manifest (cached).

Layout under ``<data_root>/<dataset>/``::

    manifest.json                 written last; describes everything below
    tokenizer/                    PreTrainedTokenizerFast.save_pretrained
    train|val|test/shard-XXXXX.arrow

A re-run validates every shard's sha256 against the manifest and reuses them; a
missing, truncated or corrupted shard is reported by name and the dataset is rebuilt, as
is a manifest that fails its own checksum.
The manifest also records the source's fingerprint (files, sizes, modification times;
:func:`~megacontext.data.sources.source_fingerprint`): when the source no longer
matches it, the change is reported and the dataset is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from megacontext.config import Config
from megacontext.data.shards import ShardWriter, check_shard, read_shard
from megacontext.data.sources import Document, Source, parse_source, source_fingerprint, source_identity
from megacontext.data.tokenizer import encode_batch, load_hf_tokenizer, tokenizer_hash, train_bpe
from megacontext.durable import checksum_ok, sha256_file, with_checksum
from megacontext.errors import DataError

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
ENCODE_CHUNK = 64  # documents per encode_batch call


@dataclass
class TokenizerPlan:
    kind: str  # "bpe" (trained here) | "hf" (the base's own) | "given" (passed by the caller)
    name: str
    tokenizer: PreTrainedTokenizerBase | None  # None for "bpe" until trained
    sha256: str = ""  # "" for "bpe" until trained

    def identity(self, vocab_size: int) -> dict:
        """What the token ids depend on, known before any data is read."""
        if self.kind == "bpe":
            return {"kind": "bpe", "vocab_size": vocab_size}
        return {"kind": self.kind, "name": self.name, "sha256": self.sha256}


def _tokenizer_plan(cfg: Config, tokenizer: PreTrainedTokenizerBase | None) -> TokenizerPlan:
    if tokenizer is not None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        return TokenizerPlan("given", str(name), tokenizer, tokenizer_hash(tokenizer))
    if cfg.base.name != "embedded":
        tok = load_hf_tokenizer(cfg.base.name)
        return TokenizerPlan("hf", cfg.base.name, tok, tokenizer_hash(tok))
    return TokenizerPlan("bpe", f"bpe{cfg.data.vocab_size}", None)


def _settings(cfg: Config, spec: str, plan: TokenizerPlan) -> dict:
    """Every setting that changes the dataset's content or layout."""
    return {
        "format_version": FORMAT_VERSION,
        "source": spec,
        "source_identity": source_identity(spec),
        "max_documents": cfg.data.max_documents,
        "val_fraction": cfg.data.val_fraction,
        "test_fraction": cfg.data.test_fraction,
        "shard_tokens": cfg.data.shard_tokens,
        "tokenizer": plan.identity(cfg.data.vocab_size),
    }


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-.").lower()[:limit] or "x"


def _source_slug(spec: str) -> str:
    kind, args = parse_source(spec)
    if kind == "python-stdlib":
        return kind
    return f"{kind}-{_slug(Path(args[0]).stem if kind == 'jsonl' else args[0])}"


def _derive_name(spec: str, plan: TokenizerPlan, settings: dict) -> str:
    """``<source>-<tokenizer>-<hash of settings>``: different settings never collide."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return f"{_source_slug(spec)}-{_slug(plan.name.rsplit('/', 1)[-1], 24)}-{digest}"


def _dataset_name(cfg: Config, spec: str, plan: TokenizerPlan, settings: dict) -> str:
    """``data.name`` names the configured source + base tokenizer only; else a derived name."""
    if cfg.data.name and spec == cfg.data.source and plan.kind != "given":
        return cfg.data.name
    return _derive_name(spec, plan, settings)


def dataset_dir(cfg: Config, source: str | None = None) -> Path:
    """Where ``prepare_dataset(cfg, source)`` puts the dataset of the configured base."""
    spec = source or cfg.data.source
    plan = _tokenizer_plan(cfg, None)
    return cfg.data_root / _dataset_name(cfg, spec, plan, _settings(cfg, spec, plan))


def load_base_tokenizer(cfg: Config) -> PreTrainedTokenizerBase:
    """The tokenizer the configured base uses.

    HF base: its own tokenizer. Embedded base: the BPE saved with the prepared dataset
    (``megacontext prepare`` must have run for this config).
    """
    if cfg.base.name != "embedded":
        return load_hf_tokenizer(cfg.base.name)
    tok_dir = dataset_dir(cfg) / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        raise DataError(
            f"no tokenizer for the embedded base at {tok_dir}; run `megacontext prepare` "
            "with this config first"
        )
    return PreTrainedTokenizerFast.from_pretrained(str(tok_dir))


def split_of(content_sha256: str, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split from a document's content hash (uniform in [0, 1))."""
    u = int(content_sha256[:16], 16) / float(1 << 64)
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


@dataclass
class PreparedDataset:
    """A prepared dataset on disk. ``status``: "built" | "rebuilt" | "reused"."""

    name: str
    root: Path
    manifest: dict
    status: str = "reused"
    elapsed_s: float = 0.0
    _docs: dict[str, list[np.ndarray]] = field(default_factory=dict, repr=False)
    _tokenizer: PreTrainedTokenizerBase | None = field(default=None, repr=False)

    @classmethod
    def open(cls, root: str | os.PathLike) -> PreparedDataset:
        root = Path(root)
        manifest = _read_manifest(root / "manifest.json")
        if manifest is None:
            raise DataError(f"no valid prepared dataset at {root}; run `megacontext prepare`")
        return cls(manifest["name"], root, manifest)

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_dir))
        return self._tokenizer

    def num_tokens(self, split: str) -> int:
        return self._split(split)["tokens"]

    def documents(self, split: str) -> list[np.ndarray]:
        """uint32 token ids of every document in ``split``, each shard checksum-verified."""
        if split not in self._docs:
            self._docs[split] = [d for info in self._split(split)["shards"] for d in self._read(info)[1]]
        return self._docs[split]

    def doc_ids(self, split: str) -> list[str]:
        return [i for info in self._split(split)["shards"] for i in self._read(info)[0]]

    def _split(self, split: str) -> dict:
        if split not in self.manifest["splits"]:
            raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return self.manifest["splits"][split]

    def _read(self, info: dict) -> tuple[list[str], list[np.ndarray]]:
        problem = check_shard(self.root, info, full=False)
        if problem:
            raise DataError(f"dataset {self.name}: {problem}; run `megacontext prepare` again to rebuild it")
        return read_shard(self.root, info)


def _say(msg: str) -> None:
    print(f"[prepare] {msg}", file=sys.stderr, flush=True)


def _read_manifest(path: Path) -> dict | None:
    """The manifest, or None when it is unreadable, fails its checksum (damaged) or is from
    another format version."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    keys = {"format_version", "name", "settings", "source", "tokenizer", "splits"}
    ok = isinstance(manifest, dict) and keys <= manifest.keys() and checksum_ok(manifest)
    return manifest if ok and manifest["format_version"] == FORMAT_VERSION else None


def verify_dataset(root: Path, manifest: dict) -> list[str]:
    """Every problem with the shards and tokenizer of a dataset (full sha256 check)."""
    problems = [
        p
        for split in manifest["splits"].values()
        for info in split["shards"]
        if (p := check_shard(root, info, full=True))
    ]
    for fname, sha in manifest["tokenizer"]["files"].items():
        path = root / "tokenizer" / fname
        if not path.is_file() or sha256_file(path) != sha:
            problems.append(f"tokenizer/{fname} is missing or modified")
    return problems


def source_change(spec: str, manifest: dict) -> str | None:
    """How the source differs from the fingerprint in ``manifest`` (None: unchanged, or not known).

    Manifests written before fingerprints existed, and ``hf:`` sources, have none to compare.
    """
    before = manifest["source"].get("fingerprint")
    now = source_fingerprint(spec)
    if before is None or now is None or before == now:
        return None
    if (before["files"], before["bytes"]) == (now["files"], now["bytes"]):
        return f"{now['files']} files of the same total size, but renamed, rewritten or touched"
    return f"files {before['files']} -> {now['files']}, bytes {before['bytes']:,} -> {now['bytes']:,}"


def prepare_dataset(
    cfg: Config,
    source: str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    progress: bool = True,
) -> PreparedDataset:
    """Prepare (or validate and reuse) the dataset for ``source`` (default ``cfg.data.source``).

    ``tokenizer``: use this tokenizer instead of the configured base's (recorded by hash).
    """
    t0 = time.perf_counter()
    spec = source or cfg.data.source
    plan = _tokenizer_plan(cfg, tokenizer)
    settings = _settings(cfg, spec, plan)
    name = _dataset_name(cfg, spec, plan, settings)
    root = cfg.data_root / name
    manifest_path = root / "manifest.json"
    status = "built"
    if manifest_path.exists():
        manifest = _read_manifest(manifest_path)
        if manifest is not None and manifest["settings"] != settings and not cfg.data.force_rebuild:
            changed = sorted(k for k in settings if manifest["settings"].get(k) != settings[k])
            raise DataError(
                f"dataset {name!r} at {root} was prepared with different settings "
                f"({', '.join(changed)}); choose another data.name or rebuild it with --force"
            )
        if cfg.data.force_rebuild:
            _say(f"force rebuild of {name} requested")
            status = "rebuilt"
        elif manifest is None:
            _say(f"{manifest_path} is unreadable, damaged or from another format version; rebuilding {name}")
            status = "rebuilt"
        elif (change := source_change(spec, manifest)) is not None:
            _say(f"the source {spec} changed since {name} was prepared ({change}); rebuilding it")
            status = "rebuilt"
        else:
            problems = verify_dataset(root, manifest)
            if not problems:
                n = sum(len(s["shards"]) for s in manifest["splits"].values())
                _say(f"reused {name}: {n} shards verified against the manifest ({root})")
                return PreparedDataset(name, root, manifest, "reused", time.perf_counter() - t0)
            for p in problems:
                _say(f"invalid shard data: {p}")
            _say(f"rebuilding {name}")
            status = "rebuilt"
    manifest = _build(cfg, spec, plan, settings, name, root, progress)
    return PreparedDataset(name, root, manifest, status, time.perf_counter() - t0)


@dataclass
class _SplitStream:
    """(split, document) pairs of a source, exact duplicates dropped; re-iterable."""

    source: Source
    val_fraction: float
    test_fraction: float
    duplicates: int = 0

    def __iter__(self) -> Iterator[tuple[str, Document]]:
        seen: set[str] = set()
        self.duplicates = 0
        for doc in self.source:
            if doc.sha256 in seen:
                self.duplicates += 1
                continue
            seen.add(doc.sha256)
            yield split_of(doc.sha256, self.val_fraction, self.test_fraction), doc


def _clear_outputs(root: Path) -> None:
    """Remove what a previous build wrote (manifest first, so a crash never trusts a mix)."""
    (root / "manifest.json").unlink(missing_ok=True)
    for split in SPLITS:
        for p in (root / split).glob("*shard-*.arrow*"):
            p.unlink()
    shutil.rmtree(root / "tokenizer", ignore_errors=True)


def _save_tokenizer(tok: PreTrainedTokenizerBase, root: Path) -> dict[str, str]:
    """save_pretrained into ``root/tokenizer`` atomically; sha256 of each file written."""
    tmp = root / f".tokenizer.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(str(tmp))
    os.replace(tmp, root / "tokenizer")
    return {p.name: sha256_file(p) for p in sorted((root / "tokenizer").iterdir()) if p.is_file()}


def _build(
    cfg: Config, spec: str, plan: TokenizerPlan, settings: dict, name: str, root: Path, progress: bool
) -> dict:
    fingerprint = source_fingerprint(spec)  # before reading: a change during the build is seen next time
    source = Source(spec, cfg.data.max_documents)
    stream = _SplitStream(source, cfg.data.val_fraction, cfg.data.test_fraction)
    root.mkdir(parents=True, exist_ok=True)
    _clear_outputs(root)
    if plan.kind == "bpe":
        if progress:
            _say(f"training a byte-level BPE (vocab {cfg.data.vocab_size}) on the train split")
        plan.tokenizer = train_bpe((d.text for split, d in stream if split == "train"), cfg.data.vocab_size)
        plan.sha256 = tokenizer_hash(plan.tokenizer)
    tok = plan.tokenizer
    assert tok is not None
    tokenizer_files = _save_tokenizer(tok, root)

    writers = {s: ShardWriter(root, s, cfg.data.shard_tokens) for s in SPLITS}
    with tqdm(total=source.estimate(), desc=f"tokenizing {name}", unit="doc", disable=not progress) as bar:
        chunk: list[tuple[str, Document]] = []
        for item in stream:
            chunk.append(item)
            if len(chunk) == ENCODE_CHUNK:
                _encode_chunk(tok, chunk, writers)
                bar.update(len(chunk))
                chunk = []
        _encode_chunk(tok, chunk, writers)
        bar.update(len(chunk))
    for w in writers.values():
        w.flush()
    splits = {s: w.summary() for s, w in writers.items()}
    if not splits["train"]["documents"]:
        raise DataError(f"data source {spec!r} left no training documents after the split")

    manifest = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": settings,
        "source": {
            "spec": spec,
            "kind": source.kind,
            "identity": source.identity,
            "documents": source.stats.documents,
            "duplicates_dropped": stream.duplicates,
            "skipped_non_utf8": source.stats.skipped_non_utf8,
            "skipped_empty": source.stats.skipped_empty,
            "sha256": source.stats.sha256,
            "fingerprint": fingerprint,
        },
        "tokenizer": {
            "kind": plan.kind,
            "name": plan.name,
            "sha256": plan.sha256,
            "vocab_size": len(tok),
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            "files": tokenizer_files,
        },
        "splits": splits,
    }
    manifest = with_checksum(manifest)
    tmp = root / f".manifest.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, root / "manifest.json")
    return manifest


def _encode_chunk(
    tok: PreTrainedTokenizerBase, chunk: list[tuple[str, Document]], writers: dict[str, ShardWriter]
) -> None:
    """Tokenise a chunk of documents in one batch and hand each to its split's writer."""
    if not chunk:
        return
    for (split, doc), ids in zip(chunk, encode_batch(tok, [d.text for _, d in chunk])):
        writers[split].add(doc.doc_id, np.asarray(ids, dtype=np.uint32))
