"""Are gists worth the raw tokens they displace? Train GistNet and the LoRA on the initial
assembly and watch (a script, not a test; the fast proxy of issue #12).

Starts from a run's checkpoint (or untrained modules), then trains GistNet and the LoRA
adapter together — each with its own learning rate — on KL(reference || uniform_gists
window) over the horizon: the window the eval's ``uniform_gists`` reads (newest blocks raw,
every older block a gist), the reference the plain base on the newest
``max_context - H`` tokens. Every ``--eval-every`` steps it prints the gist-value row of
:func:`megacontext.eval.gists.gist_value_rows` on ``--windows`` test windows (paired):
what the displaced raw tokens are worth, what the gists win back, and what their content
is worth (another window's gists in their place).

Usage:  uv run python benchmarks/bench_gist_value.py [--config default] [--checkpoint RUN_DIR|none]
        [--steps 300] [--eval-every 150] [--windows 128] [--train gistnet,lora]
        [--lr-gist 1e-3] [--lr-lora 1e-4] [--batch 8] [--set ...]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from megacontext.config import derive_seed, load_config
from megacontext.data import WindowSampler, prepare_dataset
from megacontext.eval.evaluate import eval_history_tokens, select_windows
from megacontext.eval.gists import gist_value_rows
from megacontext.focus.horizon import horizon_logits, raw_prefix
from megacontext.focus.policies import FocusSettings, initial_context, reference_context
from megacontext.focus.source import build_source
from megacontext.modules import Modules, attach_lora
from megacontext.training.losses import kl_from_reference
from megacontext.working_context import assemble


def report(mods: Modules, settings: FocusSettings, windows, batch: int, tag: str) -> None:
    mods.set_trainable(None)
    r = gist_value_rows(mods, settings, windows, [settings.budget], batch)[0]
    print(f"[{tag}] recency@{r['budget']} {r['recency_at_budget']:.4f}  recency@{r['raw_tokens']} "
          f"{r['recency_at_raw']:.4f}  uniform_gists {r['uniform_gists']:.4f} | displaced "
          f"{r['displaced_value']:+.4f}±{r['displaced_se']:.4f}  won back {r['won_back']:+.4f}±{r['won_back_se']:.4f}"
          f"  margin {r['target_margin']:+.4f}±{r['target_margin_se']:.4f}  content "
          f"{r['content_value']:+.4f}±{r['content_value_se']:.4f} ({r['n_windows']} windows)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="default")
    ap.add_argument("--checkpoint", default="auto", help="a run or checkpoint folder, 'auto', or 'none'")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=150)
    ap.add_argument("--windows", type=int, default=128)
    ap.add_argument("--train", default="gistnet,lora", help="comma-separated owners: gistnet, lora")
    ap.add_argument("--lr-gist", type=float, default=1e-3)
    ap.add_argument("--lr-lora", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
    args = ap.parse_args()
    cfg = load_config(args.config, args.set)
    torch.set_num_threads(max(1, cfg.train.cpu_threads))
    mods = Modules.load(cfg, None if args.checkpoint == "none" else args.checkpoint)
    if mods.lora is None:
        torch.manual_seed(derive_seed(cfg.seed, "init"))
        mods.lora = attach_lora(mods.base, cfg.train.lora)
    settings = FocusSettings.from_config(cfg, greedy=True)
    H = cfg.train.horizon
    ds = prepare_dataset(cfg, progress=False)
    history = eval_history_tokens(cfg, [settings.budget])
    test = select_windows(ds.documents("test"), history, H, "random", args.windows, cfg.seed)
    sampler = WindowSampler(ds.documents("train"), H, cfg.train.history_min, cfg.train.history_max, "random",
                            derive_seed(cfg.seed, "bench-gist-value"))
    report(mods, settings, test, cfg.eval.batch_size, "start")
    owners = [o for o in args.train.split(",") if o]
    lrs = {"gistnet": args.lr_gist, "lora": args.lr_lora}
    groups = [{"params": mods.parameters_of(o), "lr": lrs[o]} for o in owners]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    losses, t0 = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        for o in ("gistnet", "lora"):
            for p in mods.parameters_of(o):
                p.requires_grad_(o in owners)
        mods.gistnet.train("gistnet" in owners)
        windows = sampler.batch(step, args.batch)
        horizons = np.stack([w.horizon for w in windows])
        with torch.no_grad(), mods.plain():
            refs = [raw_prefix(mods.base, reference_context(w.history, mods.base.max_context, H)) for w in windows]
            ref_logits = horizon_logits(mods.base, refs, horizons)
        prefixes = []
        for w in windows:
            source = build_source(mods.base, mods.gistnet, w.history, settings.shape)
            prefixes.append(assemble(initial_context(source.num_tokens, settings), source, cfg.focus.position_mode))
        loss = kl_from_reference(ref_logits, horizon_logits(mods.base, prefixes, horizons)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.train.optim.grad_clip)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0:
            print(f"step {step}: KL {np.mean(losses[-50:]):.4f} ({(time.perf_counter() - t0) / step:.2f} s/step)",
                  flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            report(mods, settings, test, cfg.eval.batch_size, f"step {step}")


if __name__ == "__main__":
    main()
