"""Arrow IPC shards of tokenised documents: atomic writes, checksums, fast reads.

One shard = one Arrow IPC file with columns ``doc_id: string`` and ``tokens: list<uint32>``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from megacontext.durable import sha256_file
from megacontext.errors import DataError

SCHEMA = pa.schema([("doc_id", pa.string()), ("tokens", pa.list_(pa.uint32()))])


@dataclass
class ShardInfo:
    file: str  # path relative to the dataset root, e.g. "train/shard-00000.arrow"
    rows: int
    tokens: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict:
        return asdict(self)


def write_shard(root: Path, rel: str, doc_ids: list[str], docs: list[np.ndarray]) -> ShardInfo:
    """Write one shard atomically (temp file + rename) and describe it."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    if lengths.sum() >= 2**31:
        raise DataError(f"shard {rel} would exceed 2**31 tokens (Arrow list limit); lower data.shard_tokens")
    offsets = np.zeros(len(docs) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(docs).astype(np.uint32) if docs else np.zeros(0, np.uint32)
    tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.uint32()))
    table = pa.Table.from_arrays([pa.array(doc_ids, pa.string()), tokens], schema=SCHEMA)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
        writer.write_table(table)
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return ShardInfo(rel, len(docs), int(lengths.sum()), path.stat().st_size, sha256_file(path))


def check_shard(root: Path, info: dict, full: bool) -> str | None:
    """Why a shard does not match its manifest entry (None when it does).

    ``full`` verifies the sha256 checksum; otherwise only existence and size (cheap).
    """
    path = root / info["file"]
    if not path.is_file():
        return f"{info['file']} is missing"
    size = path.stat().st_size
    if size != info["bytes"]:
        return f"{info['file']} has {size} bytes, the manifest says {info['bytes']} (truncated or modified)"
    if full and sha256_file(path) != info["sha256"]:
        return f"{info['file']} fails its sha256 checksum (corrupted)"
    return None


def read_shard(root: Path, info: dict) -> tuple[list[str], list[np.ndarray]]:
    """(doc_ids, uint32 token arrays) of one shard, checked against its manifest entry.

    The bytes are hashed as they are read (no second pass), so a corrupted shard never
    reaches training.
    """
    path = root / info["file"]
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read shard {path}: {e}") from None
    if len(data) != info["bytes"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise DataError(
            f"shard {info['file']} does not match its manifest checksum (truncated or corrupted); "
            "run `megacontext prepare` again to rebuild it"
        )
    try:
        table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
    except pa.ArrowInvalid as e:
        raise DataError(f"cannot read shard {path}: {e}") from None
    tokens = table.column("tokens").combine_chunks()
    offsets = tokens.offsets.to_numpy().astype(np.int64)
    values = tokens.values.to_numpy()[offsets[0] : offsets[-1]]
    offsets -= offsets[0]
    if table.num_rows != info["rows"] or len(values) != info["tokens"]:
        raise DataError(
            f"shard {path} holds {table.num_rows} documents / {len(values)} tokens, the manifest "
            f"says {info['rows']} / {info['tokens']}; run `megacontext prepare --force`"
        )
    docs = [values[offsets[i] : offsets[i + 1]] for i in range(table.num_rows)]
    return table.column("doc_id").to_pylist(), docs


class ShardWriter:
    """Writes the documents of one split as shards of about ``shard_tokens`` tokens."""

    def __init__(self, root: Path, split: str, shard_tokens: int) -> None:
        self.root = root
        self.split = split
        self.shard_tokens = shard_tokens
        self.shards: list[ShardInfo] = []
        self._ids: list[str] = []
        self._docs: list[np.ndarray] = []
        self._buffered = 0

    def add(self, doc_id: str, tokens: np.ndarray) -> None:
        self._ids.append(doc_id)
        self._docs.append(tokens)
        self._buffered += len(tokens)
        if self._buffered >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self._ids:
            return
        rel = f"{self.split}/shard-{len(self.shards):05d}.arrow"
        self.shards.append(write_shard(self.root, rel, self._ids, self._docs))
        self._ids, self._docs, self._buffered = [], [], 0

    def summary(self) -> dict:
        """The manifest entry of this split (call after the last flush)."""
        return {
            "documents": sum(s.rows for s in self.shards),
            "tokens": sum(s.tokens for s in self.shards),
            "shards": [s.to_dict() for s in self.shards],
        }
