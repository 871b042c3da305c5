"""Generation and refocus speed (issue #14), on the embedded base and a SmolLM2-135M-shaped
Llama built here with random weights (no download). A script, not a test.

For each model, at the same window W (the focus budget):

- **generation**: tokens/s of ``Session.generate`` (what ``s.generate`` runs, minus the
  detokenisation) over a history of ``--history`` x W tokens, against plain transformers
  ``model.generate`` on the newest W tokens (greedy, the same number of new tokens, each
  token timed as it comes: from the session's iterator, from a generate streamer). "decode" counts the tokens after the first, so the
  prefill both make is left out; "call" is the whole call. Target: ratio >= 0.8.
- **refocus vs forward**: median ms of one refocus (assemble + LensNet + allocator, and the
  query gains of ``lensnet.query_likelihood``, computed anew as at every block boundary, against
  the block pairs' kept keys and values: ``focus.likelihood.PairCache``) against
  one base forward over the same full window. Target: ratio <= 0.10 on the 135M model.
- ``reused``: the share of the window the KV cache kept across the refocuses of the
  generation (the entries before the first one a refocus changed); **ingest**: tokens/s
  into a RAM tree and a disk tree, gists included.

Usage:  uv run python benchmarks/bench_generate.py [--models embedded smollm2-135m] [--quick]
        [--config default] [--checkpoint auto|none|RUN] [--json out.json]
The embedded base must be trained (``uv run megacontext pretrain-base``); ``--quick`` is a
CI-sized run (small W, few tokens). Memory vs history length: benchmarks/bench_tree_memory.py.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.streamers import BaseStreamer

from megacontext.config import Config, load_config
from megacontext.data.tokenizer import train_bpe
from megacontext.modules import Modules
from megacontext.runtime import Session, open_or_create_tree
from megacontext.tree import MegaContextTree

SMOLLM2_135M = {  # HuggingFaceTB/SmolLM2-135M's shape
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True, "max_position_embeddings": 2048,
}


@dataclass
class Row:
    """One model's numbers: medians over the generate calls, in ms and tokens/s; the
    generation ratios (megacontext / plain) are medians over back-to-back pairs of calls."""

    model: str
    device: str
    params_m: float
    W: int
    history_tokens: int
    new_tokens: int
    mc_tps: float
    hf_tps: float
    gen_ratio: float
    call_ratio: float
    refocus_ms: float
    forward_ms: float
    refocus_ratio: float
    refocuses: int
    reused: float
    ingest_ram_tps: float
    ingest_disk_tps: float


class _Clock(BaseStreamer):
    """Timestamps of the tokens ``model.generate`` emits (its first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        pass


def _rates(t0: float, times: list[float]) -> tuple[float, float]:
    """(decode tokens/s after the first token, tokens/s of the whole call) from per-token times."""
    decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    return decode, len(times) / (times[-1] - t0)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def smollm2_shaped_dir(root: Path) -> Path:
    """A SmolLM2-135M-shaped Llama with seeded random weights, saved with a small BPE tokenizer."""
    path = root / "smollm2-135m-random"
    tok = train_bpe(["def f(x):\n    return x + 1\n" * 20, "class A:\n    pass\n" * 20], vocab_size=300)
    torch.manual_seed(0)
    config = LlamaConfig(**SMOLLM2_135M, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _generate_mc(session: Session, prompt: np.ndarray, n: int) -> tuple[float, float, float]:
    """(decode tokens/s, call tokens/s, reused): ``reused`` is the mean share of the window the
    KV cache kept at the decode steps after a refocus changed it (those that fed the base
    more than the one new token; the first step, a fresh session's prefill, left out)."""
    t0 = time.perf_counter()
    tokens = session.stream(prompt, n)
    times, widths = [], []
    while True:
        widths.append(len(session.wc.entries))  # the window the next step reads
        if next(tokens, None) is None:
            break
        times.append(time.perf_counter())
    kept = [1 - fed / w for fed, w in zip(session.base_forward_entries[1:], widths[1:]) if fed > 1]
    return (*_rates(t0, times), statistics.mean(kept) if kept else float("nan"))


@torch.no_grad()
def _generate_hf(model: torch.nn.Module, ids: np.ndarray, n: int) -> tuple[float, float]:
    """(decode tokens/s, call tokens/s) of plain greedy ``model.generate`` on ``ids`` [T]."""
    x = torch.as_tensor(ids.astype(np.int64), device=model.device)[None]
    clock = _Clock()
    t0 = time.perf_counter()
    model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                   streamer=clock, pad_token_id=model.config.pad_token_id)
    return _rates(t0, clock.times)


@torch.no_grad()
def _ingest_tps(tree: MegaContextTree, ids: np.ndarray) -> float:
    """Tokens/s of appending ``ids`` [T] to ``tree``, gists included (a disk tree is closed after)."""
    t0 = time.perf_counter()
    tree.append(ids)
    if tree.path is not None:
        tree.close()
    return len(ids) / (time.perf_counter() - t0)


def bench_model(label: str, cfg: Config, checkpoint: str | None, args: argparse.Namespace) -> Row:
    modules = Modules.load(cfg, checkpoint)
    base, W = modules.base, cfg.focus.budget
    rng = np.random.default_rng(cfg.seed)
    history = rng.integers(0, base.vocab_size, size=args.history * W)
    tree = MegaContextTree.create_ram(cfg.tree.block_size, cfg.tree.levels, base.dim, modules.gister())
    ingest_ram = _ingest_tps(tree, history)
    with tempfile.TemporaryDirectory() as tmp:
        ingest_disk = _ingest_tps(open_or_create_tree(cfg, modules, Path(tmp) / "tree", create=True), history)

    session = Session(modules, tree, cfg.focus, seed=cfg.seed)
    window = session.assemble()

    def forward() -> None:
        with torch.no_grad():
            base.forward(window.embeds[None], window.position_ids[None])

    forward_ms = _median_ms(forward, args.repeats)

    def refocus() -> None:  # as at a block boundary: a new query, so the likelihood feature's gains are computed anew
        session.source._gains = None  # (against the block pairs' kept keys and values, as a session does)
        session.refocus()

    refocus_ms = _median_ms(refocus, args.repeats)

    mc, hf, refocuses = [], [], []
    for r in range(-1, args.generations):  # alternating, after a warm-up pair; a fresh session (empty KV cache) each
        s = Session(modules, tree, cfg.focus, seed=cfg.seed + r)
        n = args.new_tokens if r >= 0 else cfg.tree.block_size + 1
        mc.append(_generate_mc(s, rng.integers(0, base.vocab_size, size=8), n))
        refocuses.append(len(s.telemetry))
        with modules.plain():  # the base without LoRA adapters (a no-op without them)
            hf.append(_generate_hf(base.model, tree.tokens(tree.num_tokens - W, tree.num_tokens), n))
    del mc[0], hf[0], refocuses[0]
    ratio = [statistics.median(a[i] / b[i] for a, b in zip(mc, hf)) for i in (0, 1)]  # decode, call
    reused = [x[2] for x in mc if not math.isnan(x[2])]
    params = sum(p.numel() for p in base.model.parameters()) / 1e6
    return Row(label, str(base.device), params, W, len(history), args.new_tokens, statistics.median(x[0] for x in mc),
               statistics.median(x[0] for x in hf), *ratio, refocus_ms, forward_ms, refocus_ms / forward_ms, int(statistics.median(refocuses)),
               statistics.median(reused) if reused else math.nan, ingest_ram, ingest_disk)


def _configs(args: argparse.Namespace, tmp: Path) -> Iterator[tuple[str, Config, str | None]]:
    sets = [f"focus.budget={args.budget}"] if args.budget else []
    for name in args.models:
        if name == "embedded":
            yield "embedded", load_config(args.config, sets), None if args.checkpoint == "none" else args.checkpoint
        else:
            folder = smollm2_shaped_dir(tmp)
            over = [f"base.name={folder}", f"base.max_context={SMOLLM2_135M['max_position_embeddings']}"]
            yield "smollm2-135m (random)", load_config(args.config, over + sets), None


def print_table(rows: list[Row]) -> None:
    head = (f"{'model':<22} {'device':>6} {'params':>7} {'W':>5} {'tok/s mc':>9} {'tok/s hf':>9} {'ratio':>6} {'(call)':>6} "
            f"{'refocus ms':>10} {'fwd ms':>8} {'ratio':>6} {'reused':>6} {'ingest tok/s RAM/disk':>21}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.model:<22} {r.device:>6} {r.params_m:>6.1f}M {r.W:>5} {r.mc_tps:>9.1f} {r.hf_tps:>9.1f} {r.gen_ratio:>6.2f} "
              f"{r.call_ratio:>6.2f} {r.refocus_ms:>10.2f} {r.forward_ms:>8.2f} {r.refocus_ratio:>6.3f} "
              f"{r.reused:>6.2f} {r.ingest_ram_tps:>10,.0f}/{r.ingest_disk_tps:<10,.0f}")
    print("targets: generation ratio >= 0.8; refocus / forward <= 0.10 (135M model)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["embedded", "smollm2-135m"], choices=["embedded", "smollm2-135m"])
    ap.add_argument("--config", default="default")
    ap.add_argument("--checkpoint", default="auto", help="modules for the embedded base (auto, none, a run)")
    ap.add_argument("--budget", type=int, default=None, help="W (focus.budget); default: the config's")
    ap.add_argument("--history", type=int, default=8, help="history length in multiples of W")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens per generate call (4 blocks)")
    ap.add_argument("--generations", type=int, default=3, help="generate calls per side (median)")
    ap.add_argument("--repeats", type=int, default=10, help="timed refocuses and forwards (median)")
    ap.add_argument("--quick", action="store_true", help="CI-sized: W=128, history 4W, 64 new tokens, 1 call")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()
    if args.quick:
        args.budget, args.history, args.new_tokens, args.generations, args.repeats = 128, 4, 64, 1, 3

    print(f"torch threads {torch.get_num_threads()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, cfg, checkpoint in _configs(args, Path(tmp)):
            rows.append(bench_model(label, cfg, checkpoint, args))
    print_table(rows)
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))


if __name__ == "__main__":
    main()
