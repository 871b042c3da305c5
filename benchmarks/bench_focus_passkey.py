"""LensNet on its own: train it on counterfactual labels of task + corpus windows, then
measure passkey retrieval per policy (a script, not a test; the fast proxy of issue #11).

Starts from a run's checkpoint (GistNet, LoRA and LensNet as trained there), then runs
``--steps`` LensNet steps the way the LensNet phases do (label_step -> lens_examples ->
lens_step; windows from ``data.tasks.TaskMixture``), and prints the passkey exact-match
accuracy of every gist policy on the evaluation template (``eval.passkey_*`` settings,
overridable), before and after, with the per-cell trial counts.

Usage:  uv run python benchmarks/bench_focus_passkey.py [--config default] [--checkpoint RUN_DIR|none]
        [--steps 60] [--set train.tasks.passkey=0.6 --set train.lens.listwise_weight=1 ...]
        [--lengths 4096] [--trials 8]
With ``--checkpoint none`` GistNet is untrained (its initialisation is scale-matched mean
pooling) and LensNet learns from scratch: the question is then only whether LensNet finds
the needle.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from megacontext.config import derive_seed, load_config
from megacontext.data import TaskMixture, WindowSampler, prepare_dataset
from megacontext.eval.passkey import passkey_grid
from megacontext.focus.policies import FocusSettings
from megacontext.modules import Modules
from megacontext.training.loop import make_optimizer
from megacontext.training.phases import StepOutput, label_step, lens_examples, lens_step


def grid(mods: Modules, cfg, policies: list[str]) -> dict[tuple[int, float, str], float]:
    settings = FocusSettings.from_config(cfg, greedy=True)
    filler = prepare_dataset(cfg, progress=False).documents("test")
    rows = passkey_grid(mods, settings, cfg.eval, filler, [cfg.focus.budget], policies, cfg.seed)
    return {(r["history_tokens"], r["depth"], r["policy"]): r["accuracy"] for r in rows}


def task_mixture(mods: Modules, cfg, docs, name: str) -> TaskMixture:
    """The LensNet phases' training windows (corpus windows of ``docs`` mixed with ``train.tasks``), seeded by ``name``."""
    t = cfg.train
    corpus = WindowSampler(docs, t.horizon, t.history_min, t.history_max, "random", derive_seed(cfg.seed, name))
    return TaskMixture(corpus, docs, mods.base.tokenizer, t.tasks, derive_seed(cfg.seed, name))


def lens_update(mods: Modules, cfg, params, opt, sched, examples) -> StepOutput:
    """One LensNet step on labelled examples, taken as the LensNet phases take it (one process)."""
    opt.zero_grad(set_to_none=True)
    out = lens_step(mods, cfg, examples)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(params, cfg.train.optim.grad_clip)
    opt.step()
    sched.step()
    return out


def show(title: str, acc: dict, policies: list[str]) -> None:
    print(title)
    cells = sorted({(n, d) for n, d, _ in acc})
    print(f"{'history':>8} {'depth':>6} " + " ".join(f"{p:>16}" for p in policies))
    for n, d in cells:
        print(f"{n:>8} {d:>6.2f} " + " ".join(f"{acc[(n, d, p)]:>16.3f}" for p in policies))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="default")
    ap.add_argument("--checkpoint", default="none", help="a run or checkpoint folder, latest, or none")
    ap.add_argument("--steps", type=int, default=60, help="LensNet steps")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lengths", default="4096")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--fresh-lensnet", action="store_true", help="start LensNet from its initialisation")
    args = ap.parse_args()

    torch.set_num_threads(1)
    cfg = load_config(args.config, [
        f"eval.passkey_lengths=[{args.lengths}]", f"eval.passkey_depths=[{args.depths}]",
        f"eval.passkey_trials={args.trials}", *args.overrides])
    mods = Modules.load(cfg, args.checkpoint, ablate="lensnet" if args.fresh_lensnet else None)
    policies = ["uniform_gists", "likelihood_focus", "megacontext"]
    t0 = time.perf_counter()
    show(f"before ({mods.checkpoint})", grid(mods, cfg, policies), policies)
    print(f"[grid {time.perf_counter() - t0:.0f}s]")

    t = cfg.train
    mix = task_mixture(mods, cfg, prepare_dataset(cfg, progress=False).documents("train"), "bench")
    mods.set_trainable("lensnet")
    params = mods.parameters_of("lensnet")
    opt, sched = make_optimizer(params, args.lr, t.optim, args.steps)
    t0 = time.perf_counter()
    examples = []
    for step in range(args.steps):
        if step % t.labels.reuse == 0:
            rng = np.random.default_rng(derive_seed(cfg.seed, "bench-labels", step))
            mods.set_trainable(None)
            windows = mix.batch(step, t.labels.snapshots)
            snaps, rows = label_step(mods, cfg, windows, rng, 1, step, on_policy=step > 0, gist_version="bench")
            examples = lens_examples(mods, cfg, snaps, rows)
            mods.set_trainable("lensnet")
            tasks = [w.task for w in windows]
        out = lens_update(mods, cfg, params, opt, sched, examples)
        if step % 10 == 0 or step == args.steps - 1:
            m = out.metrics
            print(f"step {step:4d}  loss {m['loss']:.4f}  regression {m['regression']:.4f}  "
                  f"sign_agreement {m['sign_agreement']:.3f}  tasks {tasks}  [{time.perf_counter() - t0:.0f}s]",
                  flush=True)
    mods.set_trainable(None)
    show("after", grid(mods, cfg, policies), policies)


if __name__ == "__main__":
    main()
