"""Disk-tree memory vs history length (a script, not a test).

Ingests 100k and then 1M tokens into a fresh disk tree, each in its own fresh
subprocess, with a cheap mean-pooling gister, and prints for each: peak RSS
(resource.getrusage ru_maxrss), the RSS growth during ingest, tokens/s and bytes on
disk. The tree keeps no history in memory, so the 1M peak should be within 10% of the
100k peak; the script exits with status 1 when it is not.

Usage:  uv run python benchmarks/bench_tree_memory.py [--tokens 100000 1000000] [--dim 256]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from megacontext.tree import MegaContextTree

VOCAB = 32_000


class MeanGister:
    """Cheap stand-in for GistNet: a random embedding table and mean pooling."""

    def __init__(self, dim: int, seed: int = 0) -> None:
        self.dim = dim
        self.table = torch.randn(VOCAB, dim, generator=torch.Generator().manual_seed(seed))
        self.version = hashlib.sha256(f"mean-{dim}-{seed}".encode()).hexdigest()[:16]

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]

    def gist(self, level: int, children: torch.Tensor) -> torch.Tensor:
        return children.mean(dim=1)


def _rss_mib_now() -> float:
    """Current resident set size (Linux /proc; falls back to the peak elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * resource.getpagesize() / 2**20
    except OSError:
        return _peak_rss_mib()


def _peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def run_child(tokens: int, dim: int, chunk: int, gist_dtype: str) -> dict:
    """Ingest `tokens` random ids into a temporary disk tree; measurements as a dict."""
    torch.set_num_threads(1)
    gister = MeanGister(dim)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tree = MegaContextTree.create_disk(
            Path(tmp) / "tree", 32, 2, dim, gister, model_name="bench", tokenizer_hash="bench", gist_dtype=gist_dtype
        )
        rss_before = _rss_mib_now()
        t0 = time.perf_counter()
        for start in range(0, tokens, chunk):
            tree.append(rng.integers(0, VOCAB, size=min(chunk, tokens - start), dtype=np.int64))
        seconds = time.perf_counter() - t0
        assert tree.num_tokens == tokens and tree.num_nodes(2) == tokens // 1024
        result = {
            "tokens": tokens,
            "seconds": seconds,
            "tokens_per_s": tokens / seconds,
            "rss_before_mib": rss_before,
            "rss_after_mib": _rss_mib_now(),
            "peak_rss_mib": _peak_rss_mib(),
            "bytes_on_disk": tree.bytes_on_disk,
        }
        tree.close()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=256, help="gist width (the base's embedding width)")
    ap.add_argument("--chunk", type=int, default=4096, help="tokens per append call")
    ap.add_argument("--gist-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_child(args.tokens[0], args.dim, args.chunk, args.gist_dtype)))
        return 0

    rows = []
    for n in args.tokens:
        cmd = [sys.executable, __file__, "--child", "--tokens", str(n), "--dim", str(args.dim),
               "--chunk", str(args.chunk), "--gist-dtype", args.gist_dtype]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"disk tree, K=32, 2 levels, dim {args.dim}, {args.gist_dtype} gists, {args.chunk} tokens per append")
    print(f"{'tokens':>10} {'tok/s':>10} {'peak RSS MiB':>13} {'RSS growth MiB':>15} {'MiB on disk':>12}")
    for r in rows:
        growth = r["rss_after_mib"] - r["rss_before_mib"]
        print(f"{r['tokens']:>10,} {r['tokens_per_s']:>10,.0f} {r['peak_rss_mib']:>13.1f} "
              f"{growth:>15.1f} {r['bytes_on_disk'] / 2**20:>12.1f}")
    ratio = rows[-1]["peak_rss_mib"] / rows[0]["peak_rss_mib"]
    ok = ratio <= 1.10
    print(f"peak RSS ratio {rows[-1]['tokens']:,} / {rows[0]['tokens']:,} tokens = {ratio:.3f} "
          f"({'OK' if ok else 'FAIL'}: must be <= 1.10)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
