"""How many rivals do LensNet's labels give the needle, and can LensNet learn them? (a script, not a test; issue #11)

1. Labels: counterfactual labels (``label_step``, exploration as configured) of ``--train``
   passkey snapshots (training templates); prints how many expands besides the best one get a
   target above ``tau_expand`` (each is a rival of the needle for the allocator's ``n_diff``).
2. Fit: a fresh LensNet trained offline on those snapshots (``lens_step``, 4 sampled per step),
   then scored on ``--held-out`` new snapshots: per snapshot, the score of its best-target
   expand against the best score of any other expand. Separation on held-out snapshots says
   LensNet can learn the labels; compare it with what the online phases reach
   (``bench_focus_passkey.py``).

Usage:  uv run python benchmarks/bench_lens_fit.py [--train 32] [--held-out 8] [--steps 200] [--set k=v ...]
GistNet is untrained (``--checkpoint none`` semantics): only LensNet is in question.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from bench_focus_passkey import lens_update, task_mixture  # a sibling script (benchmarks/ is on sys.path)

from megacontext.config import derive_seed, load_config
from megacontext.data import TaskMixture, prepare_dataset
from megacontext.focus.lens import lens_scores
from megacontext.modules import Modules
from megacontext.training.labels import LensExample
from megacontext.training.loop import make_optimizer
from megacontext.training.phases import label_step, lens_examples


def labelled(mods: Modules, cfg, mix: TaskMixture, n: int, first_step: int, rng) -> list[LensExample]:
    out: list[LensExample] = []
    for b in range(-(-n // 8)):
        snaps, rows = label_step(mods, cfg, mix.batch(first_step + b, 8), rng, 1, b, on_policy=False, gist_version="fit")
        out += lens_examples(mods, cfg, snaps, rows)
    return out[:n]


def separation(mods: Modules, examples: list[LensExample]) -> list[tuple[float, float]]:
    """Per snapshot: (score of the best-target expand, best score of the other expands)."""
    with torch.no_grad():
        scores = lens_scores(mods.lensnet, [e.inputs for e in examples])
    out = []
    for s, e in zip(scores, examples):
        cand = torch.stack([s[g].mean() for g in e.groups])[e.candidate_expand]
        best = int(e.candidate_targets[e.candidate_expand].argmax())
        others = cand[torch.arange(len(cand)) != best]
        out.append((float(cand[best]), float(others.max()) if len(others) else float("nan")))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="default")
    p.add_argument("--train", type=int, default=32, help="labelled passkey snapshots to fit")
    p.add_argument("--held-out", type=int, default=8, help="new snapshots to score after the fit")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    cfg = load_config(args.config, ["train.tasks.passkey=1.0", *args.overrides])
    mods = Modules.load(cfg, "none", ablate="lensnet")
    t = cfg.train
    mix = task_mixture(mods, cfg, prepare_dataset(cfg, progress=False).documents("train"), "fit")
    rng = np.random.default_rng(derive_seed(cfg.seed, "fit-labels"))
    train = labelled(mods, cfg, mix, args.train, 0, rng)
    held = labelled(mods, cfg, mix, args.held_out, 10_000, rng)
    above = [int((e.candidate_targets[e.candidate_expand] > cfg.focus.tau_expand).sum()) - 1 for e in train]
    print(f"labels: {len(train)} snapshots; other expands above tau_expand per snapshot: {np.mean(above):.1f}")

    mods.set_trainable("lensnet")
    params = mods.parameters_of("lensnet")
    opt, sched = make_optimizer(params, args.lr, t.optim, args.steps)
    for step in range(args.steps):
        pick = np.random.default_rng(step).choice(len(train), min(4, len(train)), replace=False)
        out = lens_update(mods, cfg, params, opt, sched, [train[i] for i in pick])
        if step % 50 == 49 or step == args.steps - 1:
            sep = separation(mods, held)
            wins = sum(b > o for b, o in sep)
            print(f"step {step:4d}  loss {out.metrics['loss']:.3f}  held-out best/other: "
                  + " ".join(f"{b:+.2f}/{o:+.2f}" for b, o in sep) + f"  (best on top in {wins}/{len(sep)})",
                  flush=True)


if __name__ == "__main__":
    main()
