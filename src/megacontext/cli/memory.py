"""`ingest`, `inspect`, `generate`: work with a MegaContext tree on disk."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from megacontext.cli import add_checkpoint, add_common, load_args_config
from megacontext.errors import MegaContextError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest",
        help="tokenize text and append it to a tree on disk",
        description="Tokenize a UTF-8 text file (or stdin with '-') with the configured base's "
        "tokenizer and append it to a MegaContext tree on disk, computing the gists of every "
        "completed block. The tree is created if DIR does not exist (with tree.levels gist "
        "levels; it grows more when a session's budget needs them); ingesting more text later "
        "appends to the same history. Any length fits: see generate --help for the budget.",
    )
    add_common(p)
    p.add_argument("--tree", required=True, metavar="DIR", help="tree folder (created if missing)")
    p.add_argument("--input", required=True, metavar="FILE", help="UTF-8 text file, or - for stdin")
    add_checkpoint(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser(
        "inspect",
        help="show a tree's size, levels and gist version",
        description="Report a tree's token count, gist levels (including the ones it grew), "
        "nodes per level, gist version and bytes on disk. Needs no model.",
    )
    add_common(p)
    p.add_argument("--tree", required=True, metavar="DIR", help="tree folder")
    p.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "generate",
        help="continue a session: prompt in, continuation out",
        description="Open a tree as a session, append the prompt to its history, and generate a "
        "continuation with the base reading a working context of at most --budget cost units "
        "(raw tokens where the focus policy wants detail, gists elsewhere). The prompt and the "
        "continuation become part of the history, committed once per block of K tokens and "
        "when the command ends (also on Ctrl-C or SIGTERM). When the history outgrows the "
        "budget at the tree's levels, the tree grows the next level (LOD3, LOD4, ...), so any "
        "history fits a budget of at least (tail_blocks + 1) * K - 1 + (K - 1) * D, for "
        "histories of fewer than K**(D + 1) tokens: at the defaults (K=32, tail_blocks=2), 188 serves a "
        "million tokens and 256 every history below 2**30 (1.07e9; 3.4e10 with tail_blocks=1).",
    )
    add_common(p)
    p.add_argument("--tree", required=True, metavar="DIR", help="tree folder (made by ingest)")
    p.add_argument("--prompt", required=True, help="text to append before generating")
    p.add_argument("--budget", type=int, default=None,
                   help="W_max in cost units, at most the base's context length (default: focus.budget)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help=">= 0; 0 = greedy (default: %(default)s)")
    add_checkpoint(p)
    p.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    p.set_defaults(func=cmd_generate)


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Inside the block SIGTERM raises KeyboardInterrupt, so a session closes (committing its
    tree) as it does on Ctrl-C."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt("terminated (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _read_input(path: str) -> str:
    try:
        raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as e:
        raise MegaContextError(f"cannot read input {path!r}: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MegaContextError(
            f"input {path!r} is not UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r}); nothing was ingested"
        ) from None


def cmd_ingest(args: argparse.Namespace) -> int:
    cfg = load_args_config(args)  # first: it may switch the hub to offline mode before the imports below
    text = _read_input(args.input)  # before touching the tree

    from tqdm import tqdm

    from megacontext.api import MegaContext

    mc = MegaContext.load(cfg, args.checkpoint)
    ids = mc.encode(text)
    with _sigterm_interrupts(), mc.session(args.tree) as session:  # an interrupted or failing append says what the tree kept
        before = session.num_tokens
        with tqdm(total=len(ids), unit="tok", desc="ingest", disable=not sys.stderr.isatty()) as bar:
            session.append(ids, progress=bar.update)
        info = session.tree_info()
    print(
        f"ingested {len(ids)} tokens into {args.tree} (history {before} -> {info.tokens} tokens; "
        f"gists per level {info.nodes_per_level}; modules: {mc.checkpoint or 'untrained'})"
    )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from megacontext.api import inspect_tree

    info = inspect_tree(args.tree).to_dict()
    if args.json:
        print(json.dumps(info))
    else:
        print(f"tree {args.tree}")
        print(f"  tokens         {info['tokens']}")
        print(f"  gist levels    {info['levels']}")
        for k, v in info["nodes_per_level"].items():
            print(f"  LOD{k} gists     {v}")
        print(f"  gist version   {info['gist_version']}")
        print(f"  bytes on disk  {info['bytes_on_disk']}")
        print(f"  max token id   {info['max_token_id']} (generate and ingest check it against the base's vocabulary)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise MegaContextError("the prompt is not valid UTF-8; nothing was changed") from None
    extra = [f"focus.budget={args.budget}"] if args.budget is not None else []
    cfg = load_args_config(args, extra)  # first: it may switch the hub to offline mode before the imports below

    from megacontext.api import MegaContext
    from megacontext.runtime import check_sampling

    check_sampling(args.max_new_tokens, args.temperature)  # before the model loads
    if not Path(args.tree).exists():
        raise MegaContextError(f"no tree at {args.tree}: create one with `megacontext ingest --tree {args.tree} --input FILE`")
    mc = MegaContext.load(cfg, args.checkpoint)
    with _sigterm_interrupts(), mc.session(args.tree, budget=cfg.focus.budget, create=False) as session:  # budget checked first
        text = session.generate(args.prompt, args.max_new_tokens, temperature=args.temperature)
        summary = session.window().summary()
    if args.json:
        print(json.dumps({"text": text, **summary}))
    else:
        print(text)
        print(
            f"\n[window: cost {summary['cost']}/{summary['budget']}, entries per level "
            f"{summary['entries_per_level']}, covers {summary['covered_tokens']}/"
            f"{summary['history_tokens']} tokens, {summary['refocuses']} refocuses, "
            f"{summary['actions']} actions; modules: {mc.checkpoint or 'untrained'}]",
            file=sys.stderr,
        )
    return 0
