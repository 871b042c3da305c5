"""LensNet on its own: train it on counterfactual labels of task + corpus windows, then
measure passkey retrieval per policy (a script, not a test; the fast proxy of issue #11).

Starts from a run's checkpoint (GistNet, LoRA and LensNet as trained there), then runs
``--steps`` LensNet steps the way the LensNet phases do (label_step -> lens_examples ->
lens_step; windows from ``data.tasks.TaskMixture``), and prints the passkey exact-match
accuracy of every gist policy on the evaluation template (``eval.passkey_*`` settings,
overridable), before and after, with the per-cell trial counts. Every policy, ``megacontext``
included, runs the grid's one protocol (the runtime's ``megacontext_session`` row is left out).

Usage:  uv run python benchmarks/bench_focus_passkey.py [--config default] [--checkpoint RUN_DIR|none]
        [--steps 60] [--set train.tasks.passkey=0.6 --set train.lens.listwise_weight=1 ...]
        [--lengths 4096] [--trials 8] [--diagnose]
With ``--checkpoint none`` GistNet is untrained (its initialisation is scale-matched mean
pooling) and LensNet learns from scratch: the question is then only whether LensNet finds
the needle. ``--diagnose`` prints, after training, one line per trial: the needle entry's
LensNet score and rank among the initial assembly's gists (and the likelihood rule's), then,
for ``megacontext`` and ``likelihood_focus``, whether the key was copied and which raw blocks
outside the tail the final window holds (block offsets from the needle's): it tells a miss
of retrieval (the needle never raw) from a miss of composition (raw, but with the wrong
company).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from megacontext.config import derive_seed, load_config
from megacontext.data import TaskMixture, WindowSampler, prepare_dataset
from megacontext.eval.passkey import answer_correct, passkey_examples, passkey_grid
from megacontext.focus.lens import score_window
from megacontext.focus.likelihood import block_gains, entry_scores
from megacontext.focus.policies import FocusSettings, PolicyRequest, initial_context, policy_window
from megacontext.focus.source import build_source
from megacontext.modules import Modules
from megacontext.training.loop import make_optimizer
from megacontext.training.phases import StepOutput, label_step, lens_examples, lens_step
from megacontext.working_context import WorkingContext, tail_start_of


def grid(mods: Modules, cfg, policies: list[str]) -> dict[tuple[int, float, str], float]:
    settings = FocusSettings.from_config(cfg, greedy=True)
    filler = prepare_dataset(cfg, progress=False).documents("test")
    rows = passkey_grid(mods, settings, cfg.eval, filler, [cfg.focus.budget], policies, cfg.seed, session=False)
    return {(r["history_tokens"], r["depth"], r["policy"]): r["accuracy"] for r in rows}


def _entry_at(wc: WorkingContext, pos: int) -> int:
    starts, ends = wc.spans()
    return int(np.flatnonzero((starts <= pos) & (pos < ends))[0])


@torch.no_grad()
def diagnose(mods: Modules, cfg) -> None:
    """One line per passkey trial: retrieval (needle rank) vs composition (raw blocks kept)."""
    settings = FocusSettings.from_config(cfg, greedy=True)
    K, mode = settings.shape.block_size, settings.focus.position_mode
    filler = prepare_dataset(cfg, progress=False).documents("test")
    for (n, depth, trial), ex in passkey_examples(cfg.eval, mods.base.tokenizer, filler, cfg.seed, "passkey", K):
        source = build_source(mods.base, mods.gistnet, ex.prompt, settings.shape)
        wc = initial_context(source.num_tokens, settings)
        with mods.plain():
            gains = block_gains(mods.base, ex.prompt, K, tail_start_of(n, K, settings.focus.tail_blocks))
        gist, i = wc.levels_array() > 0, _entry_at(wc, ex.needle_pos)
        line = f"{n:>6} {depth:.2f} {trial:>3}  needle LOD{wc.levels_array()[i]}"
        for name, s in (("lens", score_window(wc, source, mods.lensnet, mode)), ("rule", entry_scores(wc, gains))):
            line += f"  {name} {s[i]:+.2f} rank {int((s[gist] > s[i]).sum())}"
        for policy in ("megacontext", "likelihood_focus"):
            rng = np.random.default_rng(derive_seed(cfg.seed, "passkey-policy", policy, settings.budget, n, depth, trial))
            pw = policy_window(policy, PolicyRequest(mods, settings, ex.prompt, source, len(ex.answer), rng))
            ok = answer_correct(mods.base, [pw.prefix], ex.answer)[0]
            starts, _ = pw.wc.spans()
            raw = starts[(pw.wc.levels_array() == 0) & (starts < pw.wc.tail_start)]
            blocks = sorted({int(b) // K - ex.needle_pos // K for b in raw})
            line += f" | {policy} {'hit' if ok else 'miss'} raw {','.join(map(str, blocks)) or '-'}"
        print(line, flush=True)


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
    ap.add_argument("--diagnose", action="store_true", help="after training: one line per trial (see above)")
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
    if args.diagnose:
        diagnose(mods, cfg)


if __name__ == "__main__":
    main()
