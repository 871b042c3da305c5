"""`eval`, `report`, `run`: measure a trained system, write its report, or do everything."""

from __future__ import annotations

import argparse
from pathlib import Path

from megacontext.cli import add_checkpoint, add_common, load_args_config
from megacontext.errors import MegaContextError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="loss@H per policy and budget, passkey accuracy, timing -> eval.json",
        description="Compare context policies at the same budget W on held-out long documents: "
        "reference (full history at LOD0, as far as the base's context allows), recency (newest W "
        "tokens), sinks (first eval.sinks tokens + newest), uniform_gists (tail raw, the rest gists, "
        "no LensNet), random_focus (the allocator on random scores), similarity_focus (the allocator "
        "on each entry's similarity to the newest block, training-free), likelihood_focus (the allocator on how much "
        "each raw block raises the frozen base's likelihood of the newest tokens, training-free) and megacontext (LensNet + "
        "allocator). Reports loss@H, ΔNLL vs reference, the share of the recency->reference gap "
        "closed, the oracle_focus ceiling (a search that peeks at the horizon; never a policy), "
        "passkey and multi-key recall exact-match accuracy (history length x depth; every policy built "
        "over the whole prompt, plus megacontext_session: the window a runtime session builds, one block "
        "held back for decoding) and timing. "
        "Writes DIR/eval.json and prints a table.",
    )
    add_common(p)
    add_checkpoint(p)
    p.add_argument("--budgets", default=None, metavar="A,B,...", help="budgets W (default: eval.budgets)")
    p.add_argument("--data", default=None, metavar="SOURCE",
                   help="evaluate on another source (python-stdlib | files:GLOB | jsonl:PATH[:field] | "
                   "hf:NAME[:split]), prepared with the base's tokenizer and cached")
    p.add_argument("--split", default=None, choices=("train", "val", "test"),
                   help="default: eval.split; with --data, every document of that corpus")
    p.add_argument("--cursor", default=None, choices=("random", "end"), help="default: eval.cursor")
    p.add_argument("--windows", type=int, default=None, metavar="N", help="windows (default: eval.windows)")
    p.add_argument("--ablate", default=None, choices=("gistnet", "lensnet", "lora"),
                   help="swap one trained module for its untrained / absent version")
    p.add_argument("--oracle-windows", type=int, default=None, metavar="N",
                   help="windows of the oracle_focus ceiling: greedy counterfactual expands chosen on the first "
                   "half of each horizon, every policy scored on the second half (default: eval.oracle_windows; 0: off)")
    p.add_argument("--passkey-only", action="store_true",
                   help="run only the passkey and multi-key grids (and timing)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default: the checkpoint's run folder; a subfolder of it for "
                   "--ablate/--data/--passkey-only; $MEGACONTEXT_ARTIFACT_ROOT/eval/untrained without one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "report",
        help="write RUN_DIR/report.md with plots",
        description="Write RUN_DIR/report.md with PNG plots (RUN_DIR/report/): the evaluation table, "
        "loss@H vs budget per policy, passkey heatmaps, training curves per phase and cycle, swap "
        "rate and residency over training, and the level-of-detail map of a session run with the "
        "run's trained modules. Missing inputs are listed in the report.",
    )
    add_common(p)
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="a run folder (made by train or run)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "run",
        help="prepare -> pretrain-base -> train -> eval -> report, in a new run folder",
        description="The whole pipeline: prepare the data, pretrain the embedded base (both cached), "
        "train (warm start + JT1/JT2/JT3 cycles), evaluate into RUN_DIR/eval.json and write "
        "RUN_DIR/report.md. RUN_DIR defaults to a new folder under $MEGACONTEXT_ARTIFACT_ROOT/runs.",
    )
    add_common(p)
    p.add_argument("--out", default=None, metavar="RUN_DIR", help="run folder (default: a new one)")
    p.set_defaults(func=cmd_run)


def _budgets(text: str) -> list[int]:
    try:
        budgets = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MegaContextError(f"--budgets expects integers separated by commas, got {text!r}") from None
    if not budgets:
        raise MegaContextError("--budgets is empty")
    return budgets


def default_out_dir(cfg, checkpoint: Path | None, variant: list[str]) -> Path:
    """The checkpoint's run folder (a subfolder per variant), else artifacts/eval/untrained."""
    if checkpoint is not None and checkpoint.parent.name == "checkpoints":
        root = checkpoint.parent.parent
    else:
        root = cfg.artifact_root / "eval" / "untrained"
    return root / ("eval-" + "-".join(variant)) if variant else root


def cmd_eval(args: argparse.Namespace) -> int:
    extra = [f"eval.split={args.split}"] if args.split else []
    extra += [f"eval.cursor={args.cursor}"] if args.cursor else []
    cfg = load_args_config(args, extra)  # first: it may switch the hub to offline mode before the imports below

    from megacontext.eval.evaluate import EvalOptions, evaluate
    from megacontext.eval.results import write_eval_json
    from megacontext.modules import Modules

    opts = EvalOptions.from_config(cfg)
    if args.budgets:
        opts.budgets = _budgets(args.budgets)
    if args.windows is not None:
        if args.windows < 1:
            raise MegaContextError(f"--windows must be at least 1, got {args.windows}")
        opts.windows = args.windows
    if args.oracle_windows is not None:
        if args.oracle_windows < 0:
            raise MegaContextError(f"--oracle-windows must be >= 0, got {args.oracle_windows}")
        opts.oracle_windows = args.oracle_windows
    opts.data = args.data
    if args.data is not None and args.split is None:
        opts.split = None  # a corpus of one's own: every document of it
    opts.loss = not args.passkey_only
    modules = Modules.load(cfg, args.checkpoint, args.ablate)
    run = evaluate(cfg, modules, opts, progress=not args.no_progress)
    variant = [f"ablate-{args.ablate}"] if args.ablate else []
    variant += [f"data-{run.json['data']}"] if args.data else []
    variant += ["passkey"] if args.passkey_only else []
    out = Path(args.out) if args.out else default_out_dir(cfg, modules.checkpoint, variant)
    path = write_eval_json(run.json, out / "eval.json")
    _print_table(run)
    print(f"wrote {path}")
    return 0


def _print_table(run) -> None:
    """The eval table (each difference with its paired standard error) and the acceptance check."""
    from megacontext.eval.results import acceptance_lines, format_table

    print(format_table(run.json))
    for line in acceptance_lines(run.json):
        print(line)


def make_report(cfg, run_dir: Path) -> Path:
    """report.md for ``run_dir`` (the level-of-detail session uses the run's modules)."""
    from megacontext.eval.report import ReportInputs, session_traces_for_run, write_report

    trace, passkey, problem = session_traces_for_run(cfg, run_dir)
    return write_report(run_dir, ReportInputs.from_run(run_dir, trace, problem, passkey), cfg.tree.levels)


def cmd_report(args: argparse.Namespace) -> int:
    from megacontext.config import load_config
    from megacontext.hub import prefer_offline

    run_dir = Path(args.run).expanduser().resolve()
    if not run_dir.is_dir():
        raise MegaContextError(f"no run folder at {run_dir}")
    snapshot = run_dir / "config.yaml"
    if snapshot.is_file():
        cfg = load_config(snapshot, args.overrides)
        prefer_offline(cfg)
    else:
        cfg = load_args_config(args)
    print(f"wrote {make_report(cfg, run_dir)}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_args_config(args)  # first: it may switch the hub to offline mode before the imports below

    from megacontext.cli.train import locked_run
    from megacontext.data import prepare_dataset
    from megacontext.eval.evaluate import EvalOptions, evaluate
    from megacontext.eval.results import write_eval_json
    from megacontext.modules import Modules
    from megacontext.training.loop import train
    from megacontext.training.pretrain_base import pretrain_base

    with locked_run(cfg, args.out, None) as run_dir:
        prepare_dataset(cfg)
        if cfg.base.name == "embedded":
            pretrain_base(cfg)
        train(cfg, out_dir=run_dir)
        modules = Modules.load(cfg, str(run_dir))
        run = evaluate(cfg, modules, EvalOptions.from_config(cfg))
        write_eval_json(run.json, run_dir / "eval.json")
        report = make_report(cfg, run_dir)
    _print_table(run)
    print(f"report: {report}")
    return 0
