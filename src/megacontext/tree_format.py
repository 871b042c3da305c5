"""The disk format of a MegaContext tree: its constants, ``metadata.json``'s fields and the
level-file header (``docs/storage-format.md``; the backends that write it: :mod:`megacontext.tree_storage`).

Format version 2 lets a tree grow levels: a level file's header records the tree's levels
when the file was written, so a grown tree's older files carry fewer than ``metadata.json``.
Version-1 trees (fixed levels) are read as they are; the next commit records version 2.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from megacontext.errors import TreeError

MAGIC = b"MEGACTX\x00"
FORMAT_VERSION = 2  # what this megacontext writes
READ_VERSIONS = (1, 2)  # what it reads
HEADER_SIZE = 512  # bytes before the first item of every level file
METADATA_FILE = "metadata.json"
FORMAT_NAME = "megacontext-tree"
GIST_DTYPES = ("float16", "bfloat16", "float32")
MODEL_NAME_BYTES = 256
VERSION_BYTES = 64
NUMPY_DTYPES = {"uint32": np.uint32, "float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}

# magic | format version | level | levels | block size | dim | reserved | dtype | model | gist version
_HEADER = struct.Struct("<8sIIIIII8s256s64s")
_READS = "this megacontext reads versions 1 and 2 (a newer megacontext wrote it: upgrade megacontext to open it)"


def check_shape_args(block_size: int, levels: int, dim: int) -> None:
    """TreeError unless block_size >= 2, levels >= 1 and dim >= 1 are ints (for new trees and metadata.json)."""
    for name, value, least in (("block_size", block_size, 2), ("levels", levels, 1), ("dim", dim, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise TreeError(f"{name} must be an integer >= {least}, got {value!r}")


# -------------------------------------------------------------------------- metadata
@dataclass(frozen=True)
class Meta:
    """Everything metadata.json records; `committed[k]` = items at level k (0 = tokens)."""

    block_size: int
    levels: int
    dim: int
    gist_dtype: str
    model_name: str
    tokenizer_hash: str
    gist_version: str
    committed: tuple[int, ...]

    def to_json(self) -> dict:
        fields = {k: v for k, v in asdict(self).items() if k != "committed"}  # in field order
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **fields,
                "committed": {f"LOD{k}": n for k, n in enumerate(self.committed)}}

    @classmethod
    def from_json(cls, data: object, where: Path) -> Meta:
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise TreeError(f"{where} is not MegaContext tree metadata")
        if data.get("format_version") not in READ_VERSIONS:
            raise TreeError(f"{where} has format version {data.get('format_version')!r}; {_READS}")
        fields = {"block_size": int, "levels": int, "dim": int, "gist_dtype": str, "model_name": str,
                  "tokenizer_hash": str, "gist_version": str, "committed": dict}
        for key, tp in fields.items():
            if not isinstance(data.get(key), tp) or isinstance(data.get(key), bool):
                raise TreeError(f"{where}: field {key!r} is missing or not a {tp.__name__}")
        if data["gist_dtype"] not in GIST_DTYPES:
            raise TreeError(f"{where}: unknown gist_dtype {data['gist_dtype']!r}")
        try:
            check_shape_args(data["block_size"], data["levels"], data["dim"])
        except TreeError as e:
            raise TreeError(f"{where}: {e}") from None
        committed = tuple(data["committed"].get(f"LOD{k}") for k in range(data["levels"] + 1))
        K, n = data["block_size"], committed[0]
        if not all(isinstance(c, int) and c >= 0 for c in committed) or any(
            c != n // K**k for k, c in enumerate(committed)
        ):
            raise TreeError(f"{where}: committed lengths {data['committed']} do not follow num_nodes(k) = tokens // {K}**k")
        return cls(K, data["levels"], data["dim"], data["gist_dtype"], data["model_name"],
                   data["tokenizer_hash"], data["gist_version"], committed)

    def level_dtype(self, level: int) -> str:
        return "uint32" if level == 0 else self.gist_dtype

    def item_bytes(self, level: int) -> int:
        return 4 if level == 0 else self.dim * np.dtype(NUMPY_DTYPES[self.gist_dtype]).itemsize

    def row_shape(self, level: int) -> tuple[int, ...]:
        return () if level == 0 else (self.dim,)


def _fixed(text: str, width: int) -> bytes:
    """UTF-8, cut to `width` bytes, NUL-padded (what a fixed-width header field holds)."""
    return text.encode("utf-8")[:width].ljust(width, b"\0")


@dataclass(frozen=True)
class Header:
    """The fixed 512-byte header of one level file (layout: docs/storage-format.md)."""

    level: int
    levels: int
    block_size: int
    dim: int
    dtype: str
    model_name: bytes  # fixed width, NUL-padded
    gist_version: str  # "" for LOD0

    @classmethod
    def for_level(cls, meta: Meta, level: int, gist_version: str) -> Header:
        return cls(level, meta.levels, meta.block_size, meta.dim, meta.level_dtype(level),
                   _fixed(meta.model_name, MODEL_NAME_BYTES), "" if level == 0 else gist_version)

    def pack(self) -> bytes:
        raw = _HEADER.pack(MAGIC, FORMAT_VERSION, self.level, self.levels, self.block_size, self.dim, 0,
                           _fixed(self.dtype, 8), self.model_name, _fixed(self.gist_version, VERSION_BYTES))
        return raw.ljust(HEADER_SIZE, b"\0")

    @classmethod
    def read(cls, file: Path) -> Header:
        if not file.is_file():
            raise TreeError(f"{file} is missing: the tree is damaged")
        with open(file, "rb") as f:
            raw = f.read(HEADER_SIZE)
        if len(raw) < HEADER_SIZE:
            raise TreeError(f"{file} is too short to hold a {HEADER_SIZE}-byte header: the tree is damaged")
        magic, version, level, levels, block, dim, _, dtype, model, gist_version = _HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise TreeError(f"{file} has a bad magic number: not a MegaContext level file")
        if version not in READ_VERSIONS:
            raise TreeError(f"{file} has format version {version}; {_READS}")
        return cls(level, levels, block, dim, dtype.rstrip(b"\0").decode("ascii", "replace"), model,
                   gist_version.rstrip(b"\0").decode("ascii", "replace"))

    def check(self, expected: Header, file: Path) -> None:
        """TreeError naming the first field where this header disagrees with metadata.json
        (``levels``, the tree's levels when the file was written, may be fewer, down to its own)."""
        for name in ("level", "levels", "block_size", "dim", "dtype", "model_name"):
            got, want = getattr(self, name), getattr(expected, name)
            if got != want and not (name == "levels" and max(self.level, 1) <= got < want):
                if isinstance(got, bytes):
                    got, want = (v.rstrip(b"\0").decode("utf-8", "replace") for v in (got, want))
                raise TreeError(f"{file} header says {name}={got!r} but metadata.json says {want!r}")


def level_file(folder: Path, level: int) -> Path:
    return folder / f"LOD{level}.ctx"
