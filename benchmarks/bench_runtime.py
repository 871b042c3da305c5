"""Runtime benchmark on the embedded default base (a script, not a test).

Prints:
  (a) refocus time (assembly + LensNet + allocator) as a ratio to one base forward over
      the same W_max window (target <= 0.10);
  (b) ingest throughput in tokens/s, gists included (RAM tree and disk tree).

Usage:  uv run python benchmarks/bench_runtime.py [--config default] [--tokens 65536]
Needs the embedded base (`uv run megacontext pretrain-base`). Memory vs history length
is measured by benchmarks/bench_tree_memory.py.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from megacontext.config import load_config
from megacontext.modules import Modules
from megacontext.runtime import Session, open_or_create_tree
from megacontext.tree import MegaContextTree


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="default")
    ap.add_argument("--tokens", type=int, default=65536, help="history tokens to ingest")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--checkpoint", default="auto")
    args = ap.parse_args()

    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = load_config(args.config)
    modules = Modules.load(cfg, args.checkpoint)
    base, ckpt = modules.base, modules.checkpoint
    rng = np.random.default_rng(cfg.seed)
    ids = rng.integers(0, base.model.config.vocab_size, size=args.tokens)

    # (b) ingest throughput, gists included
    tree = MegaContextTree.create_ram(cfg.tree.block_size, cfg.tree.levels, base.dim, modules.gister())
    t0 = time.perf_counter()
    for i in range(0, len(ids), 4096):
        tree.append(ids[i : i + 4096])
    ram_tps = len(ids) / (time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        dtree = open_or_create_tree(cfg, modules, Path(tmp) / "t", create=True)
        t0 = time.perf_counter()
        for i in range(0, len(ids), 4096):
            dtree.append(ids[i : i + 4096])
        disk_tps = len(ids) / (time.perf_counter() - t0)
        dtree.close()

    # (a) refocus vs base forward on the same full W_max window
    session = Session(modules, tree, cfg.focus, seed=cfg.seed)
    window = session.assemble()
    W = window.embeds.shape[0]

    def forward() -> None:
        with torch.no_grad():
            base.forward(window.embeds[None], window.position_ids[None].to(base.device))

    def refocus() -> None:
        session.refocus()

    fwd_ms = _median_ms(forward, args.repeats)
    ref_ms = _median_ms(refocus, args.repeats)
    lens_ms = statistics.median(t.ms_lensnet for t in session.telemetry)
    alloc_ms = statistics.median(t.ms_allocator for t in session.telemetry)
    asm_ms = statistics.median(t.ms_assemble for t in session.telemetry)

    print(f"config {args.config}; modules: {ckpt or 'untrained'}; torch threads {torch.get_num_threads()}")
    print(f"window: W={W} entries, cost {session.wc.cost}/{cfg.focus.budget}, history {tree.num_tokens} tokens")
    print(f"(a) base forward over the window   {fwd_ms:8.2f} ms")
    print(f"    refocus (assemble+lens+alloc)   {ref_ms:8.2f} ms  "
          f"[assemble {asm_ms:.2f}, LensNet {lens_ms:.2f}, allocator {alloc_ms:.2f}]")
    print(f"    ratio refocus / forward         {ref_ms / fwd_ms:8.3f}   (target <= 0.10)")
    print(f"(b) ingest throughput (gists incl.) RAM {ram_tps:,.0f} tok/s, disk {disk_tps:,.0f} tok/s")


if __name__ == "__main__":
    main()
