"""Document sources: where raw text comes from.

A source spec is one string (``data.source`` or ``megacontext prepare --source``)::

    python-stdlib           the running interpreter's standard library (.py files; test
                            suites, idlelib, turtledemo and site-packages are skipped)
    files:GLOB              every file matching GLOB (``**`` recurses), sorted by path
    jsonl:PATH[:field]      one document per JSON line, text in ``field`` (default "text")
    hf:NAME[:split]         a Hugging Face dataset (``text`` column; needs network or a cache)

Every source yields documents in a deterministic order; files that are not valid UTF-8
are skipped and counted. :func:`source_fingerprint` summarises what a local source would
read now (paths, sizes, modification times) without reading it, so a prepared dataset
can tell that its source changed.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from megacontext.errors import DataError

# Folder names skipped inside the standard library (test suites and GUI demos).
STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo", "__pycache__"}
)


@dataclass(frozen=True)
class Document:
    doc_id: str  # stable id: a path relative to the source root, or "<file>:<line>"
    text: str

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def parse_source(spec: str) -> tuple[str, list[str]]:
    """Split a spec into (kind, arguments); raise DataError for an unknown kind."""
    if spec == "python-stdlib":
        return "python-stdlib", []
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in ("files", "jsonl", "hf") or not rest:
        raise DataError(
            f"unknown data source {spec!r}: expected python-stdlib, files:GLOB, "
            "jsonl:PATH[:field] or hf:NAME[:split]"
        )
    if kind == "files":
        return kind, [rest]
    if kind == "jsonl":
        head, sep, tail = rest.rpartition(":")
        if sep and head and re.fullmatch(r"[\w.\-]+", tail) and not Path(rest).exists():
            return kind, [head, tail]
        return kind, [rest, "text"]
    name, _, split = rest.partition(":")  # hub names never contain ':'; splits may
    return kind, [name, split or "train"]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_identity(spec: str) -> str:
    """What a source's content depends on besides the spec (resolved paths, Python version)."""
    kind, args = parse_source(spec)
    if kind == "python-stdlib":
        return f"python-stdlib {sys.version_info[0]}.{sys.version_info[1]} {stdlib_root()}"
    if kind == "files":
        return f"files {Path(args[0]).expanduser().resolve()}"
    if kind == "jsonl":
        return f"jsonl {Path(args[0]).expanduser().resolve()} field={args[1]}"
    return f"hf {args[0]} split={args[1]}"


def _stdlib_paths(root: Path) -> list[Path]:
    return [p for p in sorted(root.rglob("*.py")) if not STDLIB_SKIP_DIRS & set(p.relative_to(root).parts[:-1])]


def _glob_paths(pattern: str) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(str(Path(pattern).expanduser()), recursive=True) if Path(p).is_file())


def source_fingerprint(spec: str) -> dict | None:
    """``{"files", "bytes", "sha256"}`` over (path, size, mtime_ns) of every file a local
    source reads; None for ``hf:`` sources (the hub versions those). Stats only, no reads."""
    kind, args = parse_source(spec)
    if kind == "hf":
        return None
    if kind == "python-stdlib":
        paths = _stdlib_paths(stdlib_root())
    elif kind == "files":
        paths = _glob_paths(args[0])
    else:
        paths = [Path(args[0]).expanduser()] if Path(args[0]).expanduser().is_file() else []
    h, total = hashlib.sha256(), 0
    for p in paths:
        st = p.stat()
        total += st.st_size
        h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"files": len(paths), "bytes": total, "sha256": h.hexdigest()}


@dataclass
class SourceStats:
    """What one full pass over a source yielded and skipped."""

    documents: int = 0
    skipped_non_utf8: int = 0
    skipped_empty: int = 0
    digest: Any = field(default_factory=hashlib.sha256, repr=False)  # running sha256

    def add(self, doc: Document) -> None:
        self.documents += 1
        self.digest.update(f"{doc.doc_id}\0{doc.sha256}\n".encode())

    @property
    def sha256(self) -> str:
        """Aggregate hash over (doc_id, content sha256) of every document, in order."""
        return self.digest.hexdigest()


class Source:
    """A deterministic, re-iterable stream of documents (never all held in memory).

    Each complete pass refreshes :attr:`stats`; ``max_documents`` > 0 caps the documents
    yielded (non-UTF-8 and empty ones are skipped and do not count).
    """

    def __init__(self, spec: str, max_documents: int = 0) -> None:
        self.spec = spec
        self.kind, self.args = parse_source(spec)
        self.identity = source_identity(spec)
        self.max_documents = max_documents
        self.stats = SourceStats()
        self._paths: list[Path] = []
        self._root = Path()
        self._hf = None
        if self.kind == "python-stdlib":
            self._root = stdlib_root()
            self._paths = _stdlib_paths(self._root)
        elif self.kind == "files":
            pattern = str(Path(self.args[0]).expanduser())
            self._paths = _glob_paths(self.args[0])
            if not self._paths:
                raise DataError(f"files:{self.args[0]} matches no files")
            root = Path(pattern.split("*", 1)[0]).resolve()
            self._root = root if root.is_dir() else root.parent
        elif self.kind == "jsonl" and not Path(self.args[0]).expanduser().is_file():
            raise DataError(f"jsonl source: no such file {self.args[0]}")
        elif self.kind == "hf":
            self._hf = _load_hf(*self.args)

    def estimate(self) -> int | None:
        """Documents a pass will yield at most (None when unknown before reading)."""
        n = len(self._paths) if self._paths else len(self._hf) if self._hf is not None else None
        return min(n, self.max_documents) if n is not None and self.max_documents else n

    def __iter__(self) -> Iterator[Document]:
        raw = {
            "python-stdlib": self._iter_paths,
            "files": self._iter_paths,
            "jsonl": self._iter_jsonl,
            "hf": self._iter_hf,
        }[self.kind]
        stats = SourceStats()
        for doc in raw(stats):
            if not doc.text.strip():
                stats.skipped_empty += 1
                continue
            stats.add(doc)
            yield doc
            if self.max_documents and stats.documents >= self.max_documents:
                break
        if not stats.documents:
            raise DataError(f"data source {self.spec!r} yielded no usable documents")
        self.stats = stats

    def _iter_paths(self, stats: SourceStats) -> Iterator[Document]:
        for p in self._paths:
            try:
                text = p.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                stats.skipped_non_utf8 += 1
                continue
            except OSError as e:
                raise DataError(f"cannot read {p}: {e}") from None
            try:
                doc_id = p.resolve().relative_to(self._root.resolve()).as_posix()
            except ValueError:
                doc_id = p.as_posix()
            yield Document(doc_id, text)

    def _iter_jsonl(self, stats: SourceStats) -> Iterator[Document]:
        path, key = Path(self.args[0]).expanduser(), self.args[1]
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    stats.skipped_non_utf8 += 1
                    continue
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict) or key not in record:
                    raise DataError(f"{path}:{lineno}: no field {key!r} (use jsonl:PATH:FIELD)")
                if not isinstance(record[key], str):
                    raise DataError(f"{path}:{lineno}: field {key!r} is not a string")
                yield Document(f"{path.name}:{lineno}", record[key])

    def _iter_hf(self, stats: SourceStats) -> Iterator[Document]:
        name, split = self.args
        index = 0
        for batch in self._hf.iter(batch_size=256):
            for text in batch["text"]:
                yield Document(f"{name}/{split}/{index}", text or "")
                index += 1


def _load_hf(name: str, split: str):
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - hub, network and cache errors have many types
        raise DataError(
            f"cannot load Hugging Face dataset {name!r} (split {split!r}): it needs network "
            f"access or a local copy in the datasets cache ({type(e).__name__}: {e})"
        ) from None
    if "text" not in ds.column_names:
        raise DataError(f"hf:{name} has no 'text' column (columns: {', '.join(ds.column_names)})")
    return ds.select_columns(["text"])
