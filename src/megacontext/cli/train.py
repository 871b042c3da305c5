"""`train`: warm start, then alternating cycles JT1 (GistNet) -> JT2 (LensNet) -> JT3 (LoRA)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from megacontext.cli import add_common, load_args_config
from megacontext.config import Config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="alternating training of GistNet, LensNet and LoRA (checkpointed, resumable)",
        description="Warm start (GistNet on random replaced spans, LensNet on counterfactual "
        "labels), then train.cycles cycles of JT1 (GistNet) -> JT2 (LensNet, labels regenerated "
        "on-policy) -> JT3 (LoRA). After every phase: validation loss@H at focus.budget "
        "(megacontext vs recency vs reference) and a checkpoint under RUN_DIR/checkpoints/. "
        "A killed run continues exactly with --resume latest.",
    )
    add_common(p)
    p.add_argument("--cycles", type=int, default=None, metavar="N", help="override train.cycles")
    p.add_argument(
        "--out",
        default=None,
        metavar="RUN_DIR",
        help="run folder (default: a new <artifact_root>/runs/<time>-<config hash>/)",
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="latest|PATH",
        help="continue from the run's latest valid checkpoint, or from a checkpoint folder",
    )
    p.add_argument("--no-progress", action="store_true", help="no live progress lines")
    p.set_defaults(func=cmd_train)


@contextmanager
def locked_run(cfg: Config, out_dir: str | None, resume: str | None) -> Iterator[Path]:
    """The run folder training will use, created and write-locked for the block (a second
    writer of the same folder is refused at once, naming this process). Under ``accelerate
    launch`` every process gets the same folder and the main process, the one that writes,
    holds the lock; when it cannot take it, every process stops with its error."""
    from megacontext.lock import WriterLock
    from megacontext.training.loop import on_main, processes, resolve_run_dir

    run_dir = resolve_run_dir(cfg, out_dir, resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as held:

        def lock() -> None:
            held.enter_context(WriterLock(run_dir, "run"))

        on_main(processes(cfg), lock)  # before train()'s first collective
        yield run_dir


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_args_config(args)  # first: it may switch the hub to offline mode before the imports below

    from megacontext.training.loop import processes, train

    with locked_run(cfg, args.out, args.resume) as run_dir:
        summary = train(cfg, out_dir=run_dir, cycles=args.cycles, resume=args.resume, progress=not args.no_progress)
    if not processes(cfg).is_main_process:  # under accelerate launch: the main process reports
        return 0
    final = summary["final"]
    print(f"run         {summary['run_dir']}")
    print(f"checkpoint  {summary['checkpoint']}")
    if final:
        print(
            f"loss@H      megacontext {final['loss_megacontext']:.4f}  recency {final['loss_recency']:.4f}  "
            f"reference {final['loss_reference']:.4f}  (budget {cfg.focus.budget})"
        )
    if summary["stopped_early"]:
        print("stopped early: validation loss@H plateaued")
    return 0
